"""A long-range benchmark: documents whose later tokens can only be predicted from text more than one
segment back, with the positions of those tokens marked.

Two kinds of documents, each several of the model's segments long (``--doc-tokens``; choose ``--min-gap``
above the segment length, e.g. 512 for 256-token segments), built from real text:

* ``recurring``: real lines read in order; after the first ``--min-gap`` tokens, blocks of fresh text
  alternate with passages (whole lines, 32-96 pieces) copied from the document's own fresh text at
  least ``--min-gap`` tokens earlier. Marked: every piece of a copied passage but its first.
* ``recall``: key -> value statements (``Remember : <key> is <value> .``, two words each) come first,
  then real text, then the same pairs queried in another order (``Recall : <key> is <value> .``),
  each query at least ``--min-gap`` tokens after its statement, real lines in between. Marked: the
  value's pieces in the queries.

``train`` also mixes in plain real-text excerpts (no recurrence) so that the adapted model keeps reading
ordinary text. Fill text of each split comes from that split's own real text (held-out plays for
valid/test), and every document draws fresh keys, values and passages, so no evaluation document is
seen in training. Output, in ``--out``: ``{split}.bpe`` (sentencepiece pieces, documents separated by an
empty line: the layout ``fairseq-preprocess`` and the longmem task read), ``{split}.mask`` (one line per
``.bpe`` line: a mark per piece, 0 = none, 1 = recurring, 2 = queried) and ``stats.json``.

    python preprocess/make_longrange.py --spm-model demo_out/bpe/spm.model --out demo_out/longrange \\
        --train-text demo_out/corpus/train.txt --valid-text demo_out/corpus/valid.txt \\
        --test-text demo_out/corpus/test.txt
"""
import argparse
import json
import logging
import os
import random
from collections import Counter

from longmem.errors import ConfigError
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import exit_on_config_error, output_folder
from longmem.utils.processes import exit_on_sigterm

logger = logging.getLogger("make_longrange")
KINDS = ("text", "recurring", "recall")
RECURRING, QUERIED = 1, 2  # values in the .mask files


def read_lines(path, encoder):
    """Non-empty lines of a text file as piece lists (document boundaries dropped: fill text only)."""
    if not os.path.isfile(path):
        raise ConfigError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [encoder.line(line) for line in f if line.strip()]
    lines = [x for x in lines if x]
    if len(lines) < 100:
        raise ConfigError(f"{path} has only {len(lines)} non-empty lines: too little text to build documents")
    return lines


def word_pools(path, encoder, size, skip):
    """Two disjoint pools of frequent lowercase words that are one piece each: keys and values."""
    counts = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(w for w in line.split() if w.isalpha() and w.islower() and len(w) >= 3)
    words = [w for w, _ in counts.most_common() if len(encoder.word(w)) == 1][skip: skip + 2 * size]
    if len(words) < 2 * size:
        raise ConfigError(f"{path} has only {len(words)} usable words for key/value pools of {size} each; "
                         f"lower --pool-size")
    return words[0::2], words[1::2]


class Source:
    """Consecutive real lines from a random place, wrapping around."""

    def __init__(self, lines, rng):
        self.lines, self.rng = lines, rng

    def excerpt(self):
        self.i = self.rng.randrange(len(self.lines))

    def next(self):
        line = self.lines[self.i % len(self.lines)]
        self.i += 1
        return line


def text_doc(src, n_tokens):
    src.excerpt()
    doc, pos = [], 0
    while pos < n_tokens:
        line = src.next()
        doc.append((line, [0] * len(line)))
        pos += len(line)
    return doc


def recurring_doc(src, rng, n_tokens, min_gap, max_gap=None, fresh_block=(64, 160), passage=(32, 96)):
    """Fresh lines; once ``min_gap`` tokens are in, fresh blocks alternate with copied passages (from
    between ``max_gap`` and ``min_gap`` tokens back when ``max_gap`` is given)."""
    src.excerpt()
    doc, pos, fresh = [], 0, []  # fresh: (line index in doc, start token, end token)
    while pos < n_tokens:
        block = rng.randint(*fresh_block) if pos >= min_gap else min_gap
        target = pos + block
        while pos < target:
            line = src.next()
            fresh.append((len(doc), pos, pos + len(line)))
            doc.append((line, [0] * len(line)))
            pos += len(line)
        # a passage: consecutive fresh lines ending at least min_gap tokens before here
        candidates = [j for j, (_, start, end) in enumerate(fresh)
                      if end <= pos - min_gap and (max_gap is None or start >= pos - max_gap)]
        if not candidates:
            continue
        length = rng.randint(*passage)
        j = rng.choice(candidates)
        first = True
        copied = 0
        while j < len(fresh) and fresh[j][2] <= pos - min_gap and copied < length:
            line = doc[fresh[j][0]][0]
            mask = [0 if first else RECURRING] + [RECURRING] * (len(line) - 1)
            first = False
            doc.append((line, mask))
            copied += len(line)
            j += 1
            if j < len(fresh) and fresh[j][0] != fresh[j - 1][0] + 1:
                break  # the next fresh line is not adjacent in the document (a copy sits between)
        pos += copied
    return doc


