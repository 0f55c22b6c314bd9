"""The newgpt backbone: causality, incremental decoding, padding, released sizes and key names."""
import os

import pytest
import torch
import torch.nn.functional as F

from longmem.models.newgpt import build_newgpt, newgpt_config



def tiny(dictionary, **kw):
    kw.setdefault("embed_dim", 64)
    kw.setdefault("num_layers", 3)
    kw.setdefault("num_attention_heads", 4)
    kw.setdefault("ffn_embed_dim", 128)
    kw.setdefault("retrieval_layer_index", 1)
    return build_newgpt("newgpt-tiny", dictionary, **kw).eval()


def random_tokens(dictionary, B, T):
    return torch.randint(dictionary.nspecial, len(dictionary), (B, T))


def test_changing_later_tokens_never_changes_earlier_logits(small_dict):
    model = tiny(small_dict)
    tokens = random_tokens(small_dict, 2, 20)
    with torch.no_grad():
        base = model(tokens)[0]
        for t in (0, 7, 18):
            changed = tokens.clone()
            changed[:, t + 1:] = random_tokens(small_dict, 2, 20 - t - 1)
            out = model(changed)[0]
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_incremental_decoding_reproduces_full_sequence_logits(small_dict):
    model = tiny(small_dict)
    tokens = random_tokens(small_dict, 3, 17)
    with torch.no_grad():
        full = model(tokens)[0]
        state = {}
        steps = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(17)]
    assert all(s.shape[1] == 1 for s in steps)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def test_incremental_decoding_with_a_prompt_then_steps(small_dict):
    model = tiny(small_dict)
    tokens = random_tokens(small_dict, 2, 12)
    with torch.no_grad():
        full = model(tokens)[0]
        state = {}
        prompt = model(tokens[:, :8], incremental_state=state)[0]
        rest = [model(tokens[:, : t + 1], incremental_state=state)[0] for t in range(8, 12)]
    assert (torch.cat([prompt] + rest, 1) - full).abs().max().item() < 1e-5


def test_reorder_incremental_state_follows_the_new_order(small_dict):
    model = tiny(small_dict)
    tokens = random_tokens(small_dict, 3, 6)
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        state = {}
        model(tokens[:, :5], incremental_state=state)
        model.decoder.reorder_incremental_state_scripting(state, order)
        step = model(tokens[order], incremental_state=state)[0]
        full = model(tokens[order])[0]
    assert (step[:, -1] - full[:, -1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_other_tokens_logits(small_dict, side):
    model = tiny(small_dict)
    pad = small_dict.pad()
    a, b = random_tokens(small_dict, 1, 12), random_tokens(small_dict, 1, 7)
    padding = torch.full((1, 5), pad)
    b_padded = torch.cat([padding, b], 1) if side == "left" else torch.cat([b, padding], 1)
    with torch.no_grad():
        batch = model(torch.cat([a, b_padded], 0))[0]
        alone_a = model(a)[0]
        alone_b = model(b)[0]
    real = slice(5, 12) if side == "left" else slice(0, 7)
    torch.testing.assert_close(batch[0], alone_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1, real], alone_b[0], rtol=0, atol=1e-5)
    assert torch.isfinite(batch).all()


def test_forward_returns_hidden_states_and_retrieval_layer_projections(small_dict):
    """Independent recomputation of the parallel block from docs/design.md §1 with the module's weights."""
    model = tiny(small_dict)
    net = model.decoder.model
    tokens = random_tokens(small_dict, 2, 9)
    with torch.no_grad():
        logits, extra = model(tokens, return_all_hiddens=True, return_retrieval_kv=True)
        x = net.transformer.wte(tokens)
        H, d = 4, 16
        slopes = torch.tensor([2 ** (-8 * h / H) for h in range(1, H + 1)])
        i = torch.arange(9)
        alibi = -slopes.view(H, 1, 1) * (i.view(9, 1) - i.view(1, 9)).float()
        alibi = alibi.masked_fill(i.view(1, 9) > i.view(9, 1), float("-inf"))
        states = []
        for n, blk in enumerate(net.transformer.h):
            states.append(x)
            h = F.layer_norm(x, (64,), blk.ln_1.weight, blk.ln_1.bias, 1e-6)
            q, k, v = (h @ w.T for w in (blk.attn.q_proj.weight, blk.attn.k_proj.weight, blk.attn.v_proj.weight))
            if n == 1:
                expected_kv = (k, v)
            heads = lambda t: t.view(2, 9, H, d).transpose(1, 2)
            att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / d ** 0.5 + alibi, -1) @ heads(v)
            att = att.transpose(1, 2).reshape(2, 9, 64) @ blk.attn.out_proj.weight.T
            mlp = blk.mlp.fc_out(0.5 * blk.mlp.fc_in(h) * (1 + torch.tanh(
                (2 / torch.pi) ** 0.5 * (blk.mlp.fc_in(h) + 0.044715 * blk.mlp.fc_in(h) ** 3))))
            x = x + att + mlp
        states.append(F.layer_norm(x, (64,), net.transformer.ln_f.weight, net.transformer.ln_f.bias, 1e-6))
        expected_logits = states[-1] @ net.lm_head.weight.T + net.lm_head.bias
    assert len(extra["inner_states"]) == 3 + 1
    for got, want in zip(extra["inner_states"], states):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra["retrieval_kv"][0], expected_kv[0])
    torch.testing.assert_close(extra["retrieval_kv"][1], expected_kv[1])
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def released_backbone_shapes(L, C, F_, V):
    """docs/design.md §1's key names with shapes, written from the spec, not from the model."""
    shapes = {"decoder.model.transformer.wte.weight": (V, C)}
    for i in range(L):
        p = f"decoder.model.transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"attn.{proj}.weight"] = (C, C)
        shapes.update({p + "mlp.fc_in.weight": (F_, C), p + "mlp.fc_in.bias": (F_,),
                       p + "mlp.fc_out.weight": (C, F_), p + "mlp.fc_out.bias": (C,)})
    shapes.update({"decoder.model.transformer.ln_f.weight": (C,), "decoder.model.transformer.ln_f.bias": (C,),
                   "decoder.model.lm_head.weight": (V, C), "decoder.model.lm_head.bias": (V,)})
    return shapes


