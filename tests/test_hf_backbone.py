"""LongMem over a Hugging Face Llama backbone, on a tiny random Llama built here (no download)."""
import dataclasses
import os

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from longmem.paths import REPO

transformers = pytest.importorskip("transformers")  # the [hf] extra, which `make test` installs


def longmem_over(path, d, **kw):
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet

    settings = dict(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64,
                    retrieval_layer_index=2, pretrained_model_path=str(path), dropout=0.0, attention_dropout=0.0,
                    memory_size=64, k=4, chunk_size=2, memory_backend="torch")
    cfg = SideNetConfig(**{**settings, **kw})
    return TransformerLanguageModelSideNet.build_model(cfg, SimpleNamespace(target_dictionary=d, source_dictionary=d)), cfg


def test_adapter_returns_the_models_own_hidden_states_and_pre_rotary_keys(llama):
    from longmem.models.hf_causal_lm import HFCausalLM

    path, d = llama
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    adapter = HFCausalLM.from_path(str(path), d, retrieval_layer_index=2)
    tokens = torch.randint(4, len(d), (2, 9))
    seen = {}
    attn = hf.model.layers[2].self_attn
    hooks = [attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out)),
             attn.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out))]
    with torch.no_grad():
        want = hf.model(input_ids=tokens, output_hidden_states=True).hidden_states
        got = adapter.frozen_states(tokens, retrieval_kv=True)
    for h in hooks:
        h.remove()
    assert len(got.hidden) == 5 == len(want)
    for a, b in zip(got.hidden, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.retrieval_kv[0], seen["k"], rtol=0, atol=0)
    torch.testing.assert_close(got.retrieval_kv[1], seen["v"], rtol=0, atol=0)
    assert got.retrieval_kv[0].shape == (2, 9, 2 * 8)  # the key/value heads, before any rotation
    # the logits through fairseq's interface are the model's own
    with torch.no_grad():
        torch.testing.assert_close(adapter(tokens)[0], hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_reload_copies_backbone_layer_r_i_plus_1_and_training_leaves_the_backbone(llama):
    path, d = llama
    model, _ = longmem_over(path, d, reload_ptm_layer=True, use_external_memory=True)
    hf = model.decoder.pretrained_model.hf
    for i, layer in enumerate(model.decoder.layers):
        src = hf.model.layers[2 * i + 1]
        for name, value in src.state_dict().items():
            assert torch.equal(layer.state_dict()[name], value), (i, name)
    assert torch.equal(model.decoder.layer_norm.weight, hf.model.norm.weight)
    assert model.decoder.layers[1].self_attn.memory_bias.shape == (4,)  # one gate per query head
    before = {k: v.clone() for k, v in model.decoder.pretrained_model.state_dict().items()}
    trainable = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):  # the second step reads memory, so the gate gets a gradient
        opt.zero_grad()
        logits = model(torch.randint(4, len(d), (2, 8)))[0]
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.randint(4, len(d), (16,))).backward()
        opt.step()
    for k, v in model.decoder.pretrained_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = {k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, trainable[k])}
    assert changed == set(trainable)


def test_a_segment_never_finds_its_own_tokens_and_each_query_head_reads_its_key_value_head(llama):
    path, d = llama
    model, _ = longmem_over(path, d, use_external_memory=True, k=4, chunk_size=2)
    model.eval()
    backbone = model.decoder.pretrained_model
    seen = []
    seg1, seg2 = torch.randint(4, len(d), (1, 10)), torch.randint(4, len(d), (1, 10))
    reported = []
    with torch.no_grad(), model.memory.retrieval_hook(lambda q, out, heads: (seen.append(out), reported.append(heads))):
        k1 = backbone.frozen_states(seg1, True).retrieval_kv[0].view(10, 2, 8)  # (T, H_kv, d)
        k2 = backbone.frozen_states(seg2, True).retrieval_kv[0].view(10, 2, 8)
        model(seg1)
        assert seen == []
        model(seg2)
    assert len(seen) == 2  # one search per query head of a group (2 query heads per key/value head)
    assert reported == [[0, 2], [1, 3]]  # search j answers query head j of each key/value head's group
    for out in seen:
        for h in range(2):
            real = out.keys[0, h][out.mask[0, h]]
            assert len(real)
            for row in real:
                assert torch.isclose(row, k1[:, h], atol=1e-6).all(-1).any()
                assert not torch.isclose(row, k2[:, h], atol=1e-6).all(-1).any()


