"""``newgpt``: the frozen backbone of LongMem, a GPT-2-sized decoder trained with ALiBi.

docs/design.md §1. GPT-J-style parallel block ``h = x + Attn(LN1(x)) + MLP(LN1(x))`` with one LayerNorm per
block, bias-free attention projections, tanh-GELU MLP, a final ``ln_f``, no position embeddings and an
untied ``lm_head`` with bias. Module names reproduce the released state-dict keys
(``decoder.model.transformer.h.{i}.attn.q_proj.weight`` ...).

Besides logits, the decoder returns on request the L+1 hidden states (the L block inputs, then
``ln_f`` of the last block's output) and the key/value projections of layer
``retrieval_layer_index``: what LongMem's memory caches.
"""
import argparse
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)

from longmem.errors import ConfigError
from longmem.models.backbone import BackboneStates, FrozenBackbone, register_family
from longmem.models.layer_map import check_retrieval_layer_index
from longmem.modules.alibi import alibi_attention_bias, alibi_slopes, token_positions
from longmem.modules.heads import merge_heads, split_heads
from longmem.modules.sidenet_layer import LAYER_NORM_EPS as SIDENET_LAYER_NORM_EPS
from longmem.modules.sidenet_layer import SideNetLayer

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6


@dataclass
class NewGPTConfig(FairseqDataclass):
    embed_dim: int = field(default=1024, metadata={"help": "model width"})
    num_layers: int = field(default=24, metadata={"help": "number of decoder blocks"})
    num_attention_heads: int = field(default=16, metadata={"help": "attention heads per block"})
    ffn_embed_dim: int = field(default=4096, metadata={"help": "hidden width of the MLP"})
    dropout: float = field(default=0.1, metadata={"help": "embedding and residual dropout"})
    attention_dropout: float = field(
        default=0.0, metadata={"help": "dropout on attention probabilities (the release has none)"})
    retrieval_layer_index: int = field(
        default=17,
        metadata={"help": "0-based block whose key/value projections LongMem caches in memory"},
    )
    max_target_positions: int = field(
        default=2048,
        metadata={"help": "longest sequence fairseq will batch; ALiBi itself has no length limit"},
    )


def validate_newgpt_config(cfg) -> None:
    """Errors that name the bad value and the fix, raised before any weight is allocated."""
    if cfg.embed_dim % cfg.num_attention_heads != 0:
        raise ConfigError(
            f"newgpt: embed_dim={cfg.embed_dim} is not divisible by "
            f"num_attention_heads={cfg.num_attention_heads}; choose a head count that divides the width "
            f"(e.g. {[h for h in (4, 8, 12, 16, 20, 25) if cfg.embed_dim % h == 0]})"
        )
    check_retrieval_layer_index(cfg.retrieval_layer_index, cfg.num_layers)


class NewGPTAttention(nn.Module):
    """Multi-head causal self-attention with ALiBi; q/k/v/out projections without bias."""

    def __init__(self, embed_dim: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        cache: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, C); attn_bias: (B or 1, H, T, S). Returns the output (B, T, C) and this call's
        key and value projections (B, T, C), before the head split and without ALiBi. As released, q, k,
        v and the attention are computed in fp32 whatever the model's dtype (fp16 training)."""
        key, value = self.k_proj(x).float(), self.v_proj(x).float()  # (B, T, C)
        H = self.num_heads
        q, k, v = split_heads(self.q_proj(x).float(), H), split_heads(key, H), split_heads(value, H)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, S, d)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias.to(q.dtype),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, H, T, d)
        return self.out_proj(merge_heads(out).to(x.dtype)), key, value  # (B, T, C)


class NewGPTMLP(nn.Module):
    def __init__(self, embed_dim: int, ffn_embed_dim: int):
        super().__init__()
        self.fc_in = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc_out = nn.Linear(ffn_embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))  # "gelu_new"


