"""Train a sentencepiece BPE model and encode text files into space-separated pieces.

    python preprocess/spm_bpe.py train --input train.txt --model-prefix spm --vocab-size 8000
    python preprocess/spm_bpe.py encode --model spm.model --inputs a.txt b.txt --outputs a.bpe b.bpe

Empty lines (document boundaries) stay empty, so fairseq's ``complete_doc`` break mode still sees them.
"""
import argparse
import logging
import os

from longmem.utils.atomic import atomic_open
from longmem.utils.cli import check_writable, exit_on_config_error, input_file, output_file, positive_int

logger = logging.getLogger("spm_bpe")


def train(args):
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    tmp_prefix = args.model_prefix + ".tmp"
    spm.SentencePieceTrainer.train(
        input=args.input, model_prefix=tmp_prefix, vocab_size=args.vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=args.threads, input_sentence_size=args.max_sentences,
        shuffle_input_sentence=True, seed_sentencepiece_size=1000000, minloglevel=2,
    )
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, args.model_prefix + ext)
    logger.info("wrote %s.model (vocabulary %d)", args.model_prefix, args.vocab_size)


def encode(args):
    import sentencepiece as spm
    from tqdm import tqdm

    sp = spm.SentencePieceProcessor(model_file=args.model)
    for src, dst in zip(args.inputs, args.outputs):
        with open(src, encoding="utf-8") as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        with atomic_open(dst, "w", encoding="utf-8") as out:
            for line in tqdm(lines, desc=f"encode {os.path.basename(src)}", unit="line", mininterval=2):
                out.write(" ".join(sp.encode(line, out_type=str)) + "\n" if line.strip() else "\n")


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--input", required=True, type=input_file)
    t.add_argument("--model-prefix", required=True)
    t.add_argument("--vocab-size", type=positive_int, default=8000)
    t.add_argument("--threads", type=positive_int, default=2)
    t.add_argument("--max-sentences", type=positive_int, default=2000000)
    e = sub.add_parser("encode")
    e.add_argument("--model", required=True, type=input_file)
    e.add_argument("--inputs", nargs="+", required=True, type=input_file)
    e.add_argument("--outputs", nargs="+", required=True, type=output_file)
    args = p.parse_args(argv)
    if args.command == "train":
        # the model's files are written at the end of training: their folder is checked at the start
        check_writable(p, "--model-prefix", args.model_prefix + ".model")
    elif len(args.inputs) != len(args.outputs):
        p.error(f"--inputs has {len(args.inputs)} files but --outputs {len(args.outputs)}: they pair up")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    train(args) if args.command == "train" else encode(args)


if __name__ == "__main__":
    main()
