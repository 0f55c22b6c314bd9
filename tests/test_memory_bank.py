"""ChunkedMemoryBank against a brute-force reference written here: plain loops over the chunks held."""
import pytest
import torch

from longmem.modules.memory_bank import ChunkedMemoryBank, exact_topk

H, D = 3, 8


class ReferenceMemory:
    """What docs/design.md §3 says, as literally as possible: a FIFO list of chunks per stream."""

    def __init__(self, streams, memory_size, chunk_size, k, shared, dtype):
        self.chunks = [[] for _ in range(1 if shared else streams)]  # (serial, keys (c,H,D), values, search key)
        self.serial = [0] * len(self.chunks)
        self.capacity, self.c, self.k, self.shared, self.dtype = memory_size // chunk_size, chunk_size, k, shared, dtype

    def add(self, keys, values):
        """A chunk's search key: the mean of its keys as they arrive (before rounding to the storage dtype)."""
        rows = [(keys.reshape(-1, H * D), values.reshape(-1, H * D))] if self.shared else list(zip(keys, values))
        for s, (k_row, v_row) in enumerate(rows):
            for start in range(0, len(k_row) - self.c + 1, self.c):
                k = k_row[start: start + self.c].view(self.c, H, D)
                self.chunks[s].append((self.serial[s], k.to(self.dtype),
                                       v_row[start: start + self.c].view(self.c, H, D).to(self.dtype),
                                       k.double().mean(0)))
                self.serial[s] += 1
            del self.chunks[s][: max(0, len(self.chunks[s]) - self.capacity)]

    def retrieve(self, queries):
        """-> per (b, h, t): list of (serial, keys (c, D), values (c, D)) best first."""
        B, T, _ = queries.shape
        out = {}
        for b in range(B):
            held = self.chunks[0 if self.shared else b]
            for h in range(H):
                for t in range(T):
                    q = queries[b, t].view(H, D)[h].double()
                    scored = [(float(q @ search[h]), serial, keys[:, h], values[:, h])
                              for serial, keys, values, search in held]
                    scored.sort(key=lambda x: -x[0])
                    out[b, h, t] = [(s, k, v) for _, s, k, v in scored[: self.k // self.c]]
        return out


def assert_matches(got, ref, k, c):
    B, Hh, T, _ = got.mask.shape
    for (b, h, t), chunks in ref.items():
        n = len(chunks)
        assert got.chunk_ids[b, h, t, :n].tolist() == [s for s, _, _ in chunks], (b, h, t)
        assert (got.chunk_ids[b, h, t, n:] == -1).all()
        assert got.mask[b, h, t, : n * c].all() and not got.mask[b, h, t, n * c:].any()
        if n:
            torch.testing.assert_close(got.keys[b, h, t, : n * c], torch.cat([kk for _, kk, _ in chunks]), rtol=0, atol=0)
            torch.testing.assert_close(got.values[b, h, t, : n * c], torch.cat([vv for _, _, vv in chunks]), rtol=0, atol=0)
        assert (got.keys[b, h, t, n * c:] == 0).all() and (got.values[b, h, t, n * c:] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_retrieval_matches_brute_force_through_partial_fill_and_wrap(backend, chunk_size, shared, dtype):
    torch.manual_seed(chunk_size)
    streams, memory_size, k = 2, 12 * chunk_size, 4 * chunk_size  # 12 chunks held, 4 retrieved
    bank = ChunkedMemoryBank(H, D, memory_size, chunk_size, k, num_streams=streams, shared=shared,
                             backend=backend, dtype=dtype)
    ref = ReferenceMemory(streams, memory_size, chunk_size, k, shared, dtype)
    # adds of various lengths (remainders dropped): first partly filled (< k/csz chunks), then full,
    # then several wraps of the ring
    for T in (2 * chunk_size + (chunk_size > 1), 5 * chunk_size, 7 * chunk_size + 1, 9 * chunk_size, 3, 13 * chunk_size):
        keys, values = torch.randn(streams, T, H * D), torch.randn(streams, T, H * D)
        queries = torch.randn(streams, 5, H * D)
        assert_matches(bank.retrieve(queries), ref.retrieve(queries), k, chunk_size)
        bank.add(keys, values)
        ref.add(keys, values)
    queries = torch.randn(streams, 5, H * D)
    assert_matches(bank.retrieve(queries), ref.retrieve(queries), k, chunk_size)
    for s in range(1 if shared else streams):
        assert bank.num_tokens(s) == len(ref.chunks[s]) * chunk_size


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_rows_whose_memories_differ_in_fill_match_brute_force(backend):
    """Rows searched together (the torch backend batches rows whose banks are filled alike) and apart: a
    row reset at a document boundary holds fewer chunks, then wraps at another point of the ring."""
    torch.manual_seed(5)
    streams, c, memory_size, k = 3, 2, 24, 8
    bank = ChunkedMemoryBank(H, D, memory_size, c, k, num_streams=streams, backend=backend, dtype=torch.float32)
    ref = ReferenceMemory(streams, memory_size, c, k, False, torch.float32)
    for step, T in enumerate((10, 6, 14, 8, 12, 4, 10)):
        if step in (2, 4):
            bank.reset(stream=step // 2)
            ref.chunks[step // 2], ref.serial[step // 2] = [], 0
        keys, values = torch.randn(streams, T, H * D), torch.randn(streams, T, H * D)
        bank.add(keys, values)
        ref.add(keys, values)
        queries = torch.randn(streams, 3, H * D)
        assert_matches(bank.retrieve(queries), ref.retrieve(queries), k, c)


def test_backends_agree_at_larger_scale():
    torch.manual_seed(0)
    banks = [ChunkedMemoryBank(4, 16, 4096, 4, 16, num_streams=2, backend=b, dtype=torch.float32)
             for b in ("torch", "faiss")]
    for _ in range(5):
        keys, values = torch.randn(2, 1000, 64), torch.randn(2, 1000, 64)
        for bank in banks:
            bank.add(keys, values)
    q = torch.randn(2, 50, 64)
    a, b = (bank.retrieve(q) for bank in banks)
    assert torch.equal(a.chunk_ids, b.chunk_ids)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("n,top", [(1024, 8), (4096, 16), (640, 10), (1000, 8), (64, 4)])
def test_exact_topk_equals_a_full_sort(n, top):
    """Distinct scores (a permutation), so the answer is unique: the two-stage top-k must give the indices
    a full sort gives, in order, including when the best entries crowd one slice or one column."""
    g = torch.Generator().manual_seed(n)
    rows = [torch.randperm(n, generator=g).float() for _ in range(6)]
    m = n // 16
    crowd_slice = torch.randperm(n, generator=g).float()  # the `top` best all in slice 3, contiguous
    crowd_slice[3 * m: 3 * m + top] = n + torch.arange(top).float()
    crowd_column = torch.randperm(n, generator=g).float()  # the `top` best all in column 5 of successive slices
    crowd_column[5 + m * torch.arange(min(top, 16))] = n + torch.arange(min(top, 16)).float()
    scores = torch.stack(rows + [crowd_slice, crowd_column]).view(2, 4, n)
    expected = torch.sort(scores, dim=-1, descending=True).indices[..., :top]
    assert torch.equal(exact_topk(scores, top), expected)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_a_stream_never_sees_another_streams_tokens(backend):
    bank = ChunkedMemoryBank(H, D, 64, 2, 8, num_streams=3, backend=backend, dtype=torch.float32)
    for _ in range(3):
        keys = torch.randn(3, 10, H * D)
        values = torch.arange(1, 4, dtype=torch.float32).view(3, 1, 1).expand(3, 10, H * D)  # stream b -> b+1
        bank.add(keys, values)
    bank.reset(stream=1)
    out = bank.retrieve(torch.randn(3, 7, H * D))
    for b in range(3):
        real = out.values[b][out.mask[b]]
        assert (real == b + 1).all()
    assert not out.mask[1].any() and bank.num_tokens(1) == 0 and bank.num_tokens(0) == 30


def test_memory_empty_masks_everything():
    bank = ChunkedMemoryBank(H, D, 16, 4, 8, num_streams=1, backend="torch")
    out = bank.retrieve(torch.randn(1, 3, H * D))
    assert out.keys.shape == (1, H, 3, 8, D) and out.keys.dtype == torch.float16
    assert not out.mask.any() and (out.chunk_ids == -1).all() and (out.values == 0).all()


def test_retrieval_order_is_best_first_and_tokens_in_order():
    bank = ChunkedMemoryBank(1, 2, 16, 2, 4, backend="torch", dtype=torch.float32)
    keys = torch.tensor([[[1., 0], [1, 0], [5, 0], [5, 0], [3, 0], [3, 0]]])
    values = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    bank.add(keys, values)
    out = bank.retrieve(torch.tensor([[[1., 0]]]))
    assert out.chunk_ids[0, 0, 0].tolist() == [1, 2]  # chunk keys 5 > 3 > 1
    assert out.values[0, 0, 0].tolist() == [[4, 5], [6, 7], [8, 9], [10, 11]]


def test_fp16_bank_averages_the_incoming_keys_into_chunk_keys():
    """The release averages the keys it receives (then casts to fp32) and stores the keys in fp16. With
    keys 1 + 2^-12 and 1 (chunk of 2), fp16 rounds the first to 1, so a mean of the stored keys would
    give exactly 1; the mean of the incoming keys is 1 + 2^-13."""
    bank = ChunkedMemoryBank(1, 1, 8, 2, 2, backend="torch", dtype=torch.float16)
    keys = torch.tensor([[[1 + 2 ** -12], [1.0]]])
    bank.add(keys, torch.ones(1, 2, 1))
    assert bank.keys[0, 0, 0, :, 0].tolist() == [1.0, 1.0]  # stored rounded
    assert bank.chunk_keys[0, 0, 0, 0].item() == 1 + 2 ** -13  # searched unrounded


def test_save_and_load_round_trip_including_the_ring_position(tmp_path):
    torch.manual_seed(1)
    bank = ChunkedMemoryBank(H, D, 24, 2, 6, num_streams=2, backend="torch")
    bank.add(torch.randn(2, 31, H * D), torch.randn(2, 31, H * D))  # wraps: 15 chunks into 12 slots
    bank.save(tmp_path / "mem.pt")
    loaded = ChunkedMemoryBank.load(tmp_path / "mem.pt", backend="torch")
    more = torch.randn(2, 9, H * D), torch.randn(2, 9, H * D)
    bank.add(*more)
    loaded.add(*more)
    q = torch.randn(2, 4, H * D)
    a, b = bank.retrieve(q), loaded.retrieve(q)
    assert torch.equal(a.chunk_ids, b.chunk_ids) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert loaded.write_pos == bank.write_pos and loaded.filled == bank.filled
    other = ChunkedMemoryBank(H, D * 2, 24, 2, 6, num_streams=2)
    with pytest.raises(ValueError, match="head_dim saved=8 here=16"):
        other.load_state_dict(torch.load(tmp_path / "mem.pt", weights_only=True))


def test_wrong_input_gives_errors_naming_expected_and_received():
    bank = ChunkedMemoryBank(H, D, 16, 2, 4, num_streams=2)
    with pytest.raises(ValueError, match=r"\(B, T, 24\), received \(2, 5, 20\)"):
        bank.add(torch.randn(2, 5, 20), torch.randn(2, 5, 20))
    with pytest.raises(ValueError, match=r"batch size 3 but the bank has num_streams=2"):
        bank.retrieve(torch.randn(3, 5, 24))
    with pytest.raises(TypeError, match=r"floating point .*received torch.int64"):
        bank.add(torch.ones(2, 5, 24, dtype=torch.long), torch.ones(2, 5, 24, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keys \(2, 5, 24\) and values \(2, 6, 24\)"):
        bank.add(torch.randn(2, 5, 24), torch.randn(2, 6, 24))
    with pytest.raises(ValueError, match="k=6 is not a multiple of chunk_size=4"):
        ChunkedMemoryBank(H, D, 16, 4, 6)
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        ChunkedMemoryBank(H, D, 16, 4, 8, backend="annoy")


# ---------------------------------------------------------------- the release's eviction rule
class ReleaseAddIndex:
    """The release's External_Memory.add_index, restated on lists (one head of width 1 is enough to
    follow which chunks it holds): when dstore_idx + B*T//csz >= capacity, drop the oldest
    (2*B*T)//csz chunks, shift, then append this add's chunks (B*T tokens flattened batch-major)."""

    def __init__(self, memory_size, chunk_size):
        self.capacity, self.c = memory_size // chunk_size, chunk_size
        self.chunks = []  # each: the tuple of its tokens' key values, oldest first

    def add(self, keys):  # keys (B, T): one number per token
        flat = keys.reshape(-1).tolist()
        bsz_seq = len(flat)
        if len(self.chunks) + bsz_seq // self.c >= self.capacity:
            update = (2 * bsz_seq) // self.c
            assert update <= len(self.chunks), "the release would index a negative dstore_idx here"
            self.chunks = self.chunks[update:]
        keep = bsz_seq // self.c * self.c
        self.chunks += [tuple(flat[i: i + self.c]) for i in range(0, keep, self.c)]


def held_tokens(bank, stream=0):
    keys, _, _ = bank.held(stream)  # (H, n, c, d)
    return [tuple(chunk[:, 0].tolist()) for chunk in keys[0]]


def test_release_eviction_chunk_counts_written_by_hand():
    # 64 tokens, chunk 4: 16 chunks; each add 2 rows x 8 tokens = 4 chunks; eviction drops 8
    bank = ChunkedMemoryBank(1, 1, 64, 4, 4, shared=True, backend="torch", dtype=torch.float32, eviction="release")
    counts = []
    for _ in range(6):
        bank.add(torch.randn(2, 8, 1), torch.randn(2, 8, 1))
        counts.append(bank.filled[0])
    assert counts == [4, 8, 12, 8, 12, 8]
    # the paper's recipe: 65,536 tokens, 8 rows x 1,024, chunk 4 -> swings between 12,288 and 14,336 chunks
    bank = ChunkedMemoryBank(1, 1, 65536, 4, 64, shared=True, backend="torch", dtype=torch.float32,
                             eviction="release")
    counts = []
    for _ in range(11):
        bank.add(torch.zeros(8, 1024, 1), torch.zeros(8, 1024, 1))
        counts.append(bank.filled[0])
    assert counts == [2048, 4096, 6144, 8192, 10240, 12288, 14336, 12288, 14336, 12288, 14336]


@pytest.mark.parametrize("memory_size,chunk_size,shapes", [
    (64, 4, [(2, 8)] * 9),
    (48, 2, [(1, 7), (1, 5), (1, 8), (1, 6), (1, 7), (1, 3), (1, 8), (1, 8), (1, 5), (1, 7)]),
    (120, 3, [(3, 5), (2, 7), (3, 4), (1, 9), (3, 5), (2, 6), (3, 5), (3, 3), (2, 7)]),
])
def test_release_eviction_holds_what_the_release_holds_after_any_adds(memory_size, chunk_size, shapes):
    bank = ChunkedMemoryBank(1, 1, memory_size, chunk_size, chunk_size, shared=True, backend="torch",
                             dtype=torch.float32, eviction="release")
    ref = ReleaseAddIndex(memory_size, chunk_size)
    counter = 0
    for B, T in shapes:
        keys = torch.arange(counter, counter + B * T, dtype=torch.float32).view(B, T, 1)  # every token its number
        counter += B * T
        bank.add(keys, keys)
        ref.add(keys)
        assert held_tokens(bank) == [tuple(map(float, c)) for c in ref.chunks]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_release_eviction_retrieval_matches_brute_force_when_the_held_chunks_wrap(backend):
    torch.manual_seed(3)
    c, k = 2, 6
    bank = ChunkedMemoryBank(H, D, 40, c, k, shared=True, backend=backend, dtype=torch.float32, eviction="release")
    ref = ReferenceMemory(1, 40, c, k, True, torch.float32)
    for step in range(7):  # 20-chunk ring, adds of 6 chunks: the held chunks wrap around its end
        keys, values = torch.randn(2, 6, H * D), torch.randn(2, 6, H * D)
        bank.add(keys, values)
        flat = len(ref.chunks[0])
        if flat + 6 >= 20:
            del ref.chunks[0][:12]
        ref.add(keys, values)
        queries = torch.randn(1, 4, H * D)
        assert_matches(bank.retrieve(queries), ref.retrieve(queries), k, c)
    assert (bank.write_pos[0] - bank.filled[0]) % 20 != 0  # the window did wrap


def test_release_eviction_too_small_a_memory_is_a_clear_error():
    bank = ChunkedMemoryBank(H, D, 16, 2, 2, shared=True, eviction="release")
    bank.add(torch.randn(1, 10, H * D), torch.randn(1, 10, H * D))
    with pytest.raises(ValueError, match="would drop 10 chunks from a memory holding 5"):
        bank.add(torch.randn(1, 10, H * D), torch.randn(1, 10, H * D))


def test_a_loaded_bank_is_never_swapped_for_an_empty_one():
    """load_bank(a 1-stream bank), then a batch of 2 rows: a one-line error (it used to be replaced by an empty
    2-stream memory, with an INFO line); a shared bank into a per-row model is refused at load_bank."""
    from longmem.errors import ConfigError
    from longmem.modules.memory_controller import MemoryController, MemorySettings

    controller = MemoryController(2, 4, MemorySettings(memory_size=16, k=4, chunk_size=2, backend="torch"))
    bank = ChunkedMemoryBank(2, 4, 16, 2, 4, num_streams=1, backend="torch")
    bank.add(torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    controller.load_bank(bank)
    assert controller.step(1, torch.device("cpu")).bank is bank  # one row: the loaded bank is read
    with pytest.raises(ConfigError, match="holds 1 row stream.* but this batch has 2 rows"):
        controller.step(2, torch.device("cpu"))
    with pytest.raises(ConfigError, match="one shared memory but this model's --memory-mode stream"):
        controller.load_bank(ChunkedMemoryBank(2, 4, 16, 2, 4, shared=True, backend="torch"))
