"""Levers against forgetting the backbone: --start-as-backbone and the distillation term."""
from types import SimpleNamespace

import pytest
import torch

from longmem.criterions.distillation import LongMemCrossEntropyCriterion, distillation_kl


def test_start_as_backbone_gives_the_backbones_log_probs_at_step_0_and_then_learns(make_sidenet, make_dictionary):
    d = make_dictionary(40)
    model, backbone = make_sidenet(d, use_external_memory=True, start_as_backbone=True, reload_ptm_layer=True)
    for p in model.decoder.layers.parameters():  # whatever the SideNet says, its output is gated out at step 0
        torch.nn.init.normal_(p, std=0.5)
    model.train()
    tokens = torch.randint(4, len(d), (2, 12))
    want = torch.log_softmax(backbone(tokens)[0].double(), -1)
    got = torch.log_softmax(model(tokens)[0].double(), -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert "decoder.output_gate" in model.state_dict()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(tokens)[0].flatten(0, 1), torch.randint(4, len(d), (24,)))
    loss.backward()
    assert model.decoder.output_gate.grad.abs().sum() > 0  # the gate learns first, then the SideNet through it
    opt.step()
    assert (torch.log_softmax(model(tokens)[0].double(), -1) - want).abs().max() > 1e-4
    without, _ = make_sidenet(d, use_external_memory=True)
    assert not any("output_gate" in k for k in without.state_dict())  # the release's model: no such key


def test_start_as_backbone_over_a_hugging_face_backbone(llama):
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet

    path, d = llama
    cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64,
                        retrieval_layer_index=2, pretrained_model_path=str(path), dropout=0.0, attention_dropout=0.0,
                        memory_size=16, k=4, chunk_size=2, memory_backend="torch", use_external_memory=True,
                        reload_ptm_layer=True, start_as_backbone=True)
    model = TransformerLanguageModelSideNet.build_model(cfg, SimpleNamespace(target_dictionary=d,
                                                                             source_dictionary=d)).eval()
    tokens = torch.randint(4, len(d), (1, 20))
    with torch.no_grad():
        model.memory.configure(slot="eval")
        model.memory.reset()
        got = torch.cat([model(tokens[:, i: i + 8])[0] for i in range(0, 20, 8)], dim=1)  # memory read, no effect
        want = torch.cat([model.decoder.pretrained_model(tokens[:, i: i + 8])[0] for i in range(0, 20, 8)], dim=1)
    torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(want, -1), rtol=0, atol=1e-5)


def test_distillation_kl_and_its_gradient_on_a_hand_made_example():
    """Two target tokens and a pad, a vocabulary of 3: KL(p ‖ q) = Σ p (log p - log q), its gradient with respect
    to LongMem's logits p_LongMem - p_backbone on each kept token, nothing from the pad."""
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, 1.0, 0.0]], requires_grad=True)
    backbone = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 9.0]])
    keep = torch.tensor([True, True, False])
    kl = distillation_kl(torch.log_softmax(logits, -1), backbone, keep)
    p = torch.softmax(backbone, -1)
    q = torch.softmax(logits.detach(), -1)
    by_hand = sum(float((p[i] * (p[i].log() - q[i].log())).sum()) for i in (0, 1))
    assert abs(float(kl) - by_hand) < 1e-6
    kl.backward()
    torch.testing.assert_close(logits.grad[:2], q[:2] - p[:2], rtol=0, atol=1e-6)
    assert torch.equal(logits.grad[2], torch.zeros(3))
    same = distillation_kl(torch.log_softmax(backbone, -1), backbone, keep)
    assert abs(float(same)) < 1e-6  # a model that predicts what its backbone predicts: no term


