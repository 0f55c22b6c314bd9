"""Text generation with a LongMem model (or a backbone alone) by incremental decoding (docs/design.md §11).

A prompt of any length is fed in segments: with a LongMem model each full segment of ``window`` tokens
is written to the model's memory for this generation (a memory per row, empty at the start) and the local
context restarts, exactly as the streaming evaluation reads a document. New tokens then follow one at a
time, each reading memory as the full forward would, the window sliding into memory as it fills.

    ids = generate(model, prompt_ids, max_new_tokens=50, bos=dictionary.eos(), window=256)
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from longmem.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``sample=False``), or drawn after temperature, top-k and top-p."""
    sample: bool = False
    topk: int = 0          # 0: no top-k cut
    topp: float = 1.0      # 1: no nucleus cut
    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.topp <= 1:
            raise ConfigError(f"top-p must be in (0, 1], got {self.topp}")
        if self.topk < 0:
            raise ConfigError(f"top-k must be >= 0, got {self.topk}")

    def choose(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
        """The next token of one row's logits (V,)."""
        if not self.sample:
            return int(logits.argmax())
        logits = logits.float() / self.temperature
        if 0 < self.topk < logits.numel():
            cut = logits.topk(self.topk).values[-1]
            logits = logits.masked_fill(logits < cut, -float("inf"))
        if self.topp < 1:
            probs, order = torch.softmax(logits, -1).sort(descending=True)
            before = probs.cumsum(0) - probs  # mass of the tokens ranked above each
            logits[order[before >= self.topp]] = -float("inf")  # keep the smallest set reaching topp
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def is_longmem(model) -> bool:
    return hasattr(getattr(model, "decoder", None), "begin_decoding")


@torch.no_grad()
def generate(model, prompt_ids: List[int], max_new_tokens: int, bos: int, sampling: Sampling = Sampling(),
             window: Optional[int] = None, banned: List[int] = (), stop: Optional[int] = None,
             seed: int = 1, progress: Optional[Callable] = None, piece: int = 512) -> List[int]:
    """The new token ids after ``[bos] + prompt_ids``. ``window``: a LongMem model's tokens per segment (its
    memory off: the local context still restarts there, as in the streaming evaluation); ``banned``: ids never
    chosen (padding); ``stop``: an id that ends generation (kept); ``progress(iterable, total=)`` wraps the
    prompt's segments (e.g. tqdm)."""
    device = next(model.parameters()).device
    seq = torch.tensor([[bos] + list(prompt_ids)], device=device)
    state = {}
    step = piece
    if is_longmem(model):
        model.decoder.begin_decoding(state, 1, device, window=window)
        step = window or piece
    ends = list(range(step, seq.size(1), step)) + [seq.size(1)]
    for end in (ends if progress is None else progress(ends, total=len(ends))):
        logits = model(seq[:, :end], incremental_state=state)[0]
    generator = torch.Generator().manual_seed(seed)
    new = []
    for _ in range(max_new_tokens):
        last = logits[0, -1].float().cpu()
        if banned:
            last[list(banned)] = -float("inf")
        token = sampling.choose(last, generator)
        new.append(token)
        if token == stop:
            break
        seq = torch.cat([seq, torch.tensor([[token]], device=device)], dim=1)
        logits = model(seq, incremental_state=state)[0]
    return new
