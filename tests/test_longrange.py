"""The long-range benchmark: every marked token really recurs beyond the window, and marked perplexity."""
import contextlib
import math
import random

import pytest
import torch

from longmem.commands import make_longrange
from longmem.evaluation.lm import evaluate, read_token_marks, score_document
from longmem.tasks.stream_dataset import TokenStream

WORDS = ("king queen lord lady sword crown night day love death heart blood honour grace noble gentle "
         "father mother brother sister house field storm sea fire earth heaven hell speak hear see know "
         "come go stay fly fight kiss weep laugh sleep wake").split()


def write_text(path, rng, lines, tag):
    with open(path, "w") as f:
        for n in range(lines):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {tag}{n % 7} .\n")
            if n % 150 == 149:
                f.write("\n")  # documents of the source text


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    import sentencepiece as spm

    tmp = tmp_path_factory.mktemp("longrange")
    rng = random.Random(0)
    for split, tag, lines in (("train", "tr", 1200), ("valid", "va", 400), ("test", "te", 400)):
        write_text(tmp / f"{split}.txt", rng, lines, tag)
    spm.SentencePieceTrainer.train(input=str(tmp / "train.txt"), model_prefix=str(tmp / "spm"), vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    out = tmp / "out"
    make_longrange.main(["--spm-model", str(tmp / "spm.model"), "--out", str(out),
                         "--train-text", str(tmp / "train.txt"), "--valid-text", str(tmp / "valid.txt"),
                         "--test-text", str(tmp / "test.txt"), "--train-docs", "12", "--eval-docs", "6",
                         "--doc-tokens", "700", "--min-gap", "200", "--pairs", "6", "--pool-size", "8", "--pool-skip", "0",
                         "--pretrain-docs", "3", "--pretrain-gap", "20", "120"])
    return tmp, out


def read_docs(out, split):
    """[[(pieces, marks), ...] per document] from the .bpe and .mask files."""
    with open(out / f"{split}.bpe") as fb, open(out / f"{split}.mask") as fm:
        docs, doc = [], []
        for line, marks in zip(fb, fm):
            pieces, marks = line.split(), [int(x) for x in marks.split()]
            assert len(pieces) == len(marks)
            if not pieces:
                docs.append(doc)
                doc = []
            else:
                doc.append((pieces, marks))
        return docs + [doc]


def flat(doc):
    return [p for pieces, _ in doc for p in pieces], [m for _, marks in doc for m in marks]


def marked_runs(marks, value):
    runs, start = [], None
    for i, m in enumerate(marks + [0]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            runs.append((start, i))
            start = None
    return runs


def occurs_before(pieces, needle, limit):
    """Does ``needle`` occur in pieces[:limit]? (brute force)"""
    n = len(needle)
    return any(pieces[i: i + n] == needle for i in range(0, limit - n + 1))


def test_every_recurring_span_occurred_at_least_min_gap_tokens_earlier(benchmark):
    _, out = benchmark
    seen_recurring = 0
    for split in ("train", "valid", "test"):
        for doc in read_docs(out, split):
            pieces, marks = flat(doc)
            for start, end in marked_runs(marks, make_longrange.RECURRING):
                # the passage's first piece is unmarked; the whole passage was read >= min_gap before
                assert occurs_before(pieces, pieces[start - 1: end], start - 1 - 200)
                seen_recurring += 1
    assert seen_recurring > 10


def test_every_queried_value_was_stated_with_its_key_at_least_min_gap_earlier(benchmark):
    import sentencepiece as spm

    tmp, out = benchmark
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    recall, period = sp.encode("Recall", out_type=str), sp.encode(".", out_type=str)
    queries = 0
    for doc in read_docs(out, "test"):
        pieces, _ = flat(doc)
        at = 0
        for line, line_marks in doc:
            if make_longrange.QUERIED in line_marks:
                queries += 1
                value = [p for p, m in zip(line, line_marks) if m == make_longrange.QUERIED]
                needle = line[len(recall):]  # " : <key> is <value> ." as stated after "Remember"
                assert line[:len(recall)] == recall and value == needle[-len(value) - len(period): -len(period)]
                assert occurs_before(pieces, needle, at - 200)  # stated at least min_gap pieces earlier
                assert not occurs_before(pieces[at - 200:], needle, 200)  # and not within the gap
            at += len(line)
    assert queries == 3 * 6  # half of the 6 test documents are recall documents, 6 pairs each


def test_pretraining_passages_recur_inside_the_window(benchmark):
    _, out = benchmark
    runs = 0
    for doc in read_docs(out, "pretrain"):
        pieces, marks = flat(doc)
        for start, end in marked_runs(marks, make_longrange.RECURRING):
            c = start - 1  # the passage's first (unmarked) piece
            window = pieces[max(0, c - 120): c - 20]  # its source lies 20..120 pieces back
            assert occurs_before(window, pieces[c:end], len(window))
            runs += 1
    assert runs >= 3


def test_held_out_documents_use_held_out_text_only(benchmark):
    tmp, out = benchmark
    for split, tag in (("test", "te"), ("valid", "va")):
        for doc in read_docs(out, split):
            text = "".join(p for pieces, _ in doc for p in pieces)
            assert "tr" not in text.replace("▁", " ").split()
            assert any(f"{tag}{i}" in text for i in range(7))


def test_denser_training_queries_leave_the_held_out_sets_as_they_were(benchmark, tmp_path):
    """--train-pairs / --train-query-fill change training recall documents only: valid and test are the same
    files as without them, and every training recall document holds --train-pairs queries, each stated at
    least --min-gap pieces earlier."""
    import sentencepiece as spm

    tmp, out = benchmark
    recall = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model")).encode("Recall", out_type=str)
    dense = tmp_path / "dense"
    make_longrange.main(["--spm-model", str(tmp / "spm.model"), "--out", str(dense),
                         "--train-text", str(tmp / "train.txt"), "--valid-text", str(tmp / "valid.txt"),
                         "--test-text", str(tmp / "test.txt"), "--train-docs", "12", "--eval-docs", "6",
                         "--doc-tokens", "700", "--min-gap", "200", "--pairs", "6", "--pool-size", "8", "--pool-skip", "0",
                         "--pretrain-docs", "3", "--pretrain-gap", "20", "120",
                         "--train-pairs", "10", "--train-query-fill", "0", "0"])
    for split in ("valid", "test"):
        for ext in ("bpe", "mask"):
            assert (dense / f"{split}.{ext}").read_text() == (out / f"{split}.{ext}").read_text()
    recall_docs = 0
    for doc in read_docs(dense, "train"):
        queries = [(at, line) for at, (line, marks) in zip(
            [sum(len(x) for x, _ in doc[:i]) for i in range(len(doc))], doc) if make_longrange.QUERIED in marks]
        if not queries:
            continue
        recall_docs += 1
        assert len(queries) == 10
        pieces, _ = flat(doc)
        for at, line in queries:
            assert occurs_before(pieces, line[len(recall):], at - 200)  # ": <key> is <value> ." after "Remember"
    assert recall_docs > 0
    with pytest.raises(SystemExit):
        make_longrange.main(["--spm-model", str(tmp / "spm.model"), "--out", str(tmp_path / "bad"),
                             "--train-text", str(tmp / "train.txt"), "--valid-text", str(tmp / "valid.txt"),
                             "--test-text", str(tmp / "test.txt"), "--train-query-fill", "5", "2"])


def test_marks_align_with_the_binarized_stream_and_error_on_bad_input(benchmark, tmp_path):
    _, out = benchmark
    marks = read_token_marks(str(out / "test.mask"))
    n_tokens = sum(len(line.split()) + 1 for line in open(out / "test.bpe"))  # + </s> per line
    assert len(marks) == n_tokens
    assert int((marks > 0).sum()) == sum(int(m) > 0 for line in open(out / "test.mask") for m in line.split())
    bad = tmp_path / "bad.mask"
    bad.write_text("0 1 x\n")
    with pytest.raises(ValueError, match="integer marks"):
        read_token_marks(str(bad))


def test_marked_perplexity_equals_mean_loss_over_marked_tokens(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=24, k=4, chunk_size=2)
    model.eval()
    eos = d.eos()

    class Split:  # two documents: lines of sizes 10, 1 (empty line), 12
        sizes = [10, 1, 12]
        lines = [torch.randint(4, 44, (9,)).tolist() + [eos], [eos], torch.randint(4, 44, (11,)).tolist() + [eos]]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.tensor(self.lines[i])

    stream = TokenStream(Split(), eos)
    marks = torch.zeros(23, dtype=torch.long)
    marks[[2, 3, 15]] = 1
    marks[[7, 20]] = 2
    res = evaluate({"m": (model, True)}, stream, 4, eos, marks=marks)["models"]["m"]
    nll = torch.cat([score_document(model, stream.tokens[a:b], 4, eos, True) for a, b in ((0, 11), (11, 23))])
    assert math.isclose(res["ppl_marked"], math.exp(nll[marks > 0].mean()), rel_tol=1e-12)
    assert math.isclose(res["ppl_unmarked"], math.exp(nll[marks == 0].mean()), rel_tol=1e-12)
    assert math.isclose(res["ppl_by_mark"][2], math.exp(nll[[7, 20]].mean()), rel_tol=1e-12)
    assert res["tokens_by_mark"] == {1: 3, 2: 2}
    with pytest.raises(ValueError, match="token marks"):
        evaluate({"m": (model, True)}, stream, 4, eos, marks=marks[:-1])


def test_retrieval_hits_are_certain_when_k_covers_the_whole_memory(make_sidenet, make_dictionary):
    from longmem.evaluation.diagnostics import retrieval_hits

    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=64, chunk_size=2)
    model.eval()
    eos = d.eos()
    passage = torch.randint(4, 44, (12,)).tolist()

    class Split:  # one document: passage, 20 other tokens, the passage again (beyond a segment of 8)
        lines = [passage + torch.randint(4, 44, (20,)).tolist() + passage + [eos]]
        sizes = [len(lines[0])]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor(self.lines[i])

    stream = TokenStream(Split(), eos)
    r = retrieval_hits(model, stream, eos, 8, context=4)
    # every chunk in memory is retrieved, so every earlier occurrence is found; the gate starts at 0.5
    assert r["positions"] >= 4 and r["hit_s"] == [1.0] * 4 and r["hit_s+1"] == [1.0] * 4
    assert r["gate"] == [0.5] * 4
    model.memory.configure(k=2)  # one chunk of 32: hits become rare, never above 1
    r = retrieval_hits(model, stream, eos, 8, context=4)
    assert all(0.0 <= h <= 1.0 for h in r["hit_s"]) and r["hit_s"] != [1.0] * 4


def test_unique_sources_on_a_hand_made_document():
    from longmem.evaluation.diagnostics import unique_sources

    eos = 2
    # inputs [eos] + tokens[:-1]: (5, 6) at input positions 1-2 and 9-10, (6, 7) at 2-3 and 10-11
    tokens = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 13, 14])
    got = unique_sources(tokens, eos, tokens_per_sample=4, context=2)
    assert {t: int(s) for t, s in enumerate(got) if s >= 0} == {10: 2, 11: 3}
    # with segments of 12 both sources sit in the window, not in memory
    assert int((unique_sources(tokens, eos, 12, 2) >= 0).sum()) == 0
    # (5, 6) seen twice before t = 10 (input positions 1-2 and 4-5): not unique; (1, 5) once before t = 9
    twice = torch.tensor([5, 6, 1, 5, 6, 1, 1, 1, 5, 6, 1, 1])
    assert int(unique_sources(twice, eos, 4, 2)[10]) == -1 and int(unique_sources(twice, eos, 4, 2)[9]) == 4