def test_the_criterion_adds_the_weighted_term_and_is_zero_for_a_model_that_starts_as_its_backbone(make_sidenet,
                                                                                                  make_dictionary):
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=False, start_as_backbone=True)
    task = SimpleNamespace(target_dictionary=d, source_dictionary=d)
    tokens = torch.randint(4, len(d), (2, 10))
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([10, 10])},
              "target": torch.randint(4, len(d), (2, 10)), "ntokens": 20}
    plain = LongMemCrossEntropyCriterion(task, sentence_avg=False)
    distil = LongMemCrossEntropyCriterion(task, sentence_avg=False, distill_weight=0.5)
    loss0, _, log0 = plain(model, sample)
    loss1, _, log1 = distil(model, sample)
    assert abs(float(log1["kl"])) < 1e-4 and abs(float(loss1) - float(loss0)) < 1e-3
    with torch.no_grad():
        model.decoder.output_gate.fill_(1.0)  # now LongMem differs from its backbone
    loss0, _, _ = plain(model, sample)
    loss1, _, log1 = distil(model, sample)
    assert float(log1["kl"]) > 0.01 and abs(float(loss1) - float(loss0) - 0.5 * float(log1["kl"])) < 1e-3
    with pytest.raises(Exception, match="distill-weight"):
        LongMemCrossEntropyCriterion(task, sentence_avg=False, distill_weight=float("nan"))


def test_the_output_gate_gets_its_own_learning_rate_and_no_decay(make_sidenet, make_dictionary):
    """--output-gate-lr-scale s: the output gate leaves fairseq's one group for a group of its own whose learning
    rate is s times the schedule's and whose weight decay is 0, so Adam's first step moves it by s * lr (Adam's
    first step is lr * g / |g| per coordinate) while a SideNet weight moves by lr."""
    from longmem import optim_groups
    from longmem.errors import ConfigError

    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=False, start_as_backbone=True, reload_ptm_layer=True,
                            output_gate_lr_scale=10.0)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-3
    wrapped = SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.1, eps=1e-16))
    wrapped.param_groups = wrapped.optimizer.param_groups
    optim_groups.split(wrapped)
    gate = model.decoder.output_gate
    own = [g for g in wrapped.param_groups if any(p is gate for p in g["params"])]
    assert len(own) == 1 and own[0]["params"] == [gate] and own[0]["weight_decay"] == 0.0
    assert own[0]["lr"] == pytest.approx(10 * lr) and wrapped.param_groups[0]["lr"] == pytest.approx(lr)
    tokens = torch.randint(4, len(d), (2, 12))
    # the gate starts at 0, so the SideNet's weights get no gradient yet: nudge the gate to see both move
    with torch.no_grad():
        gate.fill_(0.5)
    before = {id(p): p.detach().clone() for p in params}
    torch.nn.functional.cross_entropy(model(tokens)[0].flatten(0, 1), torch.randint(4, len(d), (24,))).backward()
    wrapped.optimizer.step()
    moved = (gate.detach() - before[id(gate)]).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 10 * lr), rtol=1e-4, atol=0)
    weight = next(p for p in model.decoder.layers.parameters() if p.dim() == 2)
    step = (weight.detach() - before[id(weight)] * (1 - lr * 0.1)).abs()  # decoupled decay, then lr * sign
    assert float(step[step > 0].max()) == pytest.approx(lr, rel=1e-3)
    with pytest.raises(ConfigError, match="--output-gate-lr-scale must be in"):
        make_sidenet(d, use_external_memory=False, start_as_backbone=True, output_gate_lr_scale=float("inf"))


