"""--precision: bf16 on a CPU that has it natively, fp32 elsewhere; the checkpoint stays fp32."""
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from longmem import precision
from longmem.errors import ConfigError

NATIVE = precision.native_bf16()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolution_follows_the_hardware_and_says_so(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert precision.resolve("fp32", cpu) is None
    with pytest.raises(ConfigError, match="choose one of fp32, bf16, auto"):
        precision.resolve("fp16", cpu)
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="longmem.precision"):
        assert precision.resolve("bf16", cpu) is None and precision.resolve("auto", cpu) is None
    assert caplog.text.count("torch would emulate it slower than fp32: running in fp32") == 2
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="longmem.precision"):
        assert precision.resolve("bf16", cpu) is torch.bfloat16 and precision.resolve("auto", cpu) is torch.bfloat16
        assert precision.resolve("bf16", torch.device("cuda")) is None  # a GPU run uses fairseq's --fp16
    assert caplog.text.count("bf16 on this CPU (native)") == 2 and "use fairseq's --fp16" in caplog.text


def _step(model, tokens):
    """Summed NLL of a training forward, and the gradients of the trained parameters."""
    model.train()
    model.zero_grad()
    logits = model(tokens[:, :-1])[0]
    loss = F.nll_loss(F.log_softmax(logits.float(), -1).flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not NATIVE, reason="needs a CPU with native bf16 (AVX-512 BF16 or AMX)")
def test_bf16_training_steps_match_fp32_and_the_weights_stay_fp32(make_sidenet, make_dictionary):
    """Same weights, same 4 segments with memory: the summed NLL within 0.2%, every parameter's gradient at
    cosine > 0.98 to fp32's and all of them together within 5% (norm of the difference). (A tensor's
    largest entry is no yardstick: the gate's gradient sums (memory - local)·dL/dout over tokens and
    cancels to ~1e-4, where bf16's rounding of the backbone's states moves it by as much.) the backbone's weights, the master weights and the state dict stay fp32, the
    bf16 backbone is a copy outside the state dict, and memory stores bf16."""
    d = make_dictionary(60)
    fp32, backbone = make_sidenet(d, use_external_memory=True, precision="fp32")
    bf16, _ = make_sidenet(d, use_external_memory=True, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.decoder.autocast_dtype is torch.bfloat16 and fp32.decoder.autocast_dtype is None
    g = torch.Generator().manual_seed(5)
    for i in range(4):
        tokens = torch.randint(4, len(d), (2, 17), generator=g)
        (loss32, grads32), (loss16, grads16) = _step(fp32, tokens), _step(bf16, tokens)
        assert loss16 == pytest.approx(loss32, rel=2e-3), i
        assert grads16.keys() == grads32.keys()
        for name, g32 in grads32.items():
            cosine = F.cosine_similarity(grads16[name].flatten(), g32.flatten(), dim=0)
            assert cosine > 0.98, (i, name, cosine)
        flat32 = torch.cat([g.flatten() for g in grads32.values()])
        flat16 = torch.cat([grads16[n].flatten() for n in grads32])
        assert (flat16 - flat32).norm() <= 0.05 * flat32.norm(), i
    assert "decoder.layers.1.self_attn.memory_bias" in grads32  # memory was read
    assert bf16.decoder.memory.bank.dtype == torch.bfloat16 and fp32.decoder.memory.bank.dtype == torch.float32
    state = bf16.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    for name, p in backbone.state_dict().items():
        assert torch.equal(state[f"decoder.pretrained_model.{name}"], p), name  # unchanged, unconverted
    assert not any("bf16" in name for name in state)


@pytest.mark.skipif(not NATIVE, reason="needs a CPU with native bf16 (AVX-512 BF16 or AMX)")
def test_the_bf16_copy_follows_weights_loaded_later(make_sidenet, make_dictionary):
    """A checkpoint loaded after a bf16 forward replaces the backbone's weights: the next forward uses them."""
    d = make_dictionary(60)
    model, _ = make_sidenet(d, precision="bf16")
    other, _ = make_sidenet(d, precision="bf16")
    with torch.no_grad():
        for p in other.decoder.pretrained_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(4, len(d), (2, 9))
    model.eval(), other.eval()
    with torch.no_grad():
        model(tokens)  # builds the bf16 copy of the first weights
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(tokens)[0], other(tokens)[0], rtol=0, atol=0)


def test_fp32_after_bf16_is_plain_fp32(make_sidenet, make_dictionary):
    """``set_precision('fp32')`` (what a bf16 checkpoint evaluated in fp32 gets) computes what an fp32 model
    computes, bit for bit."""
    d = make_dictionary(60)
    a, _ = make_sidenet(d, precision="auto")
    b, _ = make_sidenet(d, precision="fp32")
    b.load_state_dict(a.state_dict())
    a.decoder.set_precision("fp32")
    tokens = torch.randint(4, len(d), (2, 9))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(tokens)[0], b(tokens)[0])


_RSS_AFTER_FREE = """
import os, sys, torch
from longmem import precision
kept = precision.keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
x = torch.ones(64 * 2 ** 20)  # 256 MiB, touched
before_free = rss()
del x
print(kept, (before_free - rss()) / 2 ** 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_building_a_model_keeps_freed_memory_for_reuse_unless_told_not_to(run_cli):
    """What mallopt changes, seen from outside: a freed 256 MiB block stays in the process (reused by the
    next step) instead of going back to the kernel; LONGMEM_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    returned = {}
    for setting in ("1", "0"):
        env = dict(os.environ, LONGMEM_KEEP_FREED_MEMORY=setting)
        out = run_cli("-c", _RSS_AFTER_FREE, env=env, ok=True).stdout.split()
        returned[setting] = (out[0], float(out[1]))
    assert returned["1"][0] == "True" and returned["1"][1] < 16  # MiB given back: none of the block
    assert returned["0"][0] == "False" and returned["0"][1] > 240  # the whole block given back
