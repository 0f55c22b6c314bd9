"""The stock fairseq CLI with --user-dir longmem: preprocess, train, save, resume, eval-lm, sampling."""
import json
import math
import os
import re
import shutil

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts processes (fairseq-train, the scripts)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "newgpt-tiny", "--embed-dim", "64", "--num-layers", "2", "--num-attention-heads", "4",
        "--ffn-embed-dim", "128", "--retrieval-layer-index", "1", "--dropout", "0.0",
        "--attention-dropout", "0.0"]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory, synthetic_text, binarize):
    root = tmp_path_factory.mktemp("cli")
    (root / "train.txt").write_text(synthetic_text(600, 1))
    (root / "valid.txt").write_text(synthetic_text(60, 2))
    binarize(root / "bin", train=root / "train.txt", valid=root / "valid.txt")
    return root


def train_args(root, max_update):
    return [root / "bin", "--user-dir", "longmem", "--task", "language_modeling", *TINY,
            "--tokens-per-sample", "32", "--sample-break-mode", "none", "--batch-size", "8",
            "--optimizer", "adam", "--lr", "3e-3", "--max-update", max_update, "--save-dir", root / "ckpt",
            "--log-format", "json", "--log-interval", "5", "--cpu", "--seed", "1", "--no-epoch-checkpoints",
            "--num-workers", "0"]


def train_losses(log):
    return [float(json.loads(m)["loss"]) for m in re.findall(r"\| (\{.*\"loss\".*\})", log)
            if "num_updates" in json.loads(m)]


@pytest.fixture(scope="module")
def trained(data_bin, run_cli):
    log = run_cli("-m", "fairseq_cli.train", *train_args(data_bin, 60), ok=True).output
    return data_bin, log


def test_fairseq_train_lowers_the_loss_and_saves(trained):
    root, log = trained
    losses = train_losses(log)
    assert len(losses) >= 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert (root / "ckpt" / "checkpoint_last.pt").is_file()


def test_checkpoint_loads_under_weights_only_rules(trained):
    root, _ = trained
    state = torch.load(root / "ckpt" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["_name"] == "newgpt-tiny"
    assert "decoder.model.transformer.h.1.attn.k_proj.weight" in state["model"]


def resumed_in(tmp_path, args, checkpoints):
    """``args`` with --save-dir a copy of ``checkpoints`` under ``tmp_path``: a resume that leaves the module's
    fixture as the other tests read it."""
    copy = tmp_path / "resumed"
    shutil.copytree(checkpoints, copy)
    args = [str(a) for a in args]
    args[args.index("--save-dir") + 1] = str(copy)
    return args, copy


def test_training_resumes_from_the_last_checkpoint(trained, run_cli, tmp_path):
    root, _ = trained
    args, ckpt = resumed_in(tmp_path, train_args(root, 80), root / "ckpt")
    log = run_cli("-m", "fairseq_cli.train", *args, ok=True).output
    assert re.search(r"(?i)loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 60 updates\)", log), log[-3000:]
    state = torch.load(ckpt / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 80


def test_eval_lm_perplexity_matches_our_own_computation(trained, run_cli):
    root, _ = trained
    log = run_cli("-m", "fairseq_cli.eval_lm", root / "bin", "--user-dir", "longmem", "--path",
                  root / "ckpt" / "checkpoint_last.pt", "--tokens-per-sample", "32", "--batch-size", "4",
                  "--gen-subset", "valid", "--cpu", "--num-workers", "0", ok=True).output
    reported = float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1))

    from fairseq import checkpoint_utils
    from fairseq.data import data_utils
    import longmem  # noqa: F401

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(root / "ckpt" / "checkpoint_last.pt")])
    model = models[0].eval()
    tokens = data_utils.load_indexed_dataset(str(root / "bin" / "valid"), task.source_dictionary)
    stream = torch.cat([t for t in tokens])  # every line ends with </s>
    eos = task.source_dictionary.eos()
    nll, count = 0.0, 0
    with torch.no_grad():
        # eval-lm without a context window: blocks of 32 targets; a block's input is the 32 tokens
        # before each target (</s> stands before the very first token)
        for start in range(0, len(stream), 32):
            tgt = stream[start: start + 32]
            src = torch.cat([torch.tensor([eos]), stream[: len(tgt) - 1]]) if start == 0 \
                else stream[start - 1: start - 1 + len(tgt)]
            lp = torch.log_softmax(model(src[None])[0][0].double(), -1)
            nll -= lp.gather(-1, tgt[:, None]).sum().item()
            count += len(tgt)
    ours = nll / count / math.log(2)
    assert abs(ours - reported) < 2e-4, (ours, reported)


def test_greedy_generation_through_the_hub_interface_matches_full_forward_argmax(trained):
    root, _ = trained
    from longmem.models.newgpt import NewGPTLanguageModel

    hub = NewGPTLanguageModel.from_pretrained(str(root / "ckpt"), "checkpoint_last.pt", str(root / "bin"))
    hub.eval()
    prompt = "w0 w3 w6"
    out = hub.sample(prompt, beam=1, sampling=False, max_len_b=9, min_len=9)  # 9 tokens in all
    tokens = hub.binarize(prompt)[:-1]  # no trailing </s> for a prompt
    model = hub.models[0]
    seq = torch.cat([torch.tensor([hub.task.source_dictionary.eos()]), tokens])
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq[None])[0][0, -1].argmax().view(1)])
    expected = hub.string(seq[1:])
    assert out == expected, (out, expected)


