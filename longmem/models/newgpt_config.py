"""``newgpt``'s settings: its fairseq config, the checks made before any weight exists, and the registered sizes
(``newgpt-tiny`` ... ``newgpt-xl``). The layers are in ``longmem/modules/newgpt_blocks.py``, the fairseq model and
its role as LongMem's frozen backbone in ``longmem/models/newgpt.py``."""
import argparse
from dataclasses import dataclass, field, fields

from fairseq.dataclass import FairseqDataclass
from fairseq.models import ARCH_CONFIG_REGISTRY

from longmem.errors import ConfigError
from longmem.models.arch_defaults import arch_defaults
from longmem.models.layer_map import check_retrieval_layer_index


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
    return arch_defaults(embed_dim=embed_dim, num_layers=num_layers, num_attention_heads=heads, ffn_embed_dim=ffn,
                         retrieval_layer_index=retrieval, dropout=0.1,
                         attention_dropout=0.0,  # the release has none
                         max_target_positions=2048)


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
