"""ICL protocol: templates, sampling, memory blocks, read-only queries, the script end to end."""
import json
import os
import subprocess
import sys

import torch

from longmem.evaluation import icl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prompts_match_hand_written_strings():
    context = [("a fine film .", 1), ("dull .", 0)]
    assert icl.query_prompt(icl.TASKS["sst2"], context, "so good .") == \
        "Review: a fine film . Sentiment: positive. Review: dull . Sentiment: negative. Review: so good . Sentiment:"
    assert icl.query_prompt(icl.TASKS["sst5"], [("meh", 2)], "wow") == "Review: meh Sentiment: okay. Review: wow Sentiment:"
    assert icl.query_prompt(icl.TASKS["subj"], [("the plot follows a man .", 1)], "i loved it") == \
        "Input: the plot follows a man . Type: objective. Input: i loved it Type:"
    assert icl.query_prompt(icl.TASKS["mpqa"], [("failing", 0)], "hope") == "Review: failing Sentiment: negative. Review: hope Sentiment:"
    assert icl.demonstration(icl.TASKS["mr"], "great", 1) == "Review: great Sentiment: positive. "


def test_released_files_are_read_with_their_sizes(repo_data):
    sizes = {"sst2": 872, "mr": 2000, "subj": 2000, "sst5": 1101, "mpqa": 2000}
    for task, n in sizes.items():
        spec, train, evaluation = icl.load_task(os.path.join(repo_data, "icl"), task)
        assert len(evaluation) == n
        assert {label for _, label in train} == set(range(len(spec.labels)))
    _, _, sst2 = icl.load_task(os.path.join(repo_data, "icl"), "sst2")
    assert sst2[0] == ("one long string of cliches .", 0)


def test_sampling_is_disjoint_and_seeded():
    train = [(f"t{i}", i % 2) for i in range(100)]
    ctx, mem = icl.sample_demonstrations(train, 5, 30, seed=3)
    assert len(ctx) == 5 and len(mem) == 30 and not set(ctx) & set(mem)
    assert (ctx, mem) == icl.sample_demonstrations(train, 5, 30, seed=3)
    assert ctx != icl.sample_demonstrations(train, 5, 30, seed=4)[0]


def test_memory_is_cut_into_whole_blocks():
    assert icl.memory_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert icl.memory_blocks(list(range(3)), 4) == []


def test_memory_holds_exactly_the_blocks_and_queries_leave_it_unchanged(make_sidenet):
    from conftest import make_dictionary

    model, _ = make_sidenet(make_dictionary(40), use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    model.memory.configure(mode="shared")
    ids = torch.randint(4, 44, (45,)).tolist()
    blocks = icl.memory_blocks(ids, 16)
    icl.fill_memory(model, blocks, torch.device("cpu"))
    bank = model.memory.bank
    assert bank.num_tokens(0) == 32
    keys = [model.decoder.pretrained_model(torch.tensor([b]), return_retrieval_kv=True)[1]["retrieval_kv"][0]
            for b in blocks]
    stored = bank.keys[0].permute(1, 2, 0, 3).reshape(-1, 32)[:32]  # (tokens, H*d) in write order
    torch.testing.assert_close(stored, torch.cat(keys, 1)[0])
    before = bank.state_dict()
    # the release's fill reads memory while writing: the same memory, bit for bit
    model.memory.reset()
    model.memory.configure(enabled=True, writes=True, reads=True)
    for b in blocks:
        model(torch.tensor([b]))
    assert model.memory.reads and all(
        torch.equal(before[k], v) if torch.is_tensor(v) else before[k] == v
        for k, v in model.memory.bank.state_dict().items())
    bank = model.memory.bank
    model.memory.configure(enabled=True, writes=False)
    lp = icl.predict(model, [[2, 5, 6, 7], [2, 9, 10]], pad=1, device=torch.device("cpu"), batch_size=2)
    assert lp.shape == (2, 44)
    after = bank.state_dict()
    assert all(torch.equal(before[k], after[k]) if torch.is_tensor(before[k]) else before[k] == after[k]
               for k in before)


def test_script_end_to_end_on_the_shipped_data_and_clear_errors(tmp_path, repo_data):
    from longmem.models.newgpt import build_newgpt
    from longmem.released import write_released_style_checkpoint
    from longmem.utils.checkpoints import save_fairseq_checkpoint

    bpe = os.path.join(repo_data, "gpt2_bpe")
    longmem_ckpt = tmp_path / "longmem.pt"
    write_released_style_checkpoint(str(longmem_ckpt), os.path.join(bpe, "dict.txt"))
    backbone = build_newgpt("newgpt-tiny", os.path.join(bpe, "dict.txt"), embed_dim=64, num_layers=4,
                            num_attention_heads=4, ffn_embed_dim=256, retrieval_layer_index=2)
    save_fairseq_checkpoint(tmp_path / "backbone.pt", backbone.state_dict(), cfg={
        "model": {"_name": "newgpt-tiny", "embed_dim": 64, "num_layers": 4, "num_attention_heads": 4,
                  "ffn_embed_dim": 256, "retrieval_layer_index": 2},
        "task": {"_name": "language_modeling", "data": bpe}})
    script = os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py")
    common = ["--data-dir", os.path.join(repo_data, "icl"), "--gpt2-bpe", bpe, "--cpu", "--k", "2",
              "--cache-k", "20", "--memory-block", "64", "--max-queries", "6", "--seeds", "1", "2"]
    out = tmp_path / "icl.json"
    proc = subprocess.run([sys.executable, script, *common, "--tasks", "sst2", "subj", "--backbone",
                           str(tmp_path / "backbone.pt"), "--longmem", str(longmem_ckpt), "--results-path", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for task in ("sst2", "subj"):
        for mode in ("backbone", "memory-off", "memory-on"):
            accs = results[task][mode]["accuracies"]
            assert len(accs) == 2 and all(a * 6 == round(a * 6) for a in accs)  # k/6 correct
    assert "| sst2 |" in proc.stdout
    bad = subprocess.run([sys.executable, script, *common, "--tasks", "sst3", "--longmem", str(longmem_ckpt)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown ICL task 'sst3'" in bad.stderr
    (tmp_path / "flat").mkdir()
    bad = subprocess.run([sys.executable, script, *common[2:], "--data-dir", str(tmp_path / "flat"), "--tasks", "mr",
                          "--modes", "memory-off", "--longmem", str(longmem_ckpt)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "not in the released layout for mr" in bad.stderr


def test_released_scoring_and_label_restricted_scoring():
    spec = icl.TASKS["sst2"]
    vocab = {0: " pos", 1: " negative", 2: " ", 3: " x"}
    lp = torch.log_softmax(torch.tensor([[5.0, 1, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 1, 0, 5.0]]), -1)
    golds = [1, 0, 1, 0]
    # released: " pos" is a prefix of "positive" (right), " negative" (right), " " is empty (wrong here),
    # " x" (wrong)
    assert icl.score(lp, golds, spec, vocab.__getitem__, [1, 0], "vocab") == 0.5
    # labels: first tokens are 1 (negative) and 0 (positive): compare only those two
    assert icl.score(lp, golds, spec, vocab.__getitem__, [1, 0], "labels") == 0.75
