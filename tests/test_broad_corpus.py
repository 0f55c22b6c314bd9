"""The broad adaptation corpus: text cleaning on hand-made examples, the builder on a tiny package tree (exclusions,
held-out documents, the ICL overlap check, a source that cannot be fetched), its shards read back by
longmem-prepare-pile with their set names."""
import json
import logging
import os

import pytest

from longmem.commands import build_broad_corpus, prepare_pile
from longmem.corpus import contamination, sources, text as T
from longmem.paths import REPO


def test_unwrap_joins_wrapped_prose_and_keeps_code_lines():
    prose = "The quick brown\nfox jumps over\n\n    x = 1;\n    y = {2}\n\n  an indented paragraph of six words or\n  more on every line of it here"
    assert T.unwrap(prose).split("\n\n") == [
        "The quick brown fox jumps over", "x = 1;\ny = {2}",
        "an indented paragraph of six words or more on every line of it here"]


def test_markup_is_reduced_to_its_text():
    rst = ".. _target:\n\nTitle\n=====\n\nCall :func:`len` or see `the docs <http://x>`_ with ``code``.\n\n.. note::"
    assert T.unwrap(T.strip_rst(rst)) == "Title\n\nCall len or see the docs with code."
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<code> and L<text|perlfunc>\n\n=cut"
    assert T.unwrap(T.strip_pod(pod)) == "NAME\n\nperlfoo - bold and code and text"
    brown = "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc it's/pps+bez done/vbn ./.\n\n"
    assert T.untag_brown(brown) == 'The jury said "no evidence", and it\'s done.'
    page = "<html><head><title>x</title></head><body><div class='navheader'>Next</div><p>One &amp; two</p><pre>a\nb</pre></body></html>"
    assert T.html_text(page) == "One & two\n\n    a\n    b"
    asciidoc = "git-foo(1)\n==========\n\nNAME\n----\n[verse]\n== Summary\nit's ``quoted''"
    assert T.unwrap(T.strip_asciidoc(asciidoc)) == 'git-foo(1)\n\nNAME\n\nSummary\n\nit\'s "quoted"'


def test_long_texts_are_cut_at_paragraphs_and_short_ones_grouped():
    text = "\n\n".join(f"p{i} " + "w " * 9 for i in range(10))  # 10 paragraphs of 10 words
    docs = list(T.split_long(text, 30))
    assert [len(d.split("\n\n")) for d in docs] == [3, 3, 3, 1] and "\n\n".join(docs) == text
    assert list(T.group(["a b", "c", "d e f", "g"], 3)) == ["a b\n\nc", "d e f", "g"]


def test_dictd_base64_numbers():
    assert sources._b64("A") == 0 and sources._b64("E2") == 4 * 64 + 54 and sources._b64("B/") == 64 + 63


def test_icl_words_undo_the_treebank_splits():
    assert contamination.words("it 's a film that does n't work .") == contamination.words("It's a film that doesn't work.")


def _icl_sentence(min_words=12) -> str:
    """A real SST-2 evaluation sentence, with its treebank tokenisation undone as a writer would spell it."""
    with open(os.path.join(REPO, "data", "icl", "SST-2", "dev.tsv"), encoding="utf-8") as f:
        for line in list(f)[1:]:
            sentence = line.split("\t")[0]
            if len(sentence.split()) >= min_words and "'" not in sentence:
                return sentence.replace(" ,", ",").replace(" .", ".")
    raise AssertionError("no long SST-2 sentence")


def _package_tree(root):
    """Tiny unpacked packages of three sources, in their real layouts."""
    books = root / "gutenberg" / "package" / "gutenberg"
    books.mkdir(parents=True)
    body = "[A Book by Someone 1900]\n\nIt was a dark and\nstormy night.\n\nThe end came soon.\n"
    for name in ("milton-paradise", "shakespeare-hamlet", "austen-emma", "chesterton-ball"):
        (books / f"{name}.txt").write_text(body.replace("Someone", name), encoding="utf-8")
    (books / "carroll-alice.txt").write_text(f"[Alice]\n\nShe read a review.\n\n{_icl_sentence()}\n\nThen she slept.\n",
                                             encoding="utf-8")
    brown = root / "brown" / "package"
    brown.mkdir(parents=True)
    (brown / "ca01").write_text("\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps left/vbd ./.\n", encoding="utf-8")
    (brown / "cc01").write_text("\tA/at fine/jj review/nn ./.\n", encoding="utf-8")  # category C: reviews
    chat = root / "chitchat" / "chitchat_dataset"
    chat.mkdir(parents=True)
    (chat / "dataset.json").write_text(json.dumps({"c1": {"messages": [
        [{"text": "Hello", "sender": "u1"}, {"text": "how are you?", "sender": "u1"}],
        [{"text": "fine", "sender": "u2"}], [{"text": "good", "sender": "u1"}]]}}), encoding="utf-8")