def test_the_demos_sample_is_the_same_on_every_run_and_leaves_torchs_generator_alone(trained):
    root, _ = trained
    from longmem.demo import seeded_sample
    from longmem.models.newgpt import NewGPTLanguageModel

    hub = NewGPTLanguageModel.from_pretrained(str(root / "ckpt"), "checkpoint_last.pt", str(root / "bin"))
    hub.eval()
    kw = {"temperature": 2.0, "min_len": 12, "max_len_b": 12}  # a flat distribution: unseeded draws differ
    state = torch.get_rng_state()
    first = seeded_sample(hub, "w0 w3 w6", **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # whatever ran before does not matter
    assert seeded_sample(hub, "w0 w3 w6", **kw) == first
    assert len(first.split()) == 12  # max_len_b counts the prompt too, as in the greedy test above
    others = {seeded_sample(hub, "w0 w3 w6", seed=s, **kw) for s in range(2, 6)}
    assert others - {first}, "other seeds should draw other text"


def test_cli_rejects_a_head_count_that_does_not_divide_the_width(data_bin, run_cli):
    args = [str(a) for a in train_args(data_bin, 1)]
    args[args.index("--num-attention-heads") + 1] = "5"
    proc = run_cli("-m", "fairseq_cli.train", *args, timeout=300)
    assert proc.returncode != 0
    assert "embed_dim=64 is not divisible by num_attention_heads=5" in proc.stderr


# ---------------------------------------------------------------- LongMem (SideNet) through fairseq-train
def sidenet_args(root, backbone, max_update):
    return [root / "bin", "--user-dir", "longmem", "--task", "language_modeling",
            "--arch", "transformer_lm_sidenet_tiny", "--pretrained-model-path", backbone,
            "--decoder-layers", "1", "--decoder-embed-dim", "64", "--decoder-attention-heads", "4",
            "--decoder-ffn-embed-dim", "128", "--retrieval-layer-index", "1", "--layer-reduction-factor", "2",
            "--reload-ptm-layer", "--use-external-memory", "--memory-size", "256", "--k", "8",
            "--chunk-size", "2", "--memory-backend", "torch", "--dropout", "0.0", "--attention-dropout", "0.0",
            "--tokens-per-sample", "32", "--sample-break-mode", "none", "--batch-size", "8",
            "--optimizer", "adam", "--lr", "1e-2", "--max-update", max_update, "--save-dir", root / "longmem_ckpt",
            "--log-format", "json", "--log-interval", "5", "--cpu", "--seed", "1", "--no-epoch-checkpoints",
            "--num-workers", "0"]


@pytest.fixture(scope="module")
def sidenet_trained(data_bin, run_cli):
    """A barely trained backbone (3 updates), so that the SideNet has something to learn."""
    root = data_bin
    args = [str(a) for a in train_args(root, 3)]
    args[args.index("--save-dir") + 1] = str(root / "weak_backbone")
    run_cli("-m", "fairseq_cli.train", *args, ok=True).output
    backbone = root / "weak_backbone" / "checkpoint_last.pt"
    log = run_cli("-m", "fairseq_cli.train", *sidenet_args(root, backbone, 40), ok=True).output
    return root, backbone, log


def test_fairseq_train_longmem_with_memory_lowers_the_loss_and_saves(sidenet_trained):
    root, _, log = sidenet_trained
    losses = train_losses(log)
    assert len(losses) >= 4 and losses[-1] < 0.9 * losses[0], losses
    state = torch.load(root / "longmem_ckpt" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["_name"] == "transformer_lm_sidenet_tiny"
    assert "decoder.layers.0.self_attn.memory_bias" in state["model"]
    assert "decoder.pretrained_model.decoder.model.lm_head.bias" in state["model"]
    assert "num. trained: " in log


def streamed_argmax_continues(model, seq, start, window, memory=True):
    """Does every token of ``seq`` (1-D, </s> first) from ``start`` on equal the argmax, over all but <pad> and
    </s>, of the full forward's logits before it, the sequence read in windows with memory on or off (the
    streaming evaluation)?"""
    d = model.decoder.dictionary
    with torch.no_grad(), model.memory.configured(slot="eval", enabled=memory):
        model.memory.reset()
        logits = torch.cat([model(seq[None, s: s + window])[0][0] for s in range(0, len(seq), window)])
    logits[:, [d.pad(), d.eos()]] = -float("inf")
    return torch.equal(logits[start - 1: len(seq) - 1].argmax(-1), seq[start:])


def test_hub_interface_generates_greedily_with_a_prompt_longer_than_the_window(sidenet_trained):
    from fairseq import hub_utils

    root, _, _ = sidenet_trained
    loaded = hub_utils.from_pretrained(str(root / "longmem_ckpt"), "checkpoint_last.pt", str(root / "bin"),
                                       user_dir=os.path.join(REPO, "longmem"))
    hub = hub_utils.GeneratorHubInterface(loaded["args"], loaded["task"], loaded["models"]).eval()
    model = hub.models[0]
    assert model.decoder.window == 32 and model.memory.enabled
    prompt = " ".join(f"w{(7 * i) % 40}" for i in range(45))  # 45 tokens: the window (32) slides into memory
    tokens = hub.binarize(prompt)[:-1]
    out = hub.generate([tokens], beam=1, sampling=False, max_len_b=60, min_len=60)[0][0]["tokens"]
    seq = torch.cat([torch.tensor([hub.task.source_dictionary.eos()]), out[:-1]])  # </s> first, 60 tokens
    assert len(seq) == 61 and torch.equal(seq[1:46], tokens)
    assert streamed_argmax_continues(model, seq, 46, 32)
    sampled = hub.sample(prompt, sampling=True, sampling_topp=0.9, temperature=0.8, max_len_b=50)
    assert sampled.startswith(prompt) and len(sampled.split()) > 45


def test_longmem_generate_streams_a_long_prompt_and_refuses_bad_input(sidenet_trained, tmp_path, run_cli):
    root, _, _ = sidenet_trained
    ckpt = root / "longmem_ckpt" / "checkpoint_last.pt"
    prompt = " ".join(f"w{(3 * i) % 40}" for i in range(70))
    out = tmp_path / "gen.json"
    result = run_cli("-m", "longmem.commands.generate", ckpt, "--whitespace", "--prompt", prompt,
                     "--max-new-tokens", "12", "--ignore-eos", "--json", out, ok=True)
    record = json.loads(out.read_text())
    assert record["window"] == 32 and record["memory"] == "on" and len(record["continuation_ids"]) == 12
    assert result.stdout.strip() == record["continuation"]
    from fairseq import checkpoint_utils

    model = checkpoint_utils.load_model_ensemble([str(ckpt)])[0][0].eval()
    seq = torch.tensor([2] + record["prompt_ids"] + record["continuation_ids"])
    assert streamed_argmax_continues(model, seq, 71, 32)
    run_cli("-m", "longmem.commands.generate", ckpt, "--whitespace", "--prompt", prompt, "--max-new-tokens",
            "12", "--ignore-eos", "--memory", "off", "--json", out, ok=True)
    off = json.loads(out.read_text())
    assert off["memory"] == "off"
    seq = torch.tensor([2] + off["prompt_ids"] + off["continuation_ids"])
    assert streamed_argmax_continues(model, seq, 71, 32, memory=False)
    bad = {("--prompt", " "): "the prompt is empty",
           ("--prompt", "w1", "--max-new-tokens", "0"): "--max-new-tokens: must be a positive integer",
           ("--prompt", "w1", "--sampling", "--topp", "1.5"): "--topp: must be in (0, 1]",
           ("--prompt", "w1", "--sampling", "--temperature", "0"): "--temperature: must be a finite number > 0",
           ("--prompt", "w1 w2 w3"): "the tokenizer does not match it"}  # GPT-2 BPE against a word dictionary
    for flags, message in bad.items():
        code, _, err = run_cli("-m", "longmem.commands.generate", ckpt, *flags)
        last = err.strip().splitlines()[-1]
        assert code == 2 and message in last and last.startswith("longmem-generate: error:"), (flags, err)
        assert "Traceback" not in err and "Loading" not in err, err  # refused before any model is loaded
    code, _, err = run_cli("-m", "longmem.commands.generate", root / "bin" / "dict.txt", "--prompt", "w1")
    assert code == 2 and "is not a readable fairseq checkpoint" in err and "Traceback" not in err


def test_fairseq_train_with_the_distillation_criterion_and_a_sidenet_that_starts_as_its_backbone(sidenet_trained,
                                                                                                   tmp_path, run_cli):
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 6)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    args[args.index("--log-interval") + 1] = "1"
    log = run_cli("-m", "fairseq_cli.train", *args, "--criterion", "longmem_cross_entropy", "--distill-weight", "0.5",
                  "--start-as-backbone", ok=True).output
    records = [json.loads(m) for m in re.findall(r"\| (\{.*\"loss\".*\})", log)]
    steps = [r for r in records if "num_updates" in r and "kl" in r]
    assert len(steps) == 6, log[-2000:]
    assert float(steps[0]["kl"]) < 1e-4 < float(steps[-1]["kl"])  # the backbone itself at first, then it adapts
    for r in steps:  # loss_total = cross-entropy + 0.5 KL, per token, in bits
        assert abs(float(r["loss_total"]) - float(r["loss"]) - 0.5 * float(r["kl"])) < 2e-3, r
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["start_as_backbone"] and "decoder.output_gate" in state["model"]


def test_distill_on_marked_reads_the_splits_marks_and_refuses_training_without_them(sidenet_trained, tmp_path,
                                                                                    run_cli):
    """The streaming task reads DATA/train.marks (one 0/1 per document): with every document marked, the term is
    --distill-on all's, step by step; without the file, training is refused with the file's name."""
    root, backbone, _ = sidenet_trained
    data = tmp_path / "bin"
    shutil.copytree(root / "bin", data)
    args = [str(a) for a in sidenet_args(root, backbone, 3)]
    args[0] = str(data)
    args[args.index("language_modeling")] = "longmem_language_modeling"
    args[args.index("--log-interval") + 1] = "1"
    args += ["--criterion", "longmem_cross_entropy", "--distill-weight", "1", "--disable-validation"]

    def train(on, name):
        args[args.index("--save-dir") + 1] = str(tmp_path / name)
        return run_cli("-m", "fairseq_cli.train", *args, "--distill-on", on)

    refused = train("marked", "none")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "--distill-on marked needs the training split's .marks file" in refused.stderr.strip().splitlines()[-1]
    documents = int(re.search(r"train: \d+ tokens, (\d+) documents as one stream", refused.output).group(1))
    (data / "train.marks").write_text("1\n" * documents)
    kls = []
    for on in ("marked", "all"):
        log = train(on, on).output
        kls.append([float(r["kl"]) for r in map(json.loads, re.findall(r"\| (\{.*\"kl\".*\})", log))
                    if "num_updates" in r])
        assert len(kls[-1]) == 3, log[-2000:]
    assert f"{documents} of them marked" in log
    assert kls[0] == kls[1] and kls[0][-1] > 0


@pytest.mark.parametrize("mix", ["token", "memory"])
def test_the_mixtures_gate_trains_alone_from_a_trained_longmem_checkpoint(sidenet_trained, run_cli, tmp_path, mix):
    """The SmolLM2 recipe's stage mix at small scale: fairseq-train restores a LongMem checkpoint trained without the
    mixture (its gate keys absent: they start at their initial values), trains the gate alone (token: b and w;
    memory: b, its rule fixed), and saves a checkpoint whose every other weight is the restored one's."""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 4)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "mix")
    restored = root / "longmem_ckpt" / "checkpoint_last.pt"
    rule = ["--mix-memory-slope", "1.5", "--mix-memory-center", "0.5"] if mix == "memory" else []
    log = run_cli("-m", "fairseq_cli.train", *args, "--restore-file", restored, "--reset-optimizer",
                  "--reset-lr-scheduler", "--reset-meters", "--mix-with-backbone", mix, "--train-mix-gate-only",
                  "--mix-gate-init", "0.5", *rule, ok=True).output
    # token: b and w, 64 features + 2 entropies + 2 top log-probs; memory: b alone
    assert re.search(r"num\. trained: %d\b" % (69 if mix == "token" else 1), log), log[-3000:]
    before = torch.load(restored, weights_only=True)["model"]
    after = torch.load(tmp_path / "mix" / "checkpoint_last.pt", weights_only=True)
    model_cfg = after["cfg"]["model"]
    assert model_cfg["mix_with_backbone"] == mix
    weights = after["model"]
    gate = ["decoder.mix_bias"] + (["decoder.mix_gate.weight"] if mix == "token" else [])
    assert sorted(set(weights) - set(before)) == gate
    assert all(torch.equal(weights[k], v) for k, v in before.items())
    assert float(weights["decoder.mix_bias"]) != 0.5
    if mix == "token":
        assert float(weights["decoder.mix_gate.weight"].abs().sum()) > 0
    else:
        assert (model_cfg["mix_memory_slope"], model_cfg["mix_memory_center"]) == (1.5, 0.5)