def recall_doc(src, rng, encoder, keys, values, n_pairs, min_gap, query_fill=(8, 48)):
    """Statements, at least ``min_gap`` real tokens, then the queries among real lines (``query_fill``: the
    range of real tokens after each query)."""
    src.excerpt()
    pairs = []
    used = set()
    while len(pairs) < n_pairs:
        key = tuple(rng.sample(keys, 2))
        if key not in used:
            used.add(key)
            pairs.append((key, tuple(rng.sample(values, 2))))

    def statement(word, key, value, mark):
        head = encoder.line(f"{word} : {key[0]} {key[1]} is")
        val = encoder.line(f"{value[0]} {value[1]}")
        tail = encoder.line(".")
        return head + val + tail, [0] * len(head) + [QUERIED if mark else 0] * len(val) + [0] * len(tail)

    doc, pos = [], 0

    def fill(n):
        nonlocal pos
        target = pos + n
        while pos < target:
            line = src.next()
            doc.append((line, [0] * len(line)))
            pos += len(line)

    told = []
    for key, value in pairs:
        line, mask = statement("Remember", key, value, False)
        doc.append((line, mask))
        told.append(pos)
        pos += len(line)
    fill(min_gap)
    order = list(range(n_pairs))
    rng.shuffle(order)
    for i in order:
        if pos - told[i] < min_gap:
            fill(min_gap - (pos - told[i]))
        line, mask = statement("Recall", *pairs[i], True)
        doc.append((line, mask))
        pos += len(line)
        fill(rng.randint(*query_fill))
    return doc


def write_split(out, split, docs, newline=None):
    """``newline``: the tokens of a line break; when given, each document is one line, its text lines
    joined by those tokens (a tokenizer that encodes newlines, as Hugging Face ones do); otherwise one
    line per text line (fairseq's ``</s>`` ends each)."""
    with atomic_open(os.path.join(out, f"{split}.bpe"), "w", encoding="utf-8") as fb, \
            atomic_open(os.path.join(out, f"{split}.mask"), "w", encoding="utf-8") as fm:
        for n, (_, doc) in enumerate(docs):
            if n:
                fb.write("\n")
                fm.write("\n")
            if newline is not None:
                pieces, marks = [], []
                for i, (line, mask) in enumerate(doc):
                    pieces += (newline if i else []) + line
                    marks += ([0] * len(newline) if i else []) + mask
                doc = [(pieces, marks)]
            for line, mask in doc:
                fb.write(" ".join(line) + "\n")
                fm.write(" ".join(map(str, mask)) + "\n")


def build(args):
    if bool(args.spm_model) == bool(args.hf_tokenizer):
        raise ConfigError("choose one tokenizer: --spm-model FILE or --hf-tokenizer PATH")
    from longmem.tokenizer import Tokenizer

    encoder = Tokenizer(sentencepiece_model=args.spm_model, hf_tokenizer=args.hf_tokenizer)
    newline = encoder.newline
    keys, values = word_pools(args.train_text, encoder, args.pool_size, args.pool_skip)
    stats = {"min_gap": args.min_gap, "doc_tokens": args.doc_tokens, "seed": args.seed, "splits": {}}
    for split, path, n_docs, kinds in (
            ("train", args.train_text, args.train_docs, KINDS),
            ("valid", args.valid_text, args.eval_docs, KINDS[1:]),
            ("test", args.test_text, args.eval_docs, KINDS[1:])):
        rng = random.Random(f"{args.seed}-{split}")
        src = Source(read_lines(path, encoder), rng)
        weights = [args.text_fraction, (1 - args.text_fraction) / 2, (1 - args.text_fraction) / 2] \
            if "text" in kinds else [0.5, 0.5]
        docs = []
        for n in range(n_docs):
            kind = kinds[n % len(kinds)] if split != "train" else rng.choices(kinds, weights)[0]
            if kind == "text":
                doc = text_doc(src, args.doc_tokens)
            elif kind == "recurring":
                doc = recurring_doc(src, rng, args.doc_tokens, args.min_gap, None, args.fresh_block, args.passage)
            else:
                # training documents may be denser in queries (--train-pairs, --train-query-fill); valid and
                # test keep --pairs and 8-48 tokens after each query, so their figures do not move with them
                doc = recall_doc(src, rng, encoder, keys, values, args.train_pairs, args.min_gap, args.train_query_fill) \
                    if split == "train" else recall_doc(src, rng, encoder, keys, values, args.pairs, args.min_gap)
            docs.append((kind, doc))
        write_split(args.out, split, docs, newline)
        summarize(stats, split, docs)
    if args.pretrain_docs:
        # in-window recurrences for the backbone's pretraining: a model that learned to copy from its
        # local context has keys a memory can match (LongMem reads the backbone's own attention keys)
        rng = random.Random(f"{args.seed}-pretrain")
        src = Source(read_lines(args.train_text, encoder), rng)
        low, high = args.pretrain_gap
        docs = [("recurring", recurring_doc(src, rng, args.doc_tokens, low, high)) for _ in range(args.pretrain_docs)]
        write_split(args.out, "pretrain", docs, newline)
        summarize(stats, "pretrain", docs)
    with atomic_open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)


