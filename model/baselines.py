"""The encoders of the neural baseline variants (SPEC section 7), built into `SDM` in place of the
paper's: DNN (YouTube-DNN style, the paper's baseline) and SASRec. The non-neural baselines
(Item-CF, Popularity) are in `sdm.pipeline.baselines`.

Shape letters as in `sdm.py`: B sessions, T session positions, L long-term events,
D `embedding_dim`, U = width of e_u.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from sdm.model.attention import CausalSelfAttention


class DNNEncoder(nn.Module):
    """YouTube-DNN baseline: [mean of prefix items; mean of long-term items; e_u] -> MLP.

    Args:
        dim: D.
        user_dim: U.
        dropout: between the MLP layers.
    """

    def __init__(self, dim: int, user_dim: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * dim + user_dim, 2 * dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
        )

    def forward(self, x: Tensor, long: Tensor, long_mask: Tensor, user: Tensor) -> Tensor:
        """Args:
            x: (B, T, D) session item inputs.
            long: (B, L, D) long-term item inputs; long_mask: bool (B, L).
            user: (B, U).

        Returns:
            (B, T, D).
        """
        B, T, D = x.shape
        # Sums in float32: a bf16 running sum over 50 positions loses too many bits.
        counts = torch.arange(1, T + 1, device=x.device, dtype=torch.float32).view(1, T, 1)  # (1, T, 1)
        prefix_mean = x.float().cumsum(dim=1) / counts  # (B, T, D) causal mean over positions <= p
        m = long_mask.unsqueeze(-1).float()  # (B, L, 1)
        long_mean = (long.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)  # (B, D), zeros when empty
        rest = torch.cat([long_mean, user], dim=-1).unsqueeze(1).expand(B, T, -1)  # (B, T, D + U)
        return self.mlp(torch.cat([prefix_mean, rest], dim=-1))  # (B, T, D)


class SASRecEncoder(nn.Module):
    """SASRec (Kang & McAuley, ICDM 2018) as a baseline inside the project: learned
    positions, `num_blocks` pre-LN causal transformer blocks, a final layer norm.
    Trained by the same trainer, it is SASRec with a full or sampled softmax
    cross-entropy (Klenitskiy & Vasilev, RecSys 2023) rather than the original BCE.

    Args:
        dim: D.
        num_blocks: transformer blocks.
        num_heads: attention heads.
        dropout: embedding, attention and feed-forward dropout.
        max_len: positions (max_session_len).
    """

    def __init__(self, dim: int, num_blocks: int, num_heads: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=dim**-0.5)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: (B, T, D) item inputs. Returns: (B, T, D), causal."""
        T = x.shape[1]
        h = self.dropout(x + self.pos(torch.arange(T, device=x.device)))  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))
