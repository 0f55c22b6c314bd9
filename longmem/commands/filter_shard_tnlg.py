"""The release's Pile sampling (its ``preprocess/filter_shard_tnlg.py``) in front of ``longmem-prepare-pile``.

The release reads the Pile in its own layout, ``SOURCE/<subset>/splitNNNNNNNN.jsonl`` (1-based, 8 digits),
and samples ``--sampling-jsonls`` shards (50,000) across subsets in proportion to each subset's shard count:
``random.seed(2)``; for each subset in the table's order, ``random.sample(range(1, n + 1), int(n / total *
sampling))``; then one ``random.shuffle`` of all the chosen paths. The shards, in that order, then go through
``longmem-prepare-pile`` (every document kept, GPT-2 BPE, ``<s>`` at the start of every line as the release's
``sed`` puts it, ``fairseq-preprocess`` with the GPT-2 dict.txt).

    python preprocess/filter_shard_tnlg.py --source-path data/pile --destdir data-bin/longmem --workers 8

``--subsets FILE`` replaces the release's table (JSON ``{subset: shard count}``, order kept); ``--list-only``
prints the chosen shards without reading them. Shards of the sample that are missing are refused in one line
(``--skip-missing`` leaves them out, with a count).
"""
import argparse
import json
import logging
import os
import random
import sys
from typing import Dict, List

from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, output_folder, positive_int

logger = logging.getLogger("filter_shard_tnlg")

# the release's table: subset -> number of jsonl split files, in the release's order
RELEASE_SUBSETS = {
    "Gutenberg_PG-19_ftfy_cleaned_id_cleaned": 27290, "BookCorpus2_ftfy_cleaned_id": 1876,
    "Books3_ftfy_cleaned_id": 19401, "CC-2020-50_id_cleaned": 79296, "CC-2021-04_id_cleaned": 96130,
    "NIH_ExPorter_ftfy_id": 755, "OpenWebText2_ftfy_cleaned_id": 15674, "Pile-CC_id_cleaned": 50000,
    "rn_dedup_shuf_cleaned_0.7_cleaned": 28773, "stories_dedup0.7_shuf_cleaned": 6702, "Wikipedia_en_ftfy_id": 5861,
}
RELEASE_SEED, RELEASE_SAMPLING = 2, 50000


def sample_shards(source: str, subsets: Dict[str, int], sampling: int, seed: int = RELEASE_SEED) -> List[str]:
    """The shard paths the release's sampling picks, in its order."""
    rng = random.Random(seed)
    total = sum(subsets.values())
    chosen = []
    for subset, count in subsets.items():
        for index in rng.sample(list(range(1, count + 1)), int(count / total * sampling)):
            chosen.append(os.path.join(source, subset, f"split{index:08d}.jsonl"))
    rng.shuffle(chosen)
    return chosen


def read_subsets(path: str) -> Dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--subsets {path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(table, dict) or not table or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in table.values()):
        raise ConfigError(f"--subsets {path}: expected a JSON object {{subset: number of split files > 0}}")
    return table


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(prog="filter_shard_tnlg.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-path", required=True, help="the Pile in the release's layout: SOURCE/<subset>/split*.jsonl")
    p.add_argument("--destdir", type=output_folder, help="fairseq data-bin output (longmem-prepare-pile --destdir)")
    p.add_argument("--subsets", help="JSON {subset: shard count} instead of the release's table")
    p.add_argument("--sampling-jsonls", type=positive_int, default=RELEASE_SAMPLING, help="shards sampled in all")
    p.add_argument("--seed", type=int, default=RELEASE_SEED)
    p.add_argument("--skip-missing", action="store_true", help="leave out sampled shards that are not there")
    p.add_argument("--list-only", action="store_true", help="print the sampled shards and stop")
    args, rest = p.parse_known_args(argv)  # the rest goes to longmem-prepare-pile (--workers, --gpt2-bpe, ...)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    if not os.path.isdir(args.source_path):
        p.error(f"--source-path {args.source_path} is not a folder")
    subsets = read_subsets(args.subsets) if args.subsets else RELEASE_SUBSETS
    shards = sample_shards(args.source_path, subsets, args.sampling_jsonls, args.seed)
    if args.list_only:
        sys.stdout.write("".join(s + "\n" for s in shards))
        return 0
    if not args.destdir:
        p.error("--destdir is required (or --list-only)")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing and not args.skip_missing:
        p.error(f"{len(missing)} of the {len(shards)} sampled shards are not there (first: {missing[0]}): give the "
                f"whole --source-path, or --skip-missing to leave them out")
    if missing:
        logger.warning("%d of %d sampled shards are not there: left out", len(missing), len(shards))
        shards = [s for s in shards if os.path.isfile(s)]
    if not shards:
        p.error("none of the sampled shards is there: nothing to prepare")
    logger.info("%d shards from %d subsets, in the release's order, to longmem-prepare-pile", len(shards), len(subsets))
    from longmem.commands import prepare_pile

    return prepare_pile.run(["--train", *shards, "--destdir", args.destdir, "--default-weight", "1", "--bos-each-line",
                             *rest])


if __name__ == "__main__":
    main()
