"""Generate text with a LongMem checkpoint (or a backbone alone), from a prompt of any length.

What of the prompt exceeds the window (--tokens-per-sample, the checkpoint's by default) streams into the
model's memory segment by segment, as the long-document evaluation reads a document; the continuation
reads that memory. Greedy by default; --sampling draws with --temperature, --topk and --topp.

    longmem-generate demo_out/smollm2/longmem/checkpoint_last.pt --prompt-file book.txt --max-new-tokens 40
    longmem-generate demo_out/longmem/checkpoint_last.pt --sentencepiece-model demo_out/bpe/spm.model \\
        --prompt "KING. My lord," --sampling --topp 0.9 --seed 3 --json out.json

The tokenizer: --hf-tokenizer (default for a checkpoint over a Hugging Face backbone: the backbone file it
records), --sentencepiece-model, or GPT-2 BPE (--gpt2-bpe, default: this repository's data/gpt2_bpe). The
dictionary: --dict, default dict.txt of the data folder the checkpoint was trained on.
"""
import argparse
import json
import math
import os
import sys

from longmem import paths
from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, input_file, output_file, positive_int, quiet_libraries

MAX_UNKNOWN_SHARE = 0.05  # <unk> in the prompt past this: the tokenizer does not match the dictionary


def probability(text: str) -> float:
    """An argparse type: top-p in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


probability.__name__, positive_float.__name__ = "a number in (0, 1]", "a number > 0"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="longmem-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=input_file, help="a LongMem (transformer_lm_sidenet*) or backbone checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt's text")
    source.add_argument("--prompt-file", type=input_file, help="a UTF-8 file holding the prompt (any length)")
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--sampling", action="store_true", help="draw tokens (default: greedy)")
    p.add_argument("--topk", type=int, default=0, help="with --sampling: draw among the k likeliest (0: all)")
    p.add_argument("--topp", type=probability, default=1.0, help="with --sampling: nucleus mass (1: all)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="with --sampling")
    p.add_argument("--seed", type=int, default=1, help="the draws' seed")
    p.add_argument("--memory", choices=["on", "off"], help="a LongMem checkpoint's memory (default: on)")
    p.add_argument("--tokens-per-sample", type=positive_int,
                   help="the window: tokens per segment (default: the checkpoint's --tokens-per-sample)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-text token")
    p.add_argument("--dict", type=input_file, help="the model's dict.txt (default: the checkpoint's data folder's)")
    p.add_argument("--gpt2-bpe", help="folder with encoder.json and vocab.bpe (default: data/gpt2_bpe)")
    p.add_argument("--sentencepiece-model", type=input_file, help="the model's sentencepiece model")
    p.add_argument("--hf-tokenizer", help="a Hugging Face model's tokenizer (.gguf file or folder)")
    p.add_argument("--whitespace", action="store_true",
                   help="the dictionary's symbols are the text's space-separated words (fairseq-preprocess of text "
                        "with no BPE)")
    p.add_argument("--pretrained-model-path", help="where the LongMem checkpoint's backbone file is now")
    p.add_argument("--json", type=output_file, metavar="FILE", help="also write prompt and continuation, text and ids")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.topk < 0:
        p.error(f"argument --topk: must be >= 0, got {args.topk}")
    if sum(map(bool, (args.gpt2_bpe, args.sentencepiece_model, args.hf_tokenizer, args.whitespace))) > 1:
        p.error("choose one tokenizer: --gpt2-bpe, --sentencepiece-model, --hf-tokenizer or --whitespace")
    return p, args


def read_prompt(parser, args) -> str:
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            parser.error(f"--prompt-file {args.prompt_file}: not UTF-8 (byte {e.start})")
    else:
        text = args.prompt
    if not text.strip():
        parser.error("the prompt is empty: give --prompt TEXT or a --prompt-file with text")
    return text


def checkpoint_settings(parser, args):
    """(kind, model config, task config) of the checkpoint, read without building a model."""
    from longmem.models.backbone import checkpoint_model_config, checkpoint_model_name
    from longmem.models.loading import checkpoint_kind, read_checkpoint

    overrides = {"pretrained_model_path": args.pretrained_model_path} if args.pretrained_model_path else {}
    state = read_checkpoint(args.checkpoint, overrides)
    kind = checkpoint_kind(state)
    if kind is None:
        parser.error(f"{args.checkpoint} holds a {checkpoint_model_name(state) or 'unknown'!r} model: give a LongMem "
                     f"(transformer_lm_sidenet*) or backbone (newgpt-*) checkpoint")
    task = (state.get("cfg") or {}).get("task") or vars(state.get("args") or argparse.Namespace())
    return kind, state, checkpoint_model_config(state), task


def checkpoint_dictionary(parser, args, task_cfg):
    """(path, Dictionary): --dict, else dict.txt of the data folder the checkpoint was trained on."""
    from fairseq.data import Dictionary

    dict_path = args.dict or os.path.join(str(task_cfg.get("data") or "").split(":")[0], "dict.txt")
    if not os.path.isfile(dict_path):
        parser.error(f"the checkpoint's dictionary {dict_path!r} is not here: pass --dict (the model's dict.txt)")
    return dict_path, Dictionary.load(dict_path)


def choose_tokenizer(args, model_cfg):
    """The tokenizer flags given, else the Hugging Face backbone's own tokenizer, else GPT-2 BPE."""
    from longmem.tokenizer import Tokenizer

    if args.whitespace:
        return Words()
    if args.gpt2_bpe or args.sentencepiece_model or args.hf_tokenizer:
        return Tokenizer(args.gpt2_bpe, args.sentencepiece_model, args.hf_tokenizer)
    backbone = str(model_cfg.get("pretrained_model_path") or model_cfg.get("hf_model") or "")
    if str(model_cfg.get("backbone_family", "")) == "hf_causal_lm" or backbone.endswith(".gguf"):
        if not os.path.exists(backbone):
            raise ConfigError(f"the checkpoint's Hugging Face backbone {backbone!r} is not here: pass its tokenizer "
                              f"(--hf-tokenizer PATH) or --pretrained-model-path")
        return Tokenizer(hf_tokenizer=backbone)
    return Tokenizer(gpt2_bpe=paths.GPT2_BPE)