def test_oracle_read_puts_the_source_chunks_first_and_only_reorders_a_full_retrieval(make_sidenet, make_dictionary):
    """k = the whole memory: the oracle only reorders the retrieved chunks, and attention over a set does
    not depend on its order (same losses). k = 2 chunks: the chunks holding s and s + 1 come first, with the
    very keys the full retrieval found for them."""
    from longmem.evaluation.diagnostics import OracleRead, unique_sources

    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=64, chunk_size=2)
    model.eval()
    eos, T, c = d.eos(), 8, 2
    passage = torch.randint(4, 44, (12,)).tolist()
    tokens = torch.tensor(passage + torch.randint(4, 44, (20,)).tolist() + passage + [eos])
    sources = unique_sources(tokens, eos, T, 4)
    assert int((sources >= 0).sum()) >= 4
    oracle = OracleRead(model, T)

    def read(with_oracle):
        seen = []
        oracle.document(sources)
        capture = lambda q, out, heads: seen.append((out.chunk_ids[0].clone(), out.keys[0].clone()))  # noqa: E731
        with contextlib.ExitStack() as stack:
            if with_oracle:
                stack.enter_context(model.memory.retrieval_hook(oracle))
            stack.enter_context(model.memory.retrieval_hook(capture))
            nll = score_document(model, tokens, T, eos, memory=True)
        return nll, seen

    plain, full = read(False)
    reordered, _ = read(True)
    assert torch.allclose(plain, reordered, atol=1e-5)
    model.memory.configure(k=4)
    _, small = read(True)
    for n, ((ids, keys), (full_ids, full_keys)) in enumerate(zip(small, full)):  # one call per segment 1..
        begin = (n + 1) * T
        for t in range(ids.size(1)):
            s = int(sources[begin + t])
            if s < 0:
                continue
            for h in range(ids.size(0)):
                assert ids[h, t, 0] == s // c and ((s + 1) // c == s // c or ids[h, t, 1] == (s + 1) // c)
                j = int(torch.nonzero(full_ids[h, t] == s // c))
                assert torch.equal(keys[h, t, :c], full_keys[h, t, j * c:(j + 1) * c])
    # s + 1 alone: one slot left per position with a source, holding the key of s + 1 (bank key of its token)
    masks = []
    alone = OracleRead(model, T, next_alone=True)
    alone.document(sources)
    with model.memory.retrieval_hook(alone), \
            model.memory.retrieval_hook(lambda q, out, heads: masks.append((out.mask[0].clone(), out.keys[0].clone()))):
        score_document(model, tokens, T, eos, memory=True)
    for n, ((mask, keys), (full_ids, full_keys)) in enumerate(zip(masks, full)):
        for t in range(mask.size(1)):
            s = int(sources[(n + 1) * T + t])
            if s < 0:
                continue
            for h in range(mask.size(0)):
                (slot,) = torch.nonzero(mask[h, t]).view(-1).tolist()
                j = int(torch.nonzero(full_ids[h, t] == (s + 1) // c))
                assert torch.equal(keys[h, t, slot], full_keys[h, t, j * c + (s + 1) % c])


def test_shortfall_split_against_direct_scoring(make_sidenet, make_dictionary):
    """Each variant's perplexity is the one scored directly: memory off/on by score_document, the forced
    gates by setting them by hand; the oracle equals memory on when k covers the whole memory; the gates
    are restored afterwards."""
    from longmem.evaluation.diagnostics import shortfall_split

    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=64, chunk_size=2)
    model.eval()
    eos = d.eos()
    passage = torch.randint(4, 44, (12,)).tolist()
    line = passage + torch.randint(4, 44, (20,)).tolist() + passage + [eos]
    marks = torch.tensor([0] * 32 + [1] * 6 + [2] * 6 + [0])

    class Split:
        sizes = [len(line)]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor(line)

    stream = TokenStream(Split(), eos)
    gate = model.decoder.layers[model.decoder.memory_layer_index].self_attn.memory_bias
    before = gate.detach().clone()
    rows = shortfall_split(model, stream, eos, 8, marks, open_heads=[1, 3], context=4)
    assert torch.equal(gate.detach(), before)

    def ppl(nll, value):
        return math.exp(float(nll[marks == value].mean())) if value else math.exp(float(nll.mean()))

    tokens = torch.tensor(line)
    on, off = score_document(model, tokens, 8, eos, True), score_document(model, tokens, 8, eos, False)
    with torch.no_grad():
        gate[[1, 3]] = 20.0
    forced = score_document(model, tokens, 8, eos, True)
    for value, key in ((0, "all"), (1, 1), (2, 2)):
        assert rows["memory off"][key] == pytest.approx(ppl(off, value), rel=1e-9)
        assert rows["memory on"][key] == pytest.approx(ppl(on, value), rel=1e-9)
        assert rows["gates of finding heads open"][key] == pytest.approx(ppl(forced, value), rel=1e-9)
        assert rows["oracle read"][key] == pytest.approx(ppl(on, value), rel=1e-5)
        assert rows["oracle read, gates open"][key] == pytest.approx(ppl(forced, value), rel=1e-5)
    assert rows["gates of finding heads open"]["all"] != pytest.approx(rows["memory on"]["all"], rel=1e-6)


def test_a_failed_rerun_leaves_the_previous_output_whole(benchmark, tmp_path):
    """Rerun into a good --out: with a --test-text that does not exist, refused before anything is written; with a
    build that fails midway (an empty --test-text), the previous files are all still there,
    unchanged, and no staging folder is left beside them."""
    import shutil

    tmp, out = benchmark
    good = tmp_path / "out"
    shutil.copytree(out, good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    common = ["--spm-model", str(tmp / "spm.model"), "--out", str(good), "--train-text", str(tmp / "train.txt"),
              "--valid-text", str(tmp / "valid.txt"), "--doc-tokens", "700", "--min-gap", "200", "--pairs", "6",
              "--seed", "7"]  # another seed: a rerun that wrote anything would change the files
    with pytest.raises(SystemExit):
        make_longrange.main(common + ["--test-text", str(tmp / "missing.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(BaseException):  # the test split fails after train and valid were written (staged)
        make_longrange.main(common + ["--test-text", str(tmp_path / "empty.txt"), "--pool-size", "8", "--pool-skip", "0"])
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "out"]


def test_by_query_head_orders_grouped_retrievals_by_the_heads_they_report():
    """Two segments, each searched twice (query heads [0, 2] then [1, 3]): the ids land under their heads, the
    segments side by side; a segment that misses a head is refused."""
    from longmem.evaluation.diagnostics import by_query_head

    ids = lambda v: torch.full((2, 3, 1), v)  # noqa: E731  (2 heads, 3 positions, 1 chunk)
    captured = [([0, 2], ids(1)), ([1, 3], ids(2)), ([0, 2], ids(3)), ([1, 3], ids(4))]
    out = by_query_head(captured, 4)
    assert out.shape == (4, 6, 1)
    assert out[:, :3, 0].tolist() == [[1] * 3, [2] * 3, [1] * 3, [2] * 3]
    assert out[:, 3:, 0].tolist() == [[3] * 3, [4] * 3, [3] * 3, [4] * 3]
    with pytest.raises(ValueError, match="do not cover the 4 query heads"):
        by_query_head(captured[:1], 4)