class NewGPTBlock(nn.Module):
    """GPT-J parallel block: ``x + Attn(LN1(x)) + MLP(LN1(x))``."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.attn = NewGPTAttention(cfg.embed_dim, cfg.num_attention_heads, cfg.attention_dropout)
        self.mlp = NewGPTMLP(cfg.embed_dim, cfg.ffn_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_bias, cache=None):
        h = self.ln_1(x)
        attn_out, key, value = self.attn(h, attn_bias, cache)
        x = x + self.dropout(attn_out) + self.dropout(self.mlp(h))
        return x, key, value


class NewGPTTransformer(nn.Module):
    def __init__(self, cfg, vocab_size: int, padding_idx: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=padding_idx)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([NewGPTBlock(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)


class NewGPTModel(nn.Module):
    """The ``model`` attribute of the decoder: ``transformer`` (wte, h, ln_f) and ``lm_head``."""

    def __init__(self, cfg, vocab_size: int, padding_idx: int):
        super().__init__()
        validate_newgpt_config(cfg)
        self.padding_idx = padding_idx
        self.num_heads = cfg.num_attention_heads
        self.retrieval_layer_index = cfg.retrieval_layer_index
        self.transformer = NewGPTTransformer(cfg, vocab_size, padding_idx)
        self.lm_head = nn.Linear(cfg.embed_dim, vocab_size, bias=True)
        self.register_buffer(
            "alibi_slopes", torch.tensor(alibi_slopes(cfg.num_attention_heads)), persistent=False
        )
        self._bias_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's initialisation: every Linear and Embedding N(0, 0.02) (no 1/sqrt(2L) scaling of
        the residual projections), biases 0, LayerNorms (1, 0), the padding row zeroed."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if "ln" in name and name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)
        with torch.no_grad():
            self.transformer.wte.weight[self.padding_idx].zero_()

    def attention_bias(self, tokens: torch.Tensor, num_new: int, dtype: torch.dtype) -> torch.Tensor:
        """Bias for the last ``num_new`` of ``tokens`` (B, S) attending to all of them."""
        S = tokens.size(1)
        key_padding_mask = tokens.eq(self.padding_idx)
        if not key_padding_mask.any():
            key = (num_new, S, dtype, tokens.device)
            if self._bias_cache is None or self._bias_cache[0] != key:
                positions = torch.arange(S, device=tokens.device)
                bias = alibi_attention_bias(
                    self.alibi_slopes, positions[S - num_new:], positions, dtype=dtype
                )
                self._bias_cache = (key, bias)
            return self._bias_cache[1]  # (1, H, T, S)
        positions = token_positions(tokens, self.padding_idx)  # (B, S)
        return alibi_attention_bias(
            self.alibi_slopes, positions[:, S - num_new:], positions, key_padding_mask, dtype=dtype
        )  # (B, H, T, S)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Optional[List[Dict[str, torch.Tensor]]] = None,
        return_hidden_states: bool = False,
        return_retrieval_kv: bool = False,
    ):
        """tokens: (B, S), the whole history; with a cache holding S' positions only the last S - S'
        are run. Returns (features (B, T, C) = ln_f(last block), hidden states or None, (k, v) or None).
        """
        cached = cache[0]["k"].size(2) if cache is not None and "k" in cache[0] else 0
        new_tokens = tokens[:, cached:]  # (B, T)
        x = self.transformer.drop(self.transformer.wte(new_tokens))  # (B, T, C)
        bias = self.attention_bias(tokens, new_tokens.size(1), x.dtype)
        hidden_states = [] if return_hidden_states else None
        retrieval_kv = None
        for i, block in enumerate(self.transformer.h):
            if hidden_states is not None:
                hidden_states.append(x)
            x, key, value = block(x, bias, None if cache is None else cache[i])
            if return_retrieval_kv and i == self.retrieval_layer_index:
                retrieval_kv = (key, value)  # each (B, T, C)
        x = self.transformer.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)  # L + 1 entries
        return x, hidden_states, retrieval_kv


class NewGPTDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg, dictionary: Dictionary):
        super().__init__(dictionary)
        self.cfg = cfg
        self.model = NewGPTModel(cfg, len(dictionary), dictionary.pad())

    def forward(
        self,
        prev_output_tokens: torch.Tensor,
        src_lengths=None,
        incremental_state=None,
        features_only: bool = False,
        return_all_hiddens: bool = False,
        return_retrieval_kv: bool = False,
        **kwargs,
    ):
        """Returns (logits (B, T, V) or features (B, T, C), extra). ``extra["inner_states"]`` holds the
        L+1 hidden states when ``return_all_hiddens``; ``extra["retrieval_kv"]`` the (k, v) projections
        (B, T, C) of layer ``retrieval_layer_index`` when ``return_retrieval_kv``."""
        x, extra = self.extract_features(
            prev_output_tokens, incremental_state, return_all_hiddens, return_retrieval_kv
        )
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(
        self,
        prev_output_tokens,
        incremental_state=None,
        return_all_hiddens: bool = False,
        return_retrieval_kv: bool = False,
        **kwargs,
    ):
        cache = None
        if incremental_state is not None:
            cache = self.get_incremental_state(incremental_state, "kv_cache")
            if cache is None:
                cache = [{} for _ in self.model.transformer.h]
        x, hidden_states, retrieval_kv = self.model(
            prev_output_tokens, cache, return_all_hiddens, return_retrieval_kv
        )
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, "kv_cache", cache)
        return x, {"attn": [None], "inner_states": hidden_states, "retrieval_kv": retrieval_kv}

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(features)

    def max_positions(self) -> int:
        return self.cfg.max_target_positions

    def reorder_incremental_state(self, incremental_state, new_order: torch.Tensor) -> None:
        """A new cache of the rows ``new_order`` (the old one is left as it was: a prompt's cache can be forked)."""
        cache = self.get_incremental_state(incremental_state, "kv_cache")
        if cache is not None:
            self.set_incremental_state(incremental_state, "kv_cache", NewGPTLanguageModel.cache_select(cache, new_order))


@register_family("newgpt")
@register_model("newgpt", dataclass=NewGPTConfig)
class NewGPTLanguageModel(FairseqLanguageModel, FrozenBackbone):
    """The LongMem backbone as a fairseq language model (``--arch newgpt-*``)."""

    family = "newgpt"

    @classmethod
    def build_model(cls, cfg, task):
        validate_newgpt_config(cfg)
        return cls(NewGPTDecoder(cfg, task.target_dictionary))

    # ------------------------------------------------------------ as LongMem's frozen backbone
    @classmethod
    def from_checkpoint_state(cls, state: dict, path: str, dictionary, retrieval_layer_index: int):
        """The backbone of a newgpt checkpoint, sizes read off its weights, heads off its config."""
        from longmem.models.backbone import checkpoint_model_config, checkpoint_model_name

        weights = state["model"]
        prefix = "decoder.model.transformer."
        if prefix + "wte.weight" not in weights:
            raise ConfigError(f"--pretrained-model-path {path} is not a newgpt backbone checkpoint (its model is "
                             f"{checkpoint_model_name(state) or 'unknown'!r} but it holds no {prefix}wte.weight)")
        rows = weights[prefix + "wte.weight"].shape[0]
        if rows != len(dictionary):
            raise ConfigError(f"backbone {path} has a vocabulary of {rows} but this task's dictionary has "
                             f"{len(dictionary)}: binarize the data with the backbone's dict.txt "
                             f"(fairseq-preprocess --srcdict)")
        model_cfg = checkpoint_model_config(state)
        embed_dim = weights[prefix + "wte.weight"].shape[1]
        heads = next((model_cfg.get(k) for k in ("num_attention_heads", "decoder_attention_heads", "n_head")
                      if model_cfg.get(k) is not None), None)
        name = checkpoint_model_name(state)
        if heads is None and name in NEWGPT_ARCHS:  # a config without the head count: its arch's default
            heads = newgpt_config(name).num_attention_heads
            logger.info("backbone %s records no head count: %d, the default of %s", path, heads, name)
        if heads is None or embed_dim % int(heads):
            raise ConfigError(f"backbone {path} records no usable attention head count (got {heads} for width "
                              f"{embed_dim}) and its model {name or 'unknown'!r} is no registered newgpt arch: "
                              f"save it with its config (num_attention_heads)")
        cfg = NewGPTConfig(
            embed_dim=embed_dim, num_layers=sum(1 for k in weights if k.startswith(prefix + "h.") and k.endswith(".ln_1.weight")),
            num_attention_heads=int(heads), ffn_embed_dim=weights[prefix + "h.0.mlp.fc_in.weight"].shape[0],
            dropout=0.0, attention_dropout=0.0, retrieval_layer_index=retrieval_layer_index,
        )
        model = cls(NewGPTDecoder(cfg, dictionary))
        model.load_state_dict(weights, strict=True)
        return model

    @classmethod
    def with_sidenet_sizes(cls, sidenet_cfg, dictionary):
        """A backbone shaped after a SideNet config (r x its layers, its width and heads), for a LongMem
        checkpoint that carries the backbone's weights itself."""
        cfg = NewGPTConfig(
            embed_dim=sidenet_cfg.decoder_embed_dim,
            num_layers=sidenet_cfg.decoder_layers * sidenet_cfg.layer_reduction_factor,
            num_attention_heads=sidenet_cfg.decoder_attention_heads, ffn_embed_dim=sidenet_cfg.decoder_ffn_embed_dim,
            dropout=0.0, attention_dropout=0.0, retrieval_layer_index=sidenet_cfg.retrieval_layer_index,
        )
        return cls(NewGPTDecoder(cfg, dictionary))

    @property
    def num_layers(self) -> int:
        return len(self.decoder.model.transformer.h)

    @property
    def embed_dim(self) -> int:
        return self.decoder.model.transformer.wte.embedding_dim

    @property
    def num_heads(self) -> int:
        return self.decoder.model.num_heads

    @property
    def memory_heads(self):
        return self.num_heads, self.embed_dim // self.num_heads

    @torch.no_grad()
    def frozen_states(self, tokens: torch.Tensor, retrieval_kv: bool, cache=None) -> BackboneStates:
        """The L+1 hidden states, layer m's keys/values (when asked) and the ALiBi bias of ``tokens``. With a
        ``cache`` (``new_cache()``) holding the first S' of ``tokens`` (B, S), only the last S - S' are run and
        returned, their bias against all S keys."""
        x, hidden, kv = self.decoder.model(tokens, cache, return_hidden_states=True, return_retrieval_kv=retrieval_kv)
        bias = self.decoder.model.attention_bias(tokens, x.size(1), hidden[0].dtype)  # (B or 1, H, T, S)
        return BackboneStates(hidden=hidden, retrieval_kv=kv, position=bias)

    def new_cache(self):
        """An empty key/value cache for ``frozen_states``: one dict per block."""
        return [{} for _ in self.decoder.model.transformer.h]

    @staticmethod
    def cache_select(cache, index: torch.Tensor):
        """A new cache of the rows ``index`` of ``cache`` (beams reordered, a prefix copied to a batch)."""
        from longmem.modules.decoding_state import take_rows

        return [{name: take_rows(t, index) for name, t in layer.items()} for layer in cache]

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.decoder.model.transformer.wte

    @property
    def lm_head(self) -> nn.Linear:
        return self.decoder.model.lm_head

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.model.transformer.ln_f

    def sidenet_final_norm(self) -> nn.Module:
        return nn.LayerNorm(self.embed_dim, eps=SIDENET_LAYER_NORM_EPS)  # fairseq's eps, as released

    def sidenet_layer(self, ffn_embed_dim, dropout, attention_dropout, use_memory):
        return SideNetLayer(self.embed_dim, ffn_embed_dim, self.num_heads, dropout, attention_dropout, use_memory)

    def copy_block_into(self, block_index, layer):
        layer.load_from_backbone_block(self.decoder.model.transformer.h[block_index])

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="checkpoint_last.pt",
                        data_name_or_path=".", **kwargs):
        """Sampling through fairseq's hub interface: ``.sample(...)``, ``.score(...)``."""
        from fairseq import hub_utils

        x = hub_utils.from_pretrained(
            model_name_or_path, checkpoint_file, data_name_or_path, load_checkpoint_heads=True, **kwargs
        )
        return hub_utils.GeneratorHubInterface(x["args"], x["task"], x["models"])


