"""Opt-in: this project's LongMem against the release's own model and memory code, number for number.

Set ``LONGMEM_RELEASE_SRC`` to a checkout of the authors' repository (GitHub ``Victorwz/LongMem``; the
folder holding ``fairseq/fairseq/``) and run ``pytest tests/test_release_parity.py``. Without it every
test here is skipped, so CI and a bare clone need nothing outside this repository.

The release's files are imported as they are, on stock fairseq 0.12, with the fewest shims (written
here): its fairseq-fork modules are made importable under their fork names while they load; its
``load_model_ensemble`` call returns a release backbone built in memory; its GPU memory path runs on the
CPU (``torch.cuda.current_device()`` gives ``"cpu"``, faiss's GPU copies return the CPU index itself) with
its arithmetic untouched, fp16 storage included. Both models share one set of weights (strict loads both
ways) and read the same tokens: a tiny config (backbone 6 x 64, SideNet 3 layers, retrieval layer 3,
memory 256 tokens, chunk 4, k 8, 2 rows x 32 tokens, 8 segments, so the release's eviction runs at the
4th, 6th and 8th add), this project's ``--memory-mode release``.
"""
import contextlib
import importlib
import importlib.util
import os
import sys
import types
from argparse import Namespace
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F


SRC = os.environ.get("LONGMEM_RELEASE_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="opt-in: set LONGMEM_RELEASE_SRC to the release's checkout "
                                                "(GitHub Victorwz/LongMem) to compare with its own code")

VOCAB, EMBED, HEADS, BACKBONE_LAYERS, FFN = 96, 64, 4, 6, 256
SIDENET_LAYERS, RETRIEVAL_LAYER, REDUCTION = 3, 3, 2
MEMORY, CHUNK, K = 256, 4, 8
ROWS, TOKENS, SEGMENTS = 2, 32, 8
PREFIX = "_longmem_release"


# ------------------------------------------------------------------------------------------ the shims
class _CpuCuda:
    """``torch.cuda`` as the release's memory module uses it: only ``current_device()``, here the CPU."""

    @staticmethod
    def current_device():
        return "cpu"


class _TorchOnCpu(types.ModuleType):
    """``torch`` for the release's memory module, with ``torch.cuda`` answered by ``_CpuCuda``."""

    cuda = _CpuCuda

    def __getattr__(self, name):
        return getattr(torch, name)


class _FaissCpuAsGpu(types.ModuleType):
    """``faiss`` for the release's memory module: the GPU resources are a placeholder and copying an index
    to or from "the GPU" returns the CPU index itself; everything else is faiss-cpu."""

    def __init__(self, faiss):
        super().__init__("faiss")
        self._faiss = faiss
        self.StandardGpuResources = object
        self.index_cpu_to_gpu = lambda resources, device, index, *options: index
        self.index_gpu_to_cpu = lambda index: index

    def __getattr__(self, name):
        return getattr(self._faiss, name)


def _package(name, folder):
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
    return module


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _fork_names(**modules):
    """While the release's files load: its fork's module names (``fairseq.modules.<name>``...) point at the
    release's modules loaded here, and fairseq's registries accept the release's second ``newgpt``."""
    import fairseq.models

    saved = {name: sys.modules.get(name) for name in modules}
    registry = fairseq.models.register_model, fairseq.models.register_model_architecture
    fairseq.models.register_model = lambda name, dataclass=None: (lambda cls: cls)
    fairseq.models.register_model_architecture = lambda model, arch: (lambda fn: fn)
    try:
        yield modules
    finally:
        fairseq.models.register_model, fairseq.models.register_model_architecture = registry
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextlib.contextmanager
def _python38_dataclasses():
    """The release's config takes dataclass instances as field defaults (``decoder: DecoderConfig =
    DecoderConfig()``), which Python 3.8 allowed and 3.11 refuses as mutable: while it loads, its dataclasses
    are made hashable so 3.11 accepts them as 3.8 did (the defaults are shared objects, as they were)."""
    import dataclasses

    plain = dataclasses.dataclass

    def dataclass(cls=None, **options):
        options.setdefault("unsafe_hash", True)
        return plain(**options) if cls is None else plain(cls, **options)

    dataclasses.dataclass = dataclass
    try:
        yield
    finally:
        dataclasses.dataclass = plain