def test_fairseq_train_longmem_resumes(sidenet_trained, run_cli, tmp_path):
    root, backbone, _ = sidenet_trained
    args, _ = resumed_in(tmp_path, sidenet_args(root, backbone, 50), root / "longmem_ckpt")
    log = run_cli("-m", "fairseq_cli.train", *args, ok=True).output
    assert re.search(r"(?i)loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 40 updates\)", log), log[-3000:]


def test_fairseq_train_with_the_streaming_task_and_document_resets(sidenet_trained, run_cli):
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 12)]
    args[args.index("language_modeling")] = "longmem_language_modeling"
    args[args.index("--save-dir") + 1] = str(root / "stream_ckpt")
    log = run_cli("-m", "fairseq_cli.train", *args, "--memory-reset-at-document-boundary",
                  "--validate-interval-updates", "6", ok=True).output
    assert "train: " in log and "tokens" in log and "as one stream" in log
    assert len(train_losses(log)) >= 2
    assert re.search(r'"valid_loss": "[\d.]+"', log), log[-2000:]
    log = run_cli("-m", "fairseq_cli.train", *args[:args.index("--save-dir") + 1], str(root / "release_ckpt"),
                  *args[args.index("--save-dir") + 2:], "--data-no-shuffle", "--memory-mode", "release",
                  "--disable-validation", "--memory-size", "1024",
                  ok=True).output  # the release's eviction needs 3 adds of 8 x 32
    assert len(train_losses(log)) >= 2


