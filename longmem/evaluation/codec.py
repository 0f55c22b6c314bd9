"""Text <-> a model's dictionary indices, through GPT-2 BPE or a sentencepiece model."""
import os


class TextCodec:
    def __init__(self, dictionary, gpt2_bpe=None, sentencepiece_model=None):
        self.dictionary = dictionary
        if gpt2_bpe:
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            files = [os.path.join(gpt2_bpe, name) for name in ("encoder.json", "vocab.bpe")]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"GPT-2 BPE files missing: {missing}; the folder must hold encoder.json and "
                                        f"vocab.bpe (this repository ships them in data/gpt2_bpe)")
            self.bpe = get_encoder(*files)
            self._pieces = lambda text: [str(i) for i in self.bpe.encode(text)]
            self._text = lambda sym: self.bpe.decode([int(sym)]) if sym.isdigit() else sym
        elif sentencepiece_model:
            import sentencepiece as spm

            if not os.path.isfile(sentencepiece_model):
                raise FileNotFoundError(f"sentencepiece model {sentencepiece_model!r} does not exist")
            sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
            self._pieces = lambda text: sp.encode(text, out_type=str)
            self._text = lambda sym: sym.replace("\u2581", " ")
        else:
            raise ValueError("choose the model's tokenizer: GPT-2 BPE files or a sentencepiece model")

    def encode(self, text):
        return [self.dictionary.index(p) for p in self._pieces(text)]

    def decode(self, index):
        return self._text(self.dictionary[index])

    def first_token_after(self, head, word):
        """The first token of ``word`` as it follows ``head`` in a prompt."""
        full, prefix = self.encode(head + " " + word), self.encode(head)
        return full[len(prefix)] if full[: len(prefix)] == prefix else self.encode(" " + word)[0]
