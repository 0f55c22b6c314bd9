"""One SideNet layer: a parallel block with a cross-network residual from the frozen backbone (docs/design.md §2).

    x_{i+1} = x_i + R_i + Attn_i(LN1_i(x_i)) + Dropout(FC2_i(GELU(FC1_i(LN1_i(x_i)))))
    R_i     = H_bb[r*i + r] - H_bb[r*i]          (backbone hidden states, detached)

As released: dropout on the MLP branch only (attention dropout acts on attention probabilities); erf
GELU; fairseq's LayerNorm eps 1e-5; attention with the backbone's ALiBi bias over local tokens. The
memory-augmented layer's attention also reads the cached memory (``JointMemoryAttention``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.modules.joint_attention import JointMemoryAttention

LAYER_NORM_EPS = 1e-5  # fairseq's LayerNorm, as in the release's SideNet (the backbone's are 1e-6)


class SideNetLayer(nn.Module):
    def __init__(self, embed_dim, ffn_embed_dim, num_heads, dropout, attention_dropout, use_memory=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.self_attn = JointMemoryAttention(embed_dim, num_heads, attention_dropout, use_memory)
        self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
        self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cross_residual, attn_bias, retrieve=None, cache=None):
        """x, cross_residual: (B, T, C) -> (B, T, C); ``cache``: the attention's keys/values (incremental)."""
        h = self.ln_1(x)
        attn = self.self_attn(h, attn_bias, retrieve, cache)
        mlp = self.fc2(F.gelu(self.fc1(h)))
        return x + cross_residual + attn + self.dropout(mlp)

    @torch.no_grad()
    def load_from_backbone_block(self, block) -> None:
        """``--reload-ptm-layer``: copy a newgpt block's weights (attn.*, ln_1, mlp.fc_in/fc_out)."""
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(self.self_attn, name).weight.copy_(getattr(block.attn, name).weight)
        self.ln_1.load_state_dict(block.ln_1.state_dict())
        self.fc1.load_state_dict(block.mlp.fc_in.state_dict())
        self.fc2.load_state_dict(block.mlp.fc_out.state_dict())
