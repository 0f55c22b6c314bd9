"""Text <-> a model's dictionary indices, through the project's one tokenizer interface
(``longmem.tokenizer.Tokenizer``: GPT-2 BPE, a sentencepiece model or a Hugging Face model's own)."""
from longmem.errors import ConfigError
from longmem.tokenizer import Tokenizer


class TextCodec:
    """Text <-> ``dictionary`` indices; ``bos``/``eos``: the indices that open and close a demonstration
    (the dictionary's ``<s>``/``</s>``, or a Hugging Face tokenizer's own bos/eos)."""

    def __init__(self, dictionary, gpt2_bpe=None, sentencepiece_model=None, hf_tokenizer=None, tokenizer=None):
        self.dictionary = dictionary
        self.tokenizer = tokenizer or Tokenizer(gpt2_bpe, sentencepiece_model, hf_tokenizer)
        specials = self.tokenizer.specials
        if self.tokenizer.kind == "hf" and specials is None:
            raise ConfigError("the Hugging Face tokenizer names no bos/eos token: the ICL protocol needs both")
        self.bos, self.eos = (dictionary.bos(), dictionary.eos()) if specials is None else \
            (dictionary.index(specials[0]), dictionary.index(specials[1]))

    def encode(self, text):
        return [self.dictionary.index(p) for p in self.tokenizer.pieces(text)]

    def decode(self, index):
        return self.tokenizer.text_of(self.dictionary[index])

    def first_token_after(self, head, word):
        """The first token of ``word`` as it follows ``head`` in a prompt."""
        full, prefix = self.encode(head + " " + word), self.encode(head)
        return full[len(prefix)] if full[: len(prefix)] == prefix else self.encode(" " + word)[0]
