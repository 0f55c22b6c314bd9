"""The longmem_language_modeling task's streams, document boundaries and memory resets."""
import numpy as np
import pytest
import torch

from longmem.tasks.stream_dataset import StreamBatches, TokenStream, read_marks

EOS, PAD = 2, 1


class Lines:
    """A stand-in for fairseq's indexed dataset: one tensor per line, each ending with </s>."""

    def __init__(self, lines):
        self.lines = [torch.tensor(l + [EOS]) for l in lines]
        self.sizes = np.array([len(l) for l in self.lines])

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        return self.lines[i]


def corpus(seed=0, n_lines=40):
    rng = np.random.RandomState(seed)
    lines = []
    for _ in range(n_lines):
        lines.append([] if rng.rand() < 0.2 else list(rng.randint(10, 1000, rng.randint(1, 9))))
    return Lines(lines)


@pytest.mark.parametrize("B,T", [(3, 5), (4, 7), (1, 16)])
def test_row_b_of_batch_i_plus_1_continues_row_b_and_every_token_is_a_target_once(B, T):
    data = corpus()
    stream = TokenStream(data, EOS)
    all_tokens = torch.cat(data.lines)
    batches = StreamBatches(stream, B, T, PAD)
    samples = [batches.collater([batches[i]]) for i in range(len(batches))]
    rows_tgt = [torch.cat([s["target"][b] for s in samples]) for b in range(B)]
    rows_src = [torch.cat([s["net_input"]["src_tokens"][b] for s in samples]) for b in range(B)]
    # every token of the split, in order, is a target exactly once (pads only at the very end)
    joined = torch.cat(rows_tgt)
    assert torch.equal(joined[: len(all_tokens)], all_tokens)
    assert (joined[len(all_tokens):] == PAD).all()
    # the input of each position is the token before its target, across batch boundaries too
    previous = torch.cat([torch.tensor([EOS]), all_tokens])
    for b in range(B):
        real = rows_tgt[b].ne(PAD)
        n = int(real.sum())
        start = sum(int(rows_tgt[j].ne(PAD).sum()) for j in range(b))
        assert torch.equal(rows_src[b][:n], previous[start: start + n])
        assert all(s["target"].shape == (B, min(T, s["target"].size(1))) for s in samples)
    assert all(s["ntokens"] == int(s["target"].ne(PAD).sum()) for s in samples)


