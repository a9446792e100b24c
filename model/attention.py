"""The two attentions of the paper's encoders (paper section 3): user attention, with the user
vector e_u as the query (short-term and long-term encoders), and causal multi-head
self-attention (short-term encoder, and the SASRec baseline's blocks).

Shape letters as in `sdm.py`: B sessions, T session positions, D `embedding_dim`, U = width of e_u.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class UserAttention(nn.Module):
    """Attention with the user vector e_u as the query.

    alpha_k = softmax_k((W e_u) . h_k / sqrt(D)) over the allowed keys; out = sum_k alpha_k h_k.
    W maps e_u (width U) to the key width D, so e_u may be any concat of profile embeddings.

    Args:
        user_dim: U.
        dim: D, the key width.
    """

    def __init__(self, user_dim: int, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(user_dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, user: Tensor, keys: Tensor, mask: Tensor, extra: Tensor | None = None) -> Tensor:
        """Args:
            user: (B, U).
            keys: (B, K, D).
            mask: bool (B, Q, K): which keys each of Q outputs may read.
            extra: (B, Q, D) added to the query W e_u of each output (the state query), or None.

        Returns:
            (B, Q, D); an output with no allowed key is zeros (e.g. empty long-term history).
        """
        q = self.query(user).unsqueeze(1)  # (B, 1, D)
        if extra is not None:
            q = q + extra  # (B, Q, D)
        # Scores in float32 so the mask value and softmax are safe under bf16 autocast.
        scores = torch.bmm(q, keys.transpose(1, 2)).float() * self.scale  # (B, 1 or Q, K)
        scores = scores.expand(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # (B, Q, K)
        # A row with no allowed key would softmax to uniform weights; "* mask" makes it zero.
        weights = torch.softmax(scores, dim=-1) * mask  # (B, Q, K)
        return torch.bmm(weights.to(keys.dtype), keys)  # (B, Q, D)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position p reads positions <= p (nanoGPT style).

    Args:
        dim: D.
        num_heads: H; D must be divisible by H.
        dropout: attention and output dropout.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, T, D). Returns: (B, T, D)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, D/H)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return F.dropout(self.proj(y), self.dropout, self.training)
