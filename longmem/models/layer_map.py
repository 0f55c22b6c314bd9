"""Which backbone layer each SideNet layer reads (docs/design.md §2): the three maps, in one place.

With ``r`` = ``layer_reduction_factor`` and ``m`` = ``retrieval_layer_index`` (0-based backbone layer
whose keys/values fill the memory):

* SideNet layer ``i`` adds the cross-network residual ``H[r*i + r] - H[r*i]`` of the backbone's hidden
  states ``H`` (``H[0]`` = token embeddings, ``H[L]`` = ``ln_f`` of the last block);
* ``--reload-ptm-layer`` initialises SideNet layer ``i`` from backbone block ``r*i + 1`` (the release;
  the paper's text says ``r*i``);
* SideNet layer ``int(m / r)`` is the memory-augmented one (the release: 17 / 2 -> 8);
  ``--memory-layer-from-retrieval-block`` starts it from block ``m`` instead of ``r*i + 1`` (the same
  block for an odd ``m`` and r = 2, as in the release; for an even ``m`` the one whose keys fill memory).
"""
from dataclasses import dataclass
from typing import Tuple

from longmem.errors import ConfigError


def check_retrieval_layer_index(index: int, backbone_layers: int) -> None:
    """The one range check of ``--retrieval-layer-index`` against a backbone's depth."""
    if not 0 <= index < backbone_layers:
        raise ConfigError(f"--retrieval-layer-index {index} is beyond the backbone's {backbone_layers} layers: "
                         f"retrieval_layer_index={index} is out of range for num_layers={backbone_layers}, choose "
                         f"one in [0, {backbone_layers - 1}] (the release: 17 of 24)")


@dataclass(frozen=True)
class LayerMap:
    backbone_layers: int
    sidenet_layers: int
    reduction_factor: int
    retrieval_layer_index: int
    memory_layer_from_retrieval_block: bool = False

    def __post_init__(self):
        r = self.reduction_factor
        if r < 1:
            raise ConfigError(f"--layer-reduction-factor must be >= 1, got {r}")
        check_retrieval_layer_index(self.retrieval_layer_index, self.backbone_layers)
        if self.memory_layer >= self.sidenet_layers:
            raise ConfigError(f"memory layer int({self.retrieval_layer_index} / {r}) = {self.memory_layer} is beyond "
                             f"the SideNet's {self.sidenet_layers} layers; lower --retrieval-layer-index or add "
                             f"--decoder-layers")
        if r * self.sidenet_layers > self.backbone_layers:
            raise ConfigError(f"{self.sidenet_layers} SideNet layers x layer_reduction_factor {r} needs "
                             f"{r * self.sidenet_layers} backbone layers, the backbone has {self.backbone_layers}")

    @property
    def memory_layer(self) -> int:
        """The SideNet layer whose attention also reads memory: ``int(m / r)``."""
        return int(self.retrieval_layer_index / self.reduction_factor)

    def residual(self, i: int) -> Tuple[int, int]:
        """(a, b): SideNet layer ``i`` adds ``H[b] - H[a]``."""
        r = self.reduction_factor
        return r * i, r * i + r

    def reload_source(self, i: int) -> int:
        """The backbone block that initialises SideNet layer ``i``: ``r*i + 1``; with
        ``memory_layer_from_retrieval_block``, the memory layer's is block ``m`` itself, so that its query
        projection is the one of the block whose keys fill the memory (for an even ``m``; not the release)."""
        if self.memory_layer_from_retrieval_block and i == self.memory_layer:
            return self.retrieval_layer_index
        return self.reduction_factor * i + 1
