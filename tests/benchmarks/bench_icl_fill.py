#!/usr/bin/env python
"""Filling memory with ICL demonstrations on LongMem over SmolLM2-135M: the whole model per block against the
backbone up to its retrieval layer (``write_memory_only``).

The model of ``bench_generation.py`` (the SmolLM2 recipe's: memory from backbone layer 18, chunk 4; weights as
initialised, which the timings do not depend on). SST-2, seed 1, the 2,000 memory demonstrations of
``longmem-eval-icl`` cut into 1,024-token blocks; the first ``--blocks`` of them written into an empty memory (release
mode, holding them all) by

- the whole model, memory writes on and reads off (every block through the 30 backbone layers, the 15 SideNet layers
  and the output heads: ``icl.fill_memory`` before 2026-12-08; the release runs the same, reading memory too);
- ``model.decoder.write_memory_only`` (``icl.fill_memory`` now): the backbone to layer 18's key/value projections.

Interleaved rounds, median; both memories compared bit for bit. Writes its table into docs/benchmarks.md.

    python tests/benchmarks/bench_icl_fill.py [--gguf PATH] [--blocks 6] [--repeats 2] [--no-write]
"""
import argparse

import torch

from bench_generation import GGUF, smollm2_model

import longmem  # noqa: F401
from longmem import paths
from longmem.evaluation import icl
from longmem.evaluation.codec import TextCodec
from longmem.tokenizer import Tokenizer
from report import interleaved, publish


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--blocks", type=int, default=6, help="1,024-token blocks written per fill")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    built = smollm2_model(args.gguf, "bench_icl_fill")
    if built is None:
        return
    model, d = built
    codec = TextCodec(d, tokenizer=Tokenizer(hf_tokenizer=args.gguf))
    spec, train, dev = icl.load_task(paths.ICL, "sst2")
    blocks, _ = icl.prompts_for_seed(spec, train, dev[:1], codec, d, 20, 2000, 1, 1024)
    every = len(blocks)
    blocks = blocks[: args.blocks]
    model.memory.configure(mode="release", chunk_size=2, slot="eval", writes=False, enabled=True)
    icl.size_memory(model, blocks, model.memory.settings.memory_size)
    banks = {}

    def whole():
        model.memory.reset()
        with model.memory.configured(enabled=True, writes=True, reads=False), torch.no_grad():
            for b in blocks:
                model(torch.tensor([b]))
        banks["whole"] = model.memory.bank.state_dict()

    def fast():
        model.memory.reset()
        icl.fill_memory(model, blocks, torch.device("cpu"))
        banks["fast"] = model.memory.bank.state_dict()

    seconds = interleaved({"whole": whole, "fast": fast}, repeats=args.repeats, warmup=1)
    same = all(torch.equal(v, banks["fast"][k]) if torch.is_tensor(v) else v == banks["fast"][k]
               for k, v in banks["whole"].items())
    per = {k: s / len(blocks) for k, s in seconds.items()}
    lines = [f"SmolLM2-135M LongMem (transformer_lm_sidenet_smollm2_135m), fp32, {torch.get_num_threads()} threads, "
             f"one run (`python tests/benchmarks/bench_icl_fill.py`).", "",
             f"SST-2, seed 1: its 2,000 memory demonstrations are {every} blocks of 1,024 tokens; the first "
             f"{len(blocks)} written into an empty memory, {args.repeats} interleaved rounds after a warm-up, median.", "",
             "| fill | s / block | speed-up | SST-2's 2,000 demonstrations (s, projected) |", "|---|---:|---:|---:|",
             f"| whole model per block (memory writes on, reads off) | {per['whole']:.2f} | 1.0x | "
             f"{per['whole'] * every:.0f} |",
             f"| backbone to layer 18's keys/values (`write_memory_only`) | {per['fast']:.2f} | "
             f"{per['whole'] / per['fast']:.1f}x | {per['fast'] * every:.0f} |", "",
             f"The two memories are {'the same bit for bit' if same else 'NOT the same'}."]
    publish(lines, "icl-fill", "Filling memory with ICL demonstrations (SmolLM2-135M)", not args.no_write)
    if not same:
        raise SystemExit("bench_icl_fill: the two fills wrote different memories")


if __name__ == "__main__":
    main()
