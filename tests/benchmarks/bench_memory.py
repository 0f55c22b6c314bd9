#!/usr/bin/env python
"""Memory-bank benchmark at paper scale (docs/design.md §3), on whatever machine runs it.

65,536-token memory, 16 heads x 64, k = 64, chunk size 4, one stream, 1,024-token segments. Measures
in one run: retrieval per segment for each backend; ``add`` of a segment into a full memory of 8k and
of 65k tokens; the release's scheme written from docs/design.md §3 (one ``IndexFlatIP`` per head, FIFO eviction
of 2*B*T/csz chunks with ``remove_ids``, tensor shifts) for comparison; and the floor, one float32
matmul of the search's shape per head. Writes its table into docs/benchmarks.md.

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
    """The release's scheme as docs/design.md §3 describes it: one exact faiss IndexFlatIP per head over chunk
    keys, key/value tensors appended, and when full the oldest 2*B*T/csz chunks removed from every
    index with ``remove_ids`` and shifted out of the tensors. (On GPU the release also copies each
    index to the host and back for the removal; on CPU there is no copy to make.)"""

    def __init__(self, memory_size, batch=1, dtype=torch.float16):
        import faiss

        self.faiss = faiss
        self.capacity = memory_size // CSZ
        self.evict = 2 * batch * T // CSZ
        self.indexes = [faiss.IndexFlatIP(D) for _ in range(H)]
        self.keys = torch.zeros(0, CSZ, H, D, dtype=dtype)
        self.values = torch.zeros(0, CSZ, H, D, dtype=dtype)

    def add(self, keys, values):  # (B, T, H*D)
        k = keys.reshape(-1, CSZ, H, D).to(self.keys.dtype)
        v = values.reshape(-1, CSZ, H, D).to(self.values.dtype)
        if self.keys.size(0) + k.size(0) > self.capacity:
            ids = self.faiss.IDSelectorRange(0, self.evict)
            for index in self.indexes:
                index.remove_ids(ids)
            self.keys, self.values = self.keys[self.evict:], self.values[self.evict:]
        means = k.float().mean(1)  # (n, H, D)
        for h, index in enumerate(self.indexes):
            index.add(means[:, h].contiguous().numpy())
        self.keys = torch.cat([self.keys, k])
        self.values = torch.cat([self.values, v])

    def retrieve(self, queries):  # (1, T, H*D)
        q = queries.view(T, H, D).float()
        kc = K // CSZ
        out_k = torch.empty(H, T, K, D, dtype=self.keys.dtype)
        out_v = torch.empty_like(out_k)
        for h, index in enumerate(self.indexes):
            _, ids = index.search(q[:, h].contiguous().numpy(), kc)
            ids = torch.from_numpy(ids).view(-1)
            out_k[h] = self.keys[ids, :, h].view(T, K, D)
            out_v[h] = self.values[ids, :, h].view(T, K, D)
        return out_k, out_v


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
        bank = ChunkedMemoryBank(H, D, memory_size, CSZ, K, backend="torch")
        fill(bank, memory_size)
        assert bank.num_tokens() == memory_size
        t = timed(lambda: bank.add(seg_k, seg_v), args.repeats)
        results[f"add_ours_{memory_size}"] = t
        rows.append((f"ours, add 1,024 tokens to a full {memory_size:,}-token memory", t, ""))

    for memory_size in (8192, 65536):
        release = ReleaseStyleMemory(memory_size)
        fill(release, memory_size)
        t = timed(lambda: release.add(seg_k, seg_v), args.repeats)
        results[f"add_release_{memory_size}"] = t
        rows.append((f"release scheme, add 1,024 tokens to a full {memory_size:,}-token memory", t,
                     f"ours is {t / results[f'add_ours_{memory_size}']:.1f}x faster"))
        if memory_size == 65536:
            t = timed(lambda: release.retrieve(seg_q), args.repeats)
            results["retrieve_release"] = t
            rows.append(("release scheme, retrieve 1,024 queries (IndexFlatIP per head)", t,
                         f"{t / results['floor']:.2f}x floor"))

    flat = results["add_ours_65536"] / results["add_ours_8192"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} runs. Memory 65,536 tokens, "
        f"16 heads x 64, k = 64, chunk 4, one stream, 1,024-token segments, fp16 storage.",
        "",
        "| what | time per segment | note |",
        "|---|---:|---|",
        *[f"| {name} | {t * 1000:.1f} ms | {note} |" for name, t, note in rows],
        "",
        f"- add, full 65k vs full 8k memory (ours): {flat:.2f}x (flat = 1.0; target about flat)",
        f"- add on a full 65k memory, release scheme / ours: "
        f"{results['add_release_65536'] / results['add_ours_65536']:.1f}x (target >= 10x)",
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
