"""Memory in generation: does a LongMem model continue a passage it read more than a window ago?

Each prompt is a passage of held-out text, then the text that follows it in the file (more than a window:
by the time the cue arrives the passage has streamed into memory), then the passage's first tokens (the cue).
The model continues greedily, memory on and memory off; the score is how many of the next --match tokens equal
the passage's own (exact match, position by position).

    longmem-generation-recall demo_out/smollm2/longmem/checkpoint_last.pt --text demo_out/smollm2/corpus/test.txt \\
        --prompts 24 --results-path recall.json

Tokenizer and dictionary as longmem-generate takes them (default for a checkpoint over a Hugging Face backbone:
the backbone's own tokenizer and the checkpoint's data folder's dict.txt).
"""
import argparse
import json
import os
import sys
from typing import List

from longmem.commands.generate import checkpoint_dictionary, checkpoint_settings, choose_tokenizer
from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, input_file, output_file, positive_int, quiet_libraries


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="longmem-generation-recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=input_file, help="a LongMem checkpoint")
    p.add_argument("--text", type=input_file, required=True, help="held-out UTF-8 text the prompts are cut from")
    p.add_argument("--prompts", type=positive_int, default=24)
    p.add_argument("--passage", type=positive_int, default=64, help="tokens of each passage")
    p.add_argument("--cue", type=positive_int, default=8, help="the passage's first tokens, given again at the end")
    p.add_argument("--match", type=positive_int, default=20, help="tokens generated and compared with the passage's")
    p.add_argument("--filler", type=positive_int, help="tokens between the passage and the cue (default: the window "
                                                       "+ 64)")
    p.add_argument("--tokens-per-sample", type=positive_int, help="the window (default: the checkpoint's)")
    p.add_argument("--dict", type=input_file, help="the model's dict.txt (default: the checkpoint's data folder's)")
    p.add_argument("--gpt2-bpe")
    p.add_argument("--sentencepiece-model", type=input_file)
    p.add_argument("--hf-tokenizer")
    p.add_argument("--pretrained-model-path", help="where the LongMem checkpoint's backbone file is now")
    p.add_argument("--results-path", type=output_file, help="JSON: the table's figures and every prompt's tokens")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    args.whitespace = False
    if args.cue + args.match > args.passage:
        p.error(f"--cue {args.cue} + --match {args.match} must fit in --passage {args.passage}")
    return p, args


def build_prompts(ids: List[int], count: int, passage: int, filler: int, cue: int, match: int):
    """``count`` prompts from consecutive stretches of ``ids``: passage + the ``filler`` tokens after it + the
    passage's first ``cue`` tokens; with each, the ``match`` tokens of the passage that follow the cue."""
    span = passage + filler
    if len(ids) < count * span:
        raise ConfigError(f"the text holds {len(ids):,} tokens, fewer than {count} prompts x {span} tokens: give more "
                          f"text or fewer --prompts")
    out = []
    for i in range(count):
        stretch = ids[i * span: (i + 1) * span]
        out.append((stretch + stretch[:cue], stretch[cue: cue + match]))
    return out


def exact_matches(generated: List[int], target: List[int]) -> int:
    return sum(int(a == b) for a, b in zip(generated, target))


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    parser, args = parse_args(argv)
    quiet_libraries()
    kind, state, model_cfg, task_cfg = checkpoint_settings(parser, args)
    if kind != "longmem":
        parser.error(f"{args.checkpoint} is a backbone checkpoint: give a LongMem checkpoint")
    window = args.tokens_per_sample or task_cfg.get("tokens_per_sample")
    if not window:
        parser.error("the checkpoint records no --tokens-per-sample: pass it")
    filler = args.filler or window + 64
    if args.passage + filler < window:
        parser.error(f"--passage + --filler ({args.passage + filler}) must exceed the window {window}, or the passage "
                     f"would still be in the local context")
    dict_path, dictionary = checkpoint_dictionary(parser, args, task_cfg)
    tokenizer = choose_tokenizer(args, model_cfg)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = [dictionary.index(s) for s in tokenizer.pieces(text)]
    prompts = build_prompts(ids, args.prompts, args.passage, filler, args.cue, args.match)
    results = score(args, state, dict_path, dictionary, tokenizer, prompts, window)
    results.update(window=window, passage=args.passage, filler=filler, cue=args.cue, match=args.match,
                   text=os.path.abspath(args.text))
    print(table(results))
    if args.results_path:
        from longmem.utils.atomic import atomic_open

        with atomic_open(args.results_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def score(args, state, dict_path, dictionary, tokenizer, prompts, window) -> dict:
    import torch
    from tqdm import tqdm

    from longmem.generation import generate
    from longmem.models.loading import load_model_for_dictionary

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = load_model_for_dictionary(args.checkpoint, dictionary, os.path.dirname(os.path.abspath(dict_path)), device,
                                      state=state, expect="longmem")
    model.memory.check_segment(window, rows=1)
    bos = dictionary.eos() if tokenizer.specials is None else dictionary.index(tokenizer.specials[0])
    eos = dictionary.eos() if tokenizer.specials is None else dictionary.index(tokenizer.specials[1])
    banned = [dictionary.pad()] if dictionary.pad() not in (bos, eos) else []
    rows = []
    for prompt, target in tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr):
        row = {"prompt_ids": prompt, "target_ids": target}
        for memory in ("on", "off"):
            model.memory.configure(enabled=memory == "on")
            row[memory] = generate(model, prompt, args.match, bos, window=window, banned=banned)
            row[f"matches_{memory}"] = exact_matches(row[memory], target)
        rows.append(row)
    decode = lambda ids: tokenizer.decode([dictionary[i] for i in ids])  # noqa: E731
    first = rows[0]
    example = {"cue": decode(first["prompt_ids"][-args.cue:]), "passage": decode(first["target_ids"]),
               "memory_on": decode(first["on"]), "memory_off": decode(first["off"])}
    summary = {m: {"mean_matches": sum(r[f"matches_{m}"] for r in rows) / len(rows),
                   "all_match": sum(r[f"matches_{m}"] == args.match for r in rows)} for m in ("on", "off")}
    return {"prompts": len(rows), "summary": summary, "example": example, "rows": rows}


def table(results) -> str:
    s, m = results["summary"], results["match"]
    ex = results["example"]
    return "\n".join([
        f"Greedy continuations of {results['prompts']} prompts: a {results['passage']}-token passage, the "
        f"{results['filler']} tokens after it (window {results['window']}), then its first {results['cue']} tokens.",
        "", f"| memory | tokens matching the passage (of {m}, mean) | prompts with all {m} |", "|---|---:|---:|",
        f"| off | {s['off']['mean_matches']:.1f} | {s['off']['all_match']} |",
        f"| on | {s['on']['mean_matches']:.1f} | {s['on']['all_match']} |", "",
        f"Example: cue {ex['cue']!r}", f"  passage:    {ex['passage']!r}", f"  memory on:  {ex['memory_on']!r}",
        f"  memory off: {ex['memory_off']!r}"])


if __name__ == "__main__":
    main()
