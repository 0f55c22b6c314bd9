#!/usr/bin/env python
"""In-context learning of a LongMem checkpoint mixed with its backbone at fixed λ: ``p = (1 - λ) p_backbone +
λ p_SideNet``, for several λ from one forward per query. Each query's two next-token distributions (the SideNet's
and the backbone's, from the ``H[L]`` a LongMem forward computes anyway) are kept, and every λ is scored from them
with eval_icl's rule, memory off and on. λ = 0 is the backbone alone (it reads no memory: memory off and on agree),
λ = 1 the SideNet alone (the checkpoint as eval_icl scores it when it was trained without a mixture); any λ equals
``--mix-with-backbone constant --mix-gate-init logit(λ)``, one λ per run. For a checkpoint trained without
``--mix-with-backbone`` (or with ``constant``): it is loaded with a constant mixture, whose gate is not read.

The protocol and its arguments are eval_icl's (tasks, --hf-tokenizer, --seeds, --max-queries, --query-subset, ...):

    python tests/benchmarks/icl_mixture.py --longmem OUT/longmem/checkpoint_last.pt --hf-tokenizer GGUF \\
        --seeds 1 2 3 --max-queries 200 --query-subset spread --results-path OUT/icl_mixture.json \\
        [--lambdas 0 0.5 0.7 0.8 0.9 1]

Prints, per λ, each task's mean over the seeds and the five-task average (memory off / memory on); the JSON keeps
every task, mode, seed and λ (rewritten after each task, a rerun skips the tasks it holds).

``--memory-rules S:C ...`` also scores the mixture that reads memory (``--mix-with-backbone memory``): λ_t =
σ(logit(--rule-lambda) + S·(z_t - C)) with z_t the memory layer's evidence at the answer position (σ(logit(λ)) where
the token reads no memory, as without memory: a rule's memory-off accuracy is --rule-lambda's), each rule from the
same forward; the checkpoint is then loaded with that mixture to read z_t (``--modes memory-on`` skips memory off).
"""
import math
import json
import os
import statistics
import sys
import tempfile

import torch

from longmem.commands import eval_icl
from longmem.commands.set_mixture import mixed_log_probs

MODES = ("memory-off", "memory-on")


def score_task(args, name, task_data, model, codec, dictionary, device) -> dict:
    """{mode: {λ: [accuracy per seed]}} of one task."""
    from longmem.evaluation import icl

    spec, train, _ = task_data
    evaluation, label_tokens = eval_icl.task_queries(args, name, task_data, codec)
    golds = [gold for _, gold in evaluation]

    evidence = []

    def both(features):  # (b, 2, V): the SideNet's logits, then the backbone's
        if args.memory_rules:
            evidence.append(torch.stack(model.decoder.memory_evidence(features), dim=-1).float().cpu())  # (b, 2)
        return torch.stack(model.decoder.mixture_components(features), dim=1)

    out = {mode: {key: [] for key in score_keys(args)} for mode in args.modes}
    for mode in args.modes:
        for seed in args.seeds:
            evidence.clear()
            lp = icl.seed_log_probs(model, mode, spec, train, evaluation, codec, dictionary, device, seed, args.k,
                                    args.cache_k, args.memory_block, args.batch_size, head=both,
                                    memory_floor=getattr(args, "memory_floor", None))
            mixtures = {str(lam): mixed_log_probs(lp[:, 0], lp[:, 1], lam) for lam in args.lambdas}
            if args.memory_rules:
                z, present = torch.cat(evidence).unbind(-1)
                for slope, center in args.memory_rules:
                    a = math.log(args.rule_lambda / (1 - args.rule_lambda)) + torch.where(
                        present > 0.5, slope * (z - center), torch.zeros_like(z))
                    lam = torch.sigmoid(a.double()).unsqueeze(-1)
                    mixtures[rule_key(args, slope, center)] = torch.logaddexp(
                        torch.log1p(-lam) + lp[:, 1].double(), torch.log(lam) + lp[:, 0].double())
                print(f"{name} {mode} seed {seed}: evidence z at the answer (median over queries) "
                      f"{float(z.median()):.2f}, memory read by {float(present.mean()):.0%}", flush=True)
            for key, mixed in mixtures.items():
                out[mode][key].append(icl.score(mixed, golds, spec, codec.decode, label_tokens, args.scoring))
            print(f"{name} {mode} seed {seed}: " + " ".join(f"{key} {out[mode][key][-1]:.3f}" for key in mixtures),
                  flush=True)
    return out