def test_release_memory_with_a_token_budget_is_checked_before_any_update(sidenet_trained, tmp_path, run_cli):
    """--memory-mode release with --max-tokens (no --batch-size): 256 tokens = 8 rows of 32 per add, and a
    256-token memory cannot evict 2 adds' chunks; refused in one line before training, no crash.pt."""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 4)]
    at = args.index("--batch-size")
    args[at:at + 2] = ["--max-tokens", "256"]
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    proc = run_cli("-m", "fairseq_cli.train", *args, "--memory-mode", "release", "--disable-validation", timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "the release's memory eviction drops 256 chunks" in last and "adds of 256 tokens" in last, last
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == [], "no checkpoint and no crash.pt"


@pytest.mark.parametrize("preset", ["longmem_paper.sh", "longmem_tiny.sh"])
def test_train_longmem_script_flags_are_accepted_by_fairseq_train(preset, repo_data, tmp_path, run_cli):
    """The script's command, parsed by fairseq-train's own parser (no training)."""
    from fairseq import options

    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"")
    data = os.path.join(repo_data, "gpt2_bpe")
    out = run_cli(os.path.join(REPO, "train_scripts", "train_longmem.sh"), data, backbone, tmp_path / "save",
                  program="bash", env={"DRY_RUN": "1", "PRESET": os.path.join(REPO, "configs", preset)}, ok=True)
    cmd = out.stdout.split("\0")[:-1]
    assert cmd[1:3] == ["-m", "fairseq_cli.train"]
    args = options.parse_args_and_arch(options.get_training_parser(), cmd[3:])
    expected = {"longmem_paper.sh": ("transformer_lm_sidenet_gpt2_small", 65536, 64, 4, 17, 1024, 2e-4),
                "longmem_tiny.sh": ("transformer_lm_sidenet_tiny", 8192, 32, 4, 3, 256, 2e-3)}[preset]
    assert (args.arch, args.memory_size, args.k, args.chunk_size, args.retrieval_layer_index,
            args.tokens_per_sample, args.lr[0]) == expected
    assert args.task == "longmem_language_modeling" and args.use_external_memory and args.reload_ptm_layer
    assert args.layer_reduction_factor == 2 and args.adam_betas == "(0.9, 0.98)" and args.weight_decay == 0.01
    if preset == "longmem_paper.sh":
        assert args.fp16 and args.use_gpu_to_search and args.batch_size == 8 and args.max_update == 100000
        assert args.data_no_shuffle and args.memory_mode == "release" and args.disable_validation and args.seed == 42
    else:  # the memory layer int(3 / 2) = 1 starts from backbone layer 2*1 + 1 = 3, whose keys fill memory
        assert args.memory_reset_at_document_boundary and args.max_update == 300
        assert args.memory_mode == "stream" and not args.data_no_shuffle


