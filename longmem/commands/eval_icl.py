"""In-context learning with memory, the release's protocol (logic: longmem/evaluation/icl.py).

This project's form, several tasks and modes in one run:

    python eval_scripts/eval_longmem_icl.py --tasks sst2 mr \\
        --backbone gpt2_medium/checkpoint_last.pt --longmem longmem_gpt2_medium/checkpoint_last.pt \\
        --modes backbone memory-off memory-on --k 20 --cache-k 2000 --results-path icl.json

The release's form, one checkpoint and one task; the mode follows from what the checkpoint is (a
LongMem checkpoint: memory on; a backbone checkpoint: the backbone alone), never from its file name:

    python eval_scripts/eval_longmem_icl.py --path gpt2_medium/checkpoint_last.pt
    python eval_scripts/eval_longmem_icl.py --path longmem_gpt2_medium/checkpoint_last.pt \\
        --pretrained-model-path gpt2_medium/checkpoint_last.pt --task SST-2

Both print the release's lines (``Acc for random seed N: x``, ``Mean acc across 6 seeds: m, std: s``)
and a table. ``--dump-prompts FILE`` writes the token ids of one task and seed's memory blocks and first
queries without loading a model, to compare with the release's script. Defaults are the release's:
GPT-2 BPE and the datasets shipped in data/, chunk size 2 and the release's memory at evaluation,
1,024-token memory blocks, one query at a time, seeds 1-6; but the memory's capacity is the checkpoint's
raised where the --cache-k demonstrations need more (``--memory-size fit``: every one of them is held, as
the release's 65,536-token memory nearly holds its 2,000; a checkpoint trained with a smaller memory would
keep only the last ones). ``--memory-size checkpoint`` keeps the checkpoint's, as the release does.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Optional

from longmem import paths
from longmem.errors import ConfigError
from longmem.utils.cli import exit_on_config_error, non_negative_int, output_file, positive_int, quiet_libraries

MODES = ["backbone", "memory-off", "memory-on"]


def add_model_arguments(p) -> None:
    """What is scored: the tasks, the modes, the checkpoints and their tokenizer."""
    p.add_argument("--data-dir", default=paths.ICL,
                   help="the ICL datasets in the released layout (default: data/icl of this repository)")
    p.add_argument("--tasks", nargs="+", help="default: all five; with --path, SST-2 as in the release")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: every mode the checkpoints given allow")
    p.add_argument("--backbone", help="backbone checkpoint (mode backbone)")
    p.add_argument("--longmem", help="LongMem checkpoint (modes memory-off, memory-on)")
    p.add_argument("--dict", help="the models' dict.txt (default: dict.txt in --gpt2-bpe)")
    p.add_argument("--gpt2-bpe", help="folder with encoder.json, vocab.bpe and dict.txt (default: data/gpt2_bpe "
                                      "of this repository, unless --sentencepiece-model is given)")
    p.add_argument("--sentencepiece-model", help="the models' sentencepiece model, instead of GPT-2 BPE")
    p.add_argument("--hf-tokenizer", metavar="PATH",
                   help="a Hugging Face model's own tokenizer (its .gguf file or folder), instead of GPT-2 BPE, for "
                        "hf_causal_lm backbones and their LongMem checkpoints: the model's ids, its bos/eos in place of "
                        "<s>/</s> (default --dict: the model's ids, as `longmem-hf-tokens dict`)")


def memory_size(text: str):
    """``--memory-size``: a positive number of tokens, ``checkpoint`` or ``fit``."""
    if text in ("checkpoint", "fit"):
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of tokens nor checkpoint or fit")


def add_protocol_arguments(p) -> None:
    """How it is scored: demonstrations in context and in memory, the memory, seeds, queries, batching."""
    p.add_argument("--k", type=non_negative_int, default=20, help="demonstrations in context")
    p.add_argument("--cache-k", type=non_negative_int, default=2000, help="demonstrations in memory")
    p.add_argument("--memory-block", type=positive_int, default=1024, help="tokens per block written to memory")
    p.add_argument("--chunk-size", type=positive_int, default=2, help="memory chunk size at evaluation (released: 2)")
    p.add_argument("--memory-size", type=memory_size, default="fit",
                   help="memory capacity in tokens at evaluation: a number; checkpoint (the checkpoint's, as the "
                        "release runs it: where the memory demonstrations overflow it, the oldest are evicted); or fit "
                        "(default): the checkpoint's, raised for each task and seed to hold all --cache-k of them")
    p.add_argument("--memory-mode", choices=["release", "shared"], default="release",
                   help="release: the release's eviction (oldest 2 blocks' chunks dropped when the next block "
                        "would fill memory); shared: a FIFO ring (default: release)")
    p.add_argument("--memory-backend", choices=["auto", "faiss", "torch"],
                   help="memory search at evaluation (default: the checkpoint's)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--scoring", choices=["vocab", "labels"], default="vocab")
    p.add_argument("--max-queries", type=positive_int, help="evaluate only N queries (quick runs; see --query-subset)")
    p.add_argument("--query-subset", choices=["first", "spread"], default="first",
                   help="with --max-queries: the first N queries, or N spread evenly over the evaluation file (MR, "
                        "MPQA and Subj list one label first: their first 1,000 queries are all label 0)")
    p.add_argument("--batch-size", type=positive_int,
                   help="queries per forward pass (default: 8 after the cached context, where a batch changes no "
                        "score beyond float rounding; 1, the release's, when prompts run whole)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run every prompt whole, the in-context demonstrations again for each query (the reference the "
                        "default is tested against: it computes the demonstrations' keys and values once per seed)")


def parse_args(argv=None):
    p = build_parser()
    return p, finish_args(p.parse_args(argv))


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """This command's arguments (a script that scores ICL another way adds its own to them)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_protocol_arguments(p)
    p.add_argument("--results-path", type=output_file, help="JSON, rewritten after every finished task")
    p.add_argument("--dump-prompts", type=output_file, metavar="FILE",
                   help="write one task and seed's memory blocks and first 5 query prompts (dictionary indices) "
                        "as JSON and exit, without a model")
    p.add_argument("--cpu", action="store_true")
    release = p.add_argument_group("the release's flags")
    release.add_argument("--path", help="one checkpoint; its kind chooses the mode (LongMem: memory-on, "
                                        "backbone: backbone)")
    release.add_argument("--pretrained-model-path", help="where the LongMem checkpoint's backbone file is "
                                                         "(overrides the path it records)")
    release.add_argument("--task", help="one task, by the release's name (SST-2, sst-5, mr, mpqa, subj) or ours")
    release.add_argument("--gpt-encoder-path", help="the release's name of --gpt2-bpe")
    release.add_argument("--subset", choices=["test", "validation"],
                         help="the evaluation split; SST-2 and SST-5 always use validation (as released)")
    return p