def test_distill_on_backbone_better_leaves_out_the_tokens_longmem_predicts_better():
    """Two tokens, a vocabulary of 3. Token 0: the backbone gives its target 0.5, LongMem less: kept, its KL and
    gradient as with every token kept. Token 1: LongMem gives its target more than the backbone (a recalled token):
    left out, no term and no gradient, where the plain term would pull LongMem back toward the backbone."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    backbone = torch.tensor([[0.0, -9.0, 0.0], [1.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1])
    keep = torch.tensor([True, True])
    p, q = torch.softmax(backbone, -1), torch.softmax(logits.detach(), -1)
    assert p[0, 0] > q[0, 0] and q[1, 1] > p[1, 1]  # the example is what the docstring says
    kl = distillation_kl(torch.log_softmax(logits, -1), backbone, keep, targets)
    assert abs(float(kl) - float((p[0] * (p[0].log() - q[0].log())).sum())) < 1e-6
    kl.backward()
    torch.testing.assert_close(logits.grad[0], q[0] - p[0], rtol=0, atol=1e-6)
    assert torch.equal(logits.grad[1], torch.zeros(3))
    both = distillation_kl(torch.log_softmax(logits.detach(), -1), backbone, keep)
    assert float(both) > float(kl) + 0.1  # with every token kept, token 1 counts too
    from longmem.errors import ConfigError

    with pytest.raises(ConfigError, match="--distill-on must be one of all, backbone-better"):
        LongMemCrossEntropyCriterion(SimpleNamespace(target_dictionary=None), False, 1.0, distill_on="recalled")


def test_distill_on_marked_keeps_every_token_of_a_marked_document_and_the_backbone_better_ones_elsewhere():
    """The example above: token 1 is one LongMem predicts better. In a marked document (a broad piece) it is kept,
    its gradient q - p as with every token kept; unmarked, it is left out as with backbone-better."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    backbone = torch.tensor([[0.0, -9.0, 0.0], [1.0, 0.0, 1.0]])
    targets, keep = torch.tensor([0, 1]), torch.tensor([True, True])
    p, q = torch.softmax(backbone, -1), torch.softmax(logits.detach(), -1)
    per_token = [float((p[i] * (p[i].log() - q[i].log())).sum()) for i in (0, 1)]
    marked = distillation_kl(torch.log_softmax(logits, -1), backbone, keep, targets, torch.tensor([False, True]))
    assert abs(float(marked) - sum(per_token)) < 1e-6
    marked.backward()
    torch.testing.assert_close(logits.grad, q - p, rtol=0, atol=1e-6)
    unmarked = distillation_kl(torch.log_softmax(logits.detach(), -1), backbone, keep, targets,
                               torch.tensor([False, False]))
    assert abs(float(unmarked) - per_token[0]) < 1e-6
    padded = distillation_kl(torch.log_softmax(logits.detach(), -1), backbone, torch.tensor([True, False]), targets,
                             torch.tensor([True, True]))
    assert abs(float(padded) - per_token[0]) < 1e-6  # a mark never brings a pad back


def test_the_criterion_reads_the_samples_marks_and_refuses_training_without_them(make_sidenet, make_dictionary):
    """--distill-on marked over a whole model: every position marked gives the term of --distill-on all, none marked
    that of backbone-better, half marked their sum over the halves; training without marks is refused, validation
    counts no document as marked."""
    from longmem.errors import ConfigError

    torch.manual_seed(0)
    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=False)
    with torch.no_grad():  # a SideNet far from its backbone, so that the choices of tokens differ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    task = SimpleNamespace(target_dictionary=d, source_dictionary=d)
    tokens = torch.randint(4, len(d), (2, 10))
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([10, 10])},
              "target": torch.randint(4, len(d), (2, 10)), "ntokens": 20}
    crit = {on: LongMemCrossEntropyCriterion(task, False, 1.0, distill_on=on) for on in ("all", "backbone-better",
                                                                                      "marked")}
    kl = lambda on, s: float(crit[on](model, s)[2]["kl"])  # noqa: E731
    model.eval()
    every, better = kl("all", sample), kl("backbone-better", sample)
    assert every > better + 0.1  # the example leaves some tokens out of backbone-better
    assert abs(kl("marked", {**sample, "marked": torch.ones(2, 10, dtype=torch.bool)}) - every) < 1e-4
    assert abs(kl("marked", {**sample, "marked": torch.zeros(2, 10, dtype=torch.bool)}) - better) < 1e-4
    assert abs(kl("marked", sample) - better) < 1e-4  # validation without a .marks file
    rows = torch.tensor([[True], [False]]).expand(2, 10)
    halves = [{**sample, "target": sample["target"].masked_fill(~m, d.pad())} for m in (rows, ~rows)]
    assert abs(kl("marked", {**sample, "marked": rows}) - kl("all", halves[0]) - kl("backbone-better", halves[1])) < 1e-4
    model.train()
    with pytest.raises(ConfigError, match=r"--distill-on marked needs the training split's \.marks file"):
        crit["marked"](model, sample)


