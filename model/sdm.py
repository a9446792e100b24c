"""SDM: Sequential Deep Matching (Lv et al., CIKM 2019, arXiv 1909.00385), in one file.

Read top-down: the config, the small parts (embedding tables, user attention,
causal self-attention), the three named encoders of the paper (short-term,
long-term, gated fusion), the DNN baseline, then `SDM`, which wires the parts
of the chosen variant together.

`SDM.forward` returns one user vector per session position, all positions in
one causal pass: the vector at position p has read events 0..p of the session
(and the whole long-term history, which precedes the session). The loss lives
in `loss.py`; the model never sees targets.

Shape letters: B sessions, T session positions, L long-term events, D
`embedding_dim`, F item features, U = width of e_u, K values of a multi-valued
feature.

A multi-valued item feature (genres 'Comedy|Romance') is embedded as the mean of
its values' embeddings wherever an item is embedded: session input, long-term
window, item tower, cold items (`ValueLists`, `pooled_embedding`). A
multi-valued user feature (a profile's interests 'sports|music') is the mean of
its values' embeddings in e_u.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import Tensor

from sdm.model.neighbours import NeighbourTable

Variant = Literal["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN", "SASRec"]
Batch = Mapping[str, Mapping[str, Tensor] | Tensor]

# Vocabulary index 0 is padding and 1 is out-of-vocabulary (docs/FORMAT.md).
PAD, OOV = 0, 1

MAX_VALUES = 16
"""Most values of a multi-valued item feature that an item is embedded with: its first 16 (in the
order of its string); later ones are dropped when items.parquet and catalogue.parquet are read
(`pipeline.dataset.pad_values`). A list's width K is the longest one the data holds, up to this
cap, and pooling looks up (..., K, D) embeddings: the full softmax's item tower holds
num_items x K x D floats at once. 16 is well above the handful of genres or tags an item
usually lists, and keeps that at most 16x the embedding table's own size."""


