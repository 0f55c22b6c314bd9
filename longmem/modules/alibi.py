"""ALiBi: attention with linear biases (Press et al., 2022), as the LongMem backbone uses it.

Head ``h`` (1-based) of ``H`` gets slope ``2^(-8h/H)`` when ``H`` is a power of two; otherwise the
slopes of the nearest lower power of two ``n`` followed by the odd-indexed slopes of ``2n`` (the rule
BLOOM uses). The bias added to ``q.k/sqrt(d)`` is ``-slope_h * (i - j)`` for query position ``i`` and
key position ``j``, positions counted over non-pad tokens. The release adds ``slope_h * j`` instead,
which softmax's shift invariance makes identical.
"""
import math
from typing import List, Optional

import torch


def alibi_slopes(num_heads: int) -> List[float]:
    """Per-head slopes, head 1 first."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got num_heads={num_heads}")

    def power_of_two_slopes(n: int) -> List[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        return power_of_two_slopes(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def token_positions(tokens: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """Position of each token counted over non-pad tokens: (B, S) -> (B, S), first real token = 0."""
    if padding_idx is None:
        return torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    not_pad = tokens.ne(padding_idx).long()
    return (torch.cumsum(not_pad, dim=1) - 1).clamp_(min=0)


def alibi_attention_bias(
    slopes: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention bias: ALiBi plus the causal and key-padding masks.

    slopes: (H,). query_positions: (B, T) or (T,); key_positions: (B, S) or (S,), with the queries
    being the last T of the S keys (incremental decoding feeds T = 1 against a cache of S).
    key_padding_mask: (B, S) bool, True = pad. Returns (B or 1, H, T, S) in ``dtype``; masked entries
    hold the most negative finite value of ``dtype``. A query always sees its own key, so a pad query
    (whose keys would all be masked) attends to itself and no row becomes NaN.
    """
    if query_positions.dim() == 1:
        query_positions = query_positions.unsqueeze(0)
    if key_positions.dim() == 1:
        key_positions = key_positions.unsqueeze(0)
    T, S = query_positions.size(1), key_positions.size(1)
    distance = query_positions.unsqueeze(-1) - key_positions.unsqueeze(-2)  # (B, T, S)
    bias = -slopes.to(torch.float32).view(1, -1, 1, 1) * distance.unsqueeze(1).to(torch.float32)
    # queries are the last T keys: query t sits at key index S - T + t
    q_index = torch.arange(S - T, S, device=slopes.device).view(T, 1)
    k_index = torch.arange(S, device=slopes.device).view(1, S)
    masked = None
    if causal:
        masked = (k_index > q_index).view(1, 1, T, S)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(key_padding_mask.size(0), 1, 1, S) & (k_index != q_index)
        masked = pad if masked is None else (masked | pad)
    bias = bias.to(dtype)
    if masked is not None:
        bias = bias.masked_fill(masked, torch.finfo(dtype).min)
    return bias  # (B or 1, H, T, S)
