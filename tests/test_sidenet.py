"""transformer_lm_sidenet: sizes, joint attention against docs/design.md §4's formula, SideNet wiring, memory order."""
import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet
from longmem.modules.joint_attention import JointMemoryAttention
from longmem.modules.memory_bank import Retrieved
from longmem.utils.checkpoints import save_fairseq_checkpoint



@pytest.mark.slow
def test_released_arch_has_the_released_trainable_and_frozen_counts(repo_data, FakeTask):
    from fairseq.data import Dictionary
    from longmem.models.transformer_lm_sidenet import SideNetConfig

    d = Dictionary.load(os.path.join(repo_data, "gpt2_bpe", "dict.txt"))
    args = argparse.Namespace()
    from fairseq.models import ARCH_CONFIG_REGISTRY
    ARCH_CONFIG_REGISTRY["transformer_lm_sidenet_gpt2_small"](args)
    cfg = SideNetConfig(**vars(args), pretrained_model_path="/nonexistent/gpt2_medium/checkpoint_last.pt",
                        use_external_memory=True)  # as the released model was trained
    model = TransformerLanguageModelSideNet.build_model(cfg, FakeTask(d))
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in params if p.requires_grad) == 151_083_024
    backbone = list(model.decoder.pretrained_model.parameters())
    assert sum(p.numel() for p in backbone) == 407_072_768
    assert not any(p.requires_grad for p in backbone)
    keys = set(model.state_dict())
    for key in ("decoder.layers.8.self_attn.memory_bias", "decoder.layers.0.self_attn.q_proj.weight",
                "decoder.layers.11.fc2.bias", "decoder.layers.3.ln_1.weight", "decoder.layer_norm.bias",
                "decoder.embed_tokens.weight", "decoder.output_projection.weight",
                "decoder.pretrained_model.decoder.model.transformer.h.23.mlp.fc_out.bias",
                "decoder.pretrained_model.decoder.model.lm_head.bias"):
        assert key in keys, key
    assert not any(k.endswith("q_proj.bias") for k in keys)
    assert [k for k in keys if k.endswith("memory_bias")] == ["decoder.layers.8.self_attn.memory_bias"]
    assert model.state_dict()["decoder.layers.8.self_attn.memory_bias"].shape == (16,)


# ---------------------------------------------------------------- joint attention vs the formula
def reference_joint_attention(x, attn, alibi_bias, mem_k, mem_v, mem_mask):
    """docs/design.md §4 written out: per head (1-σ(g))·softmax(qKᵀ/√d + ALiBi)V + σ(g)·softmax(qK̃ᵀ/√d)Ṽ,
    memory softmax over existing slots only, then out_proj."""
    B, T, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    heads = lambda t: t.view(B, T, H, d).transpose(1, 2)  # noqa: E731
    q, k, v = heads(x @ attn.q_proj.weight.T), heads(x @ attn.k_proj.weight.T), heads(x @ attn.v_proj.weight.T)
    q = q / d ** 0.5
    local = torch.softmax(q @ k.transpose(-1, -2) + alibi_bias, -1) @ v
    out = torch.zeros_like(local)
    for b in range(B):
        for h in range(H):
            g = torch.sigmoid(attn.memory_bias[h])
            for t in range(T):
                valid = mem_mask[b, h, t]
                if valid.any():
                    w = torch.softmax(mem_k[b, h, t][valid] @ q[b, h, t], 0)
                    out[b, h, t] = (1 - g) * local[b, h, t] + g * (w @ mem_v[b, h, t][valid])
                else:
                    out[b, h, t] = local[b, h, t]
    return out.transpose(1, 2).reshape(B, T, C) @ attn.out_proj.weight.T


def causal_alibi(T, H):
    slopes = torch.tensor([2 ** (-8 * h / H) for h in range(1, H + 1)])
    i = torch.arange(T)
    bias = -slopes.view(H, 1, 1) * (i.view(T, 1) - i.view(1, T)).float()
    return bias.masked_fill(i.view(1, T) > i.view(T, 1), float("-inf"))


def make_attention(C=32, H=4):
    attn = JointMemoryAttention(C, H, 0.0, use_memory=True)
    with torch.no_grad():
        attn.memory_bias.normal_()
    return attn.eval()


