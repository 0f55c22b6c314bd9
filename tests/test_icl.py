"""ICL protocol: templates, sampling, memory blocks, read-only queries, the script end to end."""
import json
import math
import os

import pytest
import torch

from longmem.evaluation import icl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WordCodec:
    """A toy tokenizer written for the test: one id per space-separated word ("" -> 99: a trailing space)."""
    VOCAB = {"Review:": 10, "Sentiment:": 11, "positive.": 12, "negative.": 13, "a": 14, "fine": 15, "film": 16,
             ".": 17, "dull": 18, "so": 19, "good": 20, "": 99}

    def encode(self, text):
        return [self.VOCAB[w] for w in text.split(" ")]


def test_prompt_token_ids_written_by_hand():
    spec, codec, BOS, EOS = icl.TASKS["sst2"], WordCodec(), 0, 2
    context = icl.encode_demonstrations(spec, [("a fine film .", 1), ("dull .", 0)], codec.encode, BOS, EOS)
    prompt = icl.query_ids(spec, context, "so good .", codec.encode, BOS)
    # each demonstration alone as [<s>] + tokens + [</s>] (its trailing space a token of its own); the
    # query [<s>] + "Review: so good . Sentiment:" and no </s>
    assert prompt == [0, 10, 14, 15, 16, 17, 11, 12, 99, 2,
                      0, 10, 18, 17, 11, 13, 99, 2,
                      0, 10, 19, 20, 17, 11]
    assert icl.TASKS["subj"].query_template == "Input: {text} Type:"
    assert icl.demonstration(icl.TASKS["sst5"], "meh", 2) == "Review: meh Sentiment: okay. "


def test_released_files_are_read_as_the_release_reads_them(repo_data):
    sizes = {"sst2": 872, "mr": 2000, "subj": 2000, "sst5": 1101, "mpqa": 2000}
    for task, n in sizes.items():
        spec, train, evaluation = icl.load_task(os.path.join(repo_data, "icl"), task)
        assert len(evaluation) == n
        assert {label for _, label in train} == set(range(len(spec.labels)))
    _, _, sst2 = icl.load_task(os.path.join(repo_data, "icl"), "SST-2")
    assert sst2[0] == ("one long string of cliches .", 0)
    _, _, mr = icl.load_task(os.path.join(repo_data, "icl"), "mr")
    assert mr[0] == ('"simplistic , silly and tedious ."', 0)  # line[2:]: the CSV quotes stay
    _, _, subj = icl.load_task(os.path.join(repo_data, "icl"), "subj")
    assert subj[0] == ("smart and alert , thirteen conversations about one thing is a small gem .", 0)
    _, _, sst5 = icl.load_task(os.path.join(repo_data, "icl"), "sst-5")
    assert sst5[0][1] == 2 and sst5[0][0].startswith("in his first stab at the form")


def test_sampling_is_the_releases_two_draws_after_one_seed():
    import random

    train = [(f"t{i}", i % 2) for i in range(10)]
    random.seed(3)  # the release: global seed, context draw, then memory draw
    want_ctx, want_mem = random.sample(train, 5), random.sample(train, 8)
    ctx, mem = icl.sample_demonstrations(train, 5, 8, seed=3)
    assert (ctx, mem) == (want_ctx, want_mem)
    assert set(ctx) & set(mem)  # 5 + 8 of 10: the two draws overlap, as in the release


def test_memory_is_cut_into_whole_blocks():
    assert icl.memory_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert icl.memory_blocks(list(range(3)), 4) == []


def test_memory_holds_exactly_the_blocks_and_queries_leave_it_unchanged(make_sidenet, make_dictionary, same_state):
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
    assert model.memory.reads and same_state(before, model.memory.bank.state_dict())
    bank = model.memory.bank
    model.memory.configure(enabled=True, writes=False)
    lp = icl.predict(model, [[2, 5, 6, 7], [2, 9, 10]], pad=1, device=torch.device("cpu"), batch_size=2)
    assert lp.shape == (2, 44)
    assert same_state(before, bank.state_dict())


