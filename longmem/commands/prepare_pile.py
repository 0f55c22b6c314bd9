"""Pile-format JSON-lines shards -> sampled documents -> BPE -> ``fairseq-preprocess`` (docs/design.md §6).

Each input line is ``{"text": ..., "meta": {"pile_set_name": ...}}``; shards may be ``.jsonl`` or
``.jsonl.zst``. Documents are kept by per-subset weights read from a JSON file (see
``configs/pile_subset_weights.json``): weight ``w`` keeps ``floor(w)`` copies of a document plus one more
with probability ``w - floor(w)``, decided by a hash of (seed, shard name, line number), so the sample
does not depend on the number of worker processes. Blank lines are dropped; each document is written as
a block of lines followed by an empty line. Lines are encoded with GPT-2 BPE (``encoder.json`` +
``vocab.bpe``, the ids written as the tokens of fairseq's GPT-2 ``dict.txt``), a sentencepiece model or a
Hugging Face model's tokenizer (``--hf-tokenizer``: each document one line, its newlines the model's own tokens),
in parallel over shards, then binarized with ``fairseq-preprocess --only-source --srcdict``.

Malformed lines (not JSON, no text, wrong types) are counted, skipped and reported, never fatal.

    python preprocess/prepare_pile.py --train shards/0*.jsonl.zst --valid val.jsonl.zst \\
        --weights configs/pile_subset_weights.json \\
        --destdir data-bin/pile --workers 8
"""
import argparse
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from collections import Counter
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from longmem import paths
from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import exit_on_config_error, non_negative_float, output_folder, positive_int
from longmem.utils.processes import die_with_parent, exit_on_sigterm, sigterm_not_lost

logger = logging.getLogger("prepare_pile")
SPLITS = ("train", "valid", "test")


class ShardError(Exception):
    """A shard that cannot be read to its end (truncated or not what its name says)."""


def shard_lines(path: str):
    """The raw lines (bytes) of a .jsonl or .jsonl.zst shard; a truncated or corrupt .zst is an error,
    never a shorter shard."""
    if not path.endswith(".zst"):
        with open(path, "rb") as f:
            yield from f
        return
    try:
        import zstandard
    except ImportError as e:
        raise ConfigError(f"{path} is zstd-compressed: pip install zstandard") from e
    pending = b""
    with open(path, "rb") as f:
        dobj, frame_done = zstandard.ZstdDecompressor().decompressobj(), True
        while True:
            raw = f.read(1 << 20)
            if not raw:
                break
            while raw:  # a shard may hold several frames one after the other
                try:
                    out = dobj.decompress(raw)
                except zstandard.ZstdError as e:
                    raise ShardError(f"{path}: not a readable zstd stream ({e})") from None
                frame_done = dobj.eof
                raw = dobj.unused_data if frame_done else b""
                if frame_done:
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                lines = (pending + out).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line + b"\n"
        if not frame_done:
            raise ShardError(f"{path}: truncated (its last zstd frame does not end); re-download or re-compress it")
    if pending:
        yield pending


def keep_count(weight: float, seed: int, shard: str, line_no: int) -> int:
    """floor(w) copies plus one with probability frac(w), from a hash: reproducible in any process."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    if frac <= 0:
        return whole
    h = hashlib.blake2b(f"{seed}|{os.path.basename(shard)}|{line_no}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(h, "big") / 2 ** 64 < frac)


def clean_document(text: str) -> list:
    """The document's non-blank lines, stripped of trailing whitespace."""
    return [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]


