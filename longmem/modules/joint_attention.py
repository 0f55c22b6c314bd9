"""Joint attention over local context and retrieved memory, with a per-head gate (docs/design.md §4).

With ``q`` scaled by ``d^-0.5``::

    A = softmax(q Kᵀ + ALiBi + causal mask)        over the local tokens
    M = softmax(q K̃ᵀ)                              over the token's k retrieved memory tokens
    out_h = (1 - σ(g_h)) · A V + σ(g_h) · M Ṽ       then out_proj

K̃, Ṽ are the raw cached backbone keys/values; only the query comes from the SideNet. The gate
``memory_bias`` (one scalar per head, initialised to 0) weighs memory by σ(g), as the release does
(the paper's text writes it the other way round). Attention dropout acts on A only, as released.

Memory slots that do not exist (``mask`` False) are excluded from M; a token with no memory slot at
all gets plain local attention (weight 1 on A V). Where every slot exists this is the release's
formula (``tests/test_sidenet.py`` checks it against the formula written out); where the release's
memory held fewer than k/csz chunks it gathered its never-written all-zero last row instead.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.modules.heads import merge_heads, split_heads


class JointMemoryAttention(nn.Module):
    """Self-attention whose layer may also read memory; q/k/v/out projections without bias."""

    def __init__(self, embed_dim: int, num_heads: int, attention_dropout: float, use_memory: bool):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.use_memory = use_memory
        if use_memory:
            self.memory_bias = nn.Parameter(torch.zeros(num_heads))  # the gate g, one per head
        self.record_evidence = False
        self.last_evidence = None

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        retrieve: Optional[Callable[[torch.Tensor], object]] = None,
        cache: Optional[dict] = None,
    ) -> torch.Tensor:
        """x: (B, T, C) (already layer-normed); attn_bias: (B or 1, H, T, S) ALiBi + masks.
        ``retrieve(queries (B, T, C)) -> Retrieved`` reads memory with the unscaled q_proj output.
        ``cache`` (incremental decoding): a dict holding the keys/values of the S - T tokens before these
        (none at first); they are read, then extended with this call's."""
        query = self.q_proj(x)  # (B, T, C)
        H = self.num_heads
        q, k, v = split_heads(query, H), split_heads(self.k_proj(x), H), split_heads(self.v_proj(x), H)
        if cache is not None:
            k, v = extend_cache(cache, k, v)
        p = self.attention_dropout if self.training else 0.0
        local = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=p)  # (B, H, T, d)
        self.last_evidence = None
        if self.use_memory and retrieve is not None:
            memory = retrieve(query.detach())
            if self.record_evidence:
                self.last_evidence = memory_evidence(q, q, k, attn_bias, memory.keys, memory.mask, self.memory_bias)
            out = mix_with_memory(q, local, memory.keys, memory.values, memory.mask, self.memory_bias)
        else:
            out = local
        return self.out_proj(merge_heads(out))  # (B, T, C)


def extend_cache(cache: dict, k: torch.Tensor, v: torch.Tensor):
    """Append this call's keys/values (B, H, T, d) to the cache's; returns all of them (B, H, S, d)."""
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    return k, v


@torch.no_grad()
def memory_evidence(q_local, q_memory, local_keys, attn_bias, mem_keys, mem_mask, memory_bias):
    """How strongly memory matches each token's query, against its local context: per head
    ``e_h = logsumexp_k(q̃·K̃_k/√d) - logsumexp_s(q·K_s/√d + bias_s)``, then ``z = Σ_h σ(g_h) e_h / Σ_h σ(g_h)``.

    q_local (B, H, T, d): the query scored against the local keys (B, H, S, d) with ``attn_bias`` (B or 1, H, T, S);
    q_memory: the one scored against the retrieved keys (B, H, T, k, d) (the same tensor but for rotary models);
    mem_mask (B, H, T, k). Returns (z, present), each (B, T) float: z (0 where absent) and 1 where the token has a
    memory slot in some head, else 0. Computed in fp32, without gradient."""
    scale = q_local.size(-1) ** -0.5
    local = torch.einsum("bhtd,bhsd->bhts", q_local.float() * scale, local_keys.float()) + attn_bias.float()
    local_lse = torch.logsumexp(local, dim=-1)  # (B, H, T)
    scores = torch.einsum("bhtd,bhtkd->bhtk", q_memory.float() * scale, mem_keys.float())
    has_slot = mem_mask.any(dim=-1) & torch.isfinite(local_lse)  # (B, H, T); a fully masked row (padding): none
    memory_lse = torch.logsumexp(scores.masked_fill(~mem_mask, float("-inf")), dim=-1)
    gate = torch.sigmoid(memory_bias.detach().float()).view(1, -1, 1)  # (1, H, 1)
    weight = gate * has_slot.float()
    per_head = torch.where(has_slot, memory_lse - local_lse, torch.zeros_like(local_lse))
    total = weight.sum(dim=1)  # (B, T)
    present = total > 0
    z = torch.where(present, (weight * per_head).sum(dim=1) / total.clamp_min(1e-12), torch.zeros_like(total))
    return z, present.float()


def mix_with_memory(q, local, mem_keys, mem_values, mem_mask, memory_bias):
    """The gated sum of local attention and attention over each token's retrieved memory.

    q, local: (B, H, T, d) (q unscaled); mem_keys/values: (B, H, T, k, d); mem_mask: (B, H, T, k);
    memory_bias: (H,) gate logits. Returns (1 - σ(g))·local + σ(g)·softmax(q·K̃ᵀ/√d)·Ṽ per head, local
    alone for a token with no memory slot."""
    mem_keys, mem_values = mem_keys.to(q.dtype), mem_values.to(q.dtype)
    scores = torch.einsum("bhtd,bhtkd->bhtk", q * q.size(-1) ** -0.5, mem_keys)  # (B, H, T, k)
    scores = scores.masked_fill(~mem_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # no dropout on the memory probabilities, as released
    from_memory = torch.einsum("bhtk,bhtkd->bhtd", probs, mem_values)  # (B, H, T, d)
    # the mix in fp32 whatever the compute dtype: under bf16 autocast the gate's gradient, a sum over tokens
    # of (memory - local)·dL/dout, cancels heavily and would lose most of its digits in bf16
    gate = torch.sigmoid(memory_bias.float()).view(1, -1, 1, 1)  # (1, H, 1, 1)
    gate = gate * mem_mask.any(dim=-1, keepdim=True).float()  # no memory slot -> local only
    return ((1 - gate) * local.float() + gate * from_memory.float()).to(local.dtype)