class ModelConfig(BaseModel):
    """Everything needed to rebuild an `SDM` (stored in checkpoints).

    Vocabulary sizes come from the data manifest and include padding (0) and OOV (1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Variant = "PSDMMAL-N"
    item_vocab: dict[str, int]
    """Item feature name -> vocabulary size; "item" (the item id) first and required."""
    user_vocab: dict[str, int] = {}
    """User feature name -> vocabulary size; "user" is the user id. May be empty."""
    embedding_dim: int = 64
    lstm_layers: int = 1
    num_heads: int = 2
    num_blocks: int = 2
    """Transformer blocks of the SASRec variant."""
    dropout: float = 0.2
    num_targets: int = 5
    """N of PSDMMAL-N; the loss uses it, the model does not."""
    max_session_len: int = 50
    max_long_len: int = 50
    user_residual: bool = False
    """Short-term output s_p = h_p + user attention (instead of the attention alone): keeps the
    position's own state, which pure attention pooling over h_0..h_p dilutes."""
    state_query: bool = False
    """User attention's query at position p is W e_u + W_h h_p (the user and where the session
    is now) instead of W e_u alone, whose attention weights are the same at every position."""
    repeat: bool = False
    """Add the repeat (copy) head: items of the session prefix and of the long-term window
    get a learned extra score (`RepeatHead`); off = the paper's model."""
    repeat_prior: float = 0.0
    """Initial copy bonus of the session's last item (`RepeatHead`); 0 = start neutral."""
    id_dropout: float = 0.0
    """Training only: probability that an item occurrence of the item tower (a target or a
    negative of the loss) loses its id embedding (index 0, a zero row), so its vector must also
    work from side features alone, as a cold item's does (`SDM.cold_item_vectors`); 0 = off."""
    multi_valued: list[str] = []
    """Features of `item_vocab` or `user_vocab` that hold several values ('Comedy|Romance'): an
    item's (a user's) embedding of such a feature is the mean of its values' embeddings
    (`ValueLists`) instead of one value's. Empty = every feature single-valued (checkpoints
    before it)."""

    @field_validator("embedding_dim", "lstm_layers", "num_heads", "num_blocks", "num_targets", "max_session_len", "max_long_len")
    @classmethod
    def _positive(cls, v: int, info) -> int:  # noqa: ANN001 (pydantic's ValidationInfo)
        # upper bounds: the same as (or wider than) TrainConfig's and SessionizeConfig's
        top = {"embedding_dim": 16_384, "lstm_layers": 64, "num_heads": 1024, "num_blocks": 64, "num_targets": 1000,
               "max_session_len": 100_000, "max_long_len": 100_000}[info.field_name]  # fmt: skip
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        if v > top:
            raise ValueError(f"must be <= {top}, got {v}")
        return v

    @field_validator("dropout", "id_dropout")
    @classmethod
    def _probability(cls, v: float, info) -> float:  # noqa: ANN001 (pydantic's ValidationInfo)
        if not 0.0 <= v < 1.0:  # nan fails too
            raise ValueError(f"{info.field_name} must be in [0, 1), got {v}")
        return v

    @field_validator("repeat_prior")
    @classmethod
    def _prior(cls, v: float) -> float:
        if not (0.0 <= v and math.isfinite(v)):
            raise ValueError(f"repeat_prior must be a finite number >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_dims(self) -> ModelConfig:
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if "item" not in self.item_vocab:
            raise ValueError(f"item_vocab must contain 'item' (the item id), got {sorted(self.item_vocab)}")
        if next(iter(self.item_vocab)) != "item":
            # item_table column 0 is the item id, and columns follow item_vocab's order.
            raise ValueError(f"'item' must be the first key of item_vocab, got {list(self.item_vocab)}")
        if self.item_vocab["item"] < 3:
            raise ValueError(f"item_vocab['item'] must be >= 3 (padding, OOV and one item), got {self.item_vocab['item']}")
        for kind, vocab in (("item_vocab", self.item_vocab), ("user_vocab", self.user_vocab)):
            for name, size in vocab.items():
                if not name:
                    raise ValueError(f"{kind} has an empty feature name")
                if size < 2:
                    raise ValueError(f"{kind}[{name!r}] must be >= 2 (padding and OOV included), got {size}")
        wrong = [f for f in self.multi_valued if f in ("item", "user") or f not in {**self.item_vocab, **self.user_vocab}]
        if wrong or len(set(self.multi_valued)) != len(self.multi_valued):
            raise ValueError(
                f"multi_valued must name distinct side features of item_vocab or user_vocab, got {self.multi_valued}"
            )
        return self

    @property
    def item_features(self) -> list[str]:
        """Item features the variant reads (NoS: the item id only)."""
        return ["item"] if self.variant == "PSDMMAL-NoS" else list(self.item_vocab)

    @property
    def user_features(self) -> list[str]:
        """User features the variant reads (NoS: the user id only, when known; SDMMA, SASRec: none)."""
        if self.variant in ("SDMMA", "SASRec"):
            return []
        if self.variant == "PSDMMAL-NoS":
            return [f for f in self.user_vocab if f == "user"]
        return list(self.user_vocab)


# ---------------------------------------------------------------------------
# Small parts


class EmbeddingBank(nn.Module):
    """One embedding table per feature, each of width D, padding row fixed at zero.

    A ModuleList rather than a ModuleDict: feature names come from user data and
    a name like "type" or "train" would clash with nn.Module attributes.

    Args:
        vocab: feature name -> vocabulary size, in column order.
        dim: D.
    """

    def __init__(self, vocab: Mapping[str, int], dim: int) -> None:
        super().__init__()
        self.names = list(vocab)
        self.tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=PAD) for n in vocab.values())
        for t in self.tables:
            nn.init.normal_(t.weight, std=dim**-0.5)
            with torch.no_grad():
                t.weight[PAD].zero_()

    def forward(self, ids: Sequence[Tensor]) -> list[Tensor]:
        """Args: ids: one LongTensor (...) per feature, in `names` order. Returns: one (..., D) per feature."""
        return [table(x) for table, x in zip(self.tables, ids, strict=True)]