def _transformers_gaps():
    """The release's ``modeling_newgpt`` imports ``transformers.utils.model_parallel_utils`` (gone from
    recent transformers; only its model-parallel methods use it): a stand-in when it is missing."""
    try:
        importlib.import_module("transformers.utils.model_parallel_utils")
        return {}
    except ImportError:
        stand_in = types.ModuleType("transformers.utils.model_parallel_utils")
        stand_in.assert_device_map = stand_in.get_device_map = None
        return {"transformers.utils.model_parallel_utils": stand_in}


def _head_mask_gap(pretrained_model_class):
    """transformers 5 dropped ``PreTrainedModel.get_head_mask``, which the release's forward calls with
    ``head_mask=None``: transformers 4 answered ``[None] * num_layers`` there, and so does this stand-in."""
    if not hasattr(pretrained_model_class, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers):
            if head_mask is not None:
                raise NotImplementedError("the parity tests pass no head mask")
            return [None] * num_hidden_layers

        pretrained_model_class.get_head_mask = get_head_mask


@pytest.fixture(scope="module")
def release():
    """The release's modules: ``newgpt`` (backbone), ``decoder`` (TransformerDecoderSideNet), ``config``."""
    root = Path(SRC) / "fairseq" / "fairseq"
    if not (root / "models" / "sidenet" / "transformer_decoder_sidenet.py").is_file():
        pytest.fail(f"LONGMEM_RELEASE_SRC={SRC!r} does not hold fairseq/fairseq/models/sidenet/: point it at the "
                    f"root of a checkout of GitHub Victorwz/LongMem")
    import faiss

    _package(PREFIX, root)
    _package(f"{PREFIX}.models", root / "models")
    gaps = _transformers_gaps()
    with _fork_names(**gaps) as names:
        sys.modules.update(names)
        newgpt = importlib.import_module(f"{PREFIX}.models.newgpt")
    _head_mask_gap(sys.modules[f"{PREFIX}.models.hf_newgpt.modeling_newgpt"].NewGPTPreTrainedModel)
    with _python38_dataclasses():
        config = _load(f"{PREFIX}.sidenet_config", root / "models/sidenet/transformer_sidenet_config.py")
    mha = _load(f"{PREFIX}.multihead_attention", root / "modules/multihead_attention.py")
    joint = _load(f"{PREFIX}.joint_attention", root / "modules/joint_multihead_attention_sum.py")
    sidenet_package = types.ModuleType("fairseq.models.sidenet")
    sidenet_package.TransformerSideNetConfig = config.TransformerSideNetConfig
    with _fork_names(**{"fairseq.models.sidenet": sidenet_package,
                        "fairseq.modules.joint_multihead_attention_sum": joint}) as names:
        sys.modules.update(names)
        layer = _load(f"{PREFIX}.sidenet_layer", root / "modules/sidenet_layer_palm_sidenet_retrieval.py")
        layer.MultiheadAttention = mha.MultiheadAttention  # the fork's attention takes position_encoding
        memory = _load(f"{PREFIX}.memory", root / "modules/dynamic_memory_with_chunk.py")
        memory.torch, memory.faiss = _TorchOnCpu("torch"), _FaissCpuAsGpu(faiss)
        sys.modules["fairseq.modules.sidenet_layer_palm_sidenet_retrieval"] = layer
        sys.modules["fairseq.modules.dynamic_memory_with_chunk"] = memory
        import fairseq.modules
        had_layer = hasattr(fairseq.modules, "sidenet_layer_palm_sidenet_retrieval")
        fairseq.modules.sidenet_layer_palm_sidenet_retrieval = layer
        try:
            decoder = _load(f"{PREFIX}.decoder", root / "models/sidenet/transformer_decoder_sidenet.py")
        finally:
            if not had_layer:
                del fairseq.modules.sidenet_layer_palm_sidenet_retrieval
            for name in ("fairseq.modules.sidenet_layer_palm_sidenet_retrieval",
                         "fairseq.modules.dynamic_memory_with_chunk"):
                sys.modules.pop(name, None)
    yield Namespace(newgpt=newgpt, decoder=decoder, config=config)
    for name in [n for n in sys.modules if n == PREFIX or n.startswith(PREFIX + ".")]:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------ the models
