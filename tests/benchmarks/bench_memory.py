#!/usr/bin/env python
"""Memory-bank benchmark (docs/design.md §3), on whatever machine runs it.

Retrieval at three shapes (the paper's: 65,536-token memory, 16 heads x 64, k = 64, chunk size 4, one
bank, 1,024 queries; and the SmolLM2 and tiny benchmarks' per-row memories), each backend against the
floor (one float32 matmul of the search's shape per row and head) and what ``backend='auto'`` chooses.
At the paper's shapes, in one run: ``add`` of a segment into a full memory of 8k and of
65k tokens, for both eviction rules; the release's own scheme restated from its code (one exact flat
index per head, preallocated tensors written in place, eviction of 2*B*T/csz chunks with ``remove_ids``
and a tensor shift) for comparison; and the floor, one float32 matmul of the search's shape per head.
Writes its table into docs/benchmarks.md (or ``--doc``).

    python tests/benchmarks/bench_memory.py [--repeats 5] [--device cuda] [--no-write]

On a GPU (``--device cuda``) ours searches with the torch backend; the release's scheme keeps its
per-head index on the GPU and, to evict, copies it to the host, removes the oldest rows and copies it
back (faiss's ``index_gpu_to_cpu``/``remove_ids``/``index_cpu_to_gpu``); without faiss there it is
restated with torch (the same copies and an exact matmul search).
"""
import argparse
import os
import platform
import statistics
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

from longmem.modules.memory_bank import ChunkedMemoryBank, _faiss
from longmem import precision
from report import interleaved, publish

