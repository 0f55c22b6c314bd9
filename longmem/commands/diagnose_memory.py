"""Is the memory finding what it should? Retrieval hit rates of a LongMem checkpoint on recurring text
(logic: longmem/evaluation/diagnostics.py).

For every token t of a held-out document whose last ``--context`` tokens occurred exactly once before,
at s, in an earlier segment (so s is in memory, not in the local window), it checks whether the chunks
that the memory layer retrieved for t (per head) hold s (the same context) and s + 1 (the token that
followed it, the one a copy needs). Also prints the per-head gate σ(memory_bias). Chance level is
about k / (tokens in memory).

    python eval_scripts/diagnose_memory.py demo_out/data-bin-longrange \\
        --longmem demo_out/longmem/checkpoint_last.pt --tokens-per-sample 256

``--split MASK`` (the split's ``.mask`` from preprocess/make_longrange.py) then splits the memory's
shortfall on the recurring and queried tokens: perplexity with memory off; on; with the gates of the
heads that find the source (hit rate of s + 1 at least ``--finding-hit-rate``) forced open; with an
oracle read (the chunks holding s and s + 1 put first among each position's retrieved chunks, every head);
and with both. Retrieval is what the oracle fixes, the gate what forcing fixes, the rest is read-out.
"""
import argparse
import json

from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, output_file, positive_int, quiet_libraries


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--longmem", required=True)
    p.add_argument("--tokens-per-sample", type=positive_int, default=256)
    p.add_argument("--context", type=positive_int, default=6, help="tokens of context that must match")
    p.add_argument("--max-documents", type=positive_int)
    p.add_argument("--split", metavar="MASK", help="also split the shortfall (perplexity on the recurring/queried "
                   "tokens marked in this .mask) into retrieval, gate and read-out")
    p.add_argument("--finding-hit-rate", type=float, default=0.2,
                   help="--split: a head 'finds the source' when its hit rate of s + 1 is at least this")
    p.add_argument("--results-path", type=output_file)
    args = p.parse_args(argv)
    if not 0.0 < args.finding_hit_rate <= 1.0:
        p.error(f"--finding-hit-rate must be in (0, 1], got {args.finding_hit_rate}")
    quiet_libraries()
    from longmem.evaluation.diagnostics import retrieval_hits
    from longmem.evaluation.lm import load_split, load_token_marks
    from longmem.utils.atomic import atomic_open
    from longmem.models.loading import load_model_for_dictionary

    d, stream = load_split(args.data, args.gen_subset)
    marks = load_token_marks(args.split, stream, args.gen_subset) if args.split else None
    if marks is not None and not (marks != 0).any():
        raise ConfigError(f"--split {args.split} marks no token (every mark is 0): the split needs the marks of "
                          f"longmem-make-longrange's .mask (1 recurring, 2 queried)")
    model = load_model_for_dictionary(args.longmem, d, args.data, expect="longmem")
    try:
        result = retrieval_hits(model, stream, d.eos(), args.tokens_per_sample, args.context, args.max_documents)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n_ctx, c = args.context, result["chunk_size"]
    print(f"{result['positions']:,} positions with a unique earlier {n_ctx}-token context in memory "
          f"({result['documents']} documents); k = {result['k']}, chunk {c}")
    print("| head | gate σ(g) | retrieved chunk holds s | holds s+1 |")
    print("|---:|---:|---:|---:|")
    for h, g in enumerate(result["gate"]):
        print(f"| {h} | {g:.3f} | {100 * result['hit_s'][h]:.1f}% | {100 * result['hit_s+1'][h]:.1f}% |")
    if marks is not None:
        result["split"] = split(model, stream, d.eos(), args, marks, result)
    if args.results_path:
        with atomic_open(args.results_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def split(model, stream, eos, args, marks, hits):
    """The shortfall split of the module docstring, printed as a Markdown table."""
    from tqdm import tqdm

    from longmem.evaluation.diagnostics import shortfall_split

    heads = [h for h, rate in enumerate(hits["hit_s+1"]) if rate >= args.finding_hit_rate]
    if not heads:
        raise ConfigError(f"no head retrieves the source for {100 * args.finding_hit_rate:.0f}% of positions: lower "
                         f"--finding-hit-rate (best head: {100 * max(hits['hit_s+1']):.1f}%)")
    rows = shortfall_split(model, stream, eos, args.tokens_per_sample, marks, heads, args.context,
                           args.max_documents, progress=tqdm)
    off = rows["memory off"]
    print(f"\nShortfall split; heads forced open: {heads} (hit rate of s+1 >= {100 * args.finding_hit_rate:.0f}%)")
    print("| variant | perplexity, all | recurring tokens | queried tokens | recurring / off | queried / off |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ppl in rows.items():
        print(f"| {name} | {ppl['all']:.2f} | {ppl.get(1, float('nan')):.2f} | {ppl.get(2, float('nan')):.2f} | "
              f"{ppl.get(1, float('nan')) / off.get(1, float('nan')):.2f} | "
              f"{ppl.get(2, float('nan')) / off.get(2, float('nan')):.2f} |")
    return {"open_heads": heads, "ppl": {name: {str(k): v for k, v in ppl.items()} for name, ppl in rows.items()}}


if __name__ == "__main__":
    main()