def test_paper_preset_trains_in_the_releases_batch_order(sidenet_trained, tmp_path, run_cli):
    """The paper preset's command (fp16 and GPU search included), tiny sizes swapped in, on this CPU:
    it trains, and its batches are the release's (docs/design.md §5.1), computed here from the data."""
    import math as _math

    from fairseq.data import Dictionary, data_utils

    root, backbone, _ = sidenet_trained
    out = run_cli(os.path.join(REPO, "train_scripts", "train_longmem.sh"), root / "bin", backbone, tmp_path / "save",
                  program="bash", env={"DRY_RUN": "1", "PRESET": os.path.join(REPO, "configs", "longmem_paper.sh")},
                  ok=True)
    cmd = out.stdout.split("\0")[:-1]
    swap = {"--arch": "transformer_lm_sidenet_tiny", "--memory-size": "1024", "--k": "8", "--chunk-size": "2",
            "--retrieval-layer-index": "1", "--tokens-per-sample": "32", "--max-update": "3",
            "--total-num-update": "3"}
    for flag, value in swap.items():
        cmd[cmd.index(flag) + 1] = value
    cmd += ["--decoder-layers", "1", "--decoder-embed-dim", "64", "--decoder-attention-heads", "4",
            "--decoder-ffn-embed-dim", "128", "--cpu", "--log-format", "json", "--log-interval", "1"]
    log = run_cli(*cmd[1:], ok=True).output  # cmd[0]: the python the script found
    assert "--fp16 needs a CUDA GPU" in log and "--use-gpu-to-search: no CUDA GPU here" in log
    assert len(train_losses(log)) == 3
    d = Dictionary.load(str(root / "bin" / "dict.txt"))
    n_tokens = sum(len(t) for t in data_utils.load_indexed_dataset(str(root / "bin" / "train"), d))
    blocks = _math.ceil(n_tokens / 32)
    passage = _math.ceil((blocks - 1) / 8)  # 1 rank x 8 rows; the last block left out
    first = re.search(r"release order, rank 0: batch 0 = samples (\[[\d, ]+\]), batch 1 = samples (\[[\d, ]+\])", log)
    assert first, log[-2000:]
    assert json.loads(first.group(1)) == [row * passage for row in range(8)]
    assert json.loads(first.group(2)) == [row * passage + 1 for row in range(8)]


def test_eval_longmem_lm_script_on_a_multi_document_corpus(sidenet_trained, tmp_path, synthetic_text, run_cli,
                                                            binarize):
    root, backbone, _ = sidenet_trained
    docs = [synthetic_text(n, seed).strip() for n, seed in ((30, 5), (12, 6), (50, 7))]
    (tmp_path / "multi.txt").write_text("\n\n".join(docs) + "\n")
    binarize(tmp_path / "multi_bin", srcdict=root / "bin" / "dict.txt", test=tmp_path / "multi.txt")
    out = tmp_path / "eval.json"
    proc = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py"), str(tmp_path / "multi_bin"), "--backbone",
                   str(backbone), "--longmem", str(root / "longmem_ckpt" / "checkpoint_last.pt"), "--tokens-per-sample",
                   "32", "--results-path", str(out), "--plot", str(tmp_path / "eval.png"), "--cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["documents"] == 3
    n_tokens = sum(len(d.split()) for d in docs) + sum(d.count("\n") + 1 for d in docs) + 2  # + </s>s, separators
    for name in ("backbone alone", "LongMem, memory off", "LongMem, memory on"):
        r = results["models"][name]
        assert r["tokens"] == n_tokens and math.isfinite(r["ppl"])
        assert sum(r["tokens_by_length"].values()) == n_tokens
    assert (tmp_path / "eval.png").stat().st_size > 1000
    # a checkpoint whose dictionary does not match the data
    (tmp_path / "other.txt").write_text("alpha beta gamma\n")
    binarize(tmp_path / "other_bin", train=tmp_path / "other.txt", test=tmp_path / "other.txt")
    proc = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py"), str(tmp_path / "other_bin"), "--backbone",
                   str(backbone), "--cpu", timeout=300)
    assert proc.returncode != 0 and "predicts" in proc.stderr and "dict.txt has" in proc.stderr


# ---------------------------------------------------------------- two processes (gloo), per-rank memory
def launch_two_ranks(run_cli, root, backbone, save, probe, *extra):
    probe.mkdir(exist_ok=True)
    proc = run_cli(
        os.path.join(REPO, "train_scripts", "train_longmem.sh"), root / "small_bin", backbone, save, "--user-dir",
        os.path.join(REPO, "tests", "ddp_probe"), "--task", "longmem_probe",
        "--arch", "transformer_lm_sidenet_tiny", "--decoder-layers", "1", "--decoder-embed-dim", "64",
        "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "128", "--retrieval-layer-index", "1",
        "--memory-size", "1024", "--k", "8", "--chunk-size", "2", "--tokens-per-sample", "32", "--batch-size", "2",
        "--required-batch-size-multiple", "1", "--disable-validation", "--log-format", "json", "--log-interval", "1",
        *extra, program="bash", timeout=300, ok=True,
        env={"NPROC": "2", "PRESET": os.path.join(REPO, "configs", "longmem_tiny.sh"),
             "EXTRA_FLAGS": "--cpu --memory-backend torch", "LONGMEM_PROBE_DIR": str(probe)})
    records = {r: [json.loads(line) for line in open(probe / f"rank{r}.jsonl")] for r in (0, 1)}
    return proc.stdout + proc.stderr, records


def rank_memory_keys(probe, rank):
    from longmem.modules.memory_bank import ChunkedMemoryBank

    bank = ChunkedMemoryBank.load(str(probe / f"memory_rank{rank}.pt"), backend="torch")
    return bank, [bank.held(s)[0].permute(1, 2, 0, 3).reshape(-1, bank.num_heads * bank.head_dim)
                  for s in range(bank.num_banks)]  # per stream: (tokens, H*d), oldest first


