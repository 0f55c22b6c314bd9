"""The adaptation mix (longmem/corpus/mix.py): long-range documents whole, broad pieces up to a share of the tokens."""
from collections import Counter

import pytest

from longmem.corpus.mix import mix, read_documents, write_documents


def _docs(prefix, lengths):
    return [[f"{prefix}{d}_{i}" for i in range(n)] for d, n in enumerate(lengths)]


def test_share_zero_keeps_the_long_range_documents_in_order():
    longrange = _docs("L", [50, 60, 70])
    assert mix(longrange, _docs("B", [500]), 0.0) == longrange


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_broad_pieces_reach_the_share_and_long_range_documents_stay_whole(share):
    longrange = _docs("L", [300, 200, 400, 100])
    broad = _docs("B", [5000, 1234, 16, 2600, 17, 900])
    docs = mix(longrange, broad, share, piece_tokens=256, seed=3)
    kept = [d for d in docs if d[0].startswith("L")]
    assert Counter(map(tuple, kept)) == Counter(map(tuple, longrange))
    pieces = [d for d in docs if d[0].startswith("B")]
    lr_tokens = sum(map(len, longrange))
    taken = sum(map(len, pieces))
    wanted = share / (1 - share) * lr_tokens
    # drawn until the share is reached: all of them reach it, all but one do not
    assert taken >= wanted and taken - max(map(len, pieces)) < wanted
    for piece in pieces:
        d, i = map(int, piece[0][1:].split("_"))
        # a consecutive run of one broad document, starting at a multiple of the piece size
        assert piece == broad[d][i:i + len(piece)] and i % 256 == 0
        assert 17 <= len(piece) <= 256
    assert len({tuple(p) for p in pieces}) == len(pieces)  # no piece twice


def test_the_broad_text_running_out_gives_all_of_it_and_a_seed_fixes_the_order():
    longrange = _docs("L", [1000] * 3)
    broad = _docs("B", [100, 10])  # the 10-token document is too short for a piece
    docs = mix(longrange, broad, 0.9, piece_tokens=64, seed=1)
    assert sum(len(d) for d in docs if d[0].startswith("B")) == 100
    assert mix(longrange, broad, 0.9, piece_tokens=64, seed=1) == docs
    assert mix(longrange, _docs("B", [4000]), 0.5, seed=2) != mix(longrange, _docs("B", [4000]), 0.5, seed=3)


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="broad share"):
        mix(_docs("L", [10]), _docs("B", [10]), share)


def test_documents_read_back_as_written(tmp_path):
    docs = _docs("x", [3, 1, 5])
    write_documents(tmp_path / "a.bpe", docs)
    assert (tmp_path / "a.bpe").read_text().split("\n\n") == ["x0_0 x0_1 x0_2", "x1_0", "x2_0 x2_1 x2_2 x2_3 x2_4\n"]
    assert read_documents(tmp_path / "a.bpe") == docs


def test_mix_marked_marks_the_broad_pieces_and_keeps_the_order_of_mix(tmp_path):
    from longmem.corpus.mix import mix_marked, write_marks
    from longmem.tasks.stream_dataset import read_marks

    longrange = _docs("L", [300, 200, 400, 100])
    broad = _docs("B", [5000, 1234, 2600])
    marked = mix_marked(longrange, broad, 0.5, piece_tokens=256, seed=4)
    assert [doc for doc, _ in marked] == mix(longrange, broad, 0.5, piece_tokens=256, seed=4)
    assert [m for _, m in marked] == [doc[0].startswith("B") for doc, _ in marked]
    assert sum(m for _, m in marked) > 1 and mix_marked(longrange, broad, 0.0) == [(d, False) for d in longrange]
    path = str(tmp_path / "train.marks")
    write_marks(path, [m for _, m in marked])
    assert read_marks(path).tolist() == [m for _, m in marked]