def test_mixing_with_the_backbone_gives_the_mixture_of_both_distributions_by_hand(make_sidenet, make_dictionary):
    """--mix-with-backbone: p = (1 - λ) p_backbone + λ p_SideNet, p_backbone the backbone model's own softmax and
    p_SideNet that of the same SideNet without the mixture (the release's output); λ = σ(b) (constant) or
    σ(b + w·[LN(x_n), H(p_SideNet), H(p_backbone), max log p_SideNet, max log p_backbone]) (token)."""
    d = make_dictionary(40)
    tokens = torch.randint(4, len(d), (2, 10))
    plain, backbone = make_sidenet(d, use_external_memory=False)
    for p in plain.decoder.layers.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        p_side = torch.softmax(plain(tokens)[0].double(), -1)
        p_bb = torch.softmax(backbone(tokens)[0].double(), -1)
        features = plain(tokens, features_only=True)[0].double()
    for mode in ("constant", "token"):
        mixed, _ = make_sidenet(d, use_external_memory=False, mix_with_backbone=mode, mix_gate_init=0.4)
        mixed.load_state_dict(plain.state_dict())  # the same SideNet; the gate keys filled in at their start
        with torch.no_grad():
            mixed.decoder.mix_bias.fill_(0.4)
            logit = torch.full((2, 10), 0.4, dtype=torch.double)
            if mode == "token":
                w = torch.randn(1, 36)
                mixed.decoder.mix_gate.weight.copy_(w)
                entropy = [-(p * p.log()).sum(-1) for p in (p_side, p_bb)]
                top = [p.max(-1).values.log() for p in (p_side, p_bb)]
                inputs = torch.cat([features, torch.stack([*entropy, *top], -1)], -1)
                logit = logit + inputs @ w.double()[0]
            lam = torch.sigmoid(logit).unsqueeze(-1)
            want = (1 - lam) * p_bb + lam * p_side
            got = torch.softmax(mixed(tokens)[0].double(), -1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert mode == "constant" or float(logit.std()) > 0.1  # the token gate did vary


def test_the_mixtures_gate_trains_alone_with_the_gradient_of_its_loss_by_hand(make_sidenet, make_dictionary):
    """-log((1 - σ(a)) p_b + σ(a) p_s) has derivative -σ(a)(1 - σ(a))(p_s - p_b) / p with respect to a: on a
    2-token example, the bias's gradient is the sum of that over the tokens; with --train-mix-gate-only nothing else
    of the model trains, and a checkpoint without a gate loads with the gate's starting value."""
    from longmem.errors import ConfigError

    d = make_dictionary(40)
    model, _ = make_sidenet(d, use_external_memory=True, mix_with_backbone="constant", mix_gate_init=-0.3,
                            train_mix_gate_only=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["decoder.mix_bias"]
    side = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    bb = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2])
    lp = model.decoder.mix_log_probs(side, bb, torch.zeros(2, 32))
    (-lp.gather(-1, targets[:, None]).sum()).backward()
    s = torch.sigmoid(torch.tensor(-0.3))
    ps = torch.softmax(side, -1)[[0, 1], targets]
    pb = torch.softmax(bb, -1)[[0, 1], targets]
    by_hand = (-s * (1 - s) * (ps - pb) / ((1 - s) * pb + s * ps)).sum()
    assert abs(float(model.decoder.mix_bias.grad) - float(by_hand)) < 1e-6
    plain, _ = make_sidenet(d, use_external_memory=True)
    fresh, _ = make_sidenet(d, use_external_memory=True, mix_with_backbone="token", mix_gate_init=1.5)
    fresh.load_state_dict(plain.state_dict())  # strict: the upgrade fills the gate in
    assert float(fresh.decoder.mix_bias) == 1.5 and float(fresh.decoder.mix_gate.weight.abs().sum()) == 0
    with pytest.raises(ConfigError, match="--train-mix-gate-only trains the gate of --mix-with-backbone"):
        make_sidenet(d, train_mix_gate_only=True)
    with pytest.raises(ConfigError, match="choose one"):
        make_sidenet(d, mix_with_backbone="token", start_as_backbone=True)


