"""Text <-> a model's dictionary indices, through GPT-2 BPE, a sentencepiece model or a Hugging Face
model's own tokenizer."""
import os


class Tokenizer:
    """Text -> the symbols a fairseq ``dict.txt`` lists: GPT-2 BPE ids as decimal strings (fairseq's GPT-2
    dictionary), sentencepiece pieces, or a Hugging Face tokenizer's ids as the symbols of
    ``longmem-hf-tokens dict`` (ids 0-3 as fairseq's specials, the others as numbers).
    ``specials``: the tokenizer's own (bos, eos) symbols where it has them (Hugging Face), else None.
    A missing file is a ``FileNotFoundError`` naming it."""

    def __init__(self, gpt2_bpe=None, sentencepiece_model=None, hf_tokenizer=None):
        self.specials = None
        if sum(map(bool, (gpt2_bpe, sentencepiece_model, hf_tokenizer))) > 1:
            raise ValueError("choose one tokenizer: GPT-2 BPE files (--gpt2-bpe), a sentencepiece model "
                             "(--sentencepiece-model) or a Hugging Face model's (--hf-tokenizer)")
        if hf_tokenizer:
            self._hf(hf_tokenizer)
        elif gpt2_bpe:
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            files = [os.path.join(gpt2_bpe, name) for name in ("encoder.json", "vocab.bpe")]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"GPT-2 BPE files missing: {missing}; the folder (--gpt2-bpe) must hold "
                                        f"encoder.json and vocab.bpe (this repository ships them in data/gpt2_bpe)")
            bpe = get_encoder(*files)
            self.pieces = lambda text: [str(i) for i in bpe.encode(text)]
            self.text_of = lambda sym: bpe.decode([int(sym)]) if sym.isdigit() else sym
        elif sentencepiece_model:
            import sentencepiece as spm

            if not os.path.isfile(sentencepiece_model):
                raise FileNotFoundError(f"sentencepiece model {sentencepiece_model!r} does not exist")
            sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
            self.pieces = lambda text: sp.encode(text, out_type=str)
            self.text_of = lambda sym: sym.replace("\u2581", " ")
        else:
            raise ValueError("choose the tokenizer: GPT-2 BPE files (--gpt2-bpe DIR), a sentencepiece model "
                             "(--sentencepiece-model FILE) or a Hugging Face model's (--hf-tokenizer PATH)")

    def _hf(self, path):
        from longmem.models.hf_causal_lm import HFTokens, is_hf_path, load_hf_tokenizer

        if not (os.path.isdir(path) or is_hf_path(path)):
            raise FileNotFoundError(f"--hf-tokenizer {path!r} is neither a .gguf file nor a model folder")
        tok = load_hf_tokenizer(path)
        self.vocab_size = len(tok)
        self.pieces = lambda text: HFTokens.symbols(tok.encode(text, add_special_tokens=False))
        self.text_of = lambda sym: tok.decode([int(sym)]) if sym.isdigit() else sym
        ids = (tok.bos_token_id, tok.eos_token_id)
        if None in ids:
            raise ValueError(f"the tokenizer of {path} names no bos/eos token: the ICL protocol needs both")
        self.specials = tuple(HFTokens.symbols(list(ids)))


class TextCodec:
    """Text <-> ``dictionary`` indices; ``bos``/``eos``: the indices that open and close a demonstration
    (the dictionary's ``<s>``/``</s>``, or a Hugging Face tokenizer's own bos/eos)."""

    def __init__(self, dictionary, gpt2_bpe=None, sentencepiece_model=None, hf_tokenizer=None, tokenizer=None):
        self.dictionary = dictionary
        self.tokenizer = tokenizer or Tokenizer(gpt2_bpe, sentencepiece_model, hf_tokenizer)
        specials = self.tokenizer.specials
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
