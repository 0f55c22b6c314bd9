"""What the SideNet needs from a frozen backbone, and how a backbone is read from its checkpoint.

A backbone family (``newgpt`` today) is a fairseq language model that also implements
``FrozenBackbone``: it runs a segment once, without gradients, and returns the L+1 hidden states, the
retrieval layer's key/value projections (what the memory caches) and whatever its attention needs to
place tokens (``position``: ALiBi's bias for newgpt); it builds SideNet layers of its own block type and
copies its block weights into them (``--reload-ptm-layer``); it owns the output head. The SideNet
(``transformer_lm_sidenet.py``) uses nothing else of it.

``load_backbone`` reads a backbone checkpoint (``--pretrained-model-path``) and dispatches on the model
name it records to the family that registered that name.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from longmem.errors import ConfigError
from longmem.utils.checkpoints import load_checkpoint_state

logger = logging.getLogger(__name__)


@dataclass
class BackboneStates:
    hidden: List[torch.Tensor]                                  # L + 1 entries of (B, T, C), no gradient
    retrieval_kv: Optional[Tuple[torch.Tensor, torch.Tensor]]   # layer m's (keys, values), each (B, T, C_kv)
    position: object                                            # the positional input of a SideNet layer


class FrozenBackbone:
    """Mixin for a fairseq model usable as LongMem's frozen backbone."""

    family: str = ""

    # sizes -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    @property
    def memory_heads(self) -> Tuple[int, int]:
        """(heads, head_dim) of the cached keys/values."""
        raise NotImplementedError

    # the frozen pass ---------------------------------------------------------------------------------
    def frozen_states(self, tokens: torch.Tensor, retrieval_kv: bool, cache=None) -> BackboneStates:
        """The states of ``tokens`` (B, S). With a ``cache`` from ``new_cache()`` that holds the first S' of
        them (incremental decoding), only the last S - S' are run; the cache then holds all S and the
        states and position returned are those of the new tokens (attending to all S)."""
        raise NotImplementedError

    def retrieval_kv_only(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer m's (keys, values) of ``tokens`` (B, S), as ``frozen_states(tokens, True).retrieval_kv`` gives them,
        without running the blocks above m where a family can stop there: all that filling memory needs."""
        return self.frozen_states(tokens, retrieval_kv=True).retrieval_kv

    def new_cache(self):
        """An empty cache for ``frozen_states``."""
        raise NotImplementedError

    @staticmethod
    def cache_select(cache, index: torch.Tensor):
        """A new cache holding rows ``index`` of ``cache`` (beam reordering; ``cache`` is left as it was)."""
        raise NotImplementedError

    # parts the SideNet shares or copies --------------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def sidenet_final_norm(self) -> nn.Module:
        """A fresh norm of the type the SideNet ends with (``--reload-ptm-layer`` copies ``final_norm``)."""
        raise NotImplementedError

    def sidenet_layer(self, ffn_embed_dim: int, dropout: float, attention_dropout: float,
                      use_memory: bool) -> nn.Module:
        """A SideNet layer of this family's block type, ``forward(x, residual, position, retrieve)``."""
        raise NotImplementedError

    def copy_block_into(self, block_index: int, layer: nn.Module) -> None:
        raise NotImplementedError

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()


# family name prefix -> class with from_checkpoint_state(state, path, dictionary, retrieval_layer_index)
# and with_sidenet_sizes(cfg, dictionary)
FAMILIES: Dict[str, type] = {}


def register_family(prefix: str):
    def wrap(cls):
        FAMILIES[prefix] = cls
        return cls
    return wrap


def checkpoint_model_config(state: dict):
    """The model config a fairseq checkpoint records (a dict or namespace-like object; {} if none), from
    its dataclass config or a legacy argparse one."""
    cfg = state.get("cfg")
    model_cfg = cfg.get("model") if cfg is not None else None
    if model_cfg is None and state.get("args") is not None:
        model_cfg = vars(state["args"])
    return model_cfg or {}


def checkpoint_model_name(state: dict) -> str:
    """The model (or arch) name a fairseq checkpoint records, from a dataclass or a legacy config."""
    model_cfg = checkpoint_model_config(state)
    for key in ("_name", "arch"):
        value = model_cfg.get(key) if isinstance(model_cfg, dict) else getattr(model_cfg, key, None)
        if value:
            return str(value)
    return ""


def family_of(name: str) -> Optional[type]:
    return next((cls for prefix, cls in FAMILIES.items() if name.startswith(prefix)), None)


def load_backbone(path: str, dictionary, retrieval_layer_index: int):
    """The frozen backbone of ``--pretrained-model-path``: (model, True), or (a model of the SideNet's
    sizes to be filled by a LongMem checkpoint, False) when the file does not exist."""
    if not (path and os.path.exists(path)):
        return None, False
    for family in FAMILIES.values():  # families read from their own files (a Hugging Face folder, a .gguf)
        if hasattr(family, "accepts_path") and family.accepts_path(path):
            backbone = family.from_path(path, dictionary, retrieval_layer_index)
            backbone.freeze()
            return backbone, True
    if not os.path.isfile(path):
        raise ConfigError(f"--pretrained-model-path {path} is a folder but not a backbone one (no config.json)")
    try:
        state = load_checkpoint_state(path)
    except ConfigError as e:
        raise ConfigError(f"--pretrained-model-path {e}") from None
    name = checkpoint_model_name(state)
    family = family_of(name)
    if family is None:
        raise ConfigError(f"--pretrained-model-path {path} is not a backbone checkpoint of a known family "
                          f"({', '.join(FAMILIES)}): its model is {name or 'unknown'!r}; pass the backbone's "
                          f"checkpoint, e.g. gpt2_medium/checkpoint_last.pt")
    backbone = family.from_checkpoint_state(state, path, dictionary, retrieval_layer_index)
    backbone.freeze()
    return backbone, True
