"""What a LongMem decoder keeps between incremental calls (generation, a cached prompt): docs/design.md §11.

The full forward reads a stream in segments of ``window`` tokens (``--tokens-per-sample``): each segment
attends locally to itself, reads the memory of the earlier segments, and is then written to memory. An
incremental decoder keeps the same segments: the tokens of the open segment are its local context (the
backbone's and every SideNet layer's key/value cache); when the segment reaches ``window`` tokens its
retrieval-layer keys/values are written to memory and the local caches start empty. ``window=None``: one
segment without end (nothing is ever written; a prompt scored whole, as the ICL evaluation does).
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from longmem.modules.memory_bank import ChunkedMemoryBank


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of ``t``: a new tensor, or, when one row is copied to a batch (a shared prefix forked
    for every prompt of a batch), a broadcast view of it that copies nothing (caches grow by concatenation,
    which materializes it; nothing writes into a cache in place)."""
    if t.size(0) == 1 and index.numel() and not bool(index.any()):
        return t.expand(index.numel(), *t.shape[1:])
    return t.index_select(0, index)


@dataclass
class DecodingState:
    window: Optional[int]                 # tokens per segment; None: the local context never slides
    backbone_cache: Any                   # the frozen backbone's cache of the open segment (new_cache())
    layer_caches: List[dict]              # one {"k", "v"} per SideNet layer, the open segment's
    bank: Optional[ChunkedMemoryBank]     # the memory read (and written at each segment's end); None: off
    tokens: torch.Tensor                  # (B, s) the open segment's tokens so far
    consumed: int = 0                     # tokens of the whole stream fed so far
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # the open segment's
    #                                       retrieval-layer (keys, values), written to memory when it closes

    @property
    def room(self) -> Optional[int]:
        """Tokens the open segment still takes (None: no limit)."""
        return None if self.window is None else self.window - self.tokens.size(1)

    def select(self, index: torch.Tensor, cache_select) -> "DecodingState":
        """A new state of the rows ``index`` (beams reordered or dropped); ``cache_select`` is the backbone's."""
        return DecodingState(
            window=self.window, backbone_cache=cache_select(self.backbone_cache, index),
            layer_caches=[{name: take_rows(t, index) for name, t in c.items()} for c in self.layer_caches],
            bank=None if self.bank is None else self.bank.select_streams(index),
            tokens=take_rows(self.tokens, index), consumed=self.consumed,
            pending=[(take_rows(k, index), take_rows(v, index)) for k, v in self.pending],
        )