def test_joint_attention_matches_the_formula_with_partly_masked_memory():
    from longmem.modules.alibi import alibi_attention_bias, alibi_slopes

    B, T, C, H, k = 2, 6, 32, 4, 8
    attn = make_attention(C, H)
    x = torch.randn(B, T, C)
    mem_k, mem_v = torch.randn(B, H, T, k, C // H), torch.randn(B, H, T, k, C // H)
    mask = torch.rand(B, H, T, k) > 0.4
    mask[0, 1, 2] = False  # a token with no memory at all
    pos = torch.arange(T)
    bias = alibi_attention_bias(torch.tensor(alibi_slopes(H)), pos, pos)
    got = attn(x, bias, lambda q: Retrieved(mem_k, mem_v, mask, None))
    want = reference_joint_attention(x, attn, causal_alibi(T, H), mem_k, mem_v, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_memory_empty_the_layer_is_plain_alibi_attention():
    from longmem.modules.alibi import alibi_attention_bias, alibi_slopes

    B, T, C, H, k = 2, 5, 32, 4, 4
    attn = make_attention(C, H)
    x = torch.randn(B, T, C)
    empty = Retrieved(torch.zeros(B, H, T, k, C // H), torch.zeros(B, H, T, k, C // H),
                      torch.zeros(B, H, T, k, dtype=torch.bool), None)
    pos = torch.arange(T)
    bias = alibi_attention_bias(torch.tensor(alibi_slopes(H)), pos, pos)
    got = attn(x, bias, lambda q: empty)
    heads = lambda t: t.view(B, T, H, C // H).transpose(1, 2)  # noqa: E731
    q, kk, v = (heads(x @ w.T) for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
    plain = torch.softmax(q @ kk.transpose(-1, -2) / (C // H) ** 0.5 + causal_alibi(T, H), -1) @ v
    torch.testing.assert_close(got, plain.transpose(1, 2).reshape(B, T, C) @ attn.out_proj.weight.T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_gate_at_zero_ignores_memory_and_at_one_uses_only_memory(gate):
    from longmem.modules.alibi import alibi_attention_bias, alibi_slopes

    B, T, C, H = 1, 4, 32, 4
    attn = make_attention(C, H)
    with torch.no_grad():
        attn.memory_bias.fill_(-1e4 if gate == 0 else 1e4)  # σ = 0 or 1 exactly in float32
    x = torch.randn(B, T, C)
    # hand-built memory: two slots per token, only the first real, holding the value 7 + head index
    mem_k = torch.randn(B, H, T, 2, C // H)
    mem_v = torch.stack([torch.full((B, T, 2, C // H), 7.0 + h) for h in range(H)], 1)
    mask = torch.zeros(B, H, T, 2, dtype=torch.bool)
    mask[..., 0] = True
    pos = torch.arange(T)
    bias = alibi_attention_bias(torch.tensor(alibi_slopes(H)), pos, pos)
    got = attn(x, bias, lambda q: Retrieved(mem_k, mem_v, mask, None))
    if gate == 0:
        want = attn(x, bias, None)
    else:
        per_head = torch.cat([torch.full((B, T, C // H), 7.0 + h) for h in range(H)], -1)
        want = per_head @ attn.out_proj.weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SideNet wiring
def test_reload_ptm_layer_copies_backbone_layer_2i_plus_1(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, backbone = make_sidenet(d, reload_ptm_layer=True)
    for i, layer in enumerate(model.decoder.layers):
        src = backbone.decoder.model.transformer.h[2 * i + 1]
        assert torch.equal(layer.self_attn.q_proj.weight, src.attn.q_proj.weight)
        assert torch.equal(layer.self_attn.out_proj.weight, src.attn.out_proj.weight)
        assert torch.equal(layer.fc1.weight, src.mlp.fc_in.weight) and torch.equal(layer.fc2.bias, src.mlp.fc_out.bias)
        assert torch.equal(layer.ln_1.weight, src.ln_1.weight)
    assert torch.equal(model.decoder.layer_norm.weight, backbone.decoder.model.transformer.ln_f.weight)


def test_sidenet_forward_matches_spec_recurrence(make_sidenet, make_dictionary):
    """x_{i+1} = x_i + (H[2i+2] - H[2i]) + Attn(LN1(x_i)) + FC2(GELU(FC1(LN1(x_i)))), LayerNorms with
    fairseq's eps 1e-5, then layer_norm and the backbone's lm_head, weight and bias (the release's forward
    calls ``pretrained_model.decoder.model.lm_head``)."""
    d = make_dictionary(40)
    model, backbone = make_sidenet(d, reload_ptm_layer=False)
    model.eval()
    tokens = torch.randint(4, 40, (2, 7))
    with torch.no_grad():
        backbone = model.decoder.pretrained_model
        backbone.decoder.model.lm_head.bias.normal_()  # a non-zero bias the output must add
        got = model(tokens)[0]
        hs = backbone(tokens, return_all_hiddens=True)[1]["inner_states"]
        x = hs[0]
        from longmem.modules.alibi import alibi_attention_bias, alibi_slopes
        pos = torch.arange(7)
        bias = alibi_attention_bias(torch.tensor(alibi_slopes(4)), pos, pos)
        for i, layer in enumerate(model.decoder.layers):
            h = F.layer_norm(x, (32,), layer.ln_1.weight, layer.ln_1.bias, 1e-5)
            x = x + (hs[2 * i + 2] - hs[2 * i]) + layer.self_attn(h, bias) + layer.fc2(F.gelu(layer.fc1(h)))
        x = F.layer_norm(x, (32,), model.decoder.layer_norm.weight, model.decoder.layer_norm.bias, 1e-5)
        want = x @ backbone.decoder.model.lm_head.weight.T + backbone.decoder.model.lm_head.bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_memory_is_searched_with_the_memory_layers_unscaled_query(make_sidenet, make_dictionary):
    """The query is q_proj(LN1(x)) of the memory layer's input, before any scaling; a model built without
    memory has no gate (the release builds the joint attention only with --use-external-memory)."""
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True)
    model.eval()
    seen = []
    seg1, seg2 = torch.randint(4, 40, (1, 6)), torch.randint(4, 40, (1, 6))
    with torch.no_grad(), model.memory.retrieval_hook(lambda q, out, heads: seen.append(q)):
        model(seg1)
        model(seg2)
        bb = model.decoder.pretrained_model
        hs = bb(seg2, return_all_hiddens=True)[1]["inner_states"]
        from longmem.modules.alibi import alibi_attention_bias, alibi_slopes
        pos = torch.arange(6)
        bias = alibi_attention_bias(torch.tensor(alibi_slopes(4)), pos, pos)
        layer0, layer1 = model.decoder.layers
        h = F.layer_norm(hs[0], (32,), layer0.ln_1.weight, layer0.ln_1.bias, 1e-5)
        x1 = hs[0] + (hs[2] - hs[0]) + layer0.self_attn(h, bias) + layer0.fc2(F.gelu(layer0.fc1(h)))
        want = layer1.self_attn.q_proj(F.layer_norm(x1, (32,), layer1.ln_1.weight, layer1.ln_1.bias, 1e-5))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    plain, _ = make_sidenet(d, use_external_memory=False)
    assert not any(k.endswith("memory_bias") for k in plain.state_dict())


def test_dropout_hits_the_mlp_branch_and_local_attention_only_as_released():
    """dropout = 1 zeroes the MLP branch and nothing else of a layer; attention dropout = 1 zeroes the
    local attention probabilities but not the memory's."""
    from longmem.modules.alibi import alibi_attention_bias, alibi_slopes
    from longmem.modules.sidenet_layer import SideNetLayer

    B, T, C, H = 2, 5, 32, 4
    layer = SideNetLayer(C, 4 * C, H, dropout=1.0, attention_dropout=0.0, use_memory=False).train()
    x, residual = torch.randn(B, T, C), torch.randn(B, T, C)
    pos = torch.arange(T)
    bias = alibi_attention_bias(torch.tensor(alibi_slopes(H)), pos, pos)
    want = x + residual + layer.self_attn(F.layer_norm(x, (C,), layer.ln_1.weight, layer.ln_1.bias, 1e-5), bias)
    torch.testing.assert_close(layer(x, residual, bias), want, rtol=1e-6, atol=1e-6)

    attn = JointMemoryAttention(C, H, attention_dropout=1.0, use_memory=True).train()
    with torch.no_grad():
        attn.memory_bias.fill_(1e4)  # σ = 1: memory only
    mem_v = torch.stack([torch.full((B, T, 2, C // H), 7.0 + h) for h in range(H)], 1)
    mask = torch.ones(B, H, T, 2, dtype=torch.bool)
    got = attn(torch.randn(B, T, C), bias, lambda q: Retrieved(torch.randn(B, H, T, 2, C // H), mem_v, mask, None))
    per_head = torch.cat([torch.full((B, T, C // H), 7.0 + h) for h in range(H)], -1)
    torch.testing.assert_close(got, per_head @ attn.out_proj.weight.T, rtol=1e-5, atol=1e-5)


def test_one_optimizer_step_changes_sidenet_but_no_backbone_parameter(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True)
    model.train()
    assert not model.decoder.pretrained_model.training
    before_bb = {k: v.clone() for k, v in model.decoder.pretrained_model.state_dict().items()}
    before_side = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = torch.randint(4, 40, (2, 8))
    for _ in range(2):  # the second step reads memory, so the gate gets a gradient
        opt.zero_grad()
        logits = model(tokens)[0]
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.randint(4, 40, (16,))).backward()
        opt.step()
    for k, v in model.decoder.pretrained_model.state_dict().items():
        assert torch.equal(v, before_bb[k]), k
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before_side[k])]
    assert set(changed) == set(before_side), set(before_side) - set(changed)


def test_a_segment_never_finds_its_own_tokens_in_memory(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, memory_size=64, k=4, chunk_size=2)
    model.eval()
    backbone = model.decoder.pretrained_model  # its retrieval layer is the SideNet's (2)
    seen = []
    seg1, seg2 = torch.randint(4, 40, (1, 10)), torch.randint(4, 40, (1, 10))
    with torch.no_grad(), model.memory.retrieval_hook(lambda q, out, heads: seen.append(out)):
        k1 = backbone(seg1, return_retrieval_kv=True)[1]["retrieval_kv"][0].view(10, 4, 8)  # (T, H, d)
        k2 = backbone(seg2, return_retrieval_kv=True)[1]["retrieval_kv"][0].view(10, 4, 8)
        model(seg1)
        assert seen == [] and model.memory.bank.num_tokens(0) == 10  # empty memory: not even searched
        model(seg2)
    assert len(seen) == 1
    got = seen[0]
    for h in range(4):
        real = got.keys[0, h][got.mask[0, h]]  # (n, d)
        for row in real:
            assert torch.isclose(row, k1[:, h], atol=1e-6).all(-1).any()
            assert not torch.isclose(row, k2[:, h], atol=1e-6).all(-1).any()
    assert model.memory.bank.num_tokens(0) == 20


def test_memory_writes_can_be_switched_off_and_memory_reset(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True)
    model.eval()
    with torch.no_grad():
        model(torch.randint(4, 40, (1, 8)))
        model.memory.configure(writes=False)
        model(torch.randint(4, 40, (1, 8)))
        assert model.memory.bank.num_tokens(0) == 8
        model.memory.reset()
        assert model.memory.bank.num_tokens(0) == 0


# ---------------------------------------------------------------- errors
def test_clear_errors_for_mismatched_backbone_and_layers(tmp_path, make_sidenet, FakeTask, make_dictionary, tiny_backbone_file):
    d = make_dictionary(40)
    with pytest.raises(ValueError, match="retrieval-layer-index 4 is beyond the backbone's 4 layers"):
        make_sidenet(d, retrieval_layer_index=4)
    with pytest.raises(ValueError, match=r"memory layer int\(3 / 1\) = 3 is beyond the SideNet's 2 layers"):
        make_sidenet(d, retrieval_layer_index=3, layer_reduction_factor=1)
    path, _ = tiny_backbone_file(tmp_path, d)
    cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=128,
                        retrieval_layer_index=2, pretrained_model_path=str(path))
    with pytest.raises(ValueError, match="vocabulary of 44 but this task's dictionary has 48"):
        TransformerLanguageModelSideNet.build_model(cfg, FakeTask(make_dictionary(44)))
    other = tmp_path / "other.pt"
    save_fairseq_checkpoint(other, {"decoder.embed_tokens.weight": torch.zeros(2)},
                            cfg={"model": {"_name": "transformer_lm_gpt"}})
    cfg.pretrained_model_path = str(other)
    with pytest.raises(ValueError, match="is not a backbone checkpoint of a known family .*'transformer_lm_gpt'"):
        TransformerLanguageModelSideNet.build_model(cfg, FakeTask(d))


def test_memory_cannot_be_enabled_on_a_model_built_without_a_memory_layer(make_sidenet, make_dictionary):
    """It would be written at every segment and read by no layer: refused in one line. A model built with memory
    switches it off and on again."""
    from longmem.errors import ConfigError

    plain, _ = make_sidenet(make_dictionary(40), use_external_memory=False)
    assert not any(hasattr(layer.self_attn, "memory_bias") for layer in plain.decoder.layers)
    with pytest.raises(ConfigError, match="built without a memory layer"):
        plain.decoder.memory.configure(enabled=True)
    assert plain.decoder.memory.enabled is False
    with_memory, _ = make_sidenet(make_dictionary(40), use_external_memory=True)
    assert with_memory.decoder.memory.configure(enabled=False).enabled is False
    assert with_memory.decoder.memory.configure(enabled=True).enabled is True