def test_memory_fit_holds_every_demonstration_where_one_chunk_less_evicts_the_oldest(make_sidenet, make_dictionary,
                                                                                    caplog):
    model, _ = make_sidenet(make_dictionary(40), use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    model.memory.configure(mode="release", slot="eval", writes=False, enabled=True)
    blocks = icl.memory_blocks(list(range(4, 44)) * 2 + [5], 16)  # 81 tokens: 5 whole blocks, 80 tokens
    assert len(blocks) == 5 and icl.memory_to_hold(blocks, 2) == 82  # 40 chunks, and one more
    cpu = torch.device("cpu")

    def held(floor=None):
        icl.size_memory(model, blocks, floor)
        model.memory.reset()
        icl.fill_memory(model, blocks, cpu)
        return model.memory.settings.memory_size, model.memory.bank.num_tokens(0)

    assert held(floor=64) == (82, 80)  # the checkpoint's 64 raised: all 80 held
    assert held(floor=200) == (200, 80)  # never lowered
    model.memory.configure(memory_size=80)
    with caplog.at_level("WARNING"):
        # by hand, the release's eviction at 40 chunks: adds of 8 chunks reach 32, the fifth would reach 40, so the
        # oldest 16 chunks go first: 16 + 8 = 24 chunks, the last 3 blocks
        assert held() == (80, 48)
    assert "holds only part of the 80 tokens" in caplog.text and "82 would hold them all" in caplog.text
    keys = model.memory.bank.held(0)[0]  # (H, chunks, chunk_size, d), oldest first
    stored = keys.permute(1, 2, 0, 3).reshape(-1, keys.shape[0] * keys.shape[-1])
    last = torch.cat([model.decoder.pretrained_model(torch.tensor([b]), return_retrieval_kv=True)[1]["retrieval_kv"][0]
                      for b in blocks[2:]], 1)[0]
    torch.testing.assert_close(stored[:48], last)


def test_memory_size_argument_is_a_number_checkpoint_or_fit():
    from longmem.commands import eval_icl

    assert eval_icl.parse_args([])[1].memory_size == "fit"
    assert [eval_icl.parse_args(["--memory-size", v])[1].memory_size for v in ("checkpoint", "4096")] == ["checkpoint",
                                                                                                          4096]
    for bad in ("0", "all"):
        with pytest.raises(SystemExit):
            eval_icl.parse_args(["--memory-size", bad])


@pytest.mark.parametrize("mode", ["backbone", "memory-off", "memory-on", "memory-on, mixed with the backbone"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_cached_context_gives_the_uncached_scores(make_sidenet, make_dictionary, mode, batch_size):
    d = make_dictionary(40)
    mix = {"mix_with_backbone": "token"} if "mixed" in mode else {}
    model, backbone = make_sidenet(d, use_external_memory=True, memory_size=64, k=4, chunk_size=2, **mix)
    for p in model.decoder.layers.parameters():  # a SideNet whose output depends on memory and context
        torch.nn.init.normal_(p, std=0.3)
    if mix:  # a gate that reads every input it has
        torch.nn.init.normal_(model.decoder.mix_gate.weight, std=0.3)
    model.eval()
    mode = mode.split(",")[0]
    model.memory.configure(mode="release", slot="eval", writes=False, enabled=mode == "memory-on")
    if mode == "memory-on":
        icl.fill_memory(model, icl.memory_blocks(torch.randint(4, 44, (60,)).tolist(), 16), torch.device("cpu"))
    net = backbone if mode == "backbone" else model
    context = torch.randint(4, 44, (30,)).tolist()
    prompts = [context + torch.randint(4, 44, (n,)).tolist() for n in (3, 7, 1, 5, 2)]
    cpu = torch.device("cpu")
    want = icl.predict(net, prompts, d.pad(), cpu, batch_size)
    got = icl.predict_cached(net, context, prompts, d.pad(), cpu, batch_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if mode == "memory-on":  # the memory was read: without it the scores differ
        with model.memory.configured(enabled=False):
            assert (icl.predict_cached(net, context, prompts, d.pad(), cpu, batch_size) - got).abs().max() > 1e-3


def test_one_seeds_two_mixture_components_are_the_sidenet_and_the_backbone_and_mix_as_the_gate_does(
        make_sidenet, make_dictionary):
    """``seed_log_probs`` with the mixture's components as head: row 0 is what the same weights score without a
    mixture (the SideNet alone), row 1 what the backbone alone scores; mixed by hand at λ they give what the model
    with that constant gate scores itself (memory on: the memory is filled as the evaluation fills it)."""
    d = make_dictionary(40)
    model, backbone = make_sidenet(d, use_external_memory=True, memory_size=64, k=4, chunk_size=2,
                                   mix_with_backbone="constant", mix_gate_init=0.8)
    plain, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    for p in model.decoder.layers.parameters():
        torch.nn.init.normal_(p, std=0.3)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "mix_" not in k})
    spec = icl.TASKS["sst2"]
    words = ["good", "bad", "film", "plot", "dull", "fine", "!", "."]
    train = [(" ".join(words[(i * j) % 8] for j in range(1, 6)), i % 2) for i in range(40)]
    queries = train[:5]

    class Codec:  # one id per word, from its letters
        bos, eos = d.bos(), d.eos()

        def encode(self, text):
            return [4 + sum(map(ord, w)) % 30 for w in text.split()]

    cpu = torch.device("cpu")
    for m in (model, plain, backbone):
        m.eval()
        if hasattr(m, "memory"):
            m.memory.configure(mode="release", slot="eval", writes=False)

    def scores(m, mode, head=None):
        return icl.seed_log_probs(m, mode, spec, train, queries, Codec(), d, cpu, 1, 4, 20, 16, 3, head=head)

    for mode in ("memory-off", "memory-on"):
        both = scores(model, mode, head=lambda f: torch.stack(model.decoder.mixture_components(f), dim=1))
        torch.testing.assert_close(both[:, 0], scores(plain, mode), rtol=0, atol=1e-5)
        torch.testing.assert_close(both[:, 1], scores(backbone, "backbone"), rtol=0, atol=1e-5)
        lam = 1 / (1 + math.exp(-0.8))
        hand = torch.log(lam * both[:, 0].exp() + (1 - lam) * both[:, 1].exp())
        torch.testing.assert_close(scores(model, mode), hand, rtol=0, atol=1e-5)
    assert (scores(plain, "memory-on") - scores(plain, "memory-off")).abs().max() > 1e-3  # memory was read


def test_cached_batches_need_no_padding_mark_when_the_pad_index_is_a_token(llama):
    """A Hugging Face model whose bos is fairseq's pad index (SmolLM2): prompts run whole one at a time, against
    the cached context with queries right-padded three to a batch, the padding unmarked."""
    from longmem.models.hf_causal_lm import HFCausalLM, HFDecoder

    path, d = llama
    model = HFCausalLM.from_path(str(path), d, 2).eval()
    for module in model.modules():
        if isinstance(module, HFDecoder):
            module.mask_padding = False
    context = [d.pad()] + torch.randint(4, len(d), (20,)).tolist()  # the model's bos is index 1, as SmolLM2's
    prompts = [context + [d.pad()] + torch.randint(4, len(d), (n,)).tolist() for n in (4, 1, 6, 2)]
    cpu = torch.device("cpu")
    want = icl.predict(model, prompts, d.pad(), cpu, batch_size=1)
    torch.testing.assert_close(icl.predict_cached(model, context, prompts, d.pad(), cpu, 3), want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_script_end_to_end_on_the_shipped_data_and_clear_errors(tmp_path, repo_data, run_cli, save_tiny_backbone):
    from longmem.released import write_released_style_checkpoint

    bpe = os.path.join(repo_data, "gpt2_bpe")
    longmem_ckpt = tmp_path / "longmem.pt"
    write_released_style_checkpoint(str(longmem_ckpt), os.path.join(bpe, "dict.txt"))
    save_tiny_backbone(tmp_path / "backbone.pt", os.path.join(bpe, "dict.txt"), bpe)
    script = os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py")
    common = ["--data-dir", os.path.join(repo_data, "icl"), "--gpt2-bpe", bpe, "--cpu", "--k", "2",
              "--cache-k", "20", "--memory-block", "64", "--max-queries", "6", "--seeds", "1", "2"]
    out = tmp_path / "icl.json"
    proc = run_cli(script, *common, "--tasks", "sst2", "subj", "--backbone", str(tmp_path / "backbone.pt"), "--longmem",
                   str(longmem_ckpt), "--results-path", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for task in ("sst2", "subj"):
        for mode in ("backbone", "memory-off", "memory-on"):
            accs = results[task][mode]["accuracies"]
            assert len(accs) == 2 and all(a * 6 == round(a * 6) for a in accs)  # k/6 correct
    assert "| sst2 |" in proc.stdout
    assert proc.stdout.count("Acc for random seed 1: ") == 6 and "Mean acc across 2 seeds: " in proc.stdout
    bad = run_cli(script, *common, "--tasks", "sst3", "--longmem", str(longmem_ckpt), timeout=120)
    assert bad.returncode != 0 and "unknown ICL task 'sst3'" in bad.stderr
    (tmp_path / "flat").mkdir()
    bad = run_cli(script, *common[2:], "--data-dir", str(tmp_path / "flat"), "--tasks", "mr", "--modes", "memory-off",
                  "--longmem", str(longmem_ckpt), timeout=120)
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
    # the mass on the two label tokens (1, 0) per query, by hand: e^5 + e or 1 + e^5 of e^5 + e + 2, or 1 + e of
    # e^5 + e + 2 for the queries that prefer another token
    e = torch.e
    big, small = (e ** 5 + e) / (e ** 5 + e + 2), (1 + e) / (e ** 5 + e + 2)
    assert abs(icl.label_mass(lp, [1, 0]) - (big + (1 + e ** 5) / (e ** 5 + 3) + 2 / (e ** 5 + 3) + small) / 4) < 1e-6


@pytest.mark.slow
def test_dump_prompts_gives_the_release_protocols_token_ids_without_a_model(tmp_path, repo_data, run_cli):
    """Rebuilt here from the raw GPT-2 BPE: demonstrations each [<s>] + BPE + [</s>], the query's
    template cut before the label, memory in whole blocks of the memory demonstrations' encoding."""
    import random

    from fairseq.data import Dictionary
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    bpe_dir = os.path.join(repo_data, "gpt2_bpe")
    out = tmp_path / "prompts.json"
    proc = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py"), "--task", "SST-2", "--seeds", "2", "--k",
                   "3", "--cache-k", "40", "--memory-block", "256", "--dump-prompts", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = json.loads(out.read_text())
    d = Dictionary.load(os.path.join(bpe_dir, "dict.txt"))
    bpe = get_encoder(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"))
    ids = lambda text: [0] + [d.index(str(t)) for t in bpe.encode(text)] + [2]  # noqa: E731
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(repo_data, "icl", "SST-2", "train.tsv"))][1:]
    train = [(text, "positive" if int(label) else "negative") for text, label in rows]
    dev = [line.rstrip("\n").split("\t")[0] for line in open(os.path.join(repo_data, "icl", "SST-2", "dev.tsv"))][1:]
    random.seed(2)
    context = random.sample(train, 3)
    memory = random.sample(train, 40)
    context_ids = sum((ids(f"Review: {t} Sentiment: {l}. ") for t, l in context), [])
    assert dump["prompts"] == [context_ids + ids(f"Review: {q} Sentiment:")[:-1] for q in dev[:5]]
    memory_ids = sum((ids(f"Review: {t} Sentiment: {l}. ") for t, l in memory), [])
    assert dump["memory_blocks"] == [memory_ids[i: i + 256] for i in range(0, len(memory_ids) // 256 * 256, 256)]
    assert dump["task"] == "sst2" and dump["seed"] == 2 and len(dump["memory_blocks"]) >= 2


@pytest.mark.slow
def test_the_releases_evaluation_commands_run_as_written(tmp_path, repo_data, run_cli, save_tiny_backbone):
    """The release's README commands, `--path CKPT` and `--path LONGMEM --pretrained-model-path CKPT`, on
    tiny checkpoints whose file names say nothing; --max-queries is the one flag added, for time."""
    import re

    from longmem.released import write_released_style_checkpoint

    dict_path = os.path.join(repo_data, "gpt2_bpe", "dict.txt")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_tiny_backbone(tmp_path / "a" / "checkpoint_last.pt", dict_path, os.path.dirname(dict_path))
    write_released_style_checkpoint(str(tmp_path / "b" / "checkpoint_last.pt"), dict_path)
    script = os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py")
    outputs = {}
    for name, release_args in (("backbone", ["--path", str(tmp_path / "a" / "checkpoint_last.pt")]),
                               ("longmem", ["--path", str(tmp_path / "b" / "checkpoint_last.pt"),
                                            "--pretrained-model-path", str(tmp_path / "a" / "checkpoint_last.pt")])):
        proc = run_cli(script, *release_args, "--max-queries", "4", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = proc.stdout
        if name == "longmem":  # the override was used
            assert f"backbone built from {tmp_path / 'a' / 'checkpoint_last.pt'}, then" in proc.stdout
    for name, mode in (("backbone", "backbone"), ("longmem", "memory-on")):
        out = outputs[name]
        assert [int(s) for s in re.findall(r"^Acc for random seed (\d): [\d.]+$", out, re.M)] == [1, 2, 3, 4, 5, 6]
        assert re.search(r"^Mean acc across 6 seeds: \d\.\d{4}, std: \d\.\d{4}", out, re.M)
        assert f"| task | {mode} |" in out and "| sst2 |" in out


@pytest.mark.slow
def test_dump_prompts_with_a_hugging_face_tokenizer_uses_its_ids_and_its_bos_eos(tmp_path, run_cli):
    """--hf-tokenizer: a word-level tokenizer written here (bos <|im_start|> = 1, eos <|im_end|> = 2, as
    SmolLM2's); one demonstration and one query, their ids written by hand."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "Review:", "good", "film", "Sentiment:",
             "positive.", "bad", "negative."]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                         unk_token="<unk>").save_pretrained(tmp_path / "tok")
    (tmp_path / "icl" / "SST-2").mkdir(parents=True)
    (tmp_path / "icl" / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\n")
    (tmp_path / "icl" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nbad film\t0\n")
    out = tmp_path / "prompts.json"
    proc = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py"), "--data-dir", str(tmp_path / "icl"),
                   "--task", "SST-2", "--seeds", "1", "--k", "1", "--cache-k", "0", "--hf-tokenizer",
                   str(tmp_path / "tok"), "--dump-prompts", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # [bos] Review: good film Sentiment: positive. [eos]  [bos] Review: bad film Sentiment:
    assert json.loads(out.read_text())["prompts"] == [[1, 4, 5, 6, 7, 8, 2, 1, 4, 9, 6, 7]]
    batched = run_cli(os.path.join(REPO, "eval_scripts", "eval_longmem_icl.py"), "--data-dir", str(tmp_path / "icl"),
                      "--task", "SST-2", "--hf-tokenizer", str(tmp_path / "tok"), "--batch-size", "4", "--dump-prompts",
                      str(out), "--no-prefix-cache", timeout=300)
    assert batched.returncode == 2 and "--batch-size 1" in batched.stderr


def test_query_subset_first_or_spread_over_a_file_sorted_by_label():
    """MR, MPQA and Subj list all label-0 queries first: 'first' takes only those, 'spread' takes every
    len/n-th query, both labels in their proportions."""
    evaluation = [(f"t{i}", 0 if i < 1000 else 1) for i in range(2000)]
    assert icl.query_subset(evaluation, 100, "first") == evaluation[:100]
    spread = icl.query_subset(evaluation, 100, "spread")
    assert spread == [evaluation[20 * i] for i in range(100)]
    assert sum(label for _, label in spread) == 50
    assert icl.query_subset(evaluation, None, "spread") is evaluation
    assert icl.query_subset(evaluation[:7], 10, "spread") == evaluation[:7]
