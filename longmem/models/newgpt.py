"""``newgpt``: the frozen backbone of LongMem, a GPT-2-sized decoder trained with ALiBi.

docs/design.md §1. GPT-J-style parallel block ``h = x + Attn(LN1(x)) + MLP(LN1(x))`` with one LayerNorm per
block, bias-free attention projections, tanh-GELU MLP, a final ``ln_f``, no position embeddings and an
untied ``lm_head`` with bias. Module names reproduce the released state-dict keys
(``decoder.model.transformer.h.{i}.attn.q_proj.weight`` ...).

Besides logits, the decoder returns on request the L+1 hidden states (the L block inputs, then
``ln_f`` of the last block's output) and the key/value projections of layer
``retrieval_layer_index``: what LongMem's memory caches.

Here: the fairseq decoder and model, and what the SideNet asks of its frozen backbone. The layers are in
``longmem/modules/newgpt_blocks.py``; the config, its checks and the registered sizes in
``longmem/models/newgpt_config.py``.
"""
import logging
import os
from typing import Union

import torch
import torch.nn as nn
from fairseq.data import Dictionary
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)

from longmem.errors import ConfigError
from longmem.models.backbone import BackboneStates, FrozenBackbone, register_family
from longmem.models.newgpt_config import NEWGPT_ARCHS, NewGPTConfig, _make_arch, newgpt_config, validate_newgpt_config
from longmem.modules.newgpt_blocks import NewGPTModel
from longmem.modules.sidenet_layer import LAYER_NORM_EPS as SIDENET_LAYER_NORM_EPS
from longmem.modules.sidenet_layer import SideNetLayer

logger = logging.getLogger(__name__)

__all__ = ["NEWGPT_ARCHS", "NewGPTConfig", "NewGPTDecoder", "NewGPTLanguageModel", "build_newgpt", "load_dictionary",
           "newgpt_config", "validate_newgpt_config"]


class NewGPTDecoder(FairseqIncrementalDecoder):
    def __init__(self, cfg, dictionary: Dictionary):
        super().__init__(dictionary)
        self.cfg = cfg
        validate_newgpt_config(cfg)  # before any weight is allocated
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

    @torch.no_grad()
    def retrieval_kv_only(self, tokens: torch.Tensor):
        return self.decoder.model.retrieval_kv(tokens)

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


for _name, _sizes in NEWGPT_ARCHS.items():
    register_model_architecture("newgpt", _name)(_make_arch(_sizes))


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