H, D, K, CSZ, T = 16, 64, 64, 4, 1024
# (label, heads, memory tokens per row, k, rows, segment): the paper's retrieval; the SmolLM2 recipe's
# (bench_smollm2); the tiny model's (bench_sidenet)
RETRIEVAL_SHAPES = [("paper", 16, 65536, 64, 1, 1024), ("smollm2", 9, 4096, 32, 2, 256), ("tiny", 4, 4096, 32, 8, 256)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_adds(memory, seg_k, seg_v, repeats, device):
    """Mean time of an add over 2 x repeats adds into a memory in its steady state: the release evicts on
    every other add, so single adds are not comparable."""
    memory.add(seg_k, seg_v)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(2 * repeats):
        memory.add(seg_k, seg_v)
    sync(device)
    return (time.perf_counter() - start) / (2 * repeats)


class FlatIndex:
    """One head's exact inner-product index: faiss's IndexFlatIP on a CPU, or its GPU behaviour restated
    with torch (rows on the device; removal = to the host, drop the oldest rows, back to the device)."""

    def __init__(self, device):
        self.device, self.faiss = device, _faiss() if device.type == "cpu" else None
        if self.faiss is not None:
            self.index = self.faiss.IndexFlatIP(D)
        else:
            self.rows = torch.zeros(0, D, device=device)

    def add(self, x):  # (n, D) float32
        if self.faiss is not None:
            self.index.add(x.contiguous().numpy())
        else:
            self.rows = torch.cat([self.rows, x])

    def remove_oldest(self, n):
        if self.faiss is not None:
            import numpy as np

            self.index.remove_ids(np.arange(n))
        else:
            self.rows = self.rows.cpu()[n:].to(self.device)

    def search(self, q, k):  # (T, D) -> ids (T, k)
        if self.faiss is not None:
            return torch.from_numpy(self.index.search(q.contiguous().numpy(), k)[1])
        return (q @ self.rows.T).topk(k, dim=-1).indices


class ReleaseStyleMemory:
    """The release's External_Memory as its code does it (modules/dynamic_memory_with_chunk.py): one
    exact flat index per head over chunk means; keys/values in preallocated per-head tensors written in
    place at dstore_idx; when dstore_idx + B*T/csz >= capacity, the oldest 2*B*T/csz chunks are removed
    from every index and shifted out of the tensors (a copy plus zeros)."""

    def __init__(self, memory_size, device, dtype=torch.float16):
        self.capacity = memory_size // CSZ
        self.indexes = [FlatIndex(device) for _ in range(H)]
        self.keys = [torch.zeros(self.capacity, CSZ, D, dtype=dtype, device=device) for _ in range(H)]
        self.vals = [torch.zeros(self.capacity, CSZ, D, dtype=dtype, device=device) for _ in range(H)]
        self.dstore_idx = 0

    def add(self, keys, values):  # (B, T, H*D)
        bsz_seq = keys.size(0) * keys.size(1)
        if self.dstore_idx + bsz_seq // CSZ >= self.capacity:
            update = 2 * bsz_seq // CSZ
            self.dstore_idx -= update
            for index in self.indexes:
                index.remove_oldest(update)
            zeros = torch.zeros(update, CSZ, D, dtype=self.keys[0].dtype, device=self.keys[0].device)
            self.keys = [torch.cat((k[update:], zeros)) for k in self.keys]
            self.vals = [torch.cat((v[update:], zeros)) for v in self.vals]
        n = bsz_seq // CSZ
        k = keys.reshape(n, CSZ, H, D)
        v = values.reshape(n, CSZ, H, D)
        for h, index in enumerate(self.indexes):
            index.add(k[:, :, h].mean(dim=-2).float())
            self.keys[h][self.dstore_idx: self.dstore_idx + n] = k[:, :, h]
            self.vals[h][self.dstore_idx: self.dstore_idx + n] = v[:, :, h]
        self.dstore_idx += n

    def retrieve(self, queries):  # (1, T, H*D)
        q = queries.view(T, H, D).float()
        out_k = torch.empty(H, T, K, D, dtype=self.keys[0].dtype, device=self.keys[0].device)
        out_v = torch.empty_like(out_k)
        for h, index in enumerate(self.indexes):
            ids = index.search(q[:, h], K // CSZ).reshape(-1).to(self.keys[h].device)
            out_k[h] = self.keys[h][ids].view(T, K, D)
            out_v[h] = self.vals[h][ids].view(T, K, D)
        return out_k, out_v


def fill(bank, memory_size, device, rows=1, seg=T, heads=H):
    """Add random segments of ``rows`` x ``seg`` tokens until each row has given ``memory_size`` tokens."""
    for _ in range(memory_size // seg):
        bank.add(torch.randn(rows, seg, heads * D, device=device), torch.randn(rows, seg, heads * D, device=device))


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--doc", help="Markdown file to write the section into (default: docs/benchmarks.md)")
    p.add_argument("--no-write", action="store_true", help="print only; write no file")
    args = p.parse_args()
    device = torch.device(args.device)
    precision.keep_freed_memory()  # as building a LongMem model does
    torch.manual_seed(0)
    seg_k, seg_v, seg_q = (torch.randn(1, T, H * D, device=device) for _ in range(3))
    rows, results = [], {}

    # retrieval against its floor (the search's fp32 matmul, one per row and head: T x d @ d x C), for the
    # paper's shapes and this project's two CPU configurations; the backends timed in the same rounds
    backends = ["torch"] + (["faiss"] if device.type == "cpu" and _faiss() is not None else [])
    for label, heads, memory_size, k, rows_, seg in RETRIEVAL_SHAPES:
        C = memory_size // CSZ
        q = torch.randn(rows_, heads, seg, D, device=device)
        base = torch.randn(rows_, heads, D, C, device=device)
        fns = {"floor": lambda: [q[b, h] @ base[b, h] for b in range(rows_) for h in range(heads)]}
        queries = torch.randn(rows_, seg, heads * D, device=device)
        banks = {}
        for backend in backends + ["auto"]:
            bank = ChunkedMemoryBank(heads, D, memory_size, CSZ, k, num_streams=rows_, backend=backend,
                                     device=device, dtype=torch.float16)
            fill(bank, memory_size, device, rows=rows_, seg=seg, heads=heads)
            banks[backend] = bank
        for backend in backends:
            fns[backend] = (lambda bank: lambda: bank.retrieve(queries))(banks[backend])
        t = interleaved(fns, args.repeats, sync=lambda: sync(device))
        fastest = min(backends, key=lambda b: t[b])
        results[f"floor_{label}"] = t["floor"]
        for backend in backends:
            results[f"retrieve_{backend}_{label}"] = t[backend]
        rows.append((f"{label}: floor, fp32 matmul per row and head ({rows_} x {heads} x {seg} x {D} @ {D} x {C:,})",
                     t["floor"], ""))
        for backend in backends:
            rows.append((f"{label}: ours, retrieve, backend={backend}", t[backend],
                         f"{t[backend] / t['floor']:.2f}x floor" + ("; fastest" if backend == fastest else "")
                         + ("; what 'auto' chose" if banks["auto"].backend == backend else "")))
    results["floor"] = results["floor_paper"]
    on_device = dict(device=device, dtype=torch.float16)

    for memory_size in (8192, 65536):
        for eviction in ("ring", "release"):
            bank = ChunkedMemoryBank(H, D, memory_size, CSZ, K, backend="torch", eviction=eviction, shared=True,
                                     **on_device)
            fill(bank, memory_size, device)
            t = timed_adds(bank, seg_k, seg_v, args.repeats, device)
            results[f"add_{eviction}_{memory_size}"] = t
            rows.append((f"ours, eviction={eviction}: add 1,024 tokens to a full {memory_size:,}-token memory", t, ""))
        release = ReleaseStyleMemory(memory_size, device)
        fill(release, memory_size, device)
        t = timed_adds(release, seg_k, seg_v, args.repeats, device)
        results[f"add_release_scheme_{memory_size}"] = t
        rows.append((f"release's scheme: add 1,024 tokens to a full {memory_size:,}-token memory", t,
                     f"release's scheme / ours: {t / results[f'add_ring_{memory_size}']:.1f}x (ring), "
                     f"{t / results[f'add_release_{memory_size}']:.1f}x (release eviction)"))
        t = timed(lambda: release.retrieve(seg_q), args.repeats, device)
        results[f"retrieve_release_{memory_size}"] = t
        rows.append((f"release's scheme: retrieve 1,024 queries from {memory_size:,} tokens (flat index per head)",
                     t, f"{t / results['floor']:.2f}x floor" if memory_size == 65536 else ""))
        bank = ChunkedMemoryBank(H, D, memory_size, CSZ, K, backend="torch", shared=True, **on_device)
        fill(bank, memory_size, device)
        t = timed(lambda: bank.retrieve(seg_q), args.repeats, device)
        rows.append((f"ours: retrieve 1,024 queries from {memory_size:,} tokens, backend=torch", t,
                     f"release's scheme / ours: {results[f'retrieve_release_{memory_size}'] / t:.2f}x"))

    flat = results["add_ring_65536"] / results["add_ring_8192"]
    lines = [
        f"Machine: {machine(device)}; median of {args.repeats} runs (retrieval: of {args.repeats} rounds, each "
        f"timing the floor and every backend once; adds: mean of {2 * args.repeats} adds in the steady state, "
        f"where the release evicts on every other add); glibc malloc keeps freed memory: "
        f"{precision.keep_freed_memory()} (as in a LongMem model). Retrieval: full memories, fp16 storage, "
        f"chunk 4, 64 dims per head; paper = 65,536 tokens, 16 heads, k = 64, one bank, 1,024 queries; smollm2 "
        f"and tiny = the shapes of the two benchmarks below (4,096 tokens per row, k = 32, 256 queries per "
        f"row). Adds: memory of 65,536 (or 8,192) tokens, 16 heads, one bank, 1,024-token segments.",
        "",
        "| what | time per segment | note |",
        "|---|---:|---|",
        *[f"| {name} | {t * 1000:.1f} ms | {note} |" for name, t, note in rows],
        "",
        f"- add, full 65k vs full 8k memory (ours, ring): {flat:.2f}x (flat = 1.0; target about flat)",
        f"- add on a full 65k memory, the release's scheme / ours: "
        f"{results['add_release_scheme_65536'] / results['add_ring_65536']:.1f}x (ring), "
        f"{results['add_release_scheme_65536'] / results['add_release_65536']:.1f}x (release eviction)",
        *[f"- {label}: retrieval / matmul floor, torch {results[f'retrieve_torch_{label}'] / results[f'floor_{label}']:.2f}x"
          + "".join(f", {b} {results[f'retrieve_{b}_{label}'] / results[f'floor_{label}']:.2f}x" for b in backends[1:])
          + " (target: torch <= 1.2x)" for label, *_ in RETRIEVAL_SHAPES],
    ]
    name = "bench_memory" if device.type == "cpu" else "bench_memory_gpu"
    title = "Memory bank (tests/benchmarks/bench_memory.py)" if device.type == "cpu" else \
        f"Memory bank on a GPU: {machine(device).split(',')[0]} (tests/benchmarks/bench_memory.py --device cuda)"
    publish(lines, name, title, write=not args.no_write, doc=args.doc)


if __name__ == "__main__":
    main()