def finish_args(args):
    """The defaults that depend on other arguments: batch size, tasks, tokenizer."""
    if args.batch_size is None:
        args.batch_size = 1 if args.no_prefix_cache or args.k == 0 else 8
    if args.task:
        args.tasks = [args.task]
    args.tasks = args.tasks or (["sst2"] if args.path else ["sst2", "mr", "subj", "sst5", "mpqa"])
    if args.gpt_encoder_path:
        args.gpt2_bpe = args.gpt_encoder_path
    if args.gpt2_bpe is None and args.sentencepiece_model is None and args.hf_tokenizer is None:
        args.gpt2_bpe = paths.GPT2_BPE
    return args


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    parser, args = parse_args(argv)
    quiet_libraries()
    scratch = tempfile.TemporaryDirectory(prefix="longmem_icl_")  # a dictionary written for the run; removed at return
    tasks, data, dict_path, dictionary, codec = read_tasks(parser, args, scratch.name)
    if args.dump_prompts:
        return dump_prompts(parser, args, tasks, data, dictionary, codec)
    models, device = load_models(parser, args, dictionary, os.path.dirname(os.path.abspath(dict_path)))
    unmask_padding(models, dictionary, codec)
    results = {}
    for name in tasks:
        results[name] = evaluate_task(args, name, data[name], models, codec, dictionary, device)
        save_results(args, results)  # every finished task is kept, whatever happens to the next
    print_table(args, tasks, models, results)
    return results


def save_results(args, results: dict) -> None:
    """``{"config": the arguments, "results": results}`` written atomically to --results-path, when given."""
    if args.results_path:
        from longmem.utils.atomic import atomic_open

        with atomic_open(args.results_path, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)


def read_tasks(parser, args, scratch: str):
    """(our task names, {task: (spec, train, evaluation)}, dict.txt's path, the dictionary, the text codec): every
    task's files read, and its text checked against the dictionary, before any model is loaded."""
    from longmem.evaluation import icl

    tasks = checked_tasks(parser, args)
    dict_path, dictionary, codec = text_setup(parser, args, scratch)
    no_padding = dictionary.pad() in (codec.bos, codec.eos)
    if no_padding and args.batch_size > 1 and (args.no_prefix_cache or args.k == 0):
        parser.error(f"the tokenizer's bos/eos is the dictionary's <pad> index {dictionary.pad()}: prompts run whole "
                     f"cannot be left-padded into batches; use --batch-size 1 (the cached context batches its queries "
                     f"right-padded, which needs no padding mark: drop --no-prefix-cache)")
    try:
        data = {name: icl.load_task(args.data_dir, name) for name in tasks}
        for spec, train, _ in data.values():
            icl.check_known_tokens(spec, train, codec, dictionary)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return tasks, data, dict_path, dictionary, codec