@pytest.mark.slow
def test_medium_has_the_released_size_and_key_names_and_loads_them_strictly(repo_data):
    model = build_newgpt("newgpt-medium", os.path.join(repo_data, "gpt2_bpe", "dict.txt"))
    assert len(model.decoder.dictionary) == 51200
    assert sum(p.numel() for p in model.parameters()) == 407_072_768
    shapes = released_backbone_shapes(24, 1024, 4096, 51200)
    own = model.state_dict()
    assert set(own) == set(shapes)
    assert {k: tuple(v.shape) for k, v in own.items()} == shapes
    del own
    released = {k: torch.randn(s) for k, s in shapes.items()}
    model.load_state_dict(released, strict=True)
    assert torch.equal(model.decoder.model.transformer.h[17].attn.k_proj.weight,
                       released["decoder.model.transformer.h.17.attn.k_proj.weight"])


def test_padding_row_of_wte_is_zero_and_lm_head_is_untied(small_dict):
    model = tiny(small_dict)
    net = model.decoder.model
    assert net.transformer.wte.weight[small_dict.pad()].abs().sum() == 0
    assert net.lm_head.bias is not None
    assert net.lm_head.weight.data_ptr() != net.transformer.wte.weight.data_ptr()


def test_initialisation_and_attention_are_the_releases(small_dict):
    """Every Linear and Embedding N(0, 0.02), residual projections not scaled down; no dropout on attention
    probabilities by default; q, k, v and the attention in fp32 even in a half-precision model."""
    model = build_newgpt("newgpt-small", small_dict, num_layers=4, retrieval_layer_index=2)
    net = model.decoder.model
    for name, p in net.named_parameters():
        if p.dim() == 2 and p.numel() > 10_000:
            assert abs(p.std().item() - 0.02) < 0.002, name  # scaled by 1/sqrt(2L) this would be 0.007
    assert all(newgpt_config(arch).attention_dropout == 0.0 for arch in ("newgpt-tiny", "newgpt-medium"))
    attn = net.transformer.h[0].attn.to(torch.bfloat16)
    x = torch.randn(2, 5, 768, dtype=torch.bfloat16)
    from longmem.modules.alibi import alibi_attention_bias, alibi_slopes
    pos = torch.arange(5)
    out, key, value = attn(x, alibi_attention_bias(torch.tensor(alibi_slopes(12)), pos, pos))
    assert key.dtype == value.dtype == torch.float32 and out.dtype == torch.bfloat16


