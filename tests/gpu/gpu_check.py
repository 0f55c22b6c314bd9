"""CUDA checks, run on a lent GPU machine by tests/gpu/run_gpu_check.sh (not part of `make test`).

    LONGMEM_CHECK_DEVICE=cuda python -m pytest -q tests/gpu/gpu_check.py     # the default device
    LONGMEM_CHECK_DEVICE=cpu  python -m pytest -q tests/gpu/gpu_check.py     # the same code on a CPU

Each check compares the device against the CPU in fp32, with the tolerance it states:
* the memory bank on the device (torch search, fp16 storage) returns the chunks the CPU bank returns;
* a LongMem forward/backward on the device, fp32 (TF32 off) and fp16, against the CPU in fp32;
* a few `fairseq-train` updates with `--use-external-memory --use-gpu-to-search` (and `--fp16`).
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = torch.device(os.environ.get("LONGMEM_CHECK_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("LONGMEM_CHECK_DEVICE=cuda but torch.cuda.is_available() is False")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("eviction", ["ring", "release"])
def test_bank_on_the_device_returns_what_the_cpu_bank_returns(eviction):
    from longmem.modules.memory_bank import ChunkedMemoryBank

    torch.manual_seed(0)
    H, d, size, c, k = 4, 16, 2048, 4, 16
    kw = dict(num_streams=2, shared=eviction == "release", backend="torch", dtype=torch.float16, eviction=eviction)
    cpu = ChunkedMemoryBank(H, d, size, c, k, device="cpu", **kw)
    dev = ChunkedMemoryBank(H, d, size, c, k, device=DEVICE, **kw)
    for _ in range(12):  # past the first evictions
        keys, values = torch.randn(2, 128, H * d), torch.randn(2, 128, H * d)
        cpu.add(keys, values)
        dev.add(keys.to(DEVICE), values.to(DEVICE))
    q = torch.randn(2, 64, H * d)
    a, b = cpu.retrieve(q), dev.retrieve(q.to(DEVICE))
    same = a.chunk_ids == b.chunk_ids.cpu()
    assert same.float().mean() > 0.999  # only near-ties of fp32 scores may swap
    rows = same.all(-1)  # (B, H, T): every chunk the same
    assert torch.equal(a.keys[rows], b.keys.cpu()[rows]) and torch.equal(a.values[rows], b.values.cpu()[rows])
    assert b.keys.dtype == torch.float16 and b.keys.device.type == DEVICE.type


@pytest.fixture
def tiny_longmem(tmp_path, FakeTask, make_dictionary, tiny_backbone_file):  # noqa: N803
    """``tiny_longmem(**cfg) -> (model, dictionary)``: a 2-layer SideNet of width 64 over a 4-layer backbone."""
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet

    def build(**kw):
        d = make_dictionary(200)
        path, _ = tiny_backbone_file(tmp_path, d, layers=4, embed=64, heads=4)
        cfg = SideNetConfig(decoder_layers=2, decoder_embed_dim=64, decoder_attention_heads=4, decoder_ffn_embed_dim=256,
                            retrieval_layer_index=2, pretrained_model_path=str(path), dropout=0.0,
                            attention_dropout=0.0, use_external_memory=True, memory_size=512, k=16, chunk_size=4,
                            memory_backend="torch", **kw)
        torch.manual_seed(1)
        return TransformerLanguageModelSideNet.build_model(cfg, FakeTask(d)), d

    return build


def run_segments(model, segments, targets):
    """Loss of each segment (memory filled by the ones before) and the gradients of the last."""
    losses = []
    for i, (src, tgt) in enumerate(zip(segments, targets)):
        model.zero_grad()
        logits = model(src)[0]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1))
        if i == len(segments) - 1:
            loss.backward()
        losses.append((logits.detach().float().cpu(), loss.item()))
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
def test_longmem_forward_backward_on_the_device_matches_the_cpu(tiny_longmem, dtype, tol):
    """fp32: logits and gradients within 1e-4 (absolute and relative) of the CPU's; fp16 (model and
    memory in half precision, attention in fp32 as released): within 3e-2."""
    torch.manual_seed(2)
    segments = [torch.randint(4, 200, (2, 32)) for _ in range(3)]
    targets = [torch.randint(4, 200, (2, 32)) for _ in range(3)]
    ref, _ = tiny_longmem(use_gpu_to_search=True)
    model, _ = tiny_longmem(use_gpu_to_search=True)
    model.load_state_dict(ref.state_dict())
    ref.train(), model.train()
    want, want_grads = run_segments(ref, segments, targets)
    model = model.to(DEVICE, dtype)
    got, got_grads = run_segments(model, [s.to(DEVICE) for s in segments], [t.to(DEVICE) for t in targets])
    assert model.memory.bank.device.type == DEVICE.type
    for (a, la), (b, lb) in zip(want, got):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        assert abs(la - lb) <= tol * max(1.0, abs(la))
    assert set(got_grads) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=tol * 10, atol=tol * 10, msg=name)


def test_fairseq_train_with_external_memory_and_gpu_search(tmp_path, synthetic_text):
    (tmp_path / "train.txt").write_text(synthetic_text(300, 1))
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source", "--trainpref",
                    str(tmp_path / "train.txt"), "--validpref", str(tmp_path / "train.txt"), "--destdir",
                    str(tmp_path / "bin"), "--workers", "1"], check=True, capture_output=True)
    common = ["--user-dir", os.path.join(REPO, "longmem"), "--tokens-per-sample", "64", "--sample-break-mode", "none",
              "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-3", "--num-workers", "0", "--log-format", "json",
              "--log-interval", "1", "--no-save-optimizer-state", "--disable-validation", "--fp16"]
    common += ["--cpu"] if DEVICE.type == "cpu" else []
    subprocess.run([sys.executable, "-m", "fairseq_cli.train", str(tmp_path / "bin"), *common, "--task",
                    "language_modeling", "--arch", "newgpt-tiny", "--embed-dim", "64", "--num-layers", "4",
                    "--num-attention-heads", "4", "--ffn-embed-dim", "256", "--max-update", "3",
                    "--save-dir", str(tmp_path / "bb")], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "fairseq_cli.train", str(tmp_path / "bin"), *common, "--task",
                           "longmem_language_modeling", "--arch", "transformer_lm_sidenet_tiny", "--decoder-layers", "2",
                           "--decoder-embed-dim", "64", "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim",
                           "256", "--pretrained-model-path", str(tmp_path / "bb" / "checkpoint_last.pt"),
                           "--retrieval-layer-index", "2", "--reload-ptm-layer", "--use-external-memory",
                           "--use-gpu-to-search", "--memory-size", "2048", "--k", "16", "--chunk-size", "4",
                           "--max-update", "6", "--save-dir", str(tmp_path / "lm")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    losses = [float(x) for x in re.findall(r'"loss": "([\d.]+)"', log)]
    assert len(losses) >= 6 and all(x == x and x < 50 for x in losses), log[-2000:]
    print(f"\nfairseq-train on {DEVICE}: losses {losses}")
