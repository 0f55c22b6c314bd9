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