def test_registered_arch_sizes():
    expected = {"newgpt-small": (768, 12, 12), "newgpt-mini": (128, 8, 4), "newgpt-medium": (1024, 24, 16),
                "newgpt-large": (1280, 36, 20), "newgpt-xl": (1600, 48, 25)}
    for arch, (C, L, H) in expected.items():
        cfg = newgpt_config(arch)
        assert (cfg.embed_dim, cfg.num_layers, cfg.num_attention_heads, cfg.ffn_embed_dim) == (C, L, H, 4 * C)
    tiny_cfg = newgpt_config("newgpt-tiny")
    assert 4 <= tiny_cfg.num_layers <= 6 and tiny_cfg.embed_dim == 256 and 4 <= tiny_cfg.num_attention_heads <= 8


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss(make_dictionary):
    dictionary = make_dictionary(30)
    model = tiny(dictionary).train()
    # a fixed random sequence repeated: learnable only by attending back
    pattern = random_tokens(dictionary, 1, 16)
    data = pattern.repeat(4, 3)  # (4, 48)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn():
        logits = model(data[:, :-1])[0]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), data[:, 1:].reshape(-1))

    with torch.no_grad():
        model.eval()
        before = loss_fn().item()
        model.train()
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss_fn().item()
    assert after < 0.5 * before


def test_clear_errors_at_build_time(small_dict, tmp_path):
    with pytest.raises(ValueError, match="unknown newgpt arch 'newgpt-huge'.*newgpt-medium"):
        build_newgpt("newgpt-huge", small_dict)
    with pytest.raises(ValueError, match=r"retrieval_layer_index=4 is out of range.*num_layers=4.*\[0, 3\]"):
        build_newgpt("newgpt-tiny", small_dict, retrieval_layer_index=4)
    with pytest.raises(ValueError, match="embed_dim=256 is not divisible by num_attention_heads=7"):
        build_newgpt("newgpt-tiny", small_dict, num_attention_heads=7)
    missing = str(tmp_path / "nowhere" / "dict.txt")
    with pytest.raises(FileNotFoundError, match="dictionary file .*nowhere/dict.txt.* does not exist"):
        build_newgpt("newgpt-tiny", missing)


def test_a_backbone_checkpoint_without_a_head_count_takes_its_archs_or_is_refused(small_dict, tmp_path):
    """No head count recorded: a registered arch (newgpt-tiny: 4 heads) gives its default, and the loaded model
    computes what the saved one did; an unregistered name is refused in one line (was: width // 64, silently)."""
    from longmem.errors import ConfigError
    from longmem.models.newgpt import NewGPTLanguageModel
    from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint

    saved = build_newgpt("newgpt-tiny", small_dict, embed_dim=64, num_layers=2, ffn_embed_dim=128,
                         retrieval_layer_index=1).eval()  # 4 heads of 16: width // 64 would say 1
    for name in ("newgpt-tiny", "newgpt-custom"):
        save_fairseq_checkpoint(tmp_path / f"{name}.pt", saved.state_dict(), cfg={"model": {"_name": name}})
    state = load_checkpoint_state(str(tmp_path / "newgpt-tiny.pt"))
    loaded = NewGPTLanguageModel.from_checkpoint_state(state, "newgpt-tiny.pt", small_dict, 1).eval()
    assert loaded.decoder.cfg.num_attention_heads == 4
    tokens = torch.randint(4, len(small_dict), (2, 12))
    torch.testing.assert_close(loaded(tokens)[0], saved(tokens)[0])
    state = load_checkpoint_state(str(tmp_path / "newgpt-custom.pt"))
    with pytest.raises(ConfigError, match="records no usable attention head count"):
        NewGPTLanguageModel.from_checkpoint_state(state, "newgpt-custom.pt", small_dict, 1)