def test_two_processes_train_together_each_with_its_own_rows_and_memory(sidenet_trained, tmp_path, synthetic_text, run_cli,
                                                                         binarize):
    """2 ranks x 2 rows, 32-token segments, gloo. The split's tokens are cut here, by hand, into the rows
    each rank should read; the ranks' records, memories and weights are checked against that."""
    from fairseq.data import Dictionary, data_utils

    from longmem.models.newgpt import NewGPTLanguageModel

    root, backbone_path, _ = sidenet_trained
    (tmp_path / "small.txt").write_text(synthetic_text(90, 11))
    binarize(tmp_path / "small_bin", srcdict=root / "bin" / "dict.txt", train=tmp_path / "small.txt")
    d = Dictionary.load(str(tmp_path / "small_bin" / "dict.txt"))
    stream = torch.cat(list(data_utils.load_indexed_dataset(str(tmp_path / "small_bin" / "train"), d)))
    T, rows = 32, 4
    per_row = -(-len(stream) // rows)
    tgt = torch.cat([stream, torch.full((rows * per_row - len(stream),), d.pad())]).view(rows, per_row)
    src = torch.cat([torch.tensor([d.eos()]), stream[:-1]])
    src = torch.cat([src, torch.full((rows * per_row - len(src),), d.pad())]).view(rows, per_row)
    batches = -(-per_row // T)
    assert batches >= 8
    state = torch.load(backbone_path, weights_only=True)
    backbone = NewGPTLanguageModel.from_checkpoint_state(state, str(backbone_path), d, 1).eval()

    def backbone_keys(tokens):  # (n,) -> (n', C): layer 1's keys of a segment, whole chunks of 2 only
        with torch.no_grad():
            return backbone(tokens[None], return_retrieval_kv=True)[1]["retrieval_kv"][0][0][: len(tokens) // 2 * 2]

    # 1. per-row streams: stop after 4 updates, then resume to the end of the epoch
    probe = tmp_path / "probe"
    save = tmp_path / "ckpt"
    launch_two_ranks(run_cli, tmp_path, backbone_path, save, probe, "--max-update", "4")
    log, records = launch_two_ranks(run_cli, tmp_path, backbone_path, save, probe, "--max-epoch", "1", "--max-update", "1000")
    assert re.search(r"resuming epoch 1 at batch 4 of \d+: every row of every rank continues", log), log[-3000:]
    for r in (0, 1):
        assert [rec["update"] for rec in records[r]] == list(range(batches))  # 4 updates, then 4 .. end
        for b in range(2):  # rank r reads rows 2r and 2r+1, in order, each token once
            read = torch.cat([torch.tensor(rec["target"][b]) for rec in records[r]])
            assert torch.equal(read[:per_row], tgt[2 * r + b])
        # its memory: exactly its own rows' segments read since the resume (memory is not saved)
        _, held = rank_memory_keys(probe, r)
        for b in range(2):
            want = torch.cat([backbone_keys(src[2 * r + b, i * T: (i + 1) * T]) for i in range(4, batches)])
            torch.testing.assert_close(held[b], want, rtol=1e-4, atol=1e-5)
    trained = [torch.load(probe / f"sidenet_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert trained[0] and all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    final = torch.load(save / "checkpoint_last.pt", weights_only=True)["model"]
    prefix = "decoder.pretrained_model."
    for key, value in state["model"].items():
        assert torch.equal(final[prefix + key], value), key

    # 2. the release's order and memory: the blocks the release's rule assigns, once, one bank per rank
    probe2 = tmp_path / "probe_release"
    _, records = launch_two_ranks(run_cli, tmp_path, backbone_path, tmp_path / "ckpt_release", probe2, "--max-epoch", "1",
                                  "--max-update", "1000", "--data-no-shuffle", "--memory-mode", "release")
    blocks = -(-len(stream) // T)
    total = blocks - 1
    passage = -(-total // 4)
    passages = [list(range(p * passage, min((p + 1) * passage, total))) for p in range(4)]
    common = min(len(p) for p in passages)
    for r in (0, 1):
        want_ids = [[passages[2 * r][i], passages[2 * r + 1][i]] for i in range(common)]
        assert [rec["ids"] for rec in records[r]] == want_ids
        bank, held = rank_memory_keys(probe2, r)
        assert bank.shared and bank.eviction == "release"
        block_src = torch.cat([src.view(-1)[: len(stream)], torch.full((blocks * T - len(stream),), d.pad())])
        want = torch.cat([backbone_keys(block_src[i * T: (i + 1) * T]) for ids in want_ids for i in ids])
        torch.testing.assert_close(held[0], want, rtol=1e-4, atol=1e-5)  # batch-major, row 0 first
    ids = [i for r in (0, 1) for rec in records[r] for i in rec["ids"]]
    assert len(ids) == len(set(ids)) == 4 * common
    trained = [torch.load(probe2 / f"sidenet_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


# the release's train_scripts/train_longmem.sh, its fairseq-train command as written there
RELEASE_TRAIN_COMMAND = """fairseq-train ${DATA_DIR}  \\
    --save-dir ${CKPT_DIR} \\
    --task language_modeling --arch transformer_lm_sidenet_gpt2_small \\
    --share-decoder-input-output-embed \\
    --optimizer adam --adam-betas '(0.9, 0.98)' --adam-eps 1e-6 \\
    --lr 2e-4 --lr-scheduler polynomial_decay \\
    --weight-decay 0.01 \\
    --save-interval-updates 10000 --sample-break-mode none \\
    --tokens-per-sample 1024 \\
    --batch-size 8 --total-num-update 100000 --seed 42 \\
    --pretrained-model-path /path/to/gpt2_pretrained_model \\
    --layer-reduction-factor 2 \\
    --disable-validation \\
    --use-external-memory --memory-size 65536 \\
    --k 64 --chunk-size 4 \\
    --fp16 \\
    --use-gpu-to-search \\
    --no-token-positional-embeddings \\
    --data-no-shuffle \\
    --retrieval-layer-index 17 \\
    --reload-ptm-layer"""


def test_the_releases_training_command_runs_as_written(sidenet_trained, tmp_path, run_cli):
    """Every flag of the release's command, with --user-dir longmem and --cpu added, tiny sizes swapped in
    (the released arch's sizes overridden by flags, so its defaults, the release's memory among them,
    stay), 2 updates."""
    import shlex

    root, backbone, _ = sidenet_trained
    text = RELEASE_TRAIN_COMMAND.replace("${DATA_DIR}", str(root / "bin")).replace("${CKPT_DIR}", str(tmp_path / "ck"))
    text = text.replace("/path/to/gpt2_pretrained_model", str(backbone))
    args = shlex.split(text.replace("\\\n", " "))[1:]
    for flag, value in {"--tokens-per-sample": "32", "--memory-size": "1024", "--retrieval-layer-index": "1"}.items():
        args[args.index(flag) + 1] = value
    args += ["--user-dir", "longmem", "--cpu", "--max-update", "2", "--decoder-layers", "1", "--decoder-embed-dim",
             "64", "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "128", "--log-format", "json",
             "--log-interval", "1", "--num-workers", "0"]
    log = run_cli("-m", "fairseq_cli.train", *args, ok=True).output
    assert len(train_losses(log)) == 2
    assert "--fp16 needs a CUDA GPU" in log and "--use-gpu-to-search: no CUDA GPU here" in log
    assert "release order, rank 0: batch 0 = samples" in log
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    cfg = state["cfg"]["model"]
    assert cfg["memory_mode"] == "release" and cfg["share_decoder_input_output_embed"]
    assert cfg["no_token_positional_embeddings"] and state["cfg"]["task"]["data_no_shuffle"]
    assert "decoder.version" in state["model"] and not any("embed_positions" in k for k in state["model"])


def test_fairseq_train_with_precision_bf16_keeps_the_checkpoint_fp32(sidenet_trained, tmp_path, run_cli):
    """``--precision bf16`` through fairseq-train: the log says what it chose (bf16 where native, else fp32);
    the saved backbone is the backbone file's fp32 weights, bit for bit; the checkpoint loads in fp32."""
    from fairseq import checkpoint_utils

    from longmem import precision

    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 10)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "bf16")
    log = run_cli("-m", "fairseq_cli.train", *args, "--precision", "bf16", ok=True).output
    native = precision.native_bf16()
    assert ("bf16 on this CPU (native)" if native else "running in fp32") in log
    losses = train_losses(log)
    assert len(losses) == 2 and losses[-1] < losses[0]
    state = torch.load(tmp_path / "bf16" / "checkpoint_last.pt", weights_only=True)
    source = torch.load(backbone, weights_only=True)["model"]
    for name, p in source.items():
        saved = state["model"][f"decoder.pretrained_model.{name}"]
        assert saved.dtype == torch.float32 and torch.equal(saved, p), name
    models, _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "bf16" / "checkpoint_last.pt")],
                                                     arg_overrides={"precision": "fp32"})
    assert models[0].decoder.autocast_dtype is None


def test_a_bf16_run_resumes_in_fp32_and_scores_alike_in_both_and_bf16_trains_over_faiss(sidenet_trained, tmp_path,
                                                                                         run_cli):
    """Trained 10 updates with --precision bf16, resumed to 14 with --precision fp32: it goes on from update 10 and
    the checkpoint stays fp32; longmem-eval-lm scores it within 2% in fp32 and in bf16. --precision bf16 with the
    faiss backend (which searches fp32 vectors) trains with a finite loss."""
    import math

    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 10)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "run")
    run_cli("-m", "fairseq_cli.train", *args, "--precision", "bf16", ok=True)
    args[args.index("--max-update") + 1] = "14"
    log = run_cli("-m", "fairseq_cli.train", *args, "--precision", "fp32", ok=True).output
    assert "num_updates\": 10" in log or "@ 10 updates" in log, log[-2000:]  # resumed, not restarted
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 14
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    ppl = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_lm.py"), root / "bin", "--gen-subset", "valid",
                "--longmem", tmp_path / "run" / "checkpoint_last.pt", "--tokens-per-sample", "32", "--precision",
                precision, "--results-path", out, "--cpu", ok=True)
        ppl[precision] = json.loads(out.read_text())["models"]["LongMem, memory on"]["ppl"]
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.02, ppl
    args[args.index("--memory-backend") + 1] = "faiss"
    args[args.index("--save-dir") + 1] = str(tmp_path / "faiss")
    args[args.index("--max-update") + 1] = "4"
    args[args.index("--log-interval") + 1] = "1"
    losses = train_losses(run_cli("-m", "fairseq_cli.train", *args, "--precision", "bf16", ok=True).output)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("gate_flags", [[], ["--memory-gate-lr-scale", "10", "--memory-gate-no-decay",
                                             "--memory-gate-init", "1.5"]])
def test_the_gate_options_reach_the_optimizer_through_fairseq_train(gate_flags, sidenet_trained, tmp_path, run_cli):
    """--memory-gate-{lr-scale,no-decay,init} through fairseq-train: the saved optimizer holds the gates in a
    group of their own (lr x 10, no weight decay), and Adam's first step on them (the second update: the
    first reads an empty memory, so the gates get no gradient) moves each by exactly its group's lr,
    lr * g / |g|; without the options one group, as the release, and a step of lr."""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 2)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    lr, decay = 1e-2, 0.1
    args[args.index("--lr") + 1] = str(lr)
    # --adam-eps 1e-16: Adam's first step is then lr * g / |g| to 1e-6 even for the tiny gradients of a gate
    run_cli("-m", "fairseq_cli.train", *args, "--weight-decay", str(decay), "--lr-scheduler", "fixed", "--adam-eps",
            "1e-16", *gate_flags, ok=True).output
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    groups = state["last_optimizer_state"]["param_groups"]
    gate = state["model"]["decoder.layers.0.self_attn.memory_bias"]
    scale, start = (10.0, 1.5) if gate_flags else (1.0, 0.0)
    if gate_flags:
        assert len(groups) == 2 and len(groups[1]["params"]) == 1, groups
        assert groups[0]["weight_decay"] == decay and groups[1]["weight_decay"] == 0.0
        assert groups[0]["lr"] == pytest.approx(lr) and groups[1]["lr"] == pytest.approx(scale * lr)
    else:
        assert len(groups) == 1 and groups[0]["weight_decay"] == decay
    # decoupled decay of a gate at 0 is 0; at 1.5 it is switched off: the step alone moves the gate
    assert torch.allclose((gate - start).abs(), torch.full_like(gate, scale * lr), rtol=1e-5), gate.tolist()


