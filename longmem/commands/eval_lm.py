"""Long-document perplexity by length bucket and position in the document (logic: longmem/evaluation/lm.py).

Each document of the split is read in order in --tokens-per-sample segments; LongMem's memory is emptied
at each document. Compares in one run: the backbone alone (--backbone), LongMem with memory off and
LongMem with memory on (--longmem, same weights). Writes a JSON file and a PNG of loss against position.

    python eval_scripts/eval_longmem_lm.py demo_out/data-bin --gen-subset test \\
        --backbone demo_out/backbone/checkpoint_last.pt --longmem demo_out/longmem/checkpoint_last.pt \\
        --tokens-per-sample 256 --results-path lm_eval.json --plot lm_eval.png
"""
import argparse
import json

from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_open
from longmem.utils.cli import exit_on_config_error, output_file, positive_int, quiet_libraries


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["models"].items():
        labels = list(r["loss_by_position"])
        ax.plot(range(len(labels)), list(r["loss_by_position"].values()), marker="o", label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{results['documents']} documents, segments of {results['tokens_per_sample']} tokens")
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def main(argv=None):
    return exit_on_config_error(run, argv)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin folder (dict.txt and the split)")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--backbone", help="newgpt checkpoint: scored alone")
    p.add_argument("--longmem", help="LongMem checkpoint: scored with memory off and on")
    p.add_argument("--tokens-per-sample", type=positive_int, default=1024)
    p.add_argument("--results-path", type=output_file, help="JSON output")
    p.add_argument("--plot", type=output_file, help="PNG of loss against position in the document")
    p.add_argument("--token-mask", help="a .mask file of preprocess/make_longrange.py for this split: "
                   "also report perplexity on the marked (recurring/queried) tokens")
    p.add_argument("--memory-size", type=positive_int, help="LongMem: memory capacity at evaluation (default: trained)")
    p.add_argument("--k", type=positive_int, help="LongMem: retrieved tokens per query at evaluation (default: trained)")
    p.add_argument("--chunk-size", type=positive_int, help="LongMem: memory chunk size at evaluation (default: trained)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                   help="LongMem: CPU arithmetic at evaluation (default: the checkpoint's --precision)")
    args = p.parse_args(argv)
    if not (args.backbone or args.longmem):
        raise ConfigError("nothing to evaluate: pass --backbone and/or --longmem")
    return args


def load_models(args, dictionary, device) -> dict:
    """{row name: (model, memory on?)}: the backbone alone, LongMem with memory off and on (one model)."""
    from longmem.models.loading import load_model_for_dictionary

    models = {}
    if args.longmem:  # first: a bad memory setting is refused before any model is scored
        lm = load_model_for_dictionary(args.longmem, dictionary, args.data, device, expect="longmem")
        try:
            lm.memory.configure(**{name: getattr(args, name) for name in ("memory_size", "k", "chunk_size")
                                   if getattr(args, name) is not None})
        except ValueError as e:
            raise ConfigError(f"--memory-size/--k/--chunk-size: {e}")
        lm.memory.check_segment(args.tokens_per_sample, rows=1)  # each document read as 1 row
        if args.precision:
            lm.decoder.set_precision(args.precision)
    if args.backbone:
        models["backbone alone"] = (load_model_for_dictionary(args.backbone, dictionary, args.data, device,
                                                              expect="backbone"), None)
    if args.longmem:
        models["LongMem, memory off"] = (lm, False)
        models["LongMem, memory on"] = (lm, True)
    return models


def print_table(results, args, marked: bool) -> None:
    names = list(results["models"])
    print(f"\n{results['documents']} documents of {args.gen_subset}, segments of {args.tokens_per_sample} tokens")
    print("| perplexity | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))

    def row(label, value):
        print(f"| {label} | " + " | ".join(f"{value(results['models'][n]):.2f}" for n in names) + " |")

    row("all", lambda r: r["ppl"])
    first = results["models"][names[0]]
    if marked:
        row(f"marked tokens ({first['tokens_marked']:,})", lambda r: r["ppl_marked"])
        for value, count in first["tokens_by_mark"].items():
            row(f"tokens marked {value} ({count:,})", lambda r, v=value: r["ppl_by_mark"][v])
        row("other tokens", lambda r: r["ppl_unmarked"])
    for bucket, count in first["tokens_by_length"].items():
        row(f"documents {bucket} ({count:,} tokens)", lambda r, b=bucket: r["by_length"][b])
    for pos in first["by_position"]:
        row(f"position {pos}", lambda r, p=pos: r["by_position"][p])


def run(argv=None):
    args = parse_args(argv)
    quiet_libraries()
    import torch
    from tqdm import tqdm

    from longmem.evaluation.lm import evaluate, load_split, load_token_marks
    dictionary, stream = load_split(args.data, args.gen_subset)
    marks = load_token_marks(args.token_mask, stream, args.gen_subset) if args.token_mask else None
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    models = load_models(args, dictionary, device)
    results = evaluate(models, stream, args.tokens_per_sample, dictionary.eos(), progress=tqdm, marks=marks)
    print_table(results, args, marks is not None)
    if args.results_path:
        with atomic_open(args.results_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return results

if __name__ == "__main__":
    main()