def _release_backbone(release, dictionary, retrieval_layer_index):
    args = Namespace(embed_dim=EMBED, num_attention_heads=HEADS, num_layers=BACKBONE_LAYERS, dropout=0.0,
                     attention_dropout=0.0, newgpt_mode="alibi", tokens_per_sample=TOKENS,
                     retrieval_layer_index=retrieval_layer_index, use_external_memory=False, gpt_model_path="")
    lm = release.newgpt.NewGPTLanguageModel.build_model(args, SimpleNamespace(target_dictionary=dictionary, source_dictionary=dictionary))
    return lm.eval()


def _release_sidenet(release, dictionary, use_external_memory=True):
    """The release's TransformerDecoderSideNet built from its own config dataclass."""
    cfg = release.config.TransformerSideNetConfig()
    cfg.decoder = release.config.DecoderConfig()  # its own, not the class's shared default
    cfg.decoder.embed_dim = cfg.decoder.input_dim = cfg.decoder.output_dim = EMBED
    cfg.decoder.attention_heads, cfg.decoder.ffn_embed_dim, cfg.decoder.layers = HEADS, FFN, SIDENET_LAYERS
    cfg.decoder.normalize_before = True
    cfg.dropout = cfg.attention_dropout = 0.0
    cfg.activation_fn = "gelu"
    cfg.max_target_positions = TOKENS
    cfg.pretrained_model_path, cfg.gpt_encoder_path = "in-memory", "unused"
    cfg.layer_reduction_factor, cfg.retrieval_layer_index = REDUCTION, RETRIEVAL_LAYER
    cfg.use_external_memory, cfg.use_gpu_to_search = use_external_memory, True
    cfg.chunk_size, cfg.k, cfg.memory_size = CHUNK, K, MEMORY
    release.decoder.load_model_ensemble = lambda paths, task=None, arg_overrides=None: (
        [_release_backbone(release, dictionary, arg_overrides["retrieval_layer_index"])], None)
    embed_tokens = torch.nn.Embedding(len(dictionary), EMBED, dictionary.pad())
    return release.decoder.TransformerDecoderSideNet(cfg, dictionary, embed_tokens, no_encoder_attn=True)


def _ours(tmp_path, dictionary, use_external_memory=True):
    from longmem.models.newgpt import build_newgpt
    from longmem.models.transformer_lm_sidenet import SideNetConfig, TransformerLanguageModelSideNet
    from longmem.utils.checkpoints import save_fairseq_checkpoint

    backbone = build_newgpt("newgpt-tiny", dictionary, embed_dim=EMBED, num_layers=BACKBONE_LAYERS,
                            num_attention_heads=HEADS, ffn_embed_dim=FFN, retrieval_layer_index=RETRIEVAL_LAYER)
    path = tmp_path / "backbone.pt"
    save_fairseq_checkpoint(path, backbone.state_dict(),
                            cfg={"model": {"_name": "newgpt-tiny", "num_attention_heads": HEADS}})
    cfg = SideNetConfig(decoder_layers=SIDENET_LAYERS, decoder_embed_dim=EMBED, decoder_attention_heads=HEADS,
                        decoder_ffn_embed_dim=FFN, layer_reduction_factor=REDUCTION,
                        retrieval_layer_index=RETRIEVAL_LAYER, pretrained_model_path=str(path), dropout=0.0,
                        attention_dropout=0.0, memory_size=MEMORY, k=K, chunk_size=CHUNK, memory_backend="faiss",
                        memory_mode="release", use_external_memory=use_external_memory)
    return TransformerLanguageModelSideNet.build_model(cfg, SimpleNamespace(target_dictionary=dictionary, source_dictionary=dictionary))


