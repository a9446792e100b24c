"""The three named encoders of the paper (section 3; SPEC section 7): the short-term session
encoder (LSTM, self-attention, user attention) giving s, the long-term encoder giving p, and
the gated fusion of s and p into the user vector o.

Shape letters as in `sdm.py`: B sessions, T session positions, L long-term events,
D `embedding_dim`, F item features, U = width of e_u.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from sdm.model.attention import CausalSelfAttention, UserAttention


class ShortTermEncoder(nn.Module):
    """Session encoder: stacked residual LSTM -> causal multi-head self-attention -> user attention.

    Every stage is causal, so the output at position p depends on positions 0..p
    only, and right padding never changes valid positions.

    Args:
        dim: D.
        lstm_layers: stacked LSTM layers, each x + LSTM(x) (the input is also width D,
            so the first layer gets a residual too).
        num_heads: heads of the self-attention.
        dropout: between layers and in the attention.
        user_dim: U; None switches user attention off (SDMMA): the output is the
            self-attention output.
        residual: add h_p to the user-attention output (`ModelConfig.user_residual`).
        state_query: position p's query is W e_u + W_h h_p instead of W e_u alone
            (`ModelConfig.state_query`).
    """

    def __init__(
        self,
        dim: int,
        lstm_layers: int,
        num_heads: int,
        dropout: float,
        user_dim: int | None,
        residual: bool = False,
        state_query: bool = False,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.state_query = nn.Linear(dim, dim, bias=False) if state_query and user_dim is not None else None
        self.lstms = nn.ModuleList(nn.LSTM(dim, dim, batch_first=True) for _ in range(lstm_layers))
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.user_attn = UserAttention(user_dim, dim) if user_dim is not None else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, user: Tensor | None) -> Tensor:
        """Args:
            x: (B, T, D) item inputs of the session.
            user: (B, U) e_u, or None when user attention is off.

        Returns:
            (B, T, D) s_p for every position p.
        """
        h = x
        for lstm in self.lstms:
            h = h + self.dropout(lstm(h)[0])  # (B, T, D)
        h = self.norm(h + self.attn(h))  # (B, T, D)  post-LN as in the paper
        if self.user_attn is None:
            return h
        T = h.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()  # (T, T) query p reads keys <= p
        extra = self.state_query(h) if self.state_query is not None else None  # (B, T, D)
        s = self.user_attn(user, h, causal.expand(h.shape[0], T, T), extra)  # (B, T, D)
        return h + s if self.residual else s


class LongTermEncoder(nn.Module):
    """Long-term history: per item feature f, user attention over the embeddings of L_f,
    then concat and a dense layer: p = tanh(W [z_1; ..; z_F] + b).

    Args:
        num_features: F.
        dim: D.
        user_dim: U.
    """

    def __init__(self, num_features: int, dim: int, user_dim: int) -> None:
        super().__init__()
        self.attns = nn.ModuleList(UserAttention(user_dim, dim) for _ in range(num_features))
        self.dense = nn.Linear(num_features * dim, dim)

    def forward(self, embs: Sequence[Tensor], mask: Tensor, user: Tensor) -> Tensor:
        """Args:
            embs: F tensors (B, L, D), the shared embeddings of each L_f.
            mask: bool (B, L), True for real events.
            user: (B, U).

        Returns:
            (B, D) p; rows with no history get tanh(b).
        """
        mask = mask.unsqueeze(1)  # (B, 1, L)
        z = [attn(user, e, mask).squeeze(1) for attn, e in zip(self.attns, embs, strict=True)]  # F x (B, D)
        return torch.tanh(self.dense(torch.cat(z, dim=-1)))  # (B, D)


class GatedFusion(nn.Module):
    """G = sigmoid(W1 e_u + W2 s + W3 p + b); o = (1 - G) * p + G * s.

    Args:
        dim: D.
        user_dim: U.
    """

    def __init__(self, dim: int, user_dim: int) -> None:
        super().__init__()
        self.w_user = nn.Linear(user_dim, dim)  # carries b
        self.w_short = nn.Linear(dim, dim, bias=False)
        self.w_long = nn.Linear(dim, dim, bias=False)

    def forward(self, user: Tensor, s: Tensor, p: Tensor) -> Tensor:
        """Args: user: (B, U); s: (B, T, D); p: (B, D). Returns: (B, T, D)."""
        p = p.unsqueeze(1)  # (B, 1, D)
        g = torch.sigmoid(self.w_user(user).unsqueeze(1) + self.w_short(s) + self.w_long(p))  # (B, T, D)
        return (1 - g) * p + g * s
