#!/usr/bin/env python
"""In-context learning with memory, the released protocol (logic: longmem/evaluation/icl.py).

    python eval_scripts/eval_longmem_icl.py --tasks sst2 mr \\
        --backbone gpt2_medium/checkpoint_last.pt --longmem longmem_gpt2_medium/checkpoint_last.pt \\
        --modes backbone memory-off memory-on \\
        --k 20 --cache-k 2000 --seeds 1 2 3 4 5 6 --results-path icl.json

Modes are chosen by flag, never by the checkpoint's path: ``backbone`` (the newgpt checkpoint alone, k
demonstrations in context), ``memory-off`` and ``memory-on`` (the LongMem checkpoint; with memory on,
cache_k more demonstrations fill the memory in whole --memory-block-token blocks first).
"""
import argparse
import json
import logging
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longmem import paths  # noqa: E402


class TextCodec:
    """Text <-> the model's dictionary indices, through GPT-2 BPE or a sentencepiece model."""

    def __init__(self, dictionary, gpt2_bpe=None, sentencepiece_model=None):
        self.dictionary = dictionary
        if gpt2_bpe:
            from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

            self.bpe = get_encoder(os.path.join(gpt2_bpe, "encoder.json"), os.path.join(gpt2_bpe, "vocab.bpe"))
            self._pieces = lambda text: [str(i) for i in self.bpe.encode(text)]
            self._text = lambda sym: self.bpe.decode([int(sym)]) if sym.isdigit() else sym
        elif sentencepiece_model:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
            self._pieces = lambda text: sp.encode(text, out_type=str)
            self._text = lambda sym: sym.replace("\u2581", " ")
        else:
            raise SystemExit("choose the model's tokenizer: --gpt2-bpe DIR or --sentencepiece-model FILE")

    def encode(self, text):
        return [self.dictionary.index(p) for p in self._pieces(text)]

    def decode(self, index):
        return self._text(self.dictionary[index])

    def first_token_after(self, head, word):
        """The first token of ``word`` as it follows ``head`` in a prompt."""
        full, prefix = self.encode(head + " " + word), self.encode(head)
        return full[len(prefix)] if full[: len(prefix)] == prefix else self.encode(" " + word)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=paths.ICL,
                   help="the ICL datasets in the released layout (default: data/icl of this repository)")
    p.add_argument("--tasks", nargs="+", default=["sst2", "mr", "subj", "sst5", "mpqa"])
    p.add_argument("--modes", nargs="+", default=["backbone", "memory-off", "memory-on"],
                   choices=["backbone", "memory-off", "memory-on"])
    p.add_argument("--backbone", help="newgpt checkpoint (mode backbone)")
    p.add_argument("--longmem", help="LongMem checkpoint (modes memory-off, memory-on)")
    p.add_argument("--dict", help="the models' dict.txt (default: dict.txt in --gpt2-bpe)")
    p.add_argument("--gpt2-bpe", help="folder with encoder.json, vocab.bpe and dict.txt (default: data/gpt2_bpe "
                                      "of this repository, unless --sentencepiece-model is given)")
    p.add_argument("--sentencepiece-model", help="the models' sentencepiece model, instead of GPT-2 BPE")
    p.add_argument("--k", type=int, default=20, help="demonstrations in context")
    p.add_argument("--cache-k", type=int, default=2000, help="demonstrations in memory")
    p.add_argument("--memory-block", type=int, default=1024, help="tokens per block written to memory")
    p.add_argument("--chunk-size", type=int, default=2, help="memory chunk size at evaluation (released: 2)")
    p.add_argument("--memory-size", type=int,
                   help="memory capacity in tokens at evaluation (default: the checkpoint's; it must hold the "
                        "cache_k demonstrations, or the oldest are evicted)")
    p.add_argument("--memory-backend", choices=["auto", "faiss", "torch"],
                   help="memory search at evaluation (default: the checkpoint's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--scoring", choices=["vocab", "labels"], default="vocab")
    p.add_argument("--max-queries", type=int, help="evaluate only the first N queries (quick runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--results-path")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.gpt2_bpe is None and args.sentencepiece_model is None:
        args.gpt2_bpe = paths.GPT2_BPE
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch
    from fairseq.data import Dictionary
    from tqdm import tqdm

    import longmem  # noqa: F401
    from longmem.evaluation import icl
    from longmem.utils.atomic import atomic_open
    from longmem.utils.checkpoints import load_model_for_dictionary

    for task in args.tasks:
        if task not in icl.TASKS:
            raise SystemExit(f"unknown ICL task {task!r}; choose from {', '.join(icl.TASKS)}")
    if "backbone" in args.modes and not args.backbone:
        raise SystemExit("mode backbone needs --backbone")
    if {"memory-off", "memory-on"} & set(args.modes) and not args.longmem:
        raise SystemExit("modes memory-off/memory-on need --longmem")
    dict_path = args.dict or (os.path.join(args.gpt2_bpe, "dict.txt") if args.gpt2_bpe else None)
    if not dict_path or not os.path.isfile(dict_path):
        raise SystemExit(f"dictionary {dict_path!r} not found: pass --dict")
    dictionary = Dictionary.load(dict_path)
    dict_dir = os.path.dirname(os.path.abspath(dict_path))
    codec = TextCodec(dictionary, args.gpt2_bpe, args.sentencepiece_model)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    models = {}
    if "backbone" in args.modes:
        models["backbone"] = load_model_for_dictionary(args.backbone, dictionary, dict_dir, device)
    if {"memory-off", "memory-on"} & set(args.modes):
        lm = load_model_for_dictionary(args.longmem, dictionary, dict_dir, device)
        # one memory that every query row reads, in the evaluation slot
        lm.memory.configure(mode="shared", chunk_size=args.chunk_size, slot="eval",
                            **({"memory_size": args.memory_size} if args.memory_size else {}),
                            **({"backend": args.memory_backend} if args.memory_backend else {}))
        for mode in ("memory-off", "memory-on"):
            if mode in args.modes:
                models[mode] = lm

    results = {}
    for task in args.tasks:
        spec, train, evaluation = icl.load_task(args.data_dir, task)
        evaluation = evaluation[: args.max_queries] if args.max_queries else evaluation
        head = spec.template.split("{text}")[1].split("{label}")[0].strip()  # e.g. "Sentiment:"
        label_tokens = [codec.first_token_after(head, label) for label in spec.labels]
        results[task] = {}
        for mode, model in models.items():
            accs = []
            for seed in tqdm(args.seeds, desc=f"{task} {mode}", unit="seed"):
                context, memory = icl.sample_demonstrations(train, args.k, args.cache_k, seed)
                if mode != "backbone":  # queries never write
                    model.memory.configure(enabled=(mode == "memory-on"), writes=False)
                    model.memory.reset()
                if mode == "memory-on":
                    ids = codec.encode("".join(icl.demonstration(spec, t, l) for t, l in memory))
                    icl.fill_memory(model, icl.memory_blocks(ids, args.memory_block), device)
                prompts = [[dictionary.eos()] + codec.encode(icl.query_prompt(spec, context, text))
                           for text, _ in evaluation]
                lp = icl.predict(model, prompts, dictionary.pad(), device, args.batch_size)
                accs.append(icl.score(lp, [g for _, g in evaluation], spec, codec.decode, label_tokens, args.scoring))
            results[task][mode] = {"accuracies": accs, "mean": statistics.mean(accs),
                                   "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0}
    modes = list(models)
    print(f"\nICL accuracy (%), k={args.k} in context, cache_k={args.cache_k} in memory, seeds {args.seeds}, "
          f"scoring={args.scoring}")
    print("| task | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for task in args.tasks:
        print(f"| {task} | " + " | ".join(f"{100 * results[task][m]['mean']:.1f} ± {100 * results[task][m]['std']:.1f}"
                                          for m in modes) + " |")
    if args.results_path:
        with atomic_open(args.results_path, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