def test_a_checkpoint_from_before_the_mixture_loads_with_it_as_an_override(make_sidenet, make_dictionary, tmp_path):
    """fairseq overrides only the keys a checkpoint records: a checkpoint written before --mix-with-backbone
    existed gets the option (and nothing that is not an option of its model) when loaded with it as an override,
    and the model built from that config mixes."""
    import dataclasses

    from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint

    d = make_dictionary(20)
    plain, _ = make_sidenet(d, use_external_memory=False)
    old = {k: v for k, v in dataclasses.asdict(plain.decoder.cfg).items() if not k.startswith(("mix_", "train_mix"))}
    old["_name"] = "transformer_lm_sidenet"
    save_fairseq_checkpoint(tmp_path / "old.pt", plain.state_dict(), cfg={"model": old, "task": {"_name": "x"}})
    state = load_checkpoint_state(str(tmp_path / "old.pt"), {"mix_with_backbone": "constant", "no_such_option": 1})
    model_cfg = state["cfg"]["model"]
    assert model_cfg["mix_with_backbone"] == "constant" and "no_such_option" not in model_cfg
    assert "mix_gate_init" not in model_cfg  # only what was asked for: the model's default fills the rest
    assert "mix_with_backbone" not in load_checkpoint_state(str(tmp_path / "old.pt"))["cfg"]["model"]
    mixed, _ = make_sidenet(d, use_external_memory=False, mix_with_backbone=model_cfg["mix_with_backbone"])
    mixed.load_state_dict(state["model"])
    tokens = torch.randint(4, len(d), (1, 6))
    with torch.no_grad():
        assert mixed.decoder.mix_mode == "constant"
        p = 0.5 * torch.softmax(plain.eval()(tokens)[0].double(), -1)  # λ = σ(0)
        p += 0.5 * torch.softmax(plain.decoder.lm_head(plain(tokens)[1]["backbone_features"]).double(), -1)
        torch.testing.assert_close(torch.softmax(mixed.eval()(tokens)[0].double(), -1), p, rtol=0, atol=1e-5)


