"""Pile preprocessing: sampling, cleaning, malformed lines, zstd, GPT-2 BPE, binarization."""
import json
import os

import pytest

from longmem.commands import prepare_pile
from longmem.paths import REPO

WEIGHTS = {"Pile-CC": 1.0, "Github": 0.0, "ArXiv": 2.0}
LINES = [
    json.dumps({"text": "Doc A line1\n\n   \nline2  ", "meta": {"pile_set_name": "Pile-CC"}}),
    "this is not json",
    json.dumps({"text": "B text", "meta": {"pile_set_name": "Github"}}),
    json.dumps({"meta": {"pile_set_name": "Pile-CC"}}),
    json.dumps({"text": 5, "meta": {"pile_set_name": "Pile-CC"}}),
    "",
    json.dumps({"text": "C1\r\nC2", "meta": {"pile_set_name": "ArXiv"}}),
    json.dumps({"text": "\n\n", "meta": {"pile_set_name": "ArXiv"}}),
    json.dumps({"text": "D", "meta": {"pile_set_name": "Wikipedia (en)"}}),
    '{"text": "truncated',
]
EXPECTED_DOCS = [("Pile-CC", ["Doc A line1", "line2"]), ("ArXiv", ["C1", "C2"]), ("ArXiv", ["C1", "C2"])]


def write_shards(tmp_path):
    plain = tmp_path / "00.jsonl"
    plain.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    import zstandard

    packed = tmp_path / "01.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    return plain, packed


@pytest.mark.parametrize("which", [0, 1])
def test_exact_documents_and_counts_per_subset_from_plain_and_zstd(tmp_path, which):
    shard = write_shards(tmp_path)[which]
    gen = prepare_pile.read_documents(str(shard), WEIGHTS, default_weight=0.0, seed=1)
    docs = []
    while True:
        try:
            docs.append(next(gen))
        except StopIteration as stop:
            stats = stop.value
            break
    assert docs == EXPECTED_DOCS
    assert stats["malformed"] == 4 and stats["lines"] == 9
    assert dict(stats["seen"]) == {"Pile-CC": 1, "Github": 1, "ArXiv": 2, "Wikipedia (en)": 1}
    assert dict(stats["kept"]) == {"Pile-CC": 1, "ArXiv": 2}
    assert any(":2: JSONDecodeError" in e for e in stats["malformed_examples"])


def test_fractional_weights_keep_about_that_share_reproducibly():
    kept = [prepare_pile.keep_count(0.3, 7, "shard.jsonl", n) for n in range(20000)]
    again = [prepare_pile.keep_count(0.3, 7, "shard.jsonl", n) for n in range(20000)]
    assert kept == again
    assert abs(sum(kept) / len(kept) - 0.3) < 0.02
    assert prepare_pile.keep_count(2.0, 1, "s", 3) == 2


def test_gpt2_bpe_hello_world_gives_gpt2_ids_and_dict_indices(repo_data):
    from fairseq.data import Dictionary

    bpe = os.path.join(repo_data, "gpt2_bpe")
    encoded = prepare_pile.Encoder(gpt2_bpe=bpe).encode("Hello world")
    assert encoded == "15496 995"
    rows = [line.split()[0] for line in open(os.path.join(bpe, "dict.txt"), encoding="utf-8")]
    d = Dictionary.load(os.path.join(bpe, "dict.txt"))
    assert [d.index(t) for t in encoded.split()] == [4 + rows.index("15496"), 4 + rows.index("995")]