class ValueLists(nn.Module):
    """The value indices of every row, per multi-valued feature (`ModelConfig.multi_valued`).

    Items (`SDM.item_values`): row i holds item i's values (items.parquet's `<f>_values`).
    Users (`SDM.user_values`): row s holds the values of value set s, the index a user's
    profile carries for the feature (users.parquet's `<f>` and `<f>_values`).

    One buffer `values_<k>` (rows, K) per feature, k in `names` order (not the feature's
    name: names come from user data and could clash with nn.Module attributes). A row holds
    at most `MAX_VALUES` value indices, right-padded with 0. Rows 0 (padding) and 1 (OOV),
    and a row without values, are all 0: there a single value index is embedded
    (`pooled_embedding`). The buffers travel in the state dict, so a model rebuilt from its
    weights alone (serving) needs no data directory.

    Args:
        tables: feature name -> (rows, K) LongTensor, checked by `SDM`.
    """

    def __init__(self, tables: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(tables)
        for k, table in enumerate(tables.values()):
            self.register_buffer(f"values_{k}", table)

    def rows(self, items: Tensor | None) -> dict[str, Tensor]:
        """feature -> (..., K) value indices of the item indices `items` (...); None: every item's (num_items, K)."""
        tables = {f: getattr(self, f"values_{k}") for k, f in enumerate(self.names)}
        return tables if items is None else {f: t[items] for f, t in tables.items()}


def pooled_embedding(table: nn.Embedding, single: Tensor, values: Tensor) -> Tensor:
    """A multi-valued feature's embedding: the mean of the embeddings of `values` (..., K) (0 = padding,
    left out of the mean), or where a row holds no value, the embedding of `single` (...). Returns (..., D)."""
    count = (values != PAD).sum(-1, keepdim=True)  # (..., 1)
    mean = table(values).sum(-2) / count.clamp_min(1).to(table.weight.dtype)  # (..., K, D) -> (..., D)
    return torch.where(count > 0, mean, table(single))


def state_item_values(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The item `ValueLists` buffers of an `SDM` state dict, by feature: with the state's `item_table`,
    what `SDM(config, ...)` needs to rebuild the model from its weights alone (serving)."""
    names = [f for f in config.multi_valued if f in config.item_features]
    keys = {f: f"item_values.values_{k}" for k, f in enumerate(names)}
    return {f: state[key] for f, key in keys.items() if key in state}


def state_user_values(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The user `ValueLists` buffers of an `SDM` state dict, by feature (`state_item_values`)."""
    names = [f for f in config.multi_valued if f in config.user_features]
    keys = {f: f"user_values.values_{k}" for k, f in enumerate(names)}
    return {f: state[key] for f, key in keys.items() if key in state}


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


# ---------------------------------------------------------------------------
# The encoders of the paper


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


def _copy_items(batch: Batch, seq_items: Tensor, long_items: Tensor | None) -> tuple[Tensor, Tensor | None]:
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


# ---------------------------------------------------------------------------
# The model


def _check_value_tables(
    kind: str, features: list[str], values: Mapping[str, Tensor], vocab: Mapping[str, int], rows: int | None, what: str
) -> dict[str, Tensor]:
    """`ValueLists` tables for `features`, checked: 2-D integer, `rows` rows (None: at least 2),
    indices inside each feature's `vocab`, rows 0 (padding) and 1 (OOV) empty.

    Raises:
        ValueError: naming `kind` and the feature.
    """
    missing = [f for f in features if f not in values]
    if missing:
        raise ValueError(f"{kind} lacks the multi-valued features {missing}; pass {what}")
    out = {}
    for f in features:
        t = values[f]
        shape_ok = t.dim() == 2 and bool(t.shape[1]) and (t.shape[0] == rows if rows is not None else t.shape[0] >= 2)
        if t.dtype.is_floating_point or t.dtype == torch.bool or not shape_ok:
            want = f"({rows}, K >= 1)" if rows is not None else "(S >= 2, K >= 1)"
            raise ValueError(f"{kind}[{f!r}] must be a 2-D integer tensor of shape {want}, got {t.dtype} of shape {tuple(t.shape)}")
        t = t.long()
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab[f]:
            raise ValueError(f"{kind}[{f!r}] has indices in [{lo}, {hi}], outside its vocabulary of size {vocab[f]}")
        if bool(t[:2].any()):
            raise ValueError(f"{kind}[{f!r}]: rows 0 (padding) and 1 (OOV) must be all 0")
        out[f] = t.clone()
    return out


class SDM(nn.Module):
    """SDM user tower (one vector per session position) and item tower, for one variant.

    Variants switch parts off; they do not copy code (SPEC section 7):

    | variant      | short-term                 | user attention | long-term + fusion |
    |--------------|----------------------------|----------------|--------------------|
    | SDMMA        | LSTM + self-attention      | no             | no                 |
    | PSDMMA       | LSTM + self-attention      | yes            | no                 |
    | PSDMMAL(-N)  | LSTM + self-attention      | yes            | yes                |
    | PSDMMAL-NoS  | as PSDMMAL, item id and user id only                            |
    | DNN          | mean-pooled history + e_u -> MLP                                |
    | SASRec       | causal transformer over the session (a baseline, not SDM)      |

    Parts a variant does not use are not built, so every parameter gets a gradient
    (DistributedDataParallel needs no `find_unused_parameters`).

    Args:
        config: the model config.
        item_table: LongTensor (num_items, F_all): row i holds item i's feature indices,
            columns in `config.item_vocab` order (column 0 = i; a multi-valued feature's
            first value). None = item id only, allowed when the variant reads no side feature.
        item_values: multi-valued item feature -> LongTensor (num_items, K): row i holds item
            i's value indices, padded with 0 (`ValueLists`; `pipeline.dataset.load_item_values`).
            Needed for each item feature of `config.multi_valued` the variant reads.
        user_values: multi-valued user feature -> LongTensor (S, K): row s holds the value
            indices of value set s, the index users carry (`pipeline.dataset.load_user_values`).
            Needed for each user feature of `config.multi_valued` the variant reads.

    Raises:
        ValueError: when item_table does not match item_vocab, or item_values / user_values do
            not hold a valid table for each feature of config.multi_valued the variant reads.
    """

    def __init__(
        self, config: ModelConfig, item_table: Tensor | None = None, item_values: Mapping[str, Tensor] | None = None,
        user_values: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        D = config.embedding_dim
        self.item_features = config.item_features
        self.user_features = config.user_features

        self.register_buffer("item_table", self._check_item_table(config, item_table))  # (num_items, F)
        # Cold items' vectors are multiplied by this (chosen on validation after training, `pipeline/coldscale.py`).
        self.register_buffer("cold_scale", torch.tensor(1.0))
        # Multi-valued features: each item's value indices, mean-pooled wherever an item is embedded.
        self.multi_valued = [f for f in config.multi_valued if f in self.item_features]
        self.item_values = ValueLists(self._check_item_values(config, item_values))
        # ... and each value set's value indices, mean-pooled into e_u.
        self.user_multi_valued = [f for f in config.multi_valued if f in self.user_features]
        self.user_values = ValueLists(self._check_user_values(config, user_values))
        # Item-CF's neighbour scores, added with a weight chosen on validation after training
        # (`model/neighbours.py`); empty, and so inactive, until then.
        self.neighbours = NeighbourTable()

        # Item side: shared by the session input, the long-term history and the item tower.
        self.item_emb = EmbeddingBank({f: config.item_vocab[f] for f in self.item_features}, D)
        self.item_proj = nn.Linear(len(self.item_features) * D, D, bias=False)
        self.input_dropout = nn.Dropout(config.dropout)

        # User side: e_u = concat of profile embeddings, or a learned vector without profile.
        self.uses_user = config.variant not in ("SDMMA", "SASRec")
        self.user_emb = EmbeddingBank({f: config.user_vocab[f] for f in self.user_features}, D)
        self.user_default = nn.Parameter(torch.randn(D) * D**-0.5) if self.uses_user and not self.user_features else None
        U = D * max(len(self.user_features), 1)

        self.short_term: ShortTermEncoder | None = None
        self.long_term: LongTermEncoder | None = None
        self.fusion: GatedFusion | None = None
        self.dnn: DNNEncoder | None = None
        self.sasrec: SASRecEncoder | None = None
        if config.variant == "DNN":
            self.dnn = DNNEncoder(D, U, config.dropout)
        elif config.variant == "SASRec":
            self.sasrec = SASRecEncoder(D, config.num_blocks, config.num_heads, config.dropout, config.max_session_len)
        else:
            self.short_term = ShortTermEncoder(
                D, config.lstm_layers, config.num_heads, config.dropout, U if self.uses_user else None,
                config.user_residual, config.state_query,
            )
        if config.variant in ("PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS"):
            self.long_term = LongTermEncoder(len(self.item_features), D, U)
            self.fusion = GatedFusion(D, U)
        self.repeat = (
            RepeatHead(D, config.max_session_len, config.max_long_len, config.repeat_prior) if config.repeat else None
        )

    def _check_item_table(self, config: ModelConfig, table: Tensor | None) -> Tensor:
        """Keep the columns of the features this variant reads; check shape and ranges."""
        num_items = config.item_vocab["item"]
        names = list(config.item_vocab)
        if table is None:
            side = [f for f in self.item_features if f != "item"]
            if side:
                raise ValueError(
                    f"item_table is None but variant {config.variant} reads item side features {side}; "
                    "pass the item feature table (or use variant PSDMMAL-NoS)"
                )
            return torch.arange(num_items).unsqueeze(1)  # (num_items, 1)
        if table.dtype.is_floating_point or table.dtype == torch.bool or table.dim() != 2:
            raise ValueError(f"item_table must be a 2-D integer tensor, got {table.dtype} of shape {tuple(table.shape)}")
        if tuple(table.shape) != (num_items, len(names)):
            raise ValueError(
                f"item_table has shape {tuple(table.shape)}, expected (item_vocab['item'], len(item_vocab)) = "
                f"({num_items}, {len(names)}) for features {names}"
            )
        table = table.long()
        if not torch.equal(table[:, 0].cpu(), torch.arange(num_items)):
            raise ValueError("item_table column 0 must be the item id itself (row i holds i)")
        for j, name in enumerate(names):
            lo, hi = int(table[:, j].min()), int(table[:, j].max())
            if lo < 0 or hi >= config.item_vocab[name]:
                raise ValueError(
                    f"item_table column {name!r} has indices in [{lo}, {hi}], outside its vocabulary "
                    f"of size {config.item_vocab[name]}"
                )
        return table[:, [names.index(f) for f in self.item_features]].clone()  # (num_items, F)

    def _check_item_values(self, config: ModelConfig, values: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """The value tables of the multi-valued item features this variant reads (num_items rows each)."""
        return _check_value_tables(
            "item_values", self.multi_valued, values or {}, config.item_vocab, config.item_vocab["item"],
            "each item's value indices (items.parquet's <f>_values, `pipeline.dataset.load_item_values`)",
        )  # fmt: skip

    def _check_user_values(self, config: ModelConfig, values: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """The value-set tables of the multi-valued user features this variant reads (any S >= 2 rows)."""
        return _check_value_tables(
            "user_values", self.user_multi_valued, values or {}, config.user_vocab, None,
            "each value set's value indices (users.parquet's <f>_values, `pipeline.dataset.load_user_values`)",
        )  # fmt: skip

    # -- item side ---------------------------------------------------------

    def item_embs(self, ids: Sequence[Tensor], values: Mapping[str, Tensor]) -> list[Tensor]:
        """One embedding per feature of `item_features`, each (..., D).

        Args:
            ids: one LongTensor (...) per feature: its value index (a multi-valued feature's first).
            values: multi-valued feature -> LongTensor (..., K) of value indices (0 = padding):
                that feature's embedding is the mean of theirs, and `ids`'s only where a row holds
                no value (`pooled_embedding`). Any other feature: the embedding of `ids`.
        """
        embs = []
        for f, table, x in zip(self.item_emb.names, self.item_emb.tables, ids, strict=True):
            embs.append(pooled_embedding(table, x, values[f]) if f in values else table(x))
        return embs

    def item_input(self, ids: Sequence[Tensor], values: Mapping[str, Tensor] | None = None) -> Tensor:
        """Item representation from its feature indices: proj(concat of feature embeddings).

        Args:
            ids: one LongTensor (...) per feature of `item_features`.
            values: multi-valued feature -> (..., K) value indices (`item_embs`); None = none.

        Returns:
            (..., D).
        """
        return self.item_proj(torch.cat(self.item_embs(ids, values or {}), dim=-1))  # (..., F*D) -> (..., D)

    def item_vectors(self, items: Tensor) -> Tensor:
        """Item tower: vectors in the user vectors' space, for dot-product retrieval.

        In training with `id_dropout` > 0, each entry of `items` independently loses its
        id embedding with that probability (`_drop_ids`).

        Args:
            items: LongTensor (...) of item indices.

        Returns:
            (..., D).
        """
        rows = self._drop_ids(self.item_table[items])  # (..., F)
        return self.item_input(rows.unbind(-1), self.item_values.rows(items))  # (..., D)

    def all_item_vectors(self) -> Tensor:
        """Returns: (num_items, D), rows 0 (padding) and 1 (OOV) included; callers mask them.
        In training with `id_dropout`, each item's id is dropped (once for the whole call) as in
        `item_vectors`."""
        return self.item_input(self._drop_ids(self.item_table).unbind(-1), self.item_values.rows(None))

    def cold_item_vectors(self, side: Tensor, values: Mapping[str, Tensor] | None = None) -> Tensor:
        """Item tower of items without an id embedding (cold items: side info, no training event).

        The id part is index 0, whose embedding is the zero padding row: the vector comes
        from the side features alone, as in training under `id_dropout`.

        Args:
            side: LongTensor (..., F - 1), the item's side feature indices in `item_features[1:]`
                order (1 = a value training never saw; a multi-valued feature's first value).
            values: multi-valued feature -> LongTensor (..., K) of the item's value indices
                (0 = padding): mean-pooled as a vocabulary item's are. A feature of
                `multi_valued` missing here, or a row without values, embeds `side`'s index;
                features the model does not pool are ignored.

        Returns:
            (..., D), multiplied by the `cold_scale` buffer: how far a side-feature-only vector
            is trusted against the vocabulary's (1 = as the tower gives it).
        """
        ids = torch.zeros(side.shape[:-1], dtype=torch.long, device=side.device)
        pooled = {f: v.long() for f, v in (values or {}).items() if f in self.multi_valued}
        return self.item_input([ids, *side.long().unbind(-1)], pooled) * self.cold_scale

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A state dict written before `cold_scale` existed loads with scale 1 (what its vectors were)."""
        state_dict.setdefault(prefix + "cold_scale", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_ids(self, rows: Tensor) -> Tensor:
        """`rows` (..., F) of feature indices with column 0 (the id) set to 0 with probability
        `id_dropout` per row, in training only; otherwise `rows` itself, and no random number
        is drawn (so id_dropout 0 leaves every later random draw as it was)."""
        p = self.config.id_dropout
        if not self.training or p == 0.0:
            return rows
        drop = torch.rand(rows.shape[:-1], device=rows.device) < p  # (...)
        return torch.cat([rows[..., :1].masked_fill(drop.unsqueeze(-1), PAD), rows[..., 1:]], dim=-1)

    # -- user side ---------------------------------------------------------

    def user_vector(self, user: Mapping[str, Tensor], batch_size: int) -> Tensor:
        """e_u. Args: user: feature -> LongTensor (B,). Returns: (B, U)."""
        if self.user_default is not None:
            return self.user_default.expand(batch_size, -1)  # (B, D)
        if not self.user_multi_valued:
            return torch.cat(self.user_emb([user[f] for f in self.user_features]), dim=-1)  # (B, U)
        sets = self.user_values.rows(None)  # feature -> (S, K)
        parts = []
        for f, table in zip(self.user_features, self.user_emb.tables, strict=True):
            if f in sets:  # the user's value set -> the mean of its values (no value: the OOV value)
                idx = user[f].long()
                parts.append(pooled_embedding(table, torch.ones_like(idx), sets[f][idx]))
            else:
                parts.append(table(user[f]))
        return torch.cat(parts, dim=-1)  # (B, U)

    def forward(self, batch: Batch, with_history: bool = False) -> Tensor | tuple[Tensor, History | None]:
        """User vectors after reading positions 0..p of each session, for every p.

        Args:
            batch: "seq": feature -> LongTensor (B, T) right-padded with 0; "seq_len" (B,);
                "long": feature -> LongTensor (B, L) (L may be 0); "long_len" (B,);
                "user": feature -> LongTensor (B,). Features the variant does not read are ignored.
                A multi-valued feature's index is its first value; a known item's event (index >= 2)
                embeds the mean of all its values instead (`ValueLists`), padding and OOV events
                the index given.
            with_history: also return the repeat head's `History` (None without the head).
                Optional batch key "copy_items": {"seq": (B, T), "long": (B, L)} candidate indices
                of the history events for the head (default: their item indices); evaluation
                with cold candidates gives an OOV event of a cold item its candidate index, so
                that item can be copied (`pipeline/catalogue.py`).

        Returns:
            (B, T, D); positions >= seq_len are finite but meaningless. With `with_history`,
            the tuple (user vectors, History or None).
        """
        self._check_features(batch)
        seq = batch["seq"]
        B, T = seq["item"].shape
        values = self.item_values.rows(seq["item"])  # multi-valued feature -> (B, T, K)
        x = self.input_dropout(self.item_input([seq[f] for f in self.item_features], values))  # (B, T, D)
        e_u = self.user_vector(batch["user"], B) if self.uses_user else None  # (B, U)

        long, long_mask, long_x, long_values = None, None, None, {}
        if self.reads_long:
            long = batch["long"]
            L = long["item"].shape[1]
            long_mask = torch.arange(L, device=x.device) < batch["long_len"].unsqueeze(1)  # (B, L)
            long_values = self.item_values.rows(long["item"])  # feature -> (B, L, K)
        if self.dnn is not None or (self.repeat is not None and long is not None):
            long_x = self.item_input([long[f] for f in self.item_features], long_values)  # (B, L, D)

        if self.dnn is not None:
            o = self.dnn(x, long_x, long_mask, e_u)  # (B, T, D)
        elif self.sasrec is not None:
            o = self.sasrec(x)  # (B, T, D)
        else:
            o = self.short_term(x, e_u)  # (B, T, D)
            if self.long_term is not None:
                embs = self.item_embs([long[f] for f in self.item_features], long_values)  # F x (B, L, D)
                p = self.long_term(embs, long_mask, e_u)  # (B, D)
                o = self.fusion(e_u, o, p)  # (B, T, D)
        if not with_history:
            return o
        if self.repeat is None:
            return o, None
        long_items = long["item"] if long is not None else None
        long_len = batch["long_len"] if long is not None else None
        seq_items, long_items = _copy_items(batch, seq["item"], long_items)
        return o, self.repeat(o, x, seq_items, long_x, long_items, long_len)

    @property
    def reads_long(self) -> bool:
        """Whether the variant reads the long-term window ("long", "long_len")."""
        return self.long_term is not None or self.dnn is not None

    def _check_features(self, batch: Batch) -> None:
        """Name the missing features instead of a bare KeyError (checks keys, not tensor values)."""
        needs_long = self.reads_long
        parts = [("seq", self.item_features), ("user", self.user_features)]
        if needs_long:
            parts.append(("long", self.item_features))
        for part, names in parts:
            missing = [f for f in names if f not in batch[part]]
            if missing:
                raise ValueError(f"batch[{part!r}] lacks features {missing} that the {self.config.variant} model reads")
