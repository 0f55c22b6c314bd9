"""LongMem's cached memory: a chunked key/value bank with token-to-chunk retrieval (docs/design.md §3).

A plain PyTorch object, no fairseq. Each stream holds the backbone's layer-m keys and values of the
tokens it was given, split into H heads of d, grouped into chunks of ``chunk_size`` consecutive tokens.
A chunk's index key, per head, is the mean of its keys. ``retrieve`` returns, for every query token and
head, the ``k // chunk_size`` chunks of highest inner product with the query and all their tokens:
``k`` token-level key/value pairs.

Storage is a ring of ``memory_size / chunk_size`` chunk slots per stream written in place: the chunks
held are the ``filled`` slots that end at ``write_pos``, oldest first. Two eviction rules
(``docs/fidelity.md`` lists how each differs from the release):

* ``eviction="ring"`` (default): new chunks overwrite the oldest, one for one, so a full memory holds
  exactly ``memory_size`` tokens and an ``add`` costs the same whatever ``memory_size`` is.
* ``eviction="release"``: the release's rule. When ``held + incoming >= capacity`` chunks (incoming =
  the add's tokens // chunk_size), the oldest ``2 * tokens // chunk_size`` chunks are dropped first. The
  bank then holds the same chunks in the same order as the release's after any sequence of adds
  (``tests/test_memory_bank.py``), without the release's tensor shifts and faiss ``remove_ids``.

``shared=False`` gives every batch row its own stream; ``shared=True`` is the release's single bank fed
batch-major (row 0's tokens first) by every row. Slots that memory cannot fill yet are masked (``mask``
False, zero keys/values) where the release gathers its never-written all-zero last row for faiss's
``-1`` ids. The ``"faiss"`` backend uses ``faiss-cpu`` (or the GPU build when ``faiss.get_num_gpus() > 0``); the
``"torch"`` backend is an exact matmul + top-k on the tensors' device (an exact two-stage top-k,
:func:`exact_topk`, and one batch of matmuls for rows whose banks are filled alike). ``"auto"`` is torch on
a CPU (faster than faiss-cpu at every shape ``tests/benchmarks/bench_memory.py`` times) and faiss on a GPU
where its GPU build is there, else torch.

Example::

    bank = ChunkedMemoryBank(num_heads=16, head_dim=64, memory_size=65536, chunk_size=4, k=64)
    out = bank.retrieve(q)   # q (B, T, H*d) -> out.keys/out.values (B, H, T, k, d), out.mask (B, H, T, k)
    bank.add(k, v)           # k, v (B, T, H*d)
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from longmem.errors import ConfigError
from longmem.modules.heads import split_heads
from longmem.utils.atomic import atomic_open

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
EVICTIONS = ("ring", "release")
# the torch backend scores as many queries per matmul as keep its (G, t, n) score block within this many
# floats (128 MB): 128 queries of the paper's 16 heads x 16,384 chunks, all 256 of the tiny model's rows
_TORCH_SCORE_BLOCK = 2 ** 25
# the torch backend's exact two-stage top-k splits a row of C scores into this many contiguous slices
_TOPK_SLICES = 16


@dataclass
class Retrieved:
    keys: torch.Tensor       # (B, H, T, k, d), storage dtype; zeros where mask is False
    values: torch.Tensor     # (B, H, T, k, d)
    mask: torch.Tensor       # (B, H, T, k) bool, True = a real slot
    chunk_ids: torch.Tensor  # (B, H, T, k // chunk_size) int64: the n-th chunk its stream held since
                             # its last reset (0-based), best first; -1 where nothing was there


def exact_topk(scores: torch.Tensor, top: int, slices: int = _TOPK_SLICES) -> torch.Tensor:
    """Indices of the ``top`` largest entries of each row of ``scores`` (..., n), best first: the same
    entries as ``scores.topk(top)`` (the order of equal scores may differ), in two cheaper stages when n
    is large (docs/design.md §3). Split each row into ``slices`` contiguous slices of m = n / slices and take,
    per column j < m, the largest of the ``slices`` entries j, m + j, ... (an elementwise max over
    contiguous memory). An entry of the row's top ``top`` lies in one of the ``top`` best columns: were
    its column not among them, those ``top`` columns would each hold a larger entry. So the top-k of the
    ``top x slices`` entries of the best columns is the row's top-k."""
    n = scores.size(-1)
    m = n // slices
    if n % slices or m < 4 * top:  # small rows: one top-k is as fast
        return scores.topk(top, dim=-1, sorted=True).indices
    lead = scores.shape[:-1]
    grid = scores.reshape(*lead, slices, m)  # (..., slices, m): row = slice, column = position in slice
    cols = grid.amax(dim=-2).topk(top, dim=-1, sorted=False).indices  # (..., top) the best columns
    cand = grid.gather(-1, cols.unsqueeze(-2).expand(*lead, slices, top))  # (..., slices, top)
    best = cand.reshape(*lead, slices * top).topk(top, dim=-1, sorted=True).indices  # slice * top + col pos
    return (best // top) * m + cols.gather(-1, best % top)


def _faiss():
    """faiss with its torch bridge loaded, or None when faiss is not installed."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (faiss.knn / knn_gpu accept torch tensors)
    except ImportError:
        return None
    return faiss


def _faiss_gpus(faiss) -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:  # faiss-cpu builds may lack the symbol
        return 0


def check_memory_settings(who: str, memory_size: int, k: int, chunk_size: int, backend: str, **counts: int) -> None:
    """The one check of a memory's sizes and backend (``MemorySettings`` and ``ChunkedMemoryBank`` both call it):
    positive integers, k and memory_size whole chunks, a known backend. ``counts``: more sizes that must be >= 1."""
    for name, value in (("memory_size", memory_size), ("k", k), ("chunk_size", chunk_size), *counts.items()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{who}: {name} must be a positive integer, got {value!r}")
    if k % chunk_size:
        raise ConfigError(f"{who}: k={k} is not a multiple of chunk_size={chunk_size}; retrieval returns whole "
                          f"chunks, so choose k in {chunk_size}, {2 * chunk_size}, ...")
    if memory_size % chunk_size:
        raise ConfigError(f"{who}: memory_size={memory_size} is not a multiple of chunk_size={chunk_size}; memory "
                          f"holds whole chunks")
    if backend not in BACKENDS:
        raise ConfigError(f"{who}: unknown backend {backend!r}; choose one of {BACKENDS}")


class ChunkedMemoryBank:
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        memory_size: int,
        chunk_size: int,
        k: int,
        num_streams: int = 1,
        shared: bool = False,
        backend: str = "auto",
        device=None,
        dtype: torch.dtype = torch.float16,
        eviction: str = "ring",
    ):
        check_memory_settings("ChunkedMemoryBank", memory_size=memory_size, k=k, chunk_size=chunk_size,
                              backend=backend, num_heads=num_heads, head_dim=head_dim, num_streams=num_streams)
        if eviction not in EVICTIONS:
            raise ConfigError(f"ChunkedMemoryBank: unknown eviction {eviction!r}; choose one of {EVICTIONS}")
        if not dtype.is_floating_point:
            raise TypeError(f"ChunkedMemoryBank: storage dtype must be floating point, got {dtype}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.memory_size, self.chunk_size, self.k = memory_size, chunk_size, k
        self.num_streams, self.shared, self.eviction = num_streams, shared, eviction
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.capacity = memory_size // chunk_size  # chunks per stream
        self.chunks_per_query = k // chunk_size
        self.backend = self._choose_backend(backend)

        S, H, C, c, d = self.num_banks, num_heads, self.capacity, chunk_size, head_dim
        self.keys = torch.zeros(S, H, C, c, d, dtype=dtype, device=self.device)
        self.values = torch.zeros(S, H, C, c, d, dtype=dtype, device=self.device)
        self.chunk_keys = torch.zeros(S, H, C, d, dtype=torch.float32, device=self.device)
        self.chunk_serial = torch.full((S, C), -1, dtype=torch.long, device=self.device)
        # ring state, kept on the host: no device sync is needed to read it. Stream s holds the
        # filled[s] slots before write_pos[s] (cyclically), oldest first.
        self.write_pos = [0] * S   # next slot to write
        self.filled = [0] * S      # chunks held
        self.next_serial = [0] * S

    def set_search(self, k: Optional[int] = None, backend: Optional[str] = None) -> None:
        """Change how memory is read (tokens per query, search backend) without touching what it holds."""
        if k is not None:
            if not isinstance(k, int) or k < 1 or k % self.chunk_size:
                raise ConfigError(f"ChunkedMemoryBank: k={k!r} must be a positive multiple of "
                                 f"chunk_size={self.chunk_size}")
            self.k, self.chunks_per_query = k, k // self.chunk_size
        if backend is not None:
            if backend not in BACKENDS:
                raise ConfigError(f"ChunkedMemoryBank: unknown backend {backend!r}; choose one of {BACKENDS}")
            self.backend = self._choose_backend(backend)

    @property
    def num_banks(self) -> int:
        return 1 if self.shared else self.num_streams

    # ------------------------------------------------------------------ backend
    def _choose_backend(self, backend: str) -> str:
        faiss = _faiss()
        if backend == "faiss":
            if faiss is None:
                raise ImportError("ChunkedMemoryBank: backend='faiss' needs faiss: pip install faiss-cpu "
                                  "(or faiss-gpu), or use backend='torch'")
            if self.device.type == "cuda" and _faiss_gpus(faiss) == 0:
                raise RuntimeError("ChunkedMemoryBank: backend='faiss' on a CUDA device needs the faiss GPU "
                                   "build (faiss.get_num_gpus() is 0); use backend='torch' there")
            return "faiss"
        if backend == "torch":
            return "torch"
        if self.device.type == "cuda":  # the release's faiss GPU index where the GPU build is there
            chosen = "faiss" if faiss is not None and _faiss_gpus(faiss) > 0 else "torch"
        else:  # torch: faster than faiss-cpu at every shape bench_memory.py times (docs/benchmarks.md)
            chosen = "torch"
        logger.info("memory bank: backend 'auto' chose %r (device %s, faiss %s)", chosen, self.device,
                    "missing" if faiss is None else f"with {_faiss_gpus(faiss)} GPU(s)")
        return chosen

    # ------------------------------------------------------------------ checks
    def _check(self, name: str, x: torch.Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"ChunkedMemoryBank: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"ChunkedMemoryBank: {name} must be floating point (expected {self.dtype} or "
                            f"another float dtype), received {x.dtype}")
        width = self.num_heads * self.head_dim
        if x.dim() != 3 or x.size(-1) != width:
            raise ConfigError(f"ChunkedMemoryBank: {name} must be (B, T, num_heads*head_dim) = "
                             f"(B, T, {width}), received {tuple(x.shape)}")
        if not self.shared and x.size(0) != self.num_streams:
            raise ConfigError(f"ChunkedMemoryBank: {name} has batch size {x.size(0)} but the bank has "
                             f"num_streams={self.num_streams} (one row per stream); received {tuple(x.shape)}")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ConfigError(f"ChunkedMemoryBank: {name} hold {bad} non-finite values (NaN or inf) of "
                              f"{x.numel()}: memory stores and searches finite vectors only (look for an overflow "
                              f"upstream, e.g. fp16 in the backbone)")

    # ------------------------------------------------------------------ write
    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, start=None) -> None:
        """Write tokens: keys, values (B, T, H*d). Per-stream: row b goes to stream b, from position
        ``start[b]`` on when ``start`` is given (a document that began mid-segment). Shared: rows are
        concatenated batch-major into the one bank. Tokens that do not fill a last chunk are dropped."""
        self._check("keys", keys)
        self._check("values", values)
        if keys.shape != values.shape:
            raise ConfigError(f"ChunkedMemoryBank: keys {tuple(keys.shape)} and values "
                             f"{tuple(values.shape)} must have the same shape")
        keys = keys.to(self.device)  # the incoming dtype: chunk search keys are averaged from it (_add_stream)
        values = values.to(self.device, self.dtype)
        if self.shared:
            if start is not None:
                raise ConfigError("ChunkedMemoryBank: start positions need per-stream memory (shared=False)")
            self._add_stream(0, keys.reshape(-1, keys.size(-1)), values.reshape(-1, values.size(-1)))  # batch-major
            return
        for s in range(keys.size(0)):
            first = 0 if start is None else int(start[s])
            self._add_stream(s, keys[s, first:], values[s, first:])

    def _add_stream(self, s: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys (N, H*d) in the incoming dtype, values (N, H*d) in the storage dtype, into stream s: whole
        chunks only. A chunk's search key is the mean of its incoming keys (the release's
        ``keys.mean(dim=-2).type(torch.float32)``), taken before the keys are rounded to the storage dtype."""
        c, H, d = self.chunk_size, self.num_heads, self.head_dim
        n = keys.size(0) // c  # whole chunks
        skipped = 0
        if self.eviction == "release":
            if self.filled[s] + n >= self.capacity:
                drop = 2 * keys.size(0) // c  # the release: twice what arrives, counted in tokens
                if drop > self.filled[s]:
                    raise ConfigError(
                        f"ChunkedMemoryBank: the release's eviction would drop {drop} chunks from a memory "
                        f"holding {self.filled[s]} (the release fails there): memory_size={self.memory_size} "
                        f"must hold at least three adds of {keys.size(0)} tokens, or use eviction='ring'")
                self.filled[s] -= drop  # forget the oldest: the held slots end at write_pos
        else:
            skipped = max(0, n - self.capacity)  # only the newest `capacity` chunks would survive
            n -= skipped
        if n == 0:
            return
        k_chunks = keys[skipped * c: (skipped + n) * c].view(n, c, H, d).permute(2, 0, 1, 3)  # (H, n, c, d)
        v_chunks = values[skipped * c: (skipped + n) * c].view(n, c, H, d).permute(2, 0, 1, 3)
        slots = ((self.write_pos[s] + torch.arange(n)) % self.capacity).to(self.device)  # (n,)
        self.keys[s].index_copy_(1, slots, k_chunks.to(self.dtype))
        self.values[s].index_copy_(1, slots, v_chunks)
        self.chunk_keys[s].index_copy_(1, slots, k_chunks.mean(dim=2).float())  # from incoming precision
        first = self.next_serial[s] + skipped
        self.chunk_serial[s].index_copy_(0, slots, torch.arange(first, first + n, device=self.device))
        self.next_serial[s] = first + n
        self.write_pos[s] = (self.write_pos[s] + n) % self.capacity
        self.filled[s] = min(self.capacity, self.filled[s] + n)

    @staticmethod
    def check_release_eviction(memory_size: int, chunk_size: int, tokens_per_add: int) -> None:
        """Raise the error ``add`` would raise, before any work: with the release's eviction every add of
        ``tokens_per_add`` tokens must find at least the chunks it drops (the release fails otherwise)."""
        capacity, n, drop = memory_size // chunk_size, tokens_per_add // chunk_size, 2 * tokens_per_add // chunk_size
        filled = 0
        for _ in range(capacity // max(n, 1) + 3):  # the first eviction is the tightest
            if filled + n >= capacity:
                if drop > filled:
                    raise ConfigError(
                        f"the release's memory eviction drops {drop} chunks when memory would fill, but a memory "
                        f"of {memory_size} tokens holds only {filled} chunks then (the release fails there): with "
                        f"adds of {tokens_per_add} tokens (batch rows x tokens per sample) --memory-size must be at "
                        f"least about 3 x {tokens_per_add}, or use --memory-mode stream/shared")
                filled -= drop
            filled += n

    def held(self, stream: int = 0):
        """(keys, values), each (H, n, chunk_size, d), and their serial numbers (n,): the chunks the
        stream holds, oldest first."""
        s = self._stream_index(stream)
        slots = self._held_slots(s)
        return self.keys[s][:, slots], self.values[s][:, slots], self.chunk_serial[s][slots]

    def select_streams(self, index: torch.Tensor) -> "ChunkedMemoryBank":
        """A new bank whose stream i is a copy of stream ``index[i]`` of this one (beams reordered or
        dropped during generation); a shared bank serves every row as it is and is returned itself."""
        if self.shared:
            return self
        rows = [int(i) for i in index.tolist()]
        bank = ChunkedMemoryBank.__new__(ChunkedMemoryBank)
        bank.__dict__.update(self.__dict__)
        bank.num_streams = len(rows)
        at = torch.tensor(rows, dtype=torch.long, device=self.device)
        for name in ("keys", "values", "chunk_keys", "chunk_serial"):
            setattr(bank, name, getattr(self, name).index_select(0, at))
        for name in ("write_pos", "filled", "next_serial"):
            setattr(bank, name, [getattr(self, name)[r] for r in rows])
        return bank

    def _held_slots(self, s: int) -> torch.Tensor:
        n, C = self.filled[s], self.capacity
        return (self.write_pos[s] - n + torch.arange(n, device=self.device)) % C  # oldest first

    def reset(self, stream: Optional[int] = None) -> None:
        """Forget everything, or one stream (e.g. at a document boundary of that row)."""
        streams = range(self.num_banks) if stream is None else [self._stream_index(stream)]
        for s in streams:
            self.write_pos[s] = self.filled[s] = self.next_serial[s] = 0
            self.chunk_serial[s].fill_(-1)

    def _stream_index(self, stream: int) -> int:
        if self.shared:
            if stream != 0:
                raise IndexError(f"ChunkedMemoryBank: a shared bank has one stream (0), got stream={stream}")
            return 0
        if not 0 <= stream < self.num_streams:
            raise IndexError(f"ChunkedMemoryBank: stream={stream} out of range [0, {self.num_streams - 1}]")
        return stream

    def num_tokens(self, stream: int = 0) -> int:
        return self.filled[self._stream_index(stream)] * self.chunk_size

    # ------------------------------------------------------------------ read
    @torch.no_grad()
    def retrieve(self, queries: torch.Tensor) -> Retrieved:
        """queries (B, T, H*d) -> the k memory tokens of each query token and head."""
        self._check("queries", queries)
        B, T, _ = queries.shape
        if T == 0:  # nothing to look up: empty results of the right shapes
            kc = self.chunks_per_query
            empty = torch.zeros(B, self.num_heads, 0, self.k, self.head_dim, dtype=self.dtype, device=self.device)
            return Retrieved(keys=empty, values=empty.clone(),
                             mask=torch.zeros(B, self.num_heads, 0, self.k, dtype=torch.bool, device=self.device),
                             chunk_ids=torch.zeros(B, self.num_heads, 0, kc, dtype=torch.long, device=self.device))
        H, kc = self.num_heads, self.chunks_per_query
        q = split_heads(queries.to(self.device), self.num_heads).float()  # (B, H, T, d)
        bank_of_row = [0] * B if self.shared else list(range(B))
        batched = self._search_rows_at_once(q, bank_of_row)
        if batched is not None:
            return self._gather(batched, bank_of_row)
        scores_ids = torch.full((B, H, T, kc), -1, dtype=torch.long, device=self.device)  # slots
        for b, s in enumerate(bank_of_row):
            n = self.filled[s]
            if n == 0:
                continue
            top = min(kc, n)
            first = (self.write_pos[s] - n) % self.capacity  # the oldest chunk's slot
            slots = None
            if n == self.capacity or first == 0:
                base = self.chunk_keys[s, :, first * (n != self.capacity):][:, :n]  # (H, n, d), a view
            else:  # the held slots wrap around the end of the ring
                slots = self._held_slots(s)
                base = self.chunk_keys[s][:, slots]
            search = self._search_faiss if self.backend == "faiss" else self._search_torch
            ids = search(q[b], base, top)  # (H, T, top), indices into base
            scores_ids[b, :, :, :top] = ids if slots is None else slots[ids]
        return self._gather(scores_ids, bank_of_row)

    def _search_rows_at_once(self, q: torch.Tensor, bank_of_row) -> Optional[torch.Tensor]:
        """The torch backend's search of every row in one batch of matmuls, where the rows' banks hold
        their chunks alike from slot 0 (full, or not yet wrapped: the steady state of per-stream memory,
        whose rows are written together, and always for a shared bank): slot ids (B, H, T, kc), or None
        (the row-by-row search then)."""
        banks = sorted(set(bank_of_row))
        n = self.filled[banks[0]]
        if self.backend != "torch" or n == 0 or any(self.filled[s] != n for s in banks):
            return None
        if n != self.capacity and any(self.write_pos[s] != n % self.capacity for s in banks):
            return None  # some bank's held chunks do not start at slot 0
        B, H, T, d = q.shape
        kc, top = self.chunks_per_query, min(self.chunks_per_query, n)
        if self.shared:  # every row against the one bank: the rows' queries side by side, per head
            ids = self._search_torch(q.transpose(0, 1).reshape(H, B * T, d), self.chunk_keys[0, :, :n], top)
            ids = ids.view(H, B, T, top).transpose(0, 1)
        else:  # row b against bank b: (row, head) pairs as the batch
            ids = self._search_torch(q.flatten(0, 1), self.chunk_keys[:B, :, :n].flatten(0, 1), top)
            ids = ids.view(B, H, T, top)
        if top == kc:
            return ids
        return torch.cat([ids, ids.new_full((B, H, T, kc - top), -1)], dim=-1)

    def _search_torch(self, q: torch.Tensor, base: torch.Tensor, top: int) -> torch.Tensor:
        """q (G, T, d) float32, base (G, n, d) -> slot ids (G, T, top), best first (G: heads, or
        (row, head) pairs)."""
        out = []
        block = max(1, _TORCH_SCORE_BLOCK // (q.size(0) * base.size(1)))
        for start in range(0, q.size(1), block):
            scores = torch.bmm(q[:, start: start + block], base.transpose(1, 2))  # (G, t, n)
            out.append(exact_topk(scores, top))
        return torch.cat(out, dim=1)

    def _search_faiss(self, q: torch.Tensor, base: torch.Tensor, top: int) -> torch.Tensor:
        """Exact inner-product search by faiss, one call per head, on torch tensors directly."""
        faiss = _faiss()
        out = torch.empty(q.size(0), q.size(1), top, dtype=torch.long, device=self.device)
        for h in range(q.size(0)):
            xq, xb = q[h].contiguous(), base[h].contiguous()
            if self.device.type == "cuda":
                res = self._gpu_resources()
                _, ids = faiss.knn_gpu(res, xq, xb, top, metric=faiss.METRIC_INNER_PRODUCT)
            else:
                _, ids = faiss.knn(xq, xb, top, metric=faiss.METRIC_INNER_PRODUCT)
            out[h] = ids.to(self.device)
        return out

    def _gpu_resources(self):
        if getattr(self, "_faiss_res", None) is None:
            self._faiss_res = _faiss().StandardGpuResources()
        return self._faiss_res

    def _gather(self, slot_ids: torch.Tensor, bank_of_row) -> Retrieved:
        """slot ids (B, H, T, kc), -1 = empty -> keys/values (B, H, T, k, d) and the mask."""
        B, H, T, kc = slot_ids.shape
        C, c, d = self.capacity, self.chunk_size, self.head_dim
        valid = slot_ids.ge(0)  # (B, H, T, kc)
        banks = torch.tensor(bank_of_row, device=self.device).view(B, 1, 1, 1)
        heads = torch.arange(H, device=self.device).view(1, H, 1, 1)
        flat = ((banks * H + heads) * C + slot_ids.clamp(min=0)).view(-1)  # rows of (S*H*C, c, d)
        keys = self.keys.view(-1, c, d).index_select(0, flat).view(B, H, T, kc * c, d)
        values = self.values.view(-1, c, d).index_select(0, flat).view(B, H, T, kc * c, d)
        mask = valid.unsqueeze(-1).expand(B, H, T, kc, c).reshape(B, H, T, kc * c)
        if not bool(valid.all()):
            keys = keys.masked_fill(~mask.unsqueeze(-1), 0)
            values = values.masked_fill(~mask.unsqueeze(-1), 0)
        serial = self.chunk_serial[banks.view(B, 1, 1, 1).expand_as(slot_ids), slot_ids.clamp(min=0)]
        chunk_ids = serial.masked_fill(~valid, -1)
        return Retrieved(keys=keys, values=values, mask=mask, chunk_ids=chunk_ids)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"num_heads": self.num_heads, "head_dim": self.head_dim, "memory_size": self.memory_size,
                "chunk_size": self.chunk_size, "k": self.k, "num_streams": self.num_streams,
                "shared": self.shared, "eviction": self.eviction}

    def state_dict(self) -> dict:
        return {"config": self.config(), "dtype": str(self.dtype).replace("torch.", ""),
                "keys": self.keys.cpu(), "values": self.values.cpu(), "chunk_keys": self.chunk_keys.cpu(),
                "chunk_serial": self.chunk_serial.cpu(), "write_pos": list(self.write_pos),
                "filled": list(self.filled), "next_serial": list(self.next_serial)}

    STATE_KEYS = ("config", "dtype", "keys", "values", "chunk_keys", "chunk_serial", "write_pos", "filled",
                  "next_serial")

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self.STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ConfigError(f"ChunkedMemoryBank: not a saved memory bank (missing {', '.join(missing)})")
        ours, theirs = self.config(), {"eviction": "ring", **state["config"]}  # files older than eviction
        if ours != theirs:
            diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
            raise ConfigError("ChunkedMemoryBank: saved memory does not fit this bank: "
                             + ", ".join(f"{k} saved={a} here={b}" for k, (a, b) in diff.items()))
        self.keys.copy_(state["keys"])
        self.values.copy_(state["values"])
        self.chunk_keys.copy_(state["chunk_keys"])
        self.chunk_serial.copy_(state["chunk_serial"])
        self.write_pos = list(state["write_pos"])
        self.filled = list(state["filled"])
        self.next_serial = list(state["next_serial"])

    def save(self, path: str) -> None:
        """Write atomically: a crash leaves the previous file intact."""
        with atomic_open(str(path), "wb") as f:
            torch.save(self.state_dict(), f)

    @classmethod
    def load(cls, path: str, backend: str = "auto", device=None) -> "ChunkedMemoryBank":
        """A bank saved by ``save``; a file that is not one is an error naming it."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"ChunkedMemoryBank: memory file {str(path)!r} does not exist") from None
        except Exception as e:  # truncated, another format: torch's many unpickling errors
            raise ConfigError(f"ChunkedMemoryBank: {path} is not a readable saved memory bank "
                              f"({type(e).__name__})") from None
        missing = [k for k in cls.STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing or not isinstance(state.get("config"), dict):
            raise ConfigError(f"ChunkedMemoryBank: {path} is not a saved memory bank (missing "
                              f"{', '.join(missing) or 'config'})")
        bank = cls(**state["config"], backend=backend, device=device, dtype=getattr(torch, str(state["dtype"])))
        bank.load_state_dict(state)
        return bank
