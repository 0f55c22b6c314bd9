"""The fairseq ids of a Hugging Face model's tokenizer (``longmem-hf-tokens``): its ``dict.txt``, and text files
written in its ids (one line of symbols per document; newlines kept as the model's tokens).

    longmem-hf-tokens dict --model SmolLM2-135M-Instruct.Q4_1.gguf --out dict.txt
    longmem-hf-tokens encode --model M.gguf --inputs a.txt --outputs a.ids

(``python -m longmem.commands.hf_tokens`` is the same.) Ids 0-3 are fairseq's specials, the others are written as
numbers; the model (``longmem.models.hf_causal_lm``) reads them back as its own ids.
"""
import argparse

from longmem.tokenizer import Tokenizer
from longmem.utils.atomic import atomic_open
from longmem.utils.cli import existing_path, exit_on_config_error, input_file, output_file, positive_int


def write_dictionary(vocab_size: int, out: str) -> None:
    """fairseq's dict.txt whose index of every id is the id: fairseq puts its 4 specials first (ids 0-3), then
    the listed symbols, here the ids 4 .. vocab_size - 1 as decimal strings."""
    with atomic_open(out, "w", encoding="utf-8") as f:
        for i in range(4, vocab_size):
            f.write(f"{i} 1\n")


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dict", help="write the fairseq dict.txt of the model's ids")
    d.add_argument("--model", required=True, type=existing_path)
    d.add_argument("--out", required=True, type=output_file)
    e = sub.add_parser("encode", help="text files -> one line of symbols per document (documents separated by "
                                      "an empty line in the input; newlines kept as the model's tokens)")
    e.add_argument("--model", required=True, type=existing_path)
    e.add_argument("--inputs", nargs="+", required=True, type=input_file)
    e.add_argument("--outputs", nargs="+", required=True, type=output_file)
    e.add_argument("--max-tokens", type=positive_int, help="stop a file after this many tokens")
    args = p.parse_args(argv)
    if args.command == "encode" and len(args.inputs) != len(args.outputs):
        p.error(f"--inputs has {len(args.inputs)} files but --outputs {len(args.outputs)}: they pair up")
    tokens = Tokenizer(hf_tokenizer=args.model)
    if args.command == "dict":
        write_dictionary(tokens.vocab_size, args.out)
        print(f"wrote {args.out}: {tokens.vocab_size - 4} entries (+ fairseq's 4 specials = {tokens.vocab_size})")
        return
    for src, dst in zip(args.inputs, args.outputs):
        with open(src, encoding="utf-8") as f:
            documents = [doc.strip("\n") for doc in f.read().split("\n\n") if doc.strip()]
        written = 0
        with atomic_open(dst, "w", encoding="utf-8") as out:
            for n, doc in enumerate(documents):
                ids = tokens.pieces(doc)
                if args.max_tokens:
                    ids = ids[: max(0, args.max_tokens - written)]
                if not ids:
                    break
                out.write(("\n" if n else "") + " ".join(ids) + "\n")
                written += len(ids)
        print(f"{src} -> {dst}: {written:,} tokens")


if __name__ == "__main__":
    main()
