"""The layers of ``newgpt`` (docs/design.md §1): ALiBi attention, the MLP, the GPT-J-style parallel block, the
stack and its ``lm_head``. Module names reproduce the released state-dict keys (``transformer.h.{i}.attn.q_proj``
...); ``longmem/models/newgpt.py`` wraps them as a fairseq decoder."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.modules.alibi import alibi_attention_bias, alibi_slopes, token_positions
from longmem.modules.heads import merge_heads, split_heads

LAYER_NORM_EPS = 1e-6


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

    def retrieval_kv(self, tokens: torch.Tensor):
        """Layer ``retrieval_layer_index``'s (k, v) of ``tokens`` (B, S), each (B, S, C), as ``forward`` computes
        them, the blocks above it not run."""
        x = self.transformer.drop(self.transformer.wte(tokens))
        bias = self.attention_bias(tokens, tokens.size(1), x.dtype)
        for block in self.transformer.h[: self.retrieval_layer_index + 1]:
            x, key, value = block(x, bias, None)
        return key, value
