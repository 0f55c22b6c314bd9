"""The one tokenizer interface: text -> the symbols a fairseq ``dict.txt`` lists, through GPT-2 BPE, a
sentencepiece model or a Hugging Face model's own tokenizer. Every command that encodes text uses it (the
Pile preprocessing, the long-range benchmark, the ICL prompts, ``longmem-hf-tokens``).

Symbols: GPT-2 BPE ids as decimal strings (fairseq's GPT-2 dictionary), sentencepiece pieces, or a Hugging
Face tokenizer's ids as written by ``longmem-hf-tokens dict`` (ids 0-3 as fairseq's specials, the others as
decimal strings).

* ``pieces(text)``: a whole text as the tokenizer cuts it (newlines included, where it encodes them);
* ``word(w)``: a word as it follows a space (cached), and ``line(text)``: a line's words so, in order;
* ``text_of(symbol)``: the text of one symbol; ``decode(symbols)``: the text of a sequence (bytes split over
  symbols joined; symbols the tokenizer does not know, e.g. fairseq's specials, left out); ``specials``: the tokenizer's own (bos, eos) symbols where it
  has them (Hugging Face), else None; ``newline``: the symbols of a line break where the tokenizer encodes
  one (Hugging Face), else None.

A missing file is a ``ConfigError`` naming it.
"""
import os
from typing import List, Optional, Tuple

from longmem.errors import ConfigError


def hf_symbols(ids: List[int]) -> List[str]:
    """A Hugging Face tokenizer's ids as the symbols of ``longmem-hf-tokens dict``."""
    from longmem.models.hf_causal_lm import FAIRSEQ_SPECIALS

    return [FAIRSEQ_SPECIALS[i] if i < 4 else str(i) for i in ids]


class Tokenizer:
    def __init__(self, gpt2_bpe: Optional[str] = None, sentencepiece_model: Optional[str] = None,
                 hf_tokenizer: Optional[str] = None):
        self.specials: Optional[Tuple[str, str]] = None
        self.newline: Optional[List[str]] = None
        self.vocab_size: Optional[int] = None
        self._words = {}
        self.kind = "hf" if hf_tokenizer else "gpt2" if gpt2_bpe else "sentencepiece"
        if sum(map(bool, (gpt2_bpe, sentencepiece_model, hf_tokenizer))) != 1:
            raise ConfigError("choose one tokenizer: GPT-2 BPE files (--gpt2-bpe DIR), a sentencepiece model "
                              "(--sentencepiece-model FILE) or a Hugging Face model's (--hf-tokenizer PATH)")
        if hf_tokenizer:
            self._hf(hf_tokenizer)
        elif gpt2_bpe:
            self._gpt2(gpt2_bpe)
        else:
            self._sentencepiece(sentencepiece_model)

    def _gpt2(self, folder: str) -> None:
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        files = [os.path.join(folder, name) for name in ("encoder.json", "vocab.bpe")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"GPT-2 BPE files missing: {missing}; the folder (--gpt2-bpe) must hold encoder.json "
                              f"and vocab.bpe (this repository ships them in data/gpt2_bpe)")
        bpe = get_encoder(*files)
        self.pieces = lambda text: [str(i) for i in bpe.encode(text)]
        self._word = lambda w: self.pieces(" " + w)
        self.text_of = lambda sym: bpe.decode([int(sym)]) if sym.isdigit() else sym
        self.decode = lambda symbols: bpe.decode([int(s) for s in symbols if s.isdigit()])

    def _sentencepiece(self, model_file: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise ConfigError(f"sentencepiece model {model_file!r} does not exist (train one: longmem-spm-bpe train)")
        sp = spm.SentencePieceProcessor(model_file=model_file)
        self.pieces = lambda text: sp.encode(text, out_type=str)
        self._word = self.pieces  # sentencepiece starts every word with its space mark
        self.text_of = lambda sym: sym.replace("\u2581", " ")
        self.decode = lambda symbols: sp.decode_pieces([s for s in symbols if sp.piece_to_id(s) != sp.unk_id()])

    def _hf(self, path: str) -> None:
        from longmem.models.hf_causal_lm import is_hf_path, load_hf_tokenizer

        if not (os.path.isdir(path) or is_hf_path(path)):
            raise ConfigError(f"--hf-tokenizer {path!r} is neither a .gguf file nor a model folder")
        files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in files):
            raise ConfigError(f"--hf-tokenizer {path} holds no tokenizer files ({', '.join(files)}): give the model's "
                              f".gguf file or the folder it was saved to")
        try:
            tok = load_hf_tokenizer(path)
        except Exception as e:  # transformers' and gguf's own errors: many kinds, many lines
            detail = " ".join(str(e).split())[:160]
            raise ConfigError(f"--hf-tokenizer {path}: no tokenizer could be read from it ({type(e).__name__}: "
                              f"{detail}); give the model's .gguf file or the folder it was saved to") from None
        self.vocab_size = len(tok)
        self.pieces = lambda text: hf_symbols(tok.encode(text, add_special_tokens=False))
        self._word = lambda w: self.pieces(" " + w)
        self.text_of = lambda sym: tok.decode([int(sym)]) if sym.isdigit() else sym
        self.decode = lambda symbols: tok.decode([int(s) for s in symbols if s.isdigit()])
        self.newline = self.pieces("\n")
        if None not in (tok.bos_token_id, tok.eos_token_id):
            self.specials = tuple(hf_symbols([tok.bos_token_id, tok.eos_token_id]))

    def word(self, w: str) -> List[str]:
        if w not in self._words:
            self._words[w] = self._word(w)
        return self._words[w]

    def line(self, text: str) -> List[str]:
        return [p for w in text.split() for p in self.word(w)]