class Words:
    """The tokenizer of text binarized without BPE: space-separated words."""
    specials = None

    @staticmethod
    def pieces(text):
        return text.split()

    @staticmethod
    def decode(symbols):
        return " ".join(symbols)


def encode_prompt(parser, text, tokenizer, dictionary):
    """The prompt's dictionary ids; refused when the tokenizer's symbols are not the dictionary's."""
    ids = [dictionary.index(s) for s in tokenizer.pieces(text)]
    unknown = sum(i == dictionary.unk() for i in ids)
    if unknown > MAX_UNKNOWN_SHARE * max(1, len(ids)):
        parser.error(f"{unknown} of the prompt's {len(ids)} tokens are <unk> in the model's dictionary: the tokenizer "
                     f"does not match it (choose the model's own: --hf-tokenizer, --sentencepiece-model, --gpt2-bpe)")
    return ids


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    parser, args = parse_args(argv)
    quiet_libraries()
    text = read_prompt(parser, args)
    kind, state, model_cfg, task_cfg = checkpoint_settings(parser, args)
    if kind == "backbone" and args.memory == "on":
        parser.error("--memory on: a backbone checkpoint has no memory (give a LongMem checkpoint)")
    args.memory = args.memory or ("on" if kind == "longmem" else None)
    dict_path, dictionary = checkpoint_dictionary(parser, args, task_cfg)
    tokenizer = choose_tokenizer(args, model_cfg)
    ids = encode_prompt(parser, text, tokenizer, dictionary)
    window = args.tokens_per_sample or task_cfg.get("tokens_per_sample")
    new = generate_ids(args, kind, state, dict_path, dictionary, tokenizer, ids, window)
    continuation = tokenizer.decode([dictionary[i] for i in new])
    print(continuation)
    if args.json:
        from longmem.utils.atomic import atomic_open

        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump({"prompt": text, "prompt_ids": ids, "continuation": continuation, "continuation_ids": new,
                       "memory": args.memory if kind == "longmem" else None, "window": window,
                       "sampling": {"sampling": args.sampling, "topk": args.topk, "topp": args.topp,
                                    "temperature": args.temperature, "seed": args.seed}}, f, indent=2)
    return 0


def generate_ids(args, kind, state, dict_path, dictionary, tokenizer, ids, window):
    import torch
    from tqdm import tqdm

    from longmem.generation import Sampling, generate
    from longmem.models.loading import load_model_for_dictionary

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = load_model_for_dictionary(args.checkpoint, dictionary, os.path.dirname(os.path.abspath(dict_path)), device,
                                      state=state)
    bos, eos = dictionary.eos(), dictionary.eos()  # fairseq's LM streams: </s> opens and ends a document
    if tokenizer.specials is not None:  # a Hugging Face model's own
        bos, eos = dictionary.index(tokenizer.specials[0]), dictionary.index(tokenizer.specials[1])
    if kind == "longmem":
        model.memory.configure(enabled=args.memory == "on")
        if args.memory == "on" and window:
            model.memory.check_segment(window, rows=1)
    if kind == "longmem" and args.memory == "on" and len(ids) + 1 > (window or math.inf):
        print(f"prompt: {len(ids):,} tokens, {(len(ids) + 1) // window} window(s) of {window} into memory",
              file=sys.stderr, flush=True)
    sampling = Sampling(args.sampling, args.topk, args.topp, args.temperature)
    progress = lambda it, total: tqdm(it, total=total, desc="prompt", unit="segment", file=sys.stderr)  # noqa: E731
    return generate(model, ids, args.max_new_tokens, bos, sampling, window=window if kind == "longmem" else None,
                    banned=[dictionary.pad()] if dictionary.pad() not in (bos, eos) else [],
                    stop=None if args.ignore_eos else eos, seed=args.seed, progress=progress)



if __name__ == "__main__":
    main()