def test_gate_groups_are_refused_by_an_optimizer_that_flattened_them():
    """fairseq's --fp16/--bf16 optimizers copy every parameter into one flat fp32 group: a model whose gates
    ask for a group of their own gets a one-line error there, not the default silently."""
    from types import SimpleNamespace

    from longmem import optim_groups
    from longmem.errors import ConfigError

    model = torch.nn.Linear(2, 2)
    optim_groups.request(model.bias, lr_scale=10.0)
    flat = SimpleNamespace(param_groups=[{"params": [torch.nn.Parameter(torch.zeros(6))]}])
    with pytest.raises(ConfigError, match="fp16"):
        optim_groups.check_reached(model, flat)
    grouped = SimpleNamespace(param_groups=[{"params": [model.weight]}, {"params": [model.bias]}])
    optim_groups.check_reached(model, grouped)  # two groups: accepted


def test_a_resume_with_another_row_layout_is_refused_or_restarts_the_streams(sidenet_trained, tmp_path, run_cli):
    """Stopped mid-epoch with 8 rows, resumed with 4: "batch 3" of 4 rows is other tokens than 3 batches of 8 read;
    refused in one line naming the difference. With --reset-dataloader the streams restart at the epoch's start
    and training goes on."""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 3)]
    args[args.index("language_modeling")] = "longmem_language_modeling"
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    run_cli("-m", "fairseq_cli.train", *args, "--disable-validation", ok=True).output
    args[args.index("--batch-size") + 1] = "4"
    args[args.index("--max-update") + 1] = "5"
    args += ["--required-batch-size-multiple", "1", "--disable-validation"]
    proc = run_cli("-m", "fairseq_cli.train", *args, timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "another row layout (rows 8 -> 4)" in last and "--reset-dataloader" in last, last
    log = run_cli("-m", "fairseq_cli.train", *args, "--reset-dataloader", ok=True).output
    assert re.search(r"(?i)loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)", log), log[-3000:]
    assert re.search(r'"num_updates": "5"', log), log[-2000:]


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(sidenet_trained, tmp_path, run_cli):
    """checkpoint_last.pt cut in half (what a kill during fairseq's copy leaves) beside an intact
    checkpoint_1_4.pt: the resume says so in one line and continues from update 4; with no intact file beside
    it, a one-line error naming it."""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 4)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    run_cli("-m", "fairseq_cli.train", *args, "--save-interval-updates", "4", "--disable-validation", ok=True).output
    last, kept = tmp_path / "ckpt" / "checkpoint_last.pt", tmp_path / "ckpt" / "checkpoint_1_4.pt"
    assert kept.exists()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    args[args.index("--max-update") + 1] = "6"
    log = run_cli("-m", "fairseq_cli.train", *args, "--disable-validation", ok=True).output
    assert "checkpoint_last.pt is truncated" in log and "resuming from" in log and "checkpoint_1_4.pt" in log
    assert re.search(r"(?i)loaded checkpoint .*checkpoint_1_4\.pt \(epoch \d+ @ 4 updates\)", log), log[-3000:]
    last.write_bytes(last.read_bytes()[:1000])
    kept.unlink()
    args[args.index("--max-update") + 1] = "8"
    proc = run_cli("-m", "fairseq_cli.train", *args, "--disable-validation", timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint_last.pt is truncated and no intact checkpoint*.pt is beside it" in proc.stderr


def test_a_resume_with_other_model_flags_names_them_in_one_line(sidenet_trained, tmp_path, run_cli):
    """A checkpoint written with memory, resumed without --use-external-memory: fairseq's traceback became one
    line naming the setting. (A SideNet wider than the backbone it copies is refused before that.)"""
    root, backbone, _ = sidenet_trained
    args = [str(a) for a in sidenet_args(root, backbone, 2)]
    args[args.index("--save-dir") + 1] = str(tmp_path / "ckpt")
    run_cli("-m", "fairseq_cli.train", *args, "--disable-validation", ok=True).output
    wider = list(args)
    wider[wider.index("--decoder-ffn-embed-dim") + 1] = "256"
    proc = run_cli("-m", "fairseq_cli.train", *wider, "--disable-validation", timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--reload-ptm-layer: backbone block 1 does not fit SideNet layer 0" in proc.stderr.strip().splitlines()[-1]
    args.remove("--use-external-memory")
    args[args.index("--max-update") + 1] = "4"
    proc = run_cli("-m", "fairseq_cli.train", *args, "--disable-validation", timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "holds another model than this run builds" in last and "use_external_memory: True -> False" in last, last