def test_checkpoint_saves_and_reloads_without_the_model_folder(llama, tmp_path):
    import shutil

    from fairseq import checkpoint_utils

    from longmem.utils.checkpoints import save_fairseq_checkpoint

    path, d = llama
    model, cfg = longmem_over(path, d, use_external_memory=True, reload_ptm_layer=True)
    assert cfg.backbone_family == "hf_causal_lm" and '"num_key_value_heads": 2' in cfg.backbone_config
    model_cfg = {**dataclasses.asdict(cfg), "_name": "transformer_lm_sidenet"}
    save_fairseq_checkpoint(tmp_path / "lm.pt", model.state_dict(), cfg={
        "model": model_cfg, "task": {"_name": "language_modeling", "data": str(tmp_path)}})
    shutil.rmtree(path)  # the backbone's folder is gone: the checkpoint carries its weights and config
    models, _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "lm.pt")])
    loaded = models[0].eval()
    model.eval()
    tokens = torch.randint(4, len(d), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fairseq_train_adapts_a_sidenet_over_a_hugging_face_folder(llama, tmp_path, run_cli, binarize):
    path, d = llama
    words = " ".join(f"w{i}" for i in range(60))
    (tmp_path / "train.txt").write_text("\n".join(words for _ in range(40)) + "\n")
    binarize(tmp_path / "bin", srcdict=tmp_path / "dict.txt", train=tmp_path / "train.txt")
    proc = run_cli("-m", "fairseq_cli.train", tmp_path / "bin", "--user-dir", os.path.join(REPO, "longmem"), "--task",
                   "longmem_language_modeling", "--arch", "transformer_lm_sidenet_tiny", "--decoder-layers", "2",
                   "--decoder-embed-dim", "32", "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "64",
                   "--pretrained-model-path", path, "--retrieval-layer-index", "2", "--reload-ptm-layer",
                   "--use-external-memory", "--memory-size", "128", "--k", "4", "--chunk-size", "2",
                   "--tokens-per-sample", "16", "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-3",
                   "--max-update", "3", "--cpu", "--save-dir", tmp_path / "ck", "--disable-validation", "--num-workers",
                   "0", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["backbone_family"] == "hf_causal_lm"
    assert "decoder.pretrained_model.decoder.model.model.layers.3.mlp.down_proj.weight" in state["model"]


def test_retrieval_diagnostics_cover_every_query_head_of_a_group(llama):
    """k = the whole memory: every earlier occurrence is retrieved, for each of the 4 query heads (2 per
    key/value head, one search per group member)."""
    from longmem.evaluation.diagnostics import retrieval_hits
    from longmem.tasks.stream_dataset import TokenStream

    path, d = llama
    model, _ = longmem_over(path, d, use_external_memory=True, memory_size=64, k=64, chunk_size=2)
    model.eval()
    eos = d.eos()
    passage = torch.randint(4, len(d), (12,)).tolist()

    class Split:  # one document: passage, 20 other tokens, the passage again (beyond a segment of 8)
        lines = [passage + torch.randint(4, len(d), (20,)).tolist() + passage + [eos]]
        sizes = [len(lines[0])]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor(self.lines[i])

    r = retrieval_hits(model, TokenStream(Split(), eos), eos, 8, context=4)
    assert r["positions"] >= 4 and r["hit_s"] == [1.0] * 4 and r["hit_s+1"] == [1.0] * 4 and len(r["gate"]) == 4


def test_padding_can_be_switched_off_when_the_pad_index_is_a_token(llama):
    """SmolLM2's bos is id 1, fairseq's <pad> index: with mask_padding off, a prompt holding it is scored
    as the model scores it (no attention mask); with it on (the default), id 1 is treated as padding."""
    from longmem.models.hf_causal_lm import HFCausalLM

    path, d = llama
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    adapter = HFCausalLM.from_path(str(path), d, retrieval_layer_index=2)
    tokens = torch.tensor([[d.pad(), 7, 8, 9, d.pad(), 10, 11]])
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        masked = adapter(tokens)[0]
        adapter.decoder.mask_padding = False
        unmasked = adapter(tokens)[0]
        states = adapter.frozen_states(tokens, retrieval_kv=False)
        hidden = hf.model(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(unmasked, want, atol=1e-5)
    assert not torch.allclose(masked[0, 5:], want[0, 5:], atol=1e-3)
    assert torch.allclose(states.hidden[-1], hidden[-1], atol=1e-5)


def test_memory_layer_from_retrieval_block_starts_the_memory_layer_from_block_m(llama):
    """An even retrieval layer m = 2: by default (the release) memory layer int(2 / 2) = 1 starts from block 3;
    with the option from block 2, the block whose keys fill the memory, so its query is that block's query."""
    path, d = llama
    want = {False: [1, 3], True: [1, 2]}
    for flag, sources in want.items():
        model, _ = longmem_over(path, d, reload_ptm_layer=True, use_external_memory=True,
                                memory_layer_from_retrieval_block=flag)
        hf = model.decoder.pretrained_model.hf
        assert model.decoder.memory_layer_index == 1
        for layer, src in zip(model.decoder.layers, sources):
            for name, value in hf.model.layers[src].state_dict().items():
                assert torch.equal(layer.state_dict()[name], value), (flag, src, name)
        other = 3 if flag else 2  # and not from the other block (the tiny Llama's blocks differ)
        assert not torch.equal(model.decoder.layers[1].self_attn.q_proj.weight,
                               hf.model.layers[other].self_attn.q_proj.weight)


def test_the_llama_memory_layers_evidence_scores_local_keys_rotated_and_memory_keys_unrotated(llama):
    """--mix-with-backbone memory over a Llama backbone: the memory layer's evidence, written out from its inputs:
    local scores with the rotated query and keys plus the mask, memory scores with the unrotated query (memory has
    no positions), each query head against its key/value head, gate-weighted over the heads."""
    from longmem.modules.llama_sidenet_layer import apply_rotary

    path, d = llama
    model, _ = longmem_over(path, d, use_external_memory=True, mix_with_backbone="memory")
    model.eval()
    attention = model.decoder.layers[model.decoder.memory_layer_index].self_attn
    with torch.no_grad():
        torch.nn.init.normal_(attention.memory_bias)
    seen = {}
    attention.register_forward_pre_hook(lambda m, args: seen.update(args=args))
    retrieved = []
    with torch.no_grad(), model.memory.retrieval_hook(lambda q, out, heads: retrieved.append((out, heads))):
        model(torch.randint(4, len(d), (1, 10)))
        retrieved.clear()
        model(torch.randint(4, len(d), (1, 10)))
        z, present = attention.last_evidence
        x, (cos, sin, bias) = seen["args"][0], seen["args"][1]
        H, Hkv, hd = attention.num_heads, attention.num_kv_heads, attention.head_dim
        q = attention.q_proj(x).view(1, 10, H, hd).transpose(1, 2)
        k = attention.k_proj(x).view(1, 10, Hkv, hd).transpose(1, 2)
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gate = torch.sigmoid(attention.memory_bias)
        num = torch.zeros(10)
        for out, heads in retrieved:  # heads[j]: the query head that searched with key/value head j
            for kv, h in enumerate(heads):
                local = (q_rot[0, h] @ k_rot[0, kv].T) / hd ** 0.5 + bias[0, h if bias.size(1) > 1 else 0]
                memory = torch.einsum("td,tkd->tk", q[0, h], out.keys[0, kv].float()) / hd ** 0.5
                memory = memory.masked_fill(~out.mask[0, kv], float("-inf"))
                num += gate[h] * (memory.logsumexp(-1) - local.logsumexp(-1))
    assert present.all()  # every token has memory slots here
    torch.testing.assert_close(z[0], num / gate.sum(), rtol=0, atol=1e-4)


def test_filling_memory_runs_the_llama_to_its_retrieval_layer_only_and_writes_the_full_forwards_memory(llama,
                                                                                                      same_state):
    """``fill_memory`` (ICL's demonstrations into memory) stops the Hugging Face model once layer m's keys and values
    are captured: the rest of layer m, the layers above it, the final norm and both output heads never run; the memory it writes is the one a
    full forward pass writes, bit for bit; the model runs whole again afterwards."""
    from longmem.evaluation import icl

    path, d = llama
    model, _ = longmem_over(path, d, use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    model.memory.configure(mode="shared")
    hf = model.decoder.pretrained_model.hf
    tokens = torch.randint(4, len(d), (1, 7))
    with torch.no_grad():
        before = model.decoder.pretrained_model.frozen_states(tokens, True)
    ran = []
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: ran.append(name))
             for name, m in [*((f"layer{i}", layer) for i, layer in enumerate(hf.model.layers)),
                             ("norm", hf.model.norm), ("lm_head", hf.lm_head), ("sidenet", model.decoder.layers[0])]]
    blocks = icl.memory_blocks(torch.randint(4, len(d), (30,)).tolist(), 8)
    try:
        icl.fill_memory(model, blocks, torch.device("cpu"))
        assert ran == ["layer0", "layer1"] * 3, ran  # layer 2 stops at its key/value projections, unfinished
        fast = model.memory.bank.state_dict()
        assert model.memory.bank.num_tokens(0) == 24
        model.memory.reset()
        with model.memory.configured(enabled=True, writes=True, reads=False), torch.no_grad():
            for b in blocks:
                model(torch.tensor([b]))
        assert "layer3" in ran and "sidenet" in ran
    finally:
        for h in hooks:
            h.remove()
    assert same_state(fast, model.memory.bank.state_dict())
    with torch.no_grad():
        after = model.decoder.pretrained_model.frozen_states(tokens, True)
    assert len(after.hidden) == len(before.hidden) == 5
    assert all(torch.equal(a, b) for a, b in zip(after.hidden + list(after.retrieval_kv),
                                                 before.hidden + list(before.retrieval_kv)))
