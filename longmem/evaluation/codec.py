"""Text <-> a model's dictionary indices, through GPT-2 BPE or a sentencepiece model."""
import os


class Tokenizer:
    """Text -> the symbols a fairseq ``dict.txt`` lists: GPT-2 BPE ids as decimal strings (fairseq's GPT-2
    dictionary) or sentencepiece pieces. A missing file is a ``FileNotFoundError`` naming it."""

    def __init__(self, gpt2_bpe=None, sentencepiece_model=None):
        if gpt2_bpe:
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
            raise ValueError("choose the tokenizer: GPT-2 BPE files (--gpt2-bpe DIR) or a sentencepiece model "
                             "(--sentencepiece-model FILE)")


class TextCodec:
    def __init__(self, dictionary, gpt2_bpe=None, sentencepiece_model=None):
        self.dictionary = dictionary
        self.tokenizer = Tokenizer(gpt2_bpe, sentencepiece_model)

    def encode(self, text):
        return [self.dictionary.index(p) for p in self.tokenizer.pieces(text)]

    def decode(self, index):
        return self.tokenizer.text_of(self.dictionary[index])

    def first_token_after(self, head, word):
        """The first token of ``word`` as it follows ``head`` in a prompt."""
        full, prefix = self.encode(head + " " + word), self.encode(head)
        return full[len(prefix)] if full[: len(prefix)] == prefix else self.encode(" " + word)[0]