def summarize(stats, split, docs):
    per_kind = {}
    for kind, doc in docs:
        s = per_kind.setdefault(kind, {"documents": 0, "tokens": 0, "marked": 0})
        s["documents"] += 1
        s["tokens"] += sum(len(line) + 1 for line, _ in doc)  # + </s> per line
        s["marked"] += sum(x > 0 for _, m in doc for x in m)
    stats["splits"][split] = per_kind
    logger.info("%s: %s", split, per_kind)


def check_ranges(p, args) -> None:
    """Every number where it enters; a request the generator cannot meet is an error, not a hang or a set
    with next to nothing marked."""
    for name, low in (("train_docs", 1), ("eval_docs", 2), ("doc_tokens", 1), ("min_gap", 1), ("pairs", 1),
                      ("train_pairs", 1), ("pool_size", 2), ("pool_skip", 0), ("pretrain_docs", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("fresh_block", "passage", "pretrain_gap"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            p.error(f"--{name.replace('_', '-')} MIN MAX needs 1 <= MIN <= MAX, got {low} {high}")
    if not 0.0 <= args.text_fraction < 1.0:
        p.error(f"--text-fraction must be in [0, 1), got {args.text_fraction}")
    room = args.min_gap + args.fresh_block[0] + args.passage[0]
    if args.doc_tokens < room:
        p.error(f"--doc-tokens {args.doc_tokens} leaves no room for a recurrence: a passage recurs only after --min-gap "
                f"{args.min_gap} tokens and a fresh block, so documents need at least {room} tokens (4 x --min-gap is "
                f"a good size)")
    low, high = args.train_query_fill
    if not 0 <= low <= high:
        p.error(f"--train-query-fill MIN MAX needs 0 <= MIN <= MAX, got {low} {high}")
    for name in ("pairs", "train_pairs"):
        flag, n = "--" + name.replace("_", "-"), getattr(args, name)
        if n > args.pool_size * (args.pool_size - 1):
            p.error(f"{flag} {n} distinct two-word keys cannot be drawn from a pool of {args.pool_size} words "
                    f"({args.pool_size * (args.pool_size - 1)} at most): raise --pool-size or lower {flag}")


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spm-model", help="the sentencepiece model that encodes the corpus")
    p.add_argument("--hf-tokenizer", help="instead: a Hugging Face model folder or .gguf file whose tokenizer "
                                          "encodes the corpus as its ids (one line per document)")
    p.add_argument("--train-text", required=True, help="real text for training documents (and word pools)")
    p.add_argument("--valid-text", required=True, help="held-out real text for validation documents")
    p.add_argument("--test-text", required=True, help="held-out real text for test documents")
    p.add_argument("--out", required=True, type=output_folder)
    p.add_argument("--train-docs", type=int, default=300)
    p.add_argument("--eval-docs", type=int, default=24, help="documents in valid and in test (half each kind)")
    p.add_argument("--doc-tokens", type=int, default=2048, help="approximate length of a document")
    p.add_argument("--min-gap", type=int, default=512,
                   help="tokens between a passage or statement and its recurrence (> --tokens-per-sample)")
    p.add_argument("--fresh-block", type=int, nargs=2, default=(64, 160), metavar=("MIN", "MAX"),
                   help="tokens of fresh text between two recurring passages")
    p.add_argument("--passage", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"),
                   help="tokens of a recurring passage")
    p.add_argument("--pairs", type=int, default=24, help="key -> value pairs per recall document")
    p.add_argument("--train-pairs", type=int, help="key -> value pairs per training recall document "
                                                     "(default: --pairs); more makes training denser in queries")
    p.add_argument("--train-query-fill", type=int, nargs=2, default=(8, 48), metavar=("MIN", "MAX"),
                   help="real tokens after each query in training recall documents (valid/test: 8-48)")
    p.add_argument("--pool-size", type=int, default=300, help="words in each of the key and value pools")
    p.add_argument("--pool-skip", type=int, default=40, help="most frequent words left out of the pools")
    p.add_argument("--text-fraction", type=float, default=0.25,
                   help="share of plain real-text excerpts among the training documents")
    p.add_argument("--pretrain-docs", type=int, default=0,
                   help="also write pretrain.bpe: documents whose passages recur inside the local window")
    p.add_argument("--pretrain-gap", type=int, nargs=2, default=(32, 200), metavar=("MIN", "MAX"),
                   help="tokens between a passage and its recurrence in pretrain.bpe")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.train_pairs is None:
        args.train_pairs = args.pairs
    check_ranges(p, args)
    for name in ("train_text", "valid_text", "test_text"):
        if not os.path.isfile(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    # built in a staging folder beside --out, which replaces --out only when everything is written: a failed
    # run leaves the previous output whole, never a mix of two runs
    exit_on_sigterm()  # SystemExit: the staging folder goes too
    with atomic_dir(args.out) as staging:
        args.out = staging
        build(args)

if __name__ == "__main__":
    main()