def _read_shard(path):
    lines = list(prepare_pile.shard_lines(str(path)))
    return [json.loads(line) for line in lines if line.strip()]


def test_builder_excludes_holds_out_drops_icl_overlap_and_names_a_missing_source(tmp_path, caplog):
    _package_tree(tmp_path / "pkgs")
    out = tmp_path / "broad"
    with caplog.at_level(logging.ERROR):
        build_broad_corpus.main(["--out", str(out), "--package-root", str(tmp_path / "pkgs"), "--offline",
                                 "--sources", "gutenberg,brown,chitchat,python-docs"])
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and left_out[0].startswith("source python-docs left out:") and "\n" not in left_out[0]

    train = {p.name: _read_shard(p) for p in (out / "train").iterdir()}
    assert sorted(train) == ["brown.jsonl.zst", "chitchat.jsonl.zst", "gutenberg.jsonl.zst"]
    books = {r["meta"]["document"]: r for r in train["gutenberg.jsonl.zst"]}
    assert sorted(books) == ["carroll-alice.txt#0", "milton-paradise.txt#0"]  # no Shakespeare, no Austen
    assert books["milton-paradise.txt#0"]["text"] == "It was a dark and stormy night.\n\nThe end came soon."
    assert books["carroll-alice.txt#0"]["text"] == "She read a review.\n\nThen she slept."  # the SST-2 sentence dropped
    assert {r["meta"]["pile_set_name"] for r in books.values()} == {"Gutenberg"}
    assert [r["text"] for r in train["brown.jsonl.zst"]] == ["The jury said.\n\nIt left."]  # no reviews
    assert [r["text"] for r in train["chitchat.jsonl.zst"]] == ["A: Hello how are you?\n\nB: fine\n\nA: good"]
    held = _read_shard(out / "heldout" / "gutenberg.jsonl.zst")
    assert [r["meta"]["document"] for r in held] == ["chesterton-ball.txt#0"]

    card = json.loads((out / "card.json").read_text())
    assert set(card["left_out"]) == {"python-docs"}
    assert card["sources"]["gutenberg"]["paragraphs_dropped_icl"] == 1
    assert card["sources"]["gutenberg"]["train_words"] == 11 + 7  # Milton, Carroll without the review

    # read back by longmem-prepare-pile: every document seen under its set name
    bin_dir = tmp_path / "bin"
    prepare_pile.main(["--train", *map(str, sorted((out / "train").iterdir())), "--valid",
                       str(out / "heldout" / "gutenberg.jsonl.zst"), "--destdir", str(bin_dir), "--workers", "1",
                       "--no-binarize"])
    report = json.loads((bin_dir / "encoded" / "report.json").read_text())
    assert report["seen"] == {"Gutenberg": 3, "Brown": 1, "ChitChat": 1}


def test_a_package_that_cannot_be_fetched_is_named_and_the_rest_built(tmp_path, monkeypatch, caplog):
    _package_tree(tmp_path / "pkgs")
    bogus = sources.Source("bogus", "Bogus", "apt", "longmem-no-such-package-xyz", "none", "none", lambda root: iter(()))
    monkeypatch.setitem(sources.SOURCES, "bogus", bogus)
    with caplog.at_level(logging.ERROR):
        build_broad_corpus.main(["--out", str(tmp_path / "broad"), "--package-root", str(tmp_path / "pkgs"),
                                 "--sources", "brown,bogus", "--download-dir", str(tmp_path / "dl")])
    [line] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert line.startswith("source bogus left out:") and "longmem-no-such-package-xyz" in line
    assert (tmp_path / "broad" / "train" / "brown.jsonl.zst").is_file()


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    for argv, message in ((["--sources", "gutenberg,nope"], "unknown ['nope']"),
                          (["--heldout", "nope:x"], "unknown source 'nope'")):
        with pytest.raises(SystemExit) as e:
            build_broad_corpus.main(["--out", str(tmp_path / "o"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