# (embed_dim, num_layers, num_attention_heads, ffn_embed_dim, retrieval_layer_index)
# Sizes are the released ones; only medium's retrieval layer (17) comes from the release.
NEWGPT_ARCHS = {
    "newgpt-tiny": (256, 4, 4, 1024, 2),
    "newgpt-mini": (128, 8, 4, 512, 5),
    "newgpt-small": (768, 12, 12, 3072, 8),
    "newgpt-medium": (1024, 24, 16, 4096, 17),
    "newgpt-large": (1280, 36, 20, 5120, 25),
    "newgpt-xl": (1600, 48, 25, 6400, 34),
}


def _make_arch(sizes):
    embed_dim, num_layers, heads, ffn, retrieval = sizes

    def arch(args):
        args.embed_dim = getattr(args, "embed_dim", embed_dim)
        args.num_layers = getattr(args, "num_layers", num_layers)
        args.num_attention_heads = getattr(args, "num_attention_heads", heads)
        args.ffn_embed_dim = getattr(args, "ffn_embed_dim", ffn)
        args.retrieval_layer_index = getattr(args, "retrieval_layer_index", retrieval)
        args.dropout = getattr(args, "dropout", 0.1)
        args.attention_dropout = getattr(args, "attention_dropout", 0.0)  # the release has none
        args.max_target_positions = getattr(args, "max_target_positions", 2048)

    return arch


