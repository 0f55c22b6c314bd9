"""``transformer_lm_sidenet``: LongMem's language model (SPEC §2-§4).

A frozen ``newgpt`` backbone (loaded from ``--pretrained-model-path``, eval mode, no gradients) and a
trainable residual SideNet: layer i starts from its own stream ``x_i`` and adds the backbone's
``H_bb[r*i + r] - H_bb[r*i]``. SideNet layer ``int(retrieval_layer_index / r)`` runs joint attention
over its local tokens and the memory bank, which caches the backbone's layer-``retrieval_layer_index``
keys and values. Each forward retrieves first, then writes the segment into memory.

State-dict keys are the released ones: ``decoder.layers.{i}...``, ``decoder.layers.8.self_attn.memory_bias``,
``decoder.layer_norm``, ``decoder.embed_tokens`` / ``decoder.output_projection`` (the backbone's ``wte``
and ``lm_head`` weights, shared, frozen) and the whole backbone under ``decoder.pretrained_model.``.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from fairseq import checkpoint_utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)

from longmem.models.newgpt import NewGPTConfig, NewGPTDecoder, NewGPTLanguageModel
from longmem.modules.memory_bank import ChunkedMemoryBank
from longmem.modules.sidenet_layer import LAYER_NORM_EPS, SideNetLayer

logger = logging.getLogger(__name__)

MEMORY_BACKENDS = ChoiceEnum(["auto", "faiss", "torch"])


@dataclass
class SideNetConfig(FairseqDataclass):
    decoder_embed_dim: int = field(default=1024, metadata={"help": "SideNet width (= backbone width)"})
    decoder_ffn_embed_dim: int = field(default=4096, metadata={"help": "SideNet MLP width"})
    decoder_layers: int = field(default=12, metadata={"help": "SideNet layers"})
    decoder_attention_heads: int = field(default=16, metadata={"help": "heads (= backbone heads)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on both branches"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    pretrained_model_path: str = field(default="", metadata={"help": "the newgpt backbone checkpoint"})
    retrieval_layer_index: int = field(
        default=17, metadata={"help": "0-based backbone layer whose keys/values fill the memory"})
    layer_reduction_factor: int = field(
        default=2, metadata={"help": "r: SideNet layer i pairs with backbone layers r*i and r*i+r"})
    reload_ptm_layer: bool = field(
        default=False, metadata={"help": "initialise SideNet layer i from backbone layer r*i+1"})
    use_external_memory: bool = field(default=False, metadata={"help": "use the cached memory"})
    memory_size: int = field(default=65536, metadata={"help": "memory capacity in tokens, per stream"})
    k: int = field(default=64, metadata={"help": "memory tokens retrieved per query token"})
    chunk_size: int = field(default=4, metadata={"help": "tokens per memory chunk"})
    use_gpu_to_search: bool = field(
        default=False, metadata={"help": "keep the memory (and its search) on the model's GPU"})
    memory_backend: MEMORY_BACKENDS = field(
        default="auto", metadata={"help": "memory search: faiss, torch (exact matmul) or auto"})
    memory_shared: bool = field(
        default=False, metadata={"help": "the release's single bank for all batch rows (default: a "
                                         "memory stream per batch row)"})
    max_target_positions: int = field(default=2048, metadata={"help": "longest sequence to batch"})


def _first(cfg, names, default=None):
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def backbone_config_from_checkpoint(state: dict, path: str, retrieval_layer_index: int) -> NewGPTConfig:
    """A newgpt config read off a backbone checkpoint: sizes from the weights, heads from its config."""
    model_cfg = (state.get("cfg") or {}).get("model") if state.get("cfg") is not None else None
    if model_cfg is None and state.get("args") is not None:
        model_cfg = vars(state["args"])
    name = str(_first(model_cfg or {}, ["_name", "arch"], ""))
    weights = state["model"]
    prefix = "decoder.model.transformer."
    if not name.startswith("newgpt") or prefix + "wte.weight" not in weights:
        raise ValueError(f"--pretrained-model-path {path} is not a newgpt backbone checkpoint (its model is "
                         f"{name or 'unknown'!r}); pass the backbone's checkpoint, e.g. gpt2_medium/checkpoint_last.pt")
    num_layers = sum(1 for k in weights if k.startswith(prefix + "h.") and k.endswith(".ln_1.weight"))
    embed_dim = weights[prefix + "wte.weight"].shape[1]
    heads = _first(model_cfg, ["num_attention_heads", "decoder_attention_heads", "n_head"], embed_dim // 64)
    return NewGPTConfig(
        embed_dim=embed_dim, num_layers=num_layers, num_attention_heads=int(heads),
        ffn_embed_dim=weights[prefix + "h.0.mlp.fc_in.weight"].shape[0], dropout=0.0, attention_dropout=0.0,
        retrieval_layer_index=retrieval_layer_index,
    )


class SideNetDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg: SideNetConfig, dictionary, backbone: NewGPTLanguageModel):
        super().__init__(dictionary)
        self.cfg = cfg
        r = cfg.layer_reduction_factor
        bb = backbone.decoder.model
        bb_layers = len(bb.transformer.h)
        self.memory_layer_index = int(cfg.retrieval_layer_index / r)
        self._validate(cfg, backbone, bb_layers)

        self.pretrained_model = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.eval()
        self.embed_tokens = nn.Embedding(len(dictionary), cfg.decoder_embed_dim, dictionary.pad())
        self.embed_tokens.weight = bb.transformer.wte.weight  # shared, frozen: the released key
        self.layers = nn.ModuleList([
            SideNetLayer(cfg.decoder_embed_dim, cfg.decoder_ffn_embed_dim, cfg.decoder_attention_heads,
                         cfg.dropout, cfg.attention_dropout, use_memory=(i == self.memory_layer_index))
            for i in range(cfg.decoder_layers)
        ])
        self.layer_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.output_projection = nn.Linear(cfg.decoder_embed_dim, len(dictionary), bias=False)
        self.output_projection.weight = bb.lm_head.weight  # shared, frozen; output uses lm_head (+ bias)
        self._init_sidenet()
        if cfg.reload_ptm_layer:
            self.reload_from_backbone()

        # named memories: training and validation read different streams and must not mix
        self.memories = {}
        self.memory_slot = "train"
        self.reset_at_document_boundaries = False
        self.memory_enabled = cfg.use_external_memory
        self.memory_writes = True
        self.memory_reads = True
        self.backbone_loaded = False

    @staticmethod
    def _validate(cfg, backbone, bb_layers):
        bb_cfg = backbone.decoder.cfg
        r = cfg.layer_reduction_factor
        if not 0 <= cfg.retrieval_layer_index < bb_layers:
            raise ValueError(f"--retrieval-layer-index {cfg.retrieval_layer_index} is beyond the backbone's "
                             f"{bb_layers} layers; choose 0..{bb_layers - 1} (the release: 17 of 24)")
        if int(cfg.retrieval_layer_index / r) >= cfg.decoder_layers:
            raise ValueError(f"memory layer int({cfg.retrieval_layer_index} / {r}) = "
                             f"{int(cfg.retrieval_layer_index / r)} is beyond the SideNet's {cfg.decoder_layers} "
                             f"layers; lower --retrieval-layer-index or add --decoder-layers")
        if r * cfg.decoder_layers > bb_layers:
            raise ValueError(f"{cfg.decoder_layers} SideNet layers x layer_reduction_factor {r} needs "
                             f"{r * cfg.decoder_layers} backbone layers, the backbone has {bb_layers}")
        if (bb_cfg.embed_dim, bb_cfg.num_attention_heads) != (cfg.decoder_embed_dim, cfg.decoder_attention_heads):
            raise ValueError(f"SideNet width/heads ({cfg.decoder_embed_dim}, {cfg.decoder_attention_heads}) "
                             f"must equal the backbone's ({bb_cfg.embed_dim}, {bb_cfg.num_attention_heads})")

    def _init_sidenet(self):
        for name, p in self.layers.named_parameters():
            if name.endswith("memory_bias"):
                continue  # the gate starts at 0
            if p.dim() == 1:
                nn.init.ones_(p) if "ln_1.weight" in name else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=0.02)

    @torch.no_grad()
    def reload_from_backbone(self):
        """SideNet layer i <- backbone layer r*i + 1 (the release; the paper's text says 2i);
        layer_norm <- ln_f."""
        bb = self.pretrained_model.decoder.model.transformer
        r = self.cfg.layer_reduction_factor
        for i, layer in enumerate(self.layers):
            layer.load_from_backbone_block(bb.h[r * i + 1])
        self.layer_norm.load_state_dict(bb.ln_f.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.pretrained_model.eval()  # frozen backbone: always in eval mode
        return self

    # ---------------------------------------------------------------- memory
    @property
    def memory(self) -> Optional[ChunkedMemoryBank]:
        return self.memories.get(self.memory_slot)

    def use_memory_slot(self, slot: str) -> None:
        """Switch to another named memory (the task keeps "train" and "valid" apart)."""
        self.memory_slot = slot

    def reset_memory(self, stream: Optional[int] = None, slot: Optional[str] = None) -> None:
        bank = self.memories.get(self.memory_slot if slot is None else slot)
        if bank is not None:
            bank.reset(stream)

    def _memory_for_batch(self, batch_size: int, device) -> ChunkedMemoryBank:
        cfg = self.cfg
        streams = 1 if cfg.memory_shared else batch_size
        bank = self.memory
        if bank is None or (not cfg.memory_shared and bank.num_streams != batch_size):
            if bank is not None:
                logger.info("memory %r: batch size changed %d -> %d, starting empty per-stream memory",
                            self.memory_slot, bank.num_streams, batch_size)
            on_gpu = device.type == "cuda" and cfg.use_gpu_to_search
            bb = self.pretrained_model.decoder.model
            bank = ChunkedMemoryBank(
                bb.num_heads, cfg.decoder_embed_dim // bb.num_heads, cfg.memory_size, cfg.chunk_size, cfg.k,
                num_streams=streams, shared=cfg.memory_shared, backend=str(cfg.memory_backend),
                device=device if on_gpu else "cpu",
                dtype=torch.float16 if on_gpu else torch.float32,
            )
            self.memories[self.memory_slot] = bank
        return bank

    def _retrieve(self, queries, new_document_from=None):
        """new_document_from (B,) or None: tokens at or after that position (a new document of that
        row) see no memory."""
        out = self.memory.retrieve(queries)
        dev = queries.device
        out.keys, out.values, out.mask = out.keys.to(dev), out.values.to(dev), out.mask.to(dev)
        if new_document_from is not None:
            T = queries.size(1)
            after = torch.arange(T, device=dev).view(1, T) >= new_document_from.to(dev).view(-1, 1)  # (B, T)
            out.mask = out.mask & ~after.view(after.size(0), 1, T, 1)
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, prev_output_tokens, src_lengths=None, incremental_state=None, features_only=False, **kwargs):
        if incremental_state is not None:
            raise NotImplementedError("transformer_lm_sidenet scores whole segments; incremental decoding "
                                      "is not supported (score with fairseq-eval-lm or the model's forward)")
        x, extra = self.extract_features(prev_output_tokens, doc_start=kwargs.get("doc_start"))
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, tokens, doc_start=None, **kwargs):
        """doc_start (B, T) bool, from the longmem task: where a new document begins in each row."""
        if self.training and not self.backbone_loaded:
            raise RuntimeError(f"the backbone was never loaded: --pretrained-model-path "
                               f"{self.cfg.pretrained_model_path!r} does not exist; pass the newgpt checkpoint")
        B, T = tokens.shape
        use_memory = self.memory_enabled
        with torch.no_grad():
            _, bb = self.pretrained_model.decoder(
                tokens, features_only=True, return_all_hiddens=True, return_retrieval_kv=use_memory)
        hidden = bb["inner_states"]  # L + 1, detached
        bias = self.pretrained_model.decoder.model.attention_bias(tokens, T, hidden[0].dtype)
        retrieve, first_new, last_new = None, None, None
        if use_memory:
            memory = self._memory_for_batch(B, hidden[0].device)
            if doc_start is not None and self.reset_at_document_boundaries and not self.cfg.memory_shared \
                    and bool(doc_start.any()):
                positions = torch.arange(T, device=doc_start.device).expand(B, T)
                first_new = torch.where(doc_start, positions, T).min(1).values  # (B,), T = none
                last_new = torch.where(doc_start, positions, -1).max(1).values  # (B,), -1 = none
            if any(memory.filled) and self.memory_reads:
                retrieve = self._retrieve if first_new is None else (lambda q: self._retrieve(q, first_new))
        r = self.cfg.layer_reduction_factor
        x = hidden[0]  # (B, T, C): the backbone's token embeddings
        for i, layer in enumerate(self.layers):
            residual = hidden[r * i + r] - hidden[r * i]
            x = layer(x, residual, bias, retrieve if i == self.memory_layer_index else None)
        x = self.layer_norm(x)
        if use_memory and self.memory_writes:
            start = None
            if last_new is not None:
                for b in torch.nonzero(last_new >= 0).view(-1).tolist():
                    memory.reset(b)  # the row's new document starts with an empty memory
                start = last_new.clamp(min=0)
            memory.add(*bb["retrieval_kv"], start=start)  # after retrieval: a segment never reads itself
        return x, {"attn": [None], "inner_states": None}

    def output_layer(self, features):
        return self.pretrained_model.decoder.model.lm_head(features)

    def max_positions(self):
        return self.cfg.max_target_positions


def build_backbone(cfg: SideNetConfig, dictionary):
    """(backbone, loaded): from --pretrained-model-path when the file exists, else its shape only."""
    path = cfg.pretrained_model_path
    if path and os.path.isfile(path):
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
        bb_cfg = backbone_config_from_checkpoint(state, path, cfg.retrieval_layer_index)
        rows = state["model"]["decoder.model.transformer.wte.weight"].shape[0]
        if rows != len(dictionary):
            raise ValueError(f"backbone {path} has a vocabulary of {rows} but this task's dictionary has "
                             f"{len(dictionary)}: binarize the data with the backbone's dict.txt "
                             f"(fairseq-preprocess --srcdict)")
        if not 0 <= cfg.retrieval_layer_index < bb_cfg.num_layers:
            raise ValueError(f"--retrieval-layer-index {cfg.retrieval_layer_index} is beyond the backbone's "
                             f"{bb_cfg.num_layers} layers; choose 0..{bb_cfg.num_layers - 1}")
        backbone = NewGPTLanguageModel(NewGPTDecoder(bb_cfg, dictionary))
        backbone.load_state_dict(state["model"], strict=True)
        return backbone, True
    # No backbone file: a LongMem checkpoint being loaded carries the backbone's weights itself.
    logger.warning("backbone file %r not found: building it from the SideNet's sizes; its weights must come "
                   "from the LongMem checkpoint being loaded", path)
    bb_cfg = NewGPTConfig(
        embed_dim=cfg.decoder_embed_dim, num_layers=cfg.decoder_layers * cfg.layer_reduction_factor,
        num_attention_heads=cfg.decoder_attention_heads, ffn_embed_dim=cfg.decoder_ffn_embed_dim,
        dropout=0.0, attention_dropout=0.0, retrieval_layer_index=cfg.retrieval_layer_index,
    )
    if not 0 <= cfg.retrieval_layer_index < bb_cfg.num_layers:
        raise ValueError(f"--retrieval-layer-index {cfg.retrieval_layer_index} is beyond the backbone's "
                         f"{bb_cfg.num_layers} layers; choose 0..{bb_cfg.num_layers - 1}")
    return NewGPTLanguageModel(NewGPTDecoder(bb_cfg, dictionary)), False


@register_model("transformer_lm_sidenet", dataclass=SideNetConfig)
class TransformerLanguageModelSideNet(FairseqLanguageModel):
    """LongMem: frozen newgpt backbone + trainable SideNet + cached memory."""

    @classmethod
    def build_model(cls, cfg, task):
        backbone, loaded = build_backbone(cfg, task.target_dictionary)
        decoder = SideNetDecoder(cfg, task.target_dictionary, backbone)
        decoder.backbone_loaded = loaded
        return cls(decoder)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if any(k.startswith("decoder.pretrained_model.") for k in state_dict):
            self.decoder.backbone_loaded = True
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    # convenience switches used by tasks and evaluation scripts
    def reset_memory(self, stream: Optional[int] = None):
        self.decoder.reset_memory(stream)

    def set_memory(self, enabled: Optional[bool] = None, writes: Optional[bool] = None,
                   reads: Optional[bool] = None):
        """enabled: use the memory at all; writes: add each segment's keys/values; reads: retrieve (off
        only to fill a memory fast: what is written does not depend on what is read)."""
        if enabled is not None:
            self.decoder.memory_enabled = enabled
        if writes is not None:
            self.decoder.memory_writes = writes
        if reads is not None:
            self.decoder.memory_reads = reads


def _sidenet_arch(layers, embed, heads, ffn, retrieval_layer_index):
    def arch(args):
        args.decoder_layers = getattr(args, "decoder_layers", layers)
        args.decoder_embed_dim = getattr(args, "decoder_embed_dim", embed)
        args.decoder_attention_heads = getattr(args, "decoder_attention_heads", heads)
        args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", ffn)
        args.retrieval_layer_index = getattr(args, "retrieval_layer_index", retrieval_layer_index)
        args.layer_reduction_factor = getattr(args, "layer_reduction_factor", 2)
        args.dropout = getattr(args, "dropout", 0.1)
        args.attention_dropout = getattr(args, "attention_dropout", 0.1)
    return arch


# released: 12 layers, 1024 wide, 16 heads over newgpt-medium; tiny: half of newgpt-tiny's 4 layers
register_model_architecture("transformer_lm_sidenet", "transformer_lm_sidenet_gpt2_small")(
    _sidenet_arch(12, 1024, 16, 4096, 17))
register_model_architecture("transformer_lm_sidenet", "transformer_lm_sidenet_tiny")(
    _sidenet_arch(2, 256, 4, 1024, 2))
