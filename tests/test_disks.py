"""Outputs on a disk that is read-only or fills up: one line naming the path before any work (read-only), or one
line after which everything written before is whole (full). Real tmpfs mounts (root only; skipped elsewhere):
access(2) can call a folder writable where a write fails, so only a real mount shows what a user meets."""
import contextlib
import os
import subprocess

import pytest
import torch

from longmem.paths import REPO

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.fixture
def mount(tmp_path):
    """``mount(size_bytes, read_only=False) -> folder``: a tmpfs of that size, unmounted after the test."""
    mounted = []

    def make(size, read_only=False):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root only): {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def tiny_train(data, save_dir, *extra):
    return ["-m", "fairseq_cli.train", data, "--user-dir", os.path.join(REPO, "longmem"), "--task", "language_modeling",
            "--arch", "newgpt-tiny", "--embed-dim", "64", "--num-layers", "2", "--num-attention-heads", "4",
            "--ffn-embed-dim", "128", "--retrieval-layer-index", "1", "--tokens-per-sample", "32", "--batch-size", "4",
            "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--save-dir", save_dir, "--disable-validation",
            "--no-epoch-checkpoints", "--num-workers", "0", *extra]


def test_fairseq_train_on_a_save_dir_that_fills_up_keeps_the_last_checkpoint(tiny, mount, tmp_path, run_cli,
                                                                             assert_one_line_error):
    """Room for one checkpoint and a half: epoch 1's checkpoint_last.pt is written, epoch 2's does not fit. One line
    (no space left on DIR), no traceback, no half-written .tmp file; checkpoint_last.pt loads and is epoch 1's."""
    run_cli(*tiny_train(tiny / "bin", tmp_path / "probe", "--max-epoch", "1"), ok=True)
    size = (tmp_path / "probe" / "checkpoint_last.pt").stat().st_size
    full = mount(int(size * 1.5) // 4096 * 4096 + 8192)
    code, _, err = run_cli(*tiny_train(tiny / "bin", full, "--max-epoch", "2"))
    assert_one_line_error(code, err, f"no space left on {full}", "checkpoint_last.pt included")
    assert not [f for f in os.listdir(full) if f.endswith(".tmp")], os.listdir(full)
    updates = [torch.load(path, weights_only=False)["optimizer_history"][-1]["num_updates"]
               for path in (tmp_path / "probe" / "checkpoint_last.pt", full / "checkpoint_last.pt")]
    assert updates[0] > 0 and updates[1] == updates[0]  # epoch 1's, as the run that stopped there saved it


def test_a_results_file_on_a_full_disk_keeps_the_previous_one(tiny, mount, run_cli, assert_one_line_error):
    """longmem-eval-lm replacing a results file on a disk with no room left: one line, the old file whole, no
    temporary file left."""
    full = mount(64 * 1024)
    (full / "results.json").write_text('{"old": true}\n')
    with contextlib.suppress(OSError):  # fill what is left
        with open(full / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    code, _, err = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py"), tiny / "bin", "--backbone",
                           tiny / "backbone.pt", "--tokens-per-sample", "32", "--results-path", full / "results.json",
                           "--cpu")
    assert_one_line_error(code, err, "No space left on device", "results.json")
    assert (full / "results.json").read_text() == '{"old": true}\n'
    assert sorted(os.listdir(full)) == ["filler", "results.json"]


READ_ONLY_OUTPUTS = {  # entry point: its arguments with RO the read-only folder, and what the line must name
    "prepare-pile --destdir": (["-m", "longmem.commands.prepare_pile", "--train", "{shard}", "--destdir", "RO/bin"],
                               "RO"),
    "fairseq-train --save-dir": (tiny_train("{data}", "RO/ckpt", "--max-update", "1"), "RO/ckpt"),
    "make-longrange --out": (["-m", "longmem.commands.make_longrange", "--spm-model", "{spm}", "--out", "RO/lr",
                              "--train-text", "{text}", "--valid-text", "{text}", "--test-text", "{text}"], "RO"),
    "eval-icl --dump-prompts": (["-m", "longmem.commands.eval_icl", "--task", "SST-2", "--dump-prompts", "RO/p.json"],
                                "RO"),
    "eval-lm --results-path": (["-m", "longmem.commands.eval_lm", "{data}", "--backbone", "{backbone}",
                                "--results-path", "RO/r.json"], "RO"),
    "diagnose-memory --results-path": (["-m", "longmem.commands.diagnose_memory", "{data}", "--longmem", "{backbone}",
                                        "--split", "{text}", "--results-path", "RO/d.json"], "RO"),
    "build-broad-corpus --out": (["-m", "longmem.commands.build_broad_corpus", "--out", "RO/broad"], "RO"),
    "build-shakespeare --out": (["-m", "longmem.commands.build_shakespeare_corpus", "--out", "RO/plays"], "RO"),
    "spm-bpe train --model-prefix": (["-m", "longmem.commands.spm_bpe", "train", "--input", "{text}", "--model-prefix",
                                      "RO/spm", "--vocab-size", "50"], "RO"),
    "hf-tokens dict --out": (["-m", "longmem.commands.hf_tokens", "dict", "--model", "{text}", "--out", "RO/d.txt"],
                             "RO"),
    "demo --out": (["-m", "longmem.demo", "--out", "RO/demo"], "RO"),
    "recipe smollm2 OUT": (["-m", "longmem.recipes", "smollm2", "RO/smol"], "RO"),
}


@pytest.mark.parametrize("entry", list(READ_ONLY_OUTPUTS))
def test_every_output_on_a_read_only_mount_is_refused_before_any_work(entry, tiny, mount, tmp_path, run_cli,
                                                                       assert_one_line_error):
    ro = mount(1 << 20, read_only=True)
    (tmp_path / "text.txt").write_text("a b c\n")
    (tmp_path / "shard.jsonl").write_text('{"text": "a b c", "meta": {"pile_set_name": "X"}}\n')
    fill = {"{shard}": str(tmp_path / "shard.jsonl"), "{data}": str(tiny / "bin"), "{spm}": str(tmp_path / "text.txt"),
            "{text}": str(tmp_path / "text.txt"), "{backbone}": str(tiny / "backbone.pt")}
    args, named = READ_ONLY_OUTPUTS[entry]

    def place(a):
        a = str(a)
        for key, value in fill.items():
            a = a.replace(key, value)
        return a.replace("RO", str(ro)) if a.startswith("RO") else a

    code, _, err = run_cli(*map(place, args), timeout=300)
    assert_one_line_error(code, err, place(named))
    assert code == 2 and ("not writable" in err or "cannot be written" in err), err[-500:]
    assert os.listdir(ro) == []


def test_output_file_checks_by_writing_not_by_asking(tmp_path, monkeypatch):
    """access(2) may say yes where a write fails: the check creates a nameless file instead."""
    import argparse

    from longmem.utils import cli

    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    monkeypatch.setattr(cli, "can_write_in", lambda folder: False)
    with pytest.raises(argparse.ArgumentTypeError, match="not writable"):
        cli.output_file(str(tmp_path / "x.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="not writable"):
        cli.output_folder(str(tmp_path / "out"))
    monkeypatch.undo()
    assert cli.output_folder(str(tmp_path / "out")) and cli.can_write_in(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the probe leaves nothing
