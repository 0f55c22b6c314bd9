#!/usr/bin/env python
"""Memory-bank benchmark at paper scale (docs/design.md §3), on whatever machine runs it.

65,536-token memory, 16 heads x 64, k = 64, chunk size 4, one bank, 1,024-token segments. Measures in
one run: retrieval per segment for each backend; ``add`` of a segment into a full memory of 8k and of
65k tokens, for both eviction rules; the release's own scheme restated from its code (one
``IndexFlatIP`` per head, preallocated tensors written in place, eviction of 2*B*T/csz chunks with
``remove_ids`` and a tensor shift) for comparison; and the floor, one float32 matmul of the search's
shape per head. Writes its table into docs/benchmarks.md.

    python tests/benchmarks/bench_memory.py [--repeats 5] [--no-write]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from longmem.modules.memory_bank import ChunkedMemoryBank  # noqa: E402
from report import write_section  # noqa: E402

H, D, K, CSZ, T = 16, 64, 64, 4, 1024


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ReleaseStyleMemory:
    """The release's External_Memory as its code does it (modules/dynamic_memory_with_chunk.py): one
    exact faiss IndexFlatIP per head over chunk means; keys/values in preallocated per-head tensors written
    in place at dstore_idx; when dstore_idx + B*T/csz >= capacity, the oldest 2*B*T/csz chunks are removed
    from every index (``remove_ids``) and shifted out of the tensors (a copy plus zeros). On a GPU the
    release also copies each index to the host and back for the removal; on a CPU there is no copy."""

    def __init__(self, memory_size, dtype=torch.float16):
        import faiss

        self.faiss = faiss
        self.capacity = memory_size // CSZ
        self.indexes = [faiss.IndexFlatIP(D) for _ in range(H)]
        self.keys = [torch.zeros(self.capacity, CSZ, D, dtype=dtype) for _ in range(H)]
        self.vals = [torch.zeros(self.capacity, CSZ, D, dtype=dtype) for _ in range(H)]
        self.dstore_idx = 0

    def add(self, keys, values):  # (B, T, H*D)
        import numpy as np

        bsz_seq = keys.size(0) * keys.size(1)
        if self.dstore_idx + bsz_seq // CSZ >= self.capacity:
            update = 2 * bsz_seq // CSZ
            self.dstore_idx -= update
            for index in self.indexes:
                index.remove_ids(np.arange(update))
            zeros = torch.zeros(update, CSZ, D, dtype=self.keys[0].dtype)
            self.keys = [torch.cat((k[update:], zeros)) for k in self.keys]
            self.vals = [torch.cat((v[update:], zeros)) for v in self.vals]
        n = bsz_seq // CSZ
        k = keys.reshape(n, CSZ, H, D)
        v = values.reshape(n, CSZ, H, D)
        for h, index in enumerate(self.indexes):
            index.add(k[:, :, h].mean(dim=-2).float().contiguous().numpy())
            self.keys[h][self.dstore_idx: self.dstore_idx + n] = k[:, :, h]
            self.vals[h][self.dstore_idx: self.dstore_idx + n] = v[:, :, h]
        self.dstore_idx += n

    def retrieve(self, queries):  # (1, T, H*D)
        q = queries.view(T, H, D).float()
        kc = K // CSZ
        out_k = torch.empty(H, T, K, D, dtype=self.keys[0].dtype)
        out_v = torch.empty_like(out_k)
        for h, index in enumerate(self.indexes):
            _, ids = index.search(q[:, h].contiguous().numpy(), kc)
            ids = torch.from_numpy(ids).view(-1)
            out_k[h] = self.keys[h][ids].view(T, K, D)
            out_v[h] = self.vals[h][ids].view(T, K, D)
        return out_k, out_v


def timed_adds(memory, seg_k, seg_v, repeats):
    """Mean time of an add over 2 x repeats adds into a memory in its steady state: the release evicts on
    every other add, so single adds are not comparable."""
    memory.add(seg_k, seg_v)  # warm-up
    start = time.perf_counter()
    for _ in range(2 * repeats):
        memory.add(seg_k, seg_v)
    return (time.perf_counter() - start) / (2 * repeats)


def fill(bank, memory_size):
    for _ in range(memory_size // T):
        bank.add(torch.randn(1, T, H * D), torch.randn(1, T, H * D))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    torch.manual_seed(0)
    seg_k, seg_v, seg_q = (torch.randn(1, T, H * D) for _ in range(3))
    rows, results = [], {}

    # floor: the search's matmul, float32, one per head: (T x d) @ (d x C)
    C = 65536 // CSZ
    q = torch.randn(H, T, D)
    base = torch.randn(H, D, C)
    results["floor"] = timed(lambda: [q[h] @ base[h] for h in range(H)], args.repeats)
    rows.append(("floor: one fp32 matmul per head, T x d @ d x C (C = 16,384 chunks)", results["floor"], ""))

    for backend in ("torch", "faiss"):
        bank = ChunkedMemoryBank(H, D, 65536, CSZ, K, backend=backend)
        fill(bank, 65536)
        t = timed(lambda: bank.retrieve(seg_q), args.repeats)
        results[f"retrieve_{backend}"] = t
        rows.append((f"ours, retrieve 1,024 queries, backend={backend}", t,
                     f"{t / results['floor']:.2f}x floor"))
    for memory_size in (8192, 65536):
        for eviction in ("ring", "release"):
            bank = ChunkedMemoryBank(H, D, memory_size, CSZ, K, backend="torch", eviction=eviction, shared=True)
            fill(bank, memory_size)
            t = timed_adds(bank, seg_k, seg_v, args.repeats)
            results[f"add_{eviction}_{memory_size}"] = t
            rows.append((f"ours, eviction={eviction}: add 1,024 tokens to a full {memory_size:,}-token memory", t, ""))
        release = ReleaseStyleMemory(memory_size)
        fill(release, memory_size)
        t = timed_adds(release, seg_k, seg_v, args.repeats)
        results[f"add_release_scheme_{memory_size}"] = t
        rows.append((f"release's code: add 1,024 tokens to a full {memory_size:,}-token memory", t,
                     f"ours (ring) is {t / results[f'add_ring_{memory_size}']:.1f}x faster, "
                     f"ours (release eviction) {t / results[f'add_release_{memory_size}']:.1f}x"))
        if memory_size == 65536:
            t = timed(lambda: release.retrieve(seg_q), args.repeats)
            results["retrieve_release"] = t
            rows.append(("release's code: retrieve 1,024 queries (IndexFlatIP per head)", t,
                         f"{t / results['floor']:.2f}x floor"))

    flat = results["add_ring_65536"] / results["add_ring_8192"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} runs (adds: mean of {2 * args.repeats} "
        f"adds in the steady state, where the release evicts on every other add). Memory 65,536 tokens, 16 "
        f"heads x 64, k = 64, chunk 4, one bank, 1,024-token segments, fp16 storage.",
        "",
        "| what | time per segment | note |",
        "|---|---:|---|",
        *[f"| {name} | {t * 1000:.1f} ms | {note} |" for name, t, note in rows],
        "",
        f"- add, full 65k vs full 8k memory (ours, ring): {flat:.2f}x (flat = 1.0; target about flat)",
        f"- add on a full 65k memory, the release's code / ours: "
        f"{results['add_release_scheme_65536'] / results['add_ring_65536']:.1f}x (ring), "
        f"{results['add_release_scheme_65536'] / results['add_release_65536']:.1f}x (release eviction)",
        f"- best retrieval / matmul floor: "
        f"{min(results['retrieve_torch'], results['retrieve_faiss']) / results['floor']:.2f}x "
        f"(target <= 2x)",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("bench_memory", "Memory bank (tests/benchmarks/bench_memory.py)", text)


if __name__ == "__main__":
    main()
