#!/usr/bin/env python
"""LongMem training-step cost of the memory, at tiny scale, on whatever machine runs it.

newgpt-tiny backbone (4 layers x 256, 4 heads; random weights: speed does not depend on them) and
transformer_lm_sidenet_tiny (2 layers). One batch of 8 rows x 256 tokens, per-stream memory of 4,096
tokens per row, k = 32, chunk 4. Times, in one run and on the same batch: a training step (forward,
backward, Adam) with memory on and the memory full, the same step with memory off, and forward-only
throughput for both. Writes its table into docs/benchmarks.md.

    python tests/benchmarks/bench_sidenet.py [--repeats 9] [--no-write]
"""
import argparse
import os
import platform
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

import longmem  # noqa: E402,F401
from longmem import precision
from fairseq.data import Dictionary
from longmem.models.newgpt import build_newgpt
from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet
from longmem.utils.checkpoints import save_fairseq_checkpoint
from report import interleaved, publish

B, T, VOCAB = 8, 256, 8000
MEMORY, K, CSZ = 4096, 32, 4


class _Task:
    def __init__(self, d):
        self.target_dictionary = self.source_dictionary = d


def build(use_memory, backbone_path, dictionary):
    cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=256, decoder_attention_heads=4,
                        decoder_ffn_embed_dim=1024, retrieval_layer_index=2, pretrained_model_path=backbone_path,
                        reload_ptm_layer=True, use_external_memory=use_memory, memory_size=MEMORY, k=K,
                        chunk_size=CSZ, memory_backend="torch", dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    return TransformerLanguageModelSideNet.build_model(cfg, _Task(dictionary))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    d = Dictionary()
    for i in range(VOCAB - 4):
        d.add_symbol(f"w{i}")
    tmp = tempfile.mkdtemp()
    backbone = build_newgpt("newgpt-tiny", d)
    path = os.path.join(tmp, "backbone.pt")
    save_fairseq_checkpoint(path, backbone.state_dict(), cfg={"model": {"_name": "newgpt-tiny", "num_attention_heads": 4}})
    tokens = torch.randint(4, len(d), (B, T + 1))
    src, tgt = tokens[:, :-1], tokens[:, 1:]

    fns = {}
    for use_memory in (False, True):
        model = build(use_memory, path, d).train()
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            model.train()
            opt.zero_grad()
            logits = model(src)[0]
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1)).backward()
            opt.step()

        def forward(model=model):
            model.eval()
            with torch.no_grad():
                model(src)

        if use_memory:
            for _ in range(MEMORY // T):  # fill the memory
                with torch.no_grad():
                    model(src)
            assert all(model.memory.bank.num_tokens(b) == MEMORY for b in range(B))
        fns[f"step_{use_memory}"], fns[f"fwd_{use_memory}"] = step, forward
    results = interleaved(fns, args.repeats)

    ratio = results["step_True"] / results["step_False"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} rounds (each round times every row's two "
        f"columns once, after 2 warm-up rounds); glibc malloc keeps freed memory: {precision.keep_freed_memory()}. "
        f"newgpt-tiny backbone + "
        f"transformer_lm_sidenet_tiny, batch {B} x {T} tokens, vocabulary {VOCAB}, per-stream memory "
        f"{MEMORY:,} tokens per row (full), k = {K}, chunk {CSZ}, backend torch.",
        "",
        "| what | memory off | memory on (full) | on / off |",
        "|---|---:|---:|---:|",
        f"| training step (fwd + bwd + Adam) | {results['step_False'] * 1000:.0f} ms | "
        f"{results['step_True'] * 1000:.0f} ms | {ratio:.2f}x |",
        f"| forward throughput | {B * T / results['fwd_False']:,.0f} tok/s | "
        f"{B * T / results['fwd_True']:,.0f} tok/s | {results['fwd_True'] / results['fwd_False']:.2f}x time |",
        "",
        f"- memory's cost on a training step: {ratio:.2f}x (target <= 1.1x); on a forward: "
        f"{results['fwd_True'] / results['fwd_False']:.2f}x (target <= 1.2x)",
    ]
    publish(lines, "bench_sidenet", "LongMem training step, memory on vs off (tests/benchmarks/bench_sidenet.py)",
            write=not args.no_write)


if __name__ == "__main__":
    main()
