"""Memory ablations at evaluation time: one LongMem checkpoint, the held-out long-range set, one knob
changed at a time (memory size, chunk size, k), perplexity overall and on the recurring/queried tokens.

The weights stay those trained with the preset's values; each row rebuilds the memory with the row's
settings and reads every document from an empty memory. Writes a Markdown table (and JSON).

    python eval_scripts/ablate_memory.py demo_out/data-bin-longrange \\
        --longmem demo_out/longmem/checkpoint_last.pt --token-mask demo_out/longrange/test.mask \\
        --tokens-per-sample 256 --output docs/ablations.md
"""
import argparse
import json
import os
import time
import sys

from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, output_file, positive_int, quiet_libraries

GRID = {"memory_size": [256, 512, 1024, 2048, 8192], "chunk_size": [1, 2, 4, 8], "k": [4, 8, 16, 32, 64]}


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin of the long-range set")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--longmem", required=True, help="LongMem checkpoint")
    p.add_argument("--token-mask", required=True, help="the split's .mask from preprocess/make_longrange.py")
    p.add_argument("--tokens-per-sample", type=positive_int, default=256)
    p.add_argument("--knobs", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--output", type=output_file, help="Markdown file for the table (a .json beside it)")
    args = p.parse_args(argv)
    quiet_libraries()
    from tqdm import tqdm

    from longmem.evaluation.lm import evaluate, load_split, load_token_marks
    from longmem.utils.atomic import atomic_open
    from longmem.models.loading import load_model_for_dictionary

    dictionary, stream = load_split(args.data, args.gen_subset)
    marks = load_token_marks(args.token_mask, stream, args.gen_subset)
    model = load_model_for_dictionary(args.longmem, dictionary, args.data, expect="longmem")
    trained = {knob: getattr(model.memory.settings, knob) for knob in GRID}
    rows = [("memory off", None, None)]
    for knob in args.knobs:
        rows += [(knob, value, {**trained, knob: value}) for value in GRID[knob]
                 if value >= 1 and not (knob == "k" and value % trained["chunk_size"])
                 and not (knob == "chunk_size" and trained["k"] % value)]
    rows = rows_that_can_run(model, rows, args.tokens_per_sample)
    results = []
    for knob, value, settings in tqdm(rows, desc="ablation rows", unit="row"):
        start = time.time()
        with model.memory.configured(**(settings or {})):
            r = evaluate({"m": (model, settings is not None)}, stream, args.tokens_per_sample, dictionary.eos(),
                         marks=marks)["models"]["m"]
        results.append({"knob": knob, "value": value, "settings": settings, "ppl": r["ppl"],
                        "recurring": r["ppl_by_mark"].get(1), "queried": r["ppl_by_mark"].get(2),
                        "seconds": round(time.time() - start, 1)})

    table = ablation_table(results, trained, args)
    print(table)
    if args.output:
        with atomic_open(args.output, "w", encoding="utf-8") as f:
            f.write(table)
        with atomic_open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump({"trained": trained, "rows": results}, f, indent=2)
    return results


def ablation_table(results, trained, args) -> str:
    lines = [f"Checkpoint trained with memory_size={trained['memory_size']}, chunk_size={trained['chunk_size']}, "
             f"k={trained['k']}; each row changes one knob at evaluation. Held-out long-range set "
             f"({args.gen_subset}), segments of {args.tokens_per_sample} tokens, memory emptied per document.",
             "", "| knob | value | perplexity, all | recurring tokens | queried tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        mark = " (trained)" if r["settings"] is not None and r["value"] == trained[r["knob"]] else ""
        lines.append(f"| {r['knob']} | {'' if r['value'] is None else r['value']}{mark} | {r['ppl']:.1f} | "
                     f"{fmt(r['recurring'])} | {fmt(r['queried'])} | {r['seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    missing = [name for name, key in (("recurring (1)", "recurring"), ("queried (2)", "queried"))
               if results[0][key] is None]
    if missing:
        table += f"\n(The mask marks no {' and no '.join(missing)} tokens: those columns are empty.)\n"
    return table


def rows_that_can_run(model, rows, tokens_per_sample: int) -> list:
    """The rows whose memory can read segments of ``tokens_per_sample`` tokens (``MemoryController.check_segment``,
    the rule training and longmem-eval-lm apply), checked before any row is scored: the trained settings refused in
    one line when they cannot; another row that cannot is left out with a line saying why."""
    model.memory.check_segment(tokens_per_sample, rows=1)  # the trained settings: a ConfigError ends the command
    kept = []
    for knob, value, settings in rows:
        try:
            with model.memory.configured(**(settings or {})):
                model.memory.check_segment(tokens_per_sample, rows=1)
        except ConfigError as e:
            print(f"row {knob}={value} left out: {e}", file=sys.stderr, flush=True)
            continue
        kept.append((knob, value, settings))
    return kept


def fmt(ppl) -> str:
    """A perplexity, or a dash where the mask marks no such token."""
    return "—" if ppl is None else f"{ppl:.1f}"


if __name__ == "__main__":
    main()