def unmask_padding(models: dict, dictionary, codec) -> None:
    """Where the tokenizer's bos/eos is the dictionary's pad index, that index is a real token of every prompt
    (the model's bos): no position is padding."""
    if dictionary.pad() not in (codec.bos, codec.eos):
        return
    from longmem.models.hf_causal_lm import HFDecoder

    for model in models.values():
        for module in model.modules():
            if isinstance(module, HFDecoder):
                module.mask_padding = False


def checked_tasks(parser, args) -> list:
    """Our names of the tasks asked for; the release's --subset is refused where a task has no such split."""
    from longmem.evaluation import icl

    try:
        tasks = [icl.task_name(t) for t in args.tasks]
        for name in tasks:  # the release's --subset: SST-2 and SST-5 are read from their dev files whatever it says
            if args.subset and args.subset != "test" and name not in ("sst2", "sst5"):
                raise ValueError(f"{name} has no {args.subset} split here; its evaluation split is test")
    except ValueError as e:
        parser.error(str(e))
    return tasks


def text_setup(parser, args, scratch: str):
    """(dict.txt's path, the dictionary, the text codec): the tokenizer asked for and its dictionary (with
    --hf-tokenizer and no --dict, the model's ids written into ``scratch`` as hf_causal_lm's ``dict`` writes them)."""
    from fairseq.data import Dictionary

    from longmem.evaluation.codec import TextCodec
    from longmem.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(args.gpt2_bpe, args.sentencepiece_model, args.hf_tokenizer)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    dict_path = args.dict or (os.path.join(args.gpt2_bpe, "dict.txt") if args.gpt2_bpe else None)
    if dict_path is None and args.hf_tokenizer:
        from longmem.commands.hf_tokens import write_dictionary

        dict_path = os.path.join(scratch, "dict.txt")
        write_dictionary(tokenizer.vocab_size, dict_path)
    if not dict_path or not os.path.isfile(dict_path):
        parser.error(f"dictionary {dict_path!r} not found: pass --dict")
    dictionary = Dictionary.load(dict_path)
    return dict_path, dictionary, TextCodec(dictionary, tokenizer=tokenizer)


def load_models(parser, args, dictionary, dict_dir: str, lm_overrides: Optional[dict] = None):
    """({mode: model}, device) for the modes asked for, each checkpoint read once; with --path, the checkpoint's
    kind (not its file name) picks its role and mode. ``lm_overrides``: settings of the LongMem checkpoint changed
    at loading (e.g. ``{"mix_with_backbone": "constant"}``)."""
    import torch

    from longmem.models.loading import checkpoint_kind, load_model_for_dictionary, read_checkpoint

    lm_overrides = dict(lm_overrides or {})
    if args.pretrained_model_path:
        lm_overrides["pretrained_model_path"] = args.pretrained_model_path
    already_read = {}  # role -> the checkpoint as load_model_for_dictionary would read it (a file is read once)
    if args.path:  # the release's form
        state = read_checkpoint(args.path, {"data": dict_dir, **lm_overrides})
        kind = checkpoint_kind(state)
        if kind is None:
            parser.error(f"--path {args.path} is neither a LongMem nor a backbone checkpoint")
        setattr(args, "longmem" if kind == "longmem" else "backbone", args.path)
        args.modes = args.modes or (["memory-on"] if kind == "longmem" else ["backbone"])
        if kind == "longmem" or not lm_overrides:
            already_read[kind] = state
    modes = args.modes or [m for m in MODES if (args.backbone if m == "backbone" else args.longmem)]
    if not modes:
        parser.error("nothing to evaluate: pass --path, or --backbone and/or --longmem")
    if "backbone" in modes and not args.backbone:
        parser.error("mode backbone needs --backbone")
    if {"memory-off", "memory-on"} & set(modes) and not args.longmem:
        parser.error("modes memory-off/memory-on need --longmem")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    models = {}
    if "backbone" in modes:
        models["backbone"] = load_model_for_dictionary(args.backbone, dictionary, dict_dir, device, expect="backbone",
                                                       state=already_read.get("backbone"))
    if {"memory-off", "memory-on"} & set(modes):
        lm = load_model_for_dictionary(args.longmem, dictionary, dict_dir, device, expect="longmem",
                                       overrides=lm_overrides, state=already_read.get("longmem"))
        # one memory that every query reads, in the evaluation slot; queries never write
        try:
            lm.memory.configure(mode=args.memory_mode, chunk_size=args.chunk_size, slot="eval", writes=False,
                                **({"memory_size": args.memory_size} if isinstance(args.memory_size, int) else {}),
                                **({"backend": args.memory_backend} if args.memory_backend else {}))
        except ValueError as e:
            parser.error(f"memory at evaluation: {e}")
        # --memory-size fit: the checkpoint's capacity is the least each task and seed gets
        args.memory_floor = lm.memory.settings.memory_size if args.memory_size == "fit" else None
        models.update({mode: lm for mode in ("memory-off", "memory-on") if mode in modes})
        built = lm.decoder.backbone_file or "the checkpoint's config (no backbone file)"
        print(f"LongMem {args.longmem}: backbone built from {built}, then the weights the checkpoint holds", flush=True)
    return models, device


