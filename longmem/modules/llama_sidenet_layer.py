"""A SideNet layer of the Llama block type, for LongMem over a Hugging Face Llama-family backbone.

The block is the backbone's own (pre-norm, sequential): RMSNorm, grouped-query attention with rotary
positions, RMSNorm, SwiGLU MLP. With LongMem's cross-network residual ``R_i = H[r*i + r] - H[r*i]``::

    a       = x + Attn(RMSNorm1(x))
    x_{i+1} = a + Dropout(MLP(RMSNorm2(a))) + R_i

Module names are the Hugging Face decoder layer's (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``), so ``--reload-ptm-layer`` copies a backbone layer by
its state dict. In the memory layer the attention also reads memory (docs/design.md §4): each query head
searches the memory of its key/value head with its own query, and its gate ``memory_bias`` weighs the
result. Memory keys are cached, and queries searched, *before* the rotary embedding: attention to
memory has no positions (the release's ALiBi adds no bias to memory either), while rotating keys and
queries at their positions within two different segments would add a meaningless offset to the score.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.modules.heads import merge_heads, split_heads
from longmem.modules.joint_attention import extend_cache, memory_evidence, mix_with_memory


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d); cos, sin (B, T, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class LlamaSideNetAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, attention_dropout: float,
                 use_memory: bool):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} key/value heads evenly")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False)
        self.use_memory = use_memory
        if use_memory:
            self.memory_bias = nn.Parameter(torch.zeros(num_heads))  # the gate, one per query head
        self.record_evidence = False  # joint_attention.py: --mix-with-backbone memory reads last_evidence
        self.last_evidence = None

    def forward(self, x, position, retrieve: Optional[Callable] = None, cache: Optional[dict] = None):
        """x (B, T, C), already normed; position = (cos, sin, attn_bias) of these T tokens, the bias against
        all S keys; ``cache`` (incremental): the rotated keys and the values of the S - T tokens before."""
        cos, sin, bias = position
        group = self.num_heads // self.num_kv_heads
        query = self.q_proj(x)  # (B, T, Hq*d), before rotary
        q = split_heads(query, self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_rot, v = extend_cache(cache, k_rot, v)
        k_rot, v_rep = k_rot.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, T, d)
        p = self.attention_dropout if self.training else 0.0
        local = F.scaled_dot_product_attention(q_rot, k_rot, v_rep, attn_mask=bias.to(q.dtype), dropout_p=p)
        self.last_evidence = None
        if self.use_memory and retrieve is not None:
            keys, values, mask = self._read_memory(query.detach(), retrieve, group)
            if self.record_evidence:  # local scores with the rotated query, memory's with the unrotated one
                self.last_evidence = memory_evidence(q_rot, q, k_rot, bias, keys, mask, self.memory_bias)
            local = mix_with_memory(q, local, keys, values, mask, self.memory_bias)
        return self.o_proj(merge_heads(local))  # (B, T, C)

    def _read_memory(self, query, retrieve, group):
        """Query head h searches key/value head h // group: one search per member of a group, each with
        the (B, T, H_kv*d) queries of that member of every group. -> keys, values (B, Hq, T, k, d), mask."""
        B, T, _ = query.shape
        heads = query.view(B, T, self.num_kv_heads, group, self.head_dim)
        found = [retrieve(heads[:, :, :, j].reshape(B, T, -1), [kv * group + j for kv in range(self.num_kv_heads)])
                 for j in range(group)]  # each (B, H_kv, T, k, ...)
        stack = lambda name: torch.stack([getattr(f, name) for f in found], dim=2).flatten(1, 2)  # noqa: E731
        return stack("keys"), stack("values"), stack("mask")  # query head kv*group + j


class LlamaSideNetLayer(nn.Module):
    def __init__(self, embed_dim, ffn_embed_dim, num_heads, num_kv_heads, head_dim, rms_norm_eps, dropout,
                 attention_dropout, use_memory=False):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(embed_dim, eps=rms_norm_eps)
        self.self_attn = LlamaSideNetAttention(embed_dim, num_heads, num_kv_heads, head_dim, attention_dropout,
                                               use_memory)
        self.post_attention_layernorm = nn.RMSNorm(embed_dim, eps=rms_norm_eps)
        self.mlp = SwiGLU(embed_dim, ffn_embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cross_residual, position, retrieve=None, cache=None):
        a = x + self.self_attn(self.input_layernorm(x), position, retrieve, cache)
        return a + self.dropout(self.mlp(self.post_attention_layernorm(a))) + cross_residual


class SwiGLU(nn.Module):
    def __init__(self, embed_dim, ffn_embed_dim):
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, ffn_embed_dim, bias=False)
        self.up_proj = nn.Linear(embed_dim, ffn_embed_dim, bias=False)
        self.down_proj = nn.Linear(ffn_embed_dim, embed_dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