@pytest.fixture
def pair(release, tmp_path, make_dictionary):
    """(ours, the release's decoder, dictionary), one set of weights: random SideNet and backbone weights
    (every bias non-zero, the gate at ±0.5) loaded into the release's decoder strictly, and back."""
    torch.manual_seed(0)
    dictionary = make_dictionary(VOCAB - 4)
    ours = _ours(tmp_path, dictionary)
    theirs = _release_sidenet(release, dictionary)
    with torch.no_grad():
        for name, p in ours.decoder.named_parameters():
            if name.endswith("memory_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() == 1 and ("ln" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * (EMBED ** -0.5 if p.dim() == 2 else 0.05))
    state = {k[len("decoder."):]: v for k, v in ours.state_dict().items()}
    assert len(state) == 101
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict({"decoder." + k: v for k, v in theirs.state_dict().items()}, strict=True)
    return ours, theirs, dictionary


def _segments(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (ROWS, TOKENS), generator=g) for _ in range(SEGMENTS + 1)]


def _our_positions(bank, chunk_ids):
    """Our retrieved chunk serials (B, H, T, k/c) as the release's faiss ids: positions among the chunks
    held, oldest first (its ``remove_ids`` renumbers from 0 after an eviction)."""
    oldest = bank.next_serial[0] - bank.filled[0]
    return torch.where(chunk_ids >= 0, chunk_ids - oldest, chunk_ids)


def _release_positions(knn_index):
    """The release's ``knn_index`` (per head: (T·B, k/c), row t·B + b) as (B, H, T, k/c)."""
    ids = torch.stack([torch.as_tensor(h) for h in knn_index], dim=1)  # (T*B, H, kc)
    return ids.view(TOKENS, ROWS, HEADS, -1).permute(1, 2, 0, 3)


# ------------------------------------------------------------------------------------------ the tests
def _fp16_bank_as_released():
    """The release's memory: one fp16 bank for all rows (its GPU path), its eviction."""
    from longmem.modules.memory_bank import ChunkedMemoryBank

    return ChunkedMemoryBank(HEADS, EMBED // HEADS, MEMORY, CHUNK, K, shared=True, backend="faiss",
                             dtype=torch.float16, eviction="release")


def _read_segments(ours, theirs, seed):
    """Both models read the same 8 segments in eval mode. Per segment: the largest log-prob difference,
    whether the retrieved chunks are the same (None: the release read nothing), how far memory moved our
    log-probs (against the same forward with memory reads off), and how many chunks memory holds after."""
    ours.eval(), theirs.eval()
    rows = []
    for tokens in _segments(seed)[:SEGMENTS]:
        seen = []
        with torch.no_grad():
            with ours.decoder.memory.configured(reads=False, writes=False):
                blind = F.log_softmax(ours(tokens)[0], dim=-1)
            with ours.decoder.memory.retrieval_hook(
                    lambda q, got, heads: seen.append(_our_positions(ours.decoder.memory.bank, got.chunk_ids))):
                got = F.log_softmax(ours(tokens)[0], dim=-1)
            logits, extra = theirs(tokens)
        if extra["knn_index"] is None:
            same_chunks = None if all((ids == -1).all() for ids in seen) else False
        else:
            same_chunks = len(seen) == 1 and torch.equal(seen[0], _release_positions(extra["knn_index"]))
        assert ours.decoder.memory.bank.filled[0] == theirs.external_memory.dstore_idx
        rows.append(Namespace(gap=(got - F.log_softmax(logits, dim=-1)).abs().max().item(), same_chunks=same_chunks,
                              memory_effect=(got - blind).abs().max().item(),
                              held=int(ours.decoder.memory.bank.filled[0])))
    return rows