def read_documents(path: str, weights: dict, default_weight: float, seed: int):
    """Yield (subset, lines) for every kept document; return statistics via StopIteration value. Lines
    that are not UTF-8 are read with the bad bytes replaced, and counted."""
    stats = {"lines": 0, "malformed": 0, "malformed_examples": [], "seen": Counter(), "kept": Counter(),
             "undecodable_lines": 0}
    for line_no, raw in enumerate(shard_lines(path), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            stats["undecodable_lines"] += 1
        if not line.strip():
            continue
        stats["lines"] += 1
        try:
            record = json.loads(line)
            text = record["text"]
            meta = record.get("meta") or {}
            subset = meta.get("pile_set_name", "unknown") if isinstance(meta, dict) else "unknown"
            if not isinstance(text, str) or not isinstance(subset, str):
                raise TypeError("text and meta.pile_set_name must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            stats["malformed"] += 1
            if len(stats["malformed_examples"]) < 5:
                stats["malformed_examples"].append(f"{os.path.basename(path)}:{line_no}: {type(e).__name__}: {e}")
            continue
        stats["seen"][subset] += 1
        lines = clean_document(text)
        if not lines:
            continue
        copies = keep_count(weights.get(subset, default_weight), seed, path, line_no)
        for _ in range(copies):
            stats["kept"][subset] += 1
            yield subset, lines
    return stats


class Encoder:
    """A text line -> its symbols joined by spaces, as ``fairseq-preprocess`` reads them (GPT-2 BPE or a
    sentencepiece model: ``longmem.tokenizer.Tokenizer``); a missing file is a ConfigError."""

    def __init__(self, gpt2_bpe: str = None, sentencepiece_model: str = None, hf_tokenizer: str = None):
        from longmem.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(gpt2_bpe, sentencepiece_model, hf_tokenizer)
        # a Hugging Face model reads a document as one text, its newlines as its own tokens (as longmem-hf-tokens
        # writes it); GPT-2 BPE and sentencepiece encode each line, fairseq ending each with </s>
        self.whole_documents = hf_tokenizer is not None

    def encode(self, text: str) -> str:
        return " ".join(self.tokenizer.pieces(text))


def process_shard(job):
    """One shard -> its encoded documents in ``out`` (one line per text line, empty line after each
    document); returns the shard's statistics."""
    path, out, weights, default_weight, seed, tokenizer_files = job
    encoder = Encoder(*tokenizer_files)
    docs = read_documents(path, weights, default_weight, seed)
    with atomic_open(out, "w", encoding="utf-8") as f:
        while True:
            try:
                _, lines = next(docs)
            except StopIteration as stop:
                stats = stop.value
                break
            for line in ["\n".join(lines)] if encoder.whole_documents else lines:
                f.write(encoder.encode(line) + "\n")
            f.write("\n")
    return path, stats


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for split in SPLITS:
        p.add_argument(f"--{split}", nargs="*", default=[], help=f"{split} shards (.jsonl or .jsonl.zst)")
    p.add_argument("--weights", help="JSON {subset: weight}; subsets not listed get --default-weight")
    p.add_argument("--default-weight", type=non_negative_float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gpt2-bpe", help="folder with encoder.json and vocab.bpe (default: data/gpt2_bpe of this "
                                      "repository, unless --sentencepiece-model is given)")
    p.add_argument("--sentencepiece-model")
    p.add_argument("--hf-tokenizer", help="a Hugging Face model's tokenizer (a .gguf file or a folder): the ids of a "
                                          "backbone loaded with --hf-model; each document one line")
    p.add_argument("--srcdict", help="fairseq dict.txt (default: dict.txt inside --gpt2-bpe; with --hf-tokenizer, "
                                     "the tokenizer's ids, written as longmem-hf-tokens dict writes them)")
    p.add_argument("--destdir", required=True, type=output_folder, help="fairseq data-bin output")
    p.add_argument("--workdir", type=output_folder, help="where encoded text goes (default: DESTDIR/encoded)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count())
    p.add_argument("--no-binarize", action="store_true", help="stop after writing the encoded text")
    p.add_argument("--bos-each-line", action="store_true",
                   help="begin every encoded line with <s>, as the release's preprocessing does (its `sed 's/^/<s> &/'` "
                        "on train.bpe, empty lines included)")
    args = p.parse_args(argv)
    if args.gpt2_bpe is None and args.sentencepiece_model is None and args.hf_tokenizer is None:
        args.gpt2_bpe = paths.GPT2_BPE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    if not args.train:
        raise ConfigError("--train needs at least one shard")
    for split in SPLITS:
        for shard in getattr(args, split):
            if not os.path.isfile(shard):
                raise ConfigError(f"{split} shard {shard!r} does not exist")
    check_split_paths(args)
    weights = read_weights(args.weights) if args.weights else {}
    encoder = Encoder(args.gpt2_bpe, args.sentencepiece_model, args.hf_tokenizer)  # fail early on missing files
    srcdict = args.srcdict or (os.path.join(args.gpt2_bpe, "dict.txt") if args.gpt2_bpe else None)
    hf_vocab = encoder.tokenizer.vocab_size if srcdict is None and args.hf_tokenizer else None
    if not args.no_binarize and hf_vocab is None and (not srcdict or not os.path.isfile(srcdict)):
        raise ConfigError(f"dictionary {srcdict!r} does not exist: pass --srcdict (the backbone's dict.txt)")

    # everything is written into a fresh folder beside --destdir, which replaces it only at the end: a
    # failed run leaves the previous output as it was
    exit_on_sigterm()  # SystemExit: the staging folder goes too
    with atomic_dir(args.destdir) as staging:
        if hf_vocab is not None:  # the tokenizer's ids, written into the output (fairseq-preprocess keeps it there)
            from longmem.commands.hf_tokens import write_dictionary

            srcdict = os.path.join(staging, "dict.txt")
            write_dictionary(hf_vocab, srcdict)
        return build(args, weights, srcdict, staging)


def check_split_paths(args) -> None:
    """A shard in two splits (the same file, or a copy: same size, same first and last MiB) would make a test
    split of training data; a --workdir inside --destdir would write into the previous output before the run
    has succeeded. Both refused before any work."""
    seen = {}
    for split in SPLITS:
        for shard in getattr(args, split):
            key = _shard_identity(shard)
            if key in seen and seen[key][0] != split:
                raise ConfigError(f"{shard} ({split}) is the same data as {seen[key][1]} ({seen[key][0]}): the splits "
                                 f"must not overlap; give each split its own shards")
            seen.setdefault(key, (split, shard))
    if args.workdir:
        destdir, workdir = os.path.abspath(args.destdir), os.path.abspath(args.workdir)
        if workdir == destdir or workdir.startswith(destdir + os.sep):
            raise ConfigError(f"--workdir {args.workdir} is inside --destdir {args.destdir}, which is replaced only "
                             f"when the run succeeds: leave --workdir out (the encoded text is then staged with the "
                             f"rest) or put it elsewhere")


def _shard_identity(path: str) -> tuple:
    size = os.path.getsize(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
        digest.update(f.read(1 << 20))
    return size, digest.hexdigest()


def read_weights(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            weights = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--weights {path}: not a readable JSON object of subset weights ({e})") from None
    if not isinstance(weights, dict):
        raise ConfigError(f"--weights {path}: expected a JSON object {{subset: weight}}, got {type(weights).__name__}")
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
    if bad:
        raise ConfigError(f"{path}: weights must be non-negative numbers, got {bad}")
    return weights


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting for shards still being encoded (after an error): their workers are
    terminated, so neither this function nor the interpreter's exit waits for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # CPython's own field, read-only here
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=True)


def build(args, weights: dict, srcdict: str, destdir: str) -> dict:
    """Encode every shard, check the splits, binarize into ``destdir``; returns the report."""
    workdir = args.workdir or os.path.join(destdir, "encoded")
    os.makedirs(workdir, exist_ok=True)
    jobs = []
    for split in SPLITS:
        for i, shard in enumerate(getattr(args, split)):
            jobs.append((shard, os.path.join(workdir, f"{split}.{i:05d}.bpe"), weights, args.default_weight,
                         args.seed, (args.gpt2_bpe, args.sentencepiece_model, getattr(args, "hf_tokenizer", None))))
    report = encode_shards(jobs, args.workers)
    report["weights_for_unseen_subsets"] = sorted(set(weights) - set(report["seen"]))
    with atomic_open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
        json.dump({k: dict(v) if isinstance(v, Counter) else v for k, v in report.items()}, f, indent=2)
    log_report(report)
    empty = [split for split in SPLITS if getattr(args, split) and not report["kept_per_split"][split]]
    if empty:
        raise ConfigError(f"split(s) {', '.join(empty)} kept no document (see the subsets seen and kept above): "
                         f"check the shards and --weights / --default-weight; nothing was written to --destdir")
    for split in SPLITS:  # one text file per split, shards in the order given
        parts = [j[1] for j in jobs if os.path.basename(j[1]).startswith(split + ".")]
        if parts:
            with atomic_open(os.path.join(workdir, f"{split}.bpe"), "w", encoding="utf-8") as out:
                for part in parts:
                    with open(part, encoding="utf-8") as f:
                        for line in f:
                            out.write("<s> " + line if getattr(args, "bos_each_line", False) else line)
    if not args.no_binarize:
        binarize(args, srcdict, destdir, workdir)
    return report


def encode_shards(jobs, workers: int) -> dict:
    """Every shard encoded (``process_shard``) by a pool of processes; the counts summed over shards."""
    from tqdm import tqdm

    report = {"malformed": 0, "malformed_examples": [], "seen": Counter(), "kept": Counter(), "lines": 0,
              "undecodable_lines": 0, "kept_per_split": Counter()}
    # a process pool that fails when a worker dies (killed, out of memory) instead of waiting for it forever, as
    # multiprocessing.Pool does; with fork, the first submit starts every worker, from this thread
    workers = max(1, min(workers, len(jobs)))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=die_with_parent)
    try:
        with sigterm_not_lost():  # a SIGTERM handled inside the fork would be lost
            results = pool.map(process_shard, jobs)
        for job, (_, stats) in zip(jobs, tqdm(results, total=len(jobs), desc="shards", unit="shard")):
            for key in ("malformed", "lines", "undecodable_lines"):
                report[key] += stats[key]
            report["malformed_examples"] += stats["malformed_examples"]
            report["seen"].update(stats["seen"])
            report["kept"].update(stats["kept"])
            report["kept_per_split"][os.path.basename(job[1]).split(".")[0]] += sum(stats["kept"].values())
    except ShardError as e:
        raise ConfigError(str(e)) from None
    except BrokenProcessPool:
        raise ConfigError(f"a shard worker died before its shard was encoded (killed, or out of memory: "
                          f"{workers} workers each hold one shard's documents); rerun with fewer --workers") from None
    finally:
        stop_pool(pool)
    return report


def log_report(report: dict) -> None:
    logger.info("%d lines read, %d malformed (skipped), %d with bytes that are not UTF-8 (replaced)%s",
                report["lines"], report["malformed"], report["undecodable_lines"],
                "".join(f"\n  {e}" for e in report["malformed_examples"][:5]))
    for subset in sorted(report["seen"]):
        logger.info("  %-24s seen %8d kept %8d", subset, report["seen"][subset], report["kept"][subset])
    if report["weights_for_unseen_subsets"]:
        logger.warning("--weights names %d subset(s) that no shard holds (ignored): %s",
                       len(report["weights_for_unseen_subsets"]), ", ".join(report["weights_for_unseen_subsets"]))


def binarize(args, srcdict: str, destdir: str, workdir: str) -> None:
    """``fairseq-preprocess`` of the splits' encoded text into ``destdir``, a child that dies with this process."""
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict", srcdict,
           "--destdir", destdir, "--workers", str(args.workers)]
    for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
        if getattr(args, split):
            cmd += [flag, os.path.join(workdir, f"{split}.bpe")]
    logger.info("$ %s", " ".join(cmd))
    proc = None
    try:
        with sigterm_not_lost():
            proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)
        returncode = proc.wait()
    except BaseException:  # stopped (SIGTERM, Ctrl-C): the child goes before its output folder does
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    if returncode != 0:
        raise ConfigError("fairseq-preprocess failed (its message is above); nothing was written to --destdir")


if __name__ == "__main__":
    main()