for _name, _sizes in NEWGPT_ARCHS.items():
    register_model_architecture("newgpt", _name)(_make_arch(_sizes))


def newgpt_config(arch: str, **overrides) -> NewGPTConfig:
    """The config of a registered ``newgpt`` arch, with keyword overrides; unknown arch is an error."""
    if arch not in NEWGPT_ARCHS:
        raise ConfigError(f"unknown newgpt arch {arch!r}; known: {', '.join(NEWGPT_ARCHS)}")
    unknown = set(overrides) - {f.name for f in fields(NewGPTConfig)}
    if unknown:
        raise ConfigError(f"unknown newgpt option(s) {sorted(unknown)} for arch {arch!r}")
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return NewGPTConfig(**{f.name: getattr(args, f.name, f.default) for f in fields(NewGPTConfig)})


def load_dictionary(dictionary: Union[str, Dictionary]) -> Dictionary:
    """A fairseq ``Dictionary`` from a ``dict.txt`` path (clear error when it is missing)."""
    if isinstance(dictionary, Dictionary):
        return dictionary
    if not os.path.isfile(dictionary):
        raise FileNotFoundError(
            f"dictionary file {dictionary!r} does not exist: pass the fairseq dict.txt of your data "
            f"(written by fairseq-preprocess, or data/gpt2_bpe/dict.txt of this repository for GPT-2 BPE)"
        )
    return Dictionary.load(dictionary)


def build_newgpt(arch: str, dictionary: Union[str, Dictionary], **overrides) -> NewGPTLanguageModel:
    """Build a ``newgpt`` model outside fairseq-train, e.g.
    ``build_newgpt("newgpt-medium", "data/gpt2_bpe/dict.txt")``."""
    cfg = newgpt_config(arch, **overrides)
    return NewGPTLanguageModel(NewGPTDecoder(cfg, load_dictionary(dictionary)))