def test_log_probs_and_retrieved_chunks_equal_the_releases_through_evictions(pair):
    """8 segments of 2 rows x 32 tokens into a 256-token memory of chunk 4, held in fp16 as the release holds
    it: the release evicts at the 4th, 6th and 8th add. Every segment: per-token log-probs equal to 1e-4,
    the same chunks retrieved; memory moves the log-probs by far more than that."""
    ours, theirs, _ = pair
    ours.decoder.memory.load_bank(_fp16_bank_as_released())
    rows = _read_segments(ours, theirs, seed=1)
    assert [r.held for r in rows] == [16, 32, 48, 32, 48, 32, 48, 32]  # 32 chunks evicted at adds 4, 6, 8
    assert rows[0].same_chunks is None and all(r.same_chunks for r in rows[1:])
    assert max(r.gap for r in rows) < 1e-4
    assert rows[0].memory_effect == 0 and min(r.memory_effect for r in rows[1:]) > 0.1


def test_with_this_projects_cpu_memory_in_fp32_only_the_releases_fp16_rounding_differs(pair):
    """The default CPU bank holds fp32 keys and values where the release rounds them to fp16: the same
    chunks are retrieved at every segment, and the log-probs differ by the rounding's effect only (relative
    rounding 2^-11 of values that move the log-probs by ~1: at most 5e-4)."""
    ours, theirs, _ = pair
    rows = _read_segments(ours, theirs, seed=1)
    assert ours.decoder.memory.bank.dtype == torch.float32
    assert rows[0].same_chunks is None and all(r.same_chunks for r in rows[1:])
    assert max(r.gap for r in rows) < 5e-4


def test_a_training_step_equals_the_releases(pair):
    """After 8 segments, a training segment: the summed NLL equal to 1e-6 (relative), the gradients of the gate
    and of every SideNet parameter equal to 1e-4 of each tensor's largest, the same parameters trained."""
    ours, theirs, _ = pair
    ours.decoder.memory.load_bank(_fp16_bank_as_released())
    segments = _segments(2)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for tokens in segments[:SEGMENTS]:
            ours(tokens), theirs(tokens)
    ours.train(), theirs.train()
    tokens, target = segments[SEGMENTS][:, :-1], segments[SEGMENTS][:, 1:]
    losses = []
    for model in (ours, theirs):
        model.zero_grad()
        loss = F.nll_loss(F.log_softmax(model(tokens)[0], -1).flatten(0, 1), target.flatten(), reduction="sum")
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    theirs_params = dict(theirs.named_parameters())
    gate = ours.decoder.get_parameter(f"layers.{RETRIEVAL_LAYER // REDUCTION}.self_attn.memory_bias")
    assert gate.grad.abs().min() > 1e-4
    trained = [(name, p) for name, p in ours.decoder.named_parameters() if p.requires_grad]
    assert len(trained) == 3 * 10 + 1 + 2  # ln_1, q/k/v/out, fc1, fc2 per layer; the gate; the final norm
    assert {name for name, _ in trained} == {name for name, p in theirs.named_parameters() if p.requires_grad}
    for name, p in trained:
        want = theirs_params[name].grad
        assert (p.grad - want).abs().max() <= 1e-4 * want.abs().max(), name  # measured: <= 2.1e-5 of the largest


def test_the_releases_memory_off_model_fails(release, make_dictionary):
    """The release's SideNet without ``--use-external-memory`` fails at its first forward (``knn_index`` is
    only assigned in the memory layer's branch): memory off has no release twin to compare with."""
    dictionary = make_dictionary(VOCAB - 4)
    theirs = _release_sidenet(release, dictionary, use_external_memory=False)
    with pytest.raises(UnboundLocalError, match="knn_index"):
        theirs(torch.randint(4, VOCAB, (ROWS, TOKENS)))