@pytest.mark.slow
def test_end_to_end_shards_to_fairseq_data(tmp_path, repo_data, run_cli):
    from fairseq.data import Dictionary, data_utils
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    plain, packed = write_shards(tmp_path)
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps(WEIGHTS))
    bpe = os.path.join(repo_data, "gpt2_bpe")
    proc = run_cli(os.path.join(REPO, "preprocess", "prepare_pile.py"), "--train", str(plain), "--valid", str(packed),
                   "--weights", str(weights), "--default-weight", "0", "--gpt2-bpe", bpe, "--destdir",
                   str(tmp_path / "bin"), "--workers", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "malformed" in proc.stderr and "8 malformed" in proc.stderr  # 4 per shard, reported
    d = Dictionary.load(str(tmp_path / "bin" / "dict.txt"))
    enc = get_encoder(os.path.join(bpe, "encoder.json"), os.path.join(bpe, "vocab.bpe"))
    for split in ("train", "valid"):
        lines = [d.string(t[:-1]) for t in data_utils.load_indexed_dataset(str(tmp_path / "bin" / split), d)]
        decoded = [enc.decode([int(x) for x in line.split()]) if line else "" for line in lines]
        expected = []
        for _, doc in EXPECTED_DOCS:
            expected += doc + [""]
        assert decoded == expected
    report = json.loads((tmp_path / "bin" / "encoded" / "report.json").read_text())
    assert report["kept"] == {"Pile-CC": 2, "ArXiv": 4} and report["malformed"] == 8


def test_a_worker_that_dies_fails_the_run_instead_of_hanging(tmp_path, repo_data, monkeypatch):
    """multiprocessing.Pool waits forever for the shard of a worker killed by the kernel (SIGKILL, the OOM
    killer); the shard pool must fail with an error that names the cause and the fix."""
    import argparse
    import signal
    import time

    from longmem.errors import ConfigError

    plain, packed = write_shards(tmp_path)
    real = prepare_pile.read_documents

    def dies_on_the_zstd_shard(path, *rest):  # what process_shard calls, in the forked workers too
        if path.endswith(".zst"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *rest)

    monkeypatch.setattr(prepare_pile, "read_documents", dies_on_the_zstd_shard)
    args = argparse.Namespace(train=[str(plain)], valid=[str(packed)], test=[], workers=2, workdir=None,
                              default_weight=0.0, seed=1, gpt2_bpe=os.path.join(repo_data, "gpt2_bpe"),
                              sentencepiece_model=None, no_binarize=True)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="worker died.*fewer --workers"):
        prepare_pile.build(args, WEIGHTS, None, str(tmp_path / "out"))
    assert time.monotonic() - start < 60
    monkeypatch.setattr(prepare_pile, "read_documents", real)  # and with every worker alive, the same build works
    report = prepare_pile.build(args, WEIGHTS, None, str(tmp_path / "out2"))
    assert report["kept"] == {"Pile-CC": 2, "ArXiv": 4}


def test_the_releases_sampling_layout_and_bos_lines_through_prepare_pile(tmp_path, repo_data, run_cli):
    """preprocess/filter_shard_tnlg.py: the release's layout SOURCE/<subset>/splitNNNNNNNN.jsonl, its sampling
    (random.seed(2), per subset int(n / total * sampling) of 1..n, one shuffle), written out by hand here, and
    every encoded line starting with <s>."""
    import random

    from longmem.commands.filter_shard_tnlg import sample_shards

    table = {"Books": 6, "Web": 3, "Wiki": 1}
    source = tmp_path / "pile"
    for subset, count in table.items():
        (source / subset).mkdir(parents=True)
        for i in range(1, count + 1):
            text = f"{subset} shard {i}\nsecond line"
            (source / subset / f"split{i:08d}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "subsets.json").write_text(json.dumps(table))
    rng = random.Random(2)
    want = [str(source / "Books" / f"split{i:08d}.jsonl") for i in rng.sample([1, 2, 3, 4, 5, 6], 3)]
    want += [str(source / "Web" / f"split{i:08d}.jsonl") for i in rng.sample([1, 2, 3], 1)]
    want += [str(source / "Wiki" / f"split{i:08d}.jsonl") for i in rng.sample([1], 0)]
    rng.shuffle(want)
    assert sample_shards(str(source), table, 5) == want
    script = os.path.join(REPO, "preprocess", "filter_shard_tnlg.py")
    listed = run_cli(script, "--source-path", source, "--subsets", tmp_path / "subsets.json", "--sampling-jsonls", "5",
                     "--list-only", ok=True).stdout.split()
    assert listed == want
    run_cli(script, "--source-path", source, "--subsets", tmp_path / "subsets.json", "--sampling-jsonls", "5",
            "--destdir", tmp_path / "bin", "--workers", "1", ok=True)
    encoded = (tmp_path / "bin" / "encoded" / "train.bpe").read_text().splitlines()
    assert len(encoded) == 3 * len(want) and all(line.startswith("<s> ") for line in encoded)
    from fairseq.data import Dictionary
    from longmem.tokenizer import Tokenizer

    d = Dictionary.load(os.path.join(repo_data, "gpt2_bpe", "dict.txt"))
    first = json.loads(open(want[0]).read())["text"].split("\n")[0]
    assert encoded[0] == "<s> " + " ".join(Tokenizer(gpt2_bpe=os.path.join(repo_data, "gpt2_bpe")).pieces(first))
    assert os.path.isfile(tmp_path / "bin" / "train.bin") and d.index("<s>") == d.bos()
    (source / "Web" / "split00000001.jsonl").unlink()
    (source / "Web" / "split00000002.jsonl").unlink()
    (source / "Web" / "split00000003.jsonl").unlink()
    code, _, err = run_cli(script, "--source-path", source, "--subsets", tmp_path / "subsets.json",
                           "--sampling-jsonls", "5", "--destdir", tmp_path / "bin2")
    assert code == 2 and "1 of the 4 sampled shards are not there" in err and "--skip-missing" in err