def test_ranks_get_disjoint_rows_that_cover_the_split():
    data = corpus(1, 60)
    stream = TokenStream(data, EOS)
    ranks = [StreamBatches(stream, 2, 6, PAD, num_shards=3, shard_id=r) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # the same number of batches on every rank
    rows = []
    for r in ranks:
        rows += [torch.cat([r.collater([i])["target"][b] for i in range(len(r))]) for b in range(2)]
    joined = torch.cat(rows)
    all_tokens = torch.cat(data.lines)
    assert torch.equal(joined[: len(all_tokens)], all_tokens) and (joined[len(all_tokens):] == PAD).all()


def test_document_starts_follow_empty_lines():
    data = Lines([[5, 6], [7], [], [8, 9], [], [], [10]])
    stream = TokenStream(data, EOS)
    # tokens: 5 6 </s> 7 </s> </s> 8 9 </s> </s> </s> 10 </s>
    assert stream.tokens.tolist() == [5, 6, 2, 7, 2, 2, 8, 9, 2, 2, 2, 10, 2]
    assert torch.nonzero(stream.doc_start).view(-1).tolist() == [0, 6, 11]


@pytest.mark.parametrize("layout,B,T", [("streams", 2, 3), ("streams", 1, 5), ("release", 2, 2)])
def test_marks_follow_their_documents_into_every_batch(layout, B, T):
    """Three documents (those of the test above), the first and last marked: each target carries its own token's
    mark (a document's separators go with it), written out by hand; pads are never marked."""
    data = Lines([[5, 6], [7], [], [8, 9], [], [], [10]])
    stream = TokenStream(data, EOS, torch.tensor([True, False, True]))
    # tokens: 5 6 </s> 7 </s> </s> | 8 9 </s> </s> </s> | 10 </s>
    assert stream.marked.tolist() == [1] * 6 + [0] * 5 + [1] * 2
    batches = StreamBatches(stream, B, T, PAD, layout=layout)
    seen = 0
    for i in range(len(batches)):
        s = batches.collater([batches[i]])
        assert s["marked"].shape == s["target"].shape and not s["marked"][s["target"].eq(PAD)].any()
        for tgt, mark in zip(s["target"].view(-1).tolist(), s["marked"].view(-1).tolist()):
            if tgt not in (PAD, EOS):  # a word token: marked where its document is
                assert mark == (tgt in (5, 6, 7, 10))
                seen += 1
    # the separators too, position by position, in the streams layout (every token a target once, in order)
    if layout == "streams":
        samples = [batches.collater([batches[i]]) for i in range(len(batches))]
        rows = [torch.cat([s["marked"][b] for s in samples]) for b in range(B)]
        assert torch.cat(rows)[:13].tolist() == stream.marked.tolist()
    assert seen > 0
    assert "marked" not in StreamBatches(TokenStream(data, EOS), B, T, PAD, layout=layout).collater([0])


def test_marks_that_do_not_fit_the_split_are_refused(tmp_path):
    from longmem.errors import ConfigError

    data = Lines([[5, 6], [], [8]])  # two documents
    with pytest.raises(ConfigError, match="marks 3 documents, the split has 2"):
        TokenStream(data, EOS, torch.tensor([True, False, True]), "train.marks")
    path = tmp_path / "train.marks"
    path.write_text("1\n0\n")
    assert read_marks(str(path)).tolist() == [True, False]
    path.write_text("1\nyes\n")
    with pytest.raises(ConfigError, match="line 2: a .marks file holds one 0 or 1 a line"):
        read_marks(str(path))


def test_release_order_sample_ids_written_by_hand():
    from longmem.tasks.stream_dataset import release_batches

    # 11 blocks, 2 ranks x 2 rows: the last block is left out, 10 cut into 4 passages of ceil(10/4) = 3:
    # [0 1 2] [3 4 5] [6 7 8] [9]; rank 0 reads passages 0-1, rank 1 passages 2-3 (as long as the shortest)
    assert release_batches(11, 2, num_shards=2, shard_id=0) == [[0, 3], [1, 4], [2, 5]]
    assert release_batches(11, 2, num_shards=2, shard_id=1) == [[6, 9]]
    # one rank, 8 rows, 100 blocks: 99 in 8 passages of 13, the last one 8 long
    got = release_batches(100, 8)
    assert len(got) == 8 and got[0] == [0, 13, 26, 39, 52, 65, 78, 91] and got[7] == [7, 20, 33, 46, 59, 72, 85, 98]
    assert release_batches(10, 4, num_shards=3, shard_id=2) == []  # passages of 1: rank 2 has an empty one
    # 3 blocks, 8 rows: fairseq's first batch has 3; 2 blocks in 3 passages of 1, the third empty
    assert release_batches(3, 8) == [] and release_batches(1, 8) == []
    assert release_batches(5, 2) == [[0, 2], [1, 3]]


def test_release_order_batches_hold_the_blocks_their_ids_name():
    data = corpus(2, 60)
    stream = TokenStream(data, EOS)
    all_tokens = torch.cat(data.lines)
    T, B = 4, 3
    batches = StreamBatches(stream, B, T, PAD, layout="release")
    assert len(batches) > 2
    for i in range(len(batches)):
        sample = batches.collater([i])
        for row, block in enumerate(sample["id"].tolist()):
            want = all_tokens[block * T: (block + 1) * T]
            assert torch.equal(sample["target"][row, : len(want)], want)
            before = torch.cat([torch.tensor([EOS]), all_tokens])[block * T: block * T + len(want)]
            assert torch.equal(sample["net_input"]["src_tokens"][row, : len(want)], before)


def test_memory_resets_exactly_at_the_document_boundary(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    model.memory.configure(reset_at_document_boundaries=True)
    seen = []
    seg1, seg2 = torch.randint(4, 40, (2, 10)), torch.randint(4, 40, (2, 10))
    doc_start = torch.zeros(2, 10, dtype=torch.bool)
    doc_start[0, 6] = True  # row 0: a new document starts at position 6; row 1: none
    with torch.no_grad(), model.memory.retrieval_hook(lambda q, out, heads: seen.append(out)):
        model(seg1)
        model(seg2, doc_start=doc_start)
    mask = seen[-1].mask  # (B, H, T, k)
    assert mask[0, :, :6].any(-1).all() and not mask[0, :, 6:].any()
    assert mask[1].any(-1).all()
    memory = model.memory.bank
    assert memory.num_tokens(0) == 4  # emptied, then positions 6..9 written
    assert memory.num_tokens(1) == 20


def test_task_resets_memory_each_epoch_and_keeps_validation_apart(make_sidenet, make_dictionary):
    from types import SimpleNamespace

    from longmem.tasks.longmem_language_modeling import LongMemLanguageModelingTask as Task

    model, _ = make_sidenet(make_dictionary(40), use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    task = SimpleNamespace(args=SimpleNamespace(memory_reset_at_document_boundary=True))
    memory = model.memory
    memory.configure(reset_at_document_boundaries=True)  # as the task's build_model does, once
    with torch.no_grad():
        Task._with_memory_slot(task, model, "train", None)
        model(torch.randint(4, 40, (2, 8)))
        Task._with_memory_slot(task, model, "valid", None)
        model(torch.randint(4, 40, (3, 6)))
    assert memory.settings.reset_at_document_boundaries  # the slot switches keep it
    assert memory.banks["train"].num_tokens(1) == 8 and memory.banks["valid"].num_tokens(2) == 6
    Task.begin_valid_epoch(task, 1, model)
    assert memory.banks["valid"].num_tokens(0) == 0 and memory.banks["train"].num_tokens(0) == 8
    Task.begin_epoch(task, 2, model)
    assert memory.banks["train"].num_tokens(0) == 0