def rule_key(args, slope: float, center: float) -> str:
    return f"memory λ={args.rule_lambda:g} s={slope:g} c={center:g}"


def score_keys(args) -> list:
    """The JSON's key of each mixture scored: every λ, then every memory rule."""
    return [str(lam) for lam in args.lambdas] + [rule_key(args, s, c) for s, c in args.memory_rules]


def memory_rule(text: str):
    slope, _, center = text.partition(":")
    return float(slope), float(center)


def print_table(args, results) -> None:
    """Per λ: each task's mean over the seeds, and the five-task average's mean ± std over the seeds."""
    tasks = [t for t in args.tasks if t in results]
    seeds = range(len(args.seeds))
    print(f"\nICL accuracy (%) of the mixture, seeds of demonstrations {args.seeds}: " + " / ".join(args.modes))
    print("| mixture | " + " | ".join(tasks) + " | average over tasks (mean ± std over seeds) |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for key in score_keys(args):
        acc = {mode: {t: [100 * a for a in results[t][mode][key]] for t in tasks} for mode in args.modes}
        row = [" / ".join(f"{statistics.mean(acc[mode][t]):.1f}" for mode in args.modes) for t in tasks]
        per_seed = {mode: [statistics.mean(acc[mode][t][s] for t in tasks) for s in seeds] for mode in args.modes}
        avg = " / ".join(f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" for v in per_seed.values())
        label = key if key.startswith("memory") else f"λ = {float(key):g}"
        print(f"| {label} | " + " | ".join(row) + f" | {avg} |")


def main(argv=None):
    p = eval_icl.build_parser(__doc__)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    p.add_argument("--memory-rules", type=memory_rule, nargs="+", default=[], metavar="S:C",
                   help="mixtures that read memory, each slope S and center C (--mix-with-backbone memory)")
    p.add_argument("--rule-lambda", type=float, default=0.7, help="the memory rules' λ without memory evidence")
    args = eval_icl.finish_args(p.parse_args(argv))
    if not args.longmem:
        p.error("--longmem: the LongMem checkpoint to mix with its backbone")
    if any(not 0 <= lam <= 1 for lam in args.lambdas):
        p.error(f"--lambdas must lie in [0, 1], got {args.lambdas}")
    if args.no_prefix_cache:
        p.error("--no-prefix-cache: the two distributions are read after the cached context only")
    if not 0 < args.rule_lambda < 1:
        p.error(f"--rule-lambda must lie in (0, 1), got {args.rule_lambda}")
    if args.modes and not set(args.modes) <= set(MODES):
        p.error(f"--modes: the mixture has {' and '.join(MODES)} only")
    args.modes = [m for m in MODES if not args.modes or m in args.modes]
    eval_icl.quiet_libraries()
    results = {}
    if args.results_path and os.path.isfile(args.results_path):
        with open(args.results_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("config", {}).get("longmem") == args.longmem and saved["config"].get("seeds") == args.seeds:
            results = {t: r for t, r in saved["results"].items()
                       if all(m in r and key in r[m] for m in args.modes for key in score_keys(args))}
    if all(t in results for t in args.tasks):
        print_table(args, results)
        return results
    with tempfile.TemporaryDirectory(prefix="longmem_icl_") as scratch:
        tasks, data, dict_path, dictionary, codec = eval_icl.read_tasks(p, args, scratch)
        # loaded with a constant mixture (or, for memory rules, one that reads memory), whose two components are
        # read (its gate is not used)
        mix = "memory" if args.memory_rules else "constant"
        models, device = eval_icl.load_models(p, args, dictionary, os.path.dirname(os.path.abspath(dict_path)),
                                              lm_overrides={"mix_with_backbone": mix})
        eval_icl.unmask_padding(models, dictionary, codec)
        model = models[args.modes[0]]  # one model for both modes
        for name in tasks:
            if name in results:
                print(f"{name}: in {args.results_path}, skipped", flush=True)
                continue
            results[name] = score_task(args, name, data[name], model, codec, dictionary, device)
            eval_icl.save_results(args, results)
    print_table(args, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