def test_set_mixture_writes_a_checkpoint_whose_output_is_the_fixed_mixture(make_sidenet, make_dictionary, tmp_path):
    """``longmem-set-mixture IN OUT --lambda 0.7``: the copy loads strictly into a constant-mixture model whose output
    is 0.3·p_backbone + 0.7·p_SideNet of IN's weights, by hand; a per-token gate's weights are dropped for the
    constant one; bad λ and a checkpoint that is not LongMem are clear errors."""
    import dataclasses

    from longmem.commands.set_mixture import mixed_log_probs, run as set_mixture
    from longmem.errors import ConfigError
    from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint

    d = make_dictionary(20)
    plain, _ = make_sidenet(d, use_external_memory=False, mix_with_backbone="token")
    for p in plain.decoder.layers.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(plain.decoder.mix_gate.weight, std=0.3)
    cfg = {**dataclasses.asdict(plain.decoder.cfg), "_name": "transformer_lm_sidenet"}
    save_fairseq_checkpoint(tmp_path / "in.pt", plain.state_dict(), cfg={"model": cfg, "task": {"_name": "x"}})
    set_mixture([str(tmp_path / "in.pt"), str(tmp_path / "out" / "mixed.pt"), "--lambda", "0.7"])
    state = load_checkpoint_state(str(tmp_path / "out" / "mixed.pt"))
    model_cfg = state["cfg"]["model"]
    assert model_cfg["mix_with_backbone"] == "constant" and "decoder.mix_gate.weight" not in state["model"]
    mixed, _ = make_sidenet(d, use_external_memory=False, mix_with_backbone="constant",
                            mix_gate_init=model_cfg["mix_gate_init"])
    mixed.load_state_dict(state["model"])  # strict
    tokens = torch.randint(4, len(d), (1, 7))
    plain.eval(), mixed.eval()
    with torch.no_grad():
        features, extra = plain.decoder(tokens, features_only=True)
        side, backbone = (torch.softmax(plain.decoder.lm_head(f).double(), -1)
                          for f in (features[..., :32], extra["backbone_features"]))
        torch.testing.assert_close(torch.softmax(mixed(tokens)[0].double(), -1), 0.3 * backbone + 0.7 * side,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(mixed_log_probs(side.log(), backbone.log(), 0.7), (0.3 * backbone + 0.7 * side).log())
    for bad, message in (("1", "strictly between 0"), ("0", "strictly between 0"), ("1e-12", "too close")):
        with pytest.raises(ConfigError, match=message):
            set_mixture([str(tmp_path / "in.pt"), str(tmp_path / "bad.pt"), "--lambda", bad])
    save_fairseq_checkpoint(tmp_path / "bb.pt", {}, cfg={"model": {"_name": "newgpt-tiny"}})
    with pytest.raises(ConfigError, match="not a LongMem checkpoint"):
        set_mixture([str(tmp_path / "bb.pt"), str(tmp_path / "bad.pt"), "--lambda", "0.5"])
    assert not (tmp_path / "bad.pt").exists()


def test_memory_evidence_is_the_log_odds_of_memory_in_one_joint_softmax_by_hand():
    """Per head e = log Σ_k exp(q̃·K̃_k/√d) - log Σ_s exp(q·K_s/√d + bias_s) over the slots that exist and the local
    keys the mask lets through; z = Σ σ(g_h) e_h / Σ σ(g_h) over the heads with a slot; a token with none: absent."""
    import math

    from longmem.modules.joint_attention import memory_evidence

    torch.manual_seed(0)
    H, T, d, k = 3, 4, 5, 3
    q_local, q_memory = torch.randn(1, H, T, d), torch.randn(1, H, T, d)
    keys, mem_keys = torch.randn(1, H, T, d), torch.randn(1, H, T, k, d)
    bias = torch.randn(1, H, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    mask = torch.rand(1, H, T, k) > 0.3
    mask[0, :, 0] = False  # token 0: no slot in any head
    mask[0, 0, 1] = False  # token 1: none in head 0 only
    mask[0, 1:, 1, 0] = True
    g = torch.randn(H)
    z, present = memory_evidence(q_local, q_memory, keys, bias, mem_keys, mask, g)
    for t in range(T):
        num = den = 0.0
        for h in range(H):
            slots = [j for j in range(k) if mask[0, h, t, j]]
            if not slots:
                continue
            local = [float(q_local[0, h, t] @ keys[0, h, s]) / math.sqrt(d) + float(bias[0, h, t, s]) for s in range(t + 1)]
            memory = [float(q_memory[0, h, t] @ mem_keys[0, h, t, j]) / math.sqrt(d) for j in slots]
            e = math.log(sum(math.exp(x) for x in memory)) - math.log(sum(math.exp(x) for x in local))
            w = 1 / (1 + math.exp(-float(g[h])))
            num, den = num + w * e, den + w
        assert float(present[0, t]) == float(den > 0)
        assert abs(float(z[0, t]) - (num / den if den else 0.0)) < 1e-5


def test_the_mixture_that_reads_memory_sets_lambda_from_the_memory_layers_evidence(make_sidenet, make_dictionary):
    """--mix-with-backbone memory: λ_t = σ(b + s·(z_t - c)) with z_t the evidence the memory layer computed, where the
    token read memory; σ(b), the constant mixture's, where it read none (an empty memory, memory off)."""
    d = make_dictionary(40)
    b, slope, center = 0.4, 1.5, 0.3
    model, _ = make_sidenet(d, use_external_memory=True, mix_with_backbone="memory", mix_gate_init=b,
                            mix_memory_slope=slope, mix_memory_center=center)
    for p in model.decoder.layers.parameters():
        torch.nn.init.normal_(p, std=0.3)
    constant, _ = make_sidenet(d, use_external_memory=True, mix_with_backbone="constant", mix_gate_init=b)
    constant.load_state_dict(model.state_dict())
    model.eval(), constant.eval()
    attention = model.decoder.layers[model.decoder.memory_layer_index].self_attn
    segments = torch.randint(4, len(d), (2, 1, 12))

    def forward(m, tokens):
        features, extra = m.decoder(tokens, features_only=True)
        side, backbone = (torch.softmax(m.decoder.lm_head(f).double(), -1)
                          for f in (features[..., :32], extra["backbone_features"]))
        return torch.softmax(m.decoder.output_layer(features).double(), -1), side, backbone

    with torch.no_grad():
        model.memory.reset(), constant.memory.reset()
        first, _, _ = forward(model, segments[0])  # memory empty: no token reads it
        assert attention.last_evidence is None or not attention.last_evidence[1].any()
        torch.testing.assert_close(first, forward(constant, segments[0])[0], rtol=0, atol=1e-6)
        got, side, backbone = forward(model, segments[1])  # reads the first segment
        z, present = attention.last_evidence
        assert present.all()
        lam = torch.sigmoid(b + slope * (z.double() - center)).unsqueeze(-1)
        assert float(lam.std()) > 0.02  # λ does move with the evidence
        torch.testing.assert_close(got, (1 - lam) * backbone + lam * side, rtol=0, atol=1e-5)
        with model.memory.configured(enabled=False), constant.memory.configured(enabled=False):
            torch.testing.assert_close(forward(model, segments[1])[0], forward(constant, segments[1])[0],
                                       rtol=0, atol=1e-6)
        assert attention.last_evidence is None  # memory off: the layer read nothing


def test_set_mixture_with_a_memory_rule(make_sidenet, make_dictionary, tmp_path):
    """``--memory-slope S --memory-center C``: the copy's config is the mixture that reads memory with that rule,
    the gate's b = logit(λ); a model without a memory layer, or one of the two flags alone, is a clear error."""
    import dataclasses
    import math

    from longmem.commands.set_mixture import run as set_mixture
    from longmem.errors import ConfigError
    from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint

    d = make_dictionary(20)
    for memory in (True, False):
        model, _ = make_sidenet(d, use_external_memory=memory)
        cfg = {**dataclasses.asdict(model.decoder.cfg), "_name": "transformer_lm_sidenet"}
        save_fairseq_checkpoint(tmp_path / f"in{memory}.pt", model.state_dict(), cfg={"model": cfg, "task": {"_name": "x"}})
    args = [str(tmp_path / "inTrue.pt"), str(tmp_path / "out.pt"), "--lambda", "0.7"]
    set_mixture(args + ["--memory-slope", "1.5", "--memory-center", "2"])
    state = load_checkpoint_state(str(tmp_path / "out.pt"))
    cfg = state["cfg"]["model"]
    assert (cfg["mix_with_backbone"], cfg["mix_memory_slope"], cfg["mix_memory_center"]) == ("memory", 1.5, 2.0)
    assert abs(float(state["model"]["decoder.mix_bias"]) - math.log(0.7 / 0.3)) < 1e-6
    loaded, _ = make_sidenet(d, use_external_memory=True, **{k: cfg[k] for k in (
        "mix_with_backbone", "mix_gate_init", "mix_memory_slope", "mix_memory_center")})
    loaded.load_state_dict(state["model"])  # strict
    assert loaded.decoder.mix_memory == (1.5, 2.0)
    with pytest.raises(ConfigError, match="has no memory layer"):
        set_mixture([str(tmp_path / "inFalse.pt"), str(tmp_path / "bad.pt"), "--lambda", "0.7", "--memory-slope", "1",
                     "--memory-center", "2"])
    with pytest.raises(SystemExit):
        set_mixture(args + ["--memory-slope", "1"])


def test_average_checkpoints_writes_the_mean_of_the_sidenets_and_refuses_another_backbone(make_sidenet, make_dictionary,
                                                                                          tmp_path):
    """``longmem-average-checkpoints OUT A B C``: every SideNet weight is the mean of the three inputs' (by hand, in
    float64), the frozen backbone is the inputs' bit for bit, the copy loads strictly, holds the last input's config
    and update count and records its inputs; one input, an input named twice, another backbone, other shapes and a
    checkpoint that is not LongMem are one-line errors that write nothing."""
    import dataclasses

    from longmem.commands.average_checkpoints import run as average
    from longmem.errors import ConfigError
    from longmem.utils.checkpoints import load_checkpoint_state, save_fairseq_checkpoint

    d = make_dictionary(20)
    model, _ = make_sidenet(d, use_external_memory=True)
    cfg = {**dataclasses.asdict(model.decoder.cfg), "_name": "transformer_lm_sidenet"}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    side = [k for k, v in base.items() if v.is_floating_point() and not k.startswith("decoder.pretrained_model.")]
    assert side and any(k.startswith("decoder.layers.") for k in side)
    inputs = []
    for i, updates in enumerate((100, 200, 300)):
        state = {k: v + torch.randn_like(v) if k in side else v.clone() for k, v in base.items()}
        path = tmp_path / f"checkpoint_1_{updates}.pt"
        save_fairseq_checkpoint(path, state, cfg={"model": {**cfg, "seed_note": i}, "task": {"_name": "x"}})
        raw = torch.load(path, weights_only=False)
        raw["optimizer_history"][-1]["num_updates"] = updates
        torch.save(raw, path)
        inputs.append((path, state))
    average([str(tmp_path / "avg.pt"), *(str(p) for p, _ in inputs)])
    got = load_checkpoint_state(str(tmp_path / "avg.pt"))
    for key, value in base.items():
        if key in side:
            want = sum(s[key].double() for _, s in inputs) / 3
            torch.testing.assert_close(got["model"][key].double(), want, rtol=0, atol=1e-6)
            assert got["model"][key].dtype == value.dtype
        else:
            assert torch.equal(got["model"][key], value), key
    assert got["cfg"]["model"]["seed_note"] == 2 and got["optimizer_history"][-1]["num_updates"] == 300
    assert [e["num_updates"] for e in got["extra_state"]["averaged_from"]] == [100, 200, 300]
    assert got["last_optimizer_state"] is None
    fresh, _ = make_sidenet(d, use_external_memory=True)
    fresh.load_state_dict(got["model"])  # strict

    (a, state_a), (b, _), _ = inputs
    other = {k: v.clone() for k, v in state_a.items()}
    frozen = next(k for k in other if k.startswith("decoder.pretrained_model.") and other[k].is_floating_point())
    other[frozen] += 1e-3
    save_fairseq_checkpoint(tmp_path / "other_backbone.pt", other, cfg={"model": cfg, "task": {"_name": "x"}})
    wider = dict(state_a, **{side[0]: torch.zeros(*state_a[side[0]].shape[:-1], state_a[side[0]].shape[-1] + 1)})
    save_fairseq_checkpoint(tmp_path / "wider.pt", wider, cfg={"model": cfg, "task": {"_name": "x"}})
    save_fairseq_checkpoint(tmp_path / "bb.pt", {}, cfg={"model": {"_name": "newgpt-tiny"}})
    for args, message in (([a], "at least two"), ([a, a], "named twice"),
                          ([a, tmp_path / "other_backbone.pt"], "frozen backbone"),
                          ([a, tmp_path / "wider.pt"], side[0]), ([a, tmp_path / "bb.pt"], "not a LongMem")):
        with pytest.raises(ConfigError, match=message):
            average([str(tmp_path / "bad.pt"), *map(str, args)])
    assert not (tmp_path / "bad.pt").exists()