def task_queries(args, name, task_data, codec):
    """(the queries evaluated, the label words' first tokens) of one task: --max-queries of them, as
    --query-subset picks; a note where fewer exist, a warning where all hold one label."""
    from longmem.evaluation import icl

    spec, _, evaluation = task_data
    if args.max_queries and args.max_queries > len(evaluation):
        print(f"note: {name}: --max-queries {args.max_queries} but the evaluation file holds {len(evaluation)} "
              f"queries: evaluating all {len(evaluation)}", file=sys.stderr, flush=True)
    evaluation = icl.query_subset(evaluation, args.max_queries, args.query_subset)
    if len({label for _, label in evaluation}) == 1 and len(spec.labels) > 1:
        print(f"warning: {name}: the {len(evaluation)} queries evaluated all hold label "
              f"{spec.labels[evaluation[0][1]]!r}: the accuracy measures a bias, not the task "
              f"(--query-subset spread)", file=sys.stderr, flush=True)
    head = spec.query_template.split("{text}")[1].strip()  # e.g. "Sentiment:"
    label_tokens = [codec.first_token_after(head, label) for label in spec.labels]
    return evaluation, label_tokens


def evaluate_task(args, name, task_data, models, codec, dictionary, device) -> dict:
    """{mode: accuracies, mean, std, label mass, queries} of one task, each seed's line printed as the release's."""
    from longmem.evaluation import icl

    spec, train, _ = task_data
    evaluation, label_tokens = task_queries(args, name, task_data, codec)
    out = {}
    for mode, model in models.items():
        masses = []
        try:
            accs = icl.evaluate(model, mode, spec, train, evaluation, codec, dictionary, device, args.seeds, args.k,
                                args.cache_k, args.memory_block, args.batch_size, args.scoring, label_tokens,
                                on_seed=lambda seed, acc: print(f"Acc for random seed {seed}: {acc}", flush=True),
                                cached=not args.no_prefix_cache, masses=masses,
                                memory_floor=getattr(args, "memory_floor", None))
        except ValueError as e:
            raise ConfigError(f"{name} {mode}: {e}")
        out[mode] = {"accuracies": accs, "mean": statistics.mean(accs),
                     "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "label_mass": masses,
                     "queries": len(evaluation)}
        print(f"Mean acc across {len(accs)} seeds: {out[mode]['mean']:.4f}, std: {out[mode]['std']:.4f}   "
              f"({name}, {mode})", flush=True)
    return out


def print_table(args, tasks, models, results) -> None:
    print(f"\nICL accuracy (%), k={args.k} in context, cache_k={args.cache_k} in memory, seeds {args.seeds}, "
          f"scoring={args.scoring}")
    print("| task | " + " | ".join(models) + " |")
    print("|---|" + "---:|" * len(models))
    for name in tasks:
        print(f"| {name} | " + " | ".join(f"{100 * results[name][m]['mean']:.1f} ± {100 * results[name][m]['std']:.1f}"
                                          for m in models) + " |")


def dump_prompts(parser, args, tasks, data, dictionary, codec):
    from longmem.evaluation import icl
    from longmem.utils.atomic import atomic_open

    if len(tasks) != 1 or len(args.seeds) != 1:
        parser.error("--dump-prompts takes one task (--tasks T or --task T) and one seed (--seeds S)")
    spec, train, evaluation = data[tasks[0]]
    blocks, prompts = icl.prompts_for_seed(spec, train, evaluation[:5], codec, dictionary, args.k, args.cache_k,
                                           args.seeds[0], args.memory_block)
    with atomic_open(args.dump_prompts, "w", encoding="utf-8") as f:
        json.dump({"task": tasks[0], "seed": args.seeds[0], "memory_blocks": blocks, "prompts": prompts}, f)
    print(f"wrote {args.dump_prompts}: {len(blocks)} memory blocks, {len(prompts)} prompts")
    return {"memory_blocks": blocks, "prompts": prompts}


if __name__ == "__main__":
    main()
