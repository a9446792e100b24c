"""The repeat (copy) head, beyond the paper (`ModelConfig.repeat`): the user's own past items,
of the session prefix and of the long-term window, get a learned extra score.

`RepeatHead` gives each session position a copy logit per history item (`History`), which
the loss mixes into the softmax (`loss.py`); `copy_scores` sums them per distinct item, the
copy score R that evaluation and serving combine with the dot product as logaddexp(u . v_j, R_j).

Shape letters as in `sdm.py`: B sessions, T session positions, L long-term events,
D `embedding_dim`, C = T (+ L) history candidates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from sdm.model.embeddings import OOV, Batch


class History(NamedTuple):
    """The user's own past items as extra candidates of every session position (`RepeatHead`).

    Attributes:
        items: LongTensor (B, C): candidate item indices, the session's positions 0..T-1
            then the long-term window's 0..L-1; 0 where there is none.
        logits: float32 (B, T, C): copy logit of candidate c for the user vector at
            position p; `NO_COPY` where p may not read c (a later session position,
            padding, OOV).
    """

    items: Tensor
    logits: Tensor


NO_COPY = -1e9
"""Copy logit of a candidate that may not be read: exp() of it is exactly 0, and unlike -inf
it keeps logsumexp's gradient finite when a row has no candidate at all."""


class RepeatHead(nn.Module):
    """Repeat mode (beyond the paper; RepeatNet's idea as a copy mechanism): a score for
    re-consuming an item the user already interacted with.

    The model's item distribution at position p is a mixture
    P(j) ~ exp(o_p . v_j) + sum_{c: item_c = j} exp(r_pc), with the copy logit
    r_pc = g(o_p) + (W_q o_p) . (W_k x_c) / sqrt(D) + b_session[p - c] (session item c <= p)
    or + b_long[age rank of c] (long-term item c). Only items of the history change
    score (to logaddexp(o_p . v_j, R_pj)), so retrieval stays a dot-product index
    search plus a re-score of at most T + L history candidates.

    Args:
        dim: D.
        max_session_len: T_max, the number of session recency biases.
        max_long_len: L_max, the number of long-term recency biases.
        prior: initial copy bonus, a recency prior: the item d positions back starts with
            session bias prior * 0.5^d and the gate with bias prior / 2, so before any
            training the last items already outscore the rest (0 = all biases start at 0).
    """

    def __init__(self, dim: int, max_session_len: int, max_long_len: int, prior: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.session_recency = nn.Embedding(max_session_len, 1)
        self.long_recency = nn.Embedding(max(max_long_len, 1), 1)
        self.scale = 1.0 / math.sqrt(dim)
        nn.init.zeros_(self.long_recency.weight)
        with torch.no_grad():
            age = torch.arange(max_session_len, dtype=torch.float32)
            self.session_recency.weight.copy_((prior * 0.5**age).unsqueeze(1))
            self.gate.bias.fill_(prior / 2)

    def forward(
        self, user: Tensor, seq_x: Tensor, seq_items: Tensor, long_x: Tensor | None, long_items: Tensor | None,
        long_len: Tensor | None,
    ) -> History:  # fmt: skip
        """Args:
            user: (B, T, D) the user vectors o_p.
            seq_x: (B, T, D) item inputs of the session; seq_items: (B, T) their indices (0 = padding).
            long_x: (B, L, D) item inputs of the long-term window, or None (variant without it);
            long_items: (B, L); long_len: (B,).

        Returns:
            `History` with C = T (+ L).
        """
        B, T, _ = user.shape
        device = user.device
        pos = torch.arange(T, device=device)
        dist = (pos.view(T, 1) - pos.view(1, T)).clamp(0, self.session_recency.num_embeddings - 1)  # (T, T) p - c
        seq_bias = self.session_recency(dist).squeeze(-1)  # (T, T)
        seq_ok = (pos.view(1, T, 1) >= pos.view(1, 1, T)) & (seq_items > OOV).unsqueeze(1)  # (B, T, T) c <= p
        keys, items, bias, ok = [seq_x], [seq_items], [seq_bias.expand(B, T, T)], [seq_ok]
        if long_x is not None and long_x.shape[1] > 0:
            L = long_x.shape[1]
            lpos = torch.arange(L, device=device)
            age = (long_len.view(B, 1) - 1 - lpos.view(1, L)).clamp(0, self.long_recency.num_embeddings - 1)  # (B, L)
            keys.append(long_x)
            items.append(long_items)
            bias.append(self.long_recency(age).squeeze(-1).unsqueeze(1).expand(B, T, L))  # (B, T, L)
            ok.append(((lpos.view(1, L) < long_len.view(B, 1)) & (long_items > OOV)).unsqueeze(1).expand(B, T, L))
        k = self.key(torch.cat(keys, dim=1))  # (B, C, D)
        q = self.query(user)  # (B, T, D)
        logits = torch.einsum("btd,bcd->btc", q, k).float() * self.scale  # (B, T, C)
        logits = logits + self.gate(user).float() + torch.cat(bias, dim=2).float()  # (B, T, C)
        return History(torch.cat(items, dim=1), logits.masked_fill(~torch.cat(ok, dim=2), NO_COPY))


def copy_items(batch: Batch, seq_items: Tensor, long_items: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The history's candidate indices: `batch["copy_items"]` where given, else the item indices."""
    given = batch.get("copy_items")
    if given is None:
        return seq_items, long_items
    return given["seq"], given["long"] if long_items is not None else None


def copy_scores(history: History, qb: Tensor, qp: Tensor) -> tuple[Tensor, Tensor]:
    """Per query, each distinct history item once with its summed copy score R = logsumexp of its logits.

    Args:
        history: the batch's `History`.
        qb, qp: (Q,) batch row and session position of each query.

    Returns:
        (items (Q, C), R (Q, C)): repeated and unreadable entries have item 0 and R = NO_COPY.
    """
    items = history.items[qb]  # (Q, C)
    logits = history.logits[qb, qp]  # (Q, C)
    readable = logits > NO_COPY / 2
    items = torch.where(readable, items, torch.zeros_like(items))
    same = items.unsqueeze(2) == items.unsqueeze(1)  # (Q, C, C)
    total = torch.logsumexp(logits.unsqueeze(1).masked_fill(~same, NO_COPY), dim=2)  # (Q, C) over equal items
    C = items.shape[1]
    earlier = torch.ones(C, C, dtype=torch.bool, device=items.device).tril(-1)  # (C, C) c' < c
    first = ~(same & earlier).any(2) & (items > OOV)  # (Q, C)
    return torch.where(first, items, torch.zeros_like(items)), torch.where(first, total, torch.full_like(total, NO_COPY))
