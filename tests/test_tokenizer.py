"""The one tokenizer interface (longmem/tokenizer.py) against the GPT-2 BPE it wraps."""
import os

import pytest

from longmem.errors import ConfigError
from longmem.tokenizer import Tokenizer


def test_gpt2_pieces_words_and_lines_are_the_bpe_ids(repo_data):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    folder = os.path.join(repo_data, "gpt2_bpe")
    bpe = get_encoder(os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe"))
    tok = Tokenizer(gpt2_bpe=folder)
    text = "Remember : the fox is red ."
    assert tok.pieces(text) == [str(i) for i in bpe.encode(text)]
    assert tok.word("fox") == [str(i) for i in bpe.encode(" fox")]  # a word as it follows a space
    assert tok.line(text) == tok.pieces(" " + text)  # GPT-2 cuts at spaces: a line is its words in order
    assert tok.word("fox") is tok.word("fox")  # cached
    assert "".join(tok.text_of(s) for s in tok.pieces(text)) == text
    assert tok.specials is None and tok.newline is None and tok.kind == "gpt2"


def test_one_tokenizer_and_existing_files_are_required(tmp_path):
    with pytest.raises(ConfigError, match="choose one tokenizer"):
        Tokenizer()
    with pytest.raises(ConfigError, match="choose one tokenizer"):
        Tokenizer(gpt2_bpe=str(tmp_path), sentencepiece_model="m.model")
    with pytest.raises(ConfigError, match="GPT-2 BPE files missing"):
        Tokenizer(gpt2_bpe=str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer(sentencepiece_model=str(tmp_path / "none.model"))
