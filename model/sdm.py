"""SDM: Sequential Deep Matching (Lv et al., CIKM 2019, arXiv 1909.00385): `SDM`, the assembly.

`SDM` wires together the parts of the chosen variant (SPEC section 7), each in its own module:

- `config.py`: `ModelConfig`, the variant and its sizes (also importable from here);
- `embeddings.py`: item and user feature embeddings, multi-valued features' value lists;
- `attention.py`: user attention and causal multi-head self-attention;
- `encoders.py`: the three named encoders of the paper (short-term, long-term, gated fusion);
- `baselines.py`: the DNN and SASRec encoders of the baseline variants;
- `repeat.py`: the repeat (copy) head, beyond the paper.

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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sdm.model.baselines import DNNEncoder, SASRecEncoder
from sdm.model.config import ModelConfig
from sdm.model.embeddings import PAD, Batch, EmbeddingBank, ValueLists, pooled_embedding
from sdm.model.encoders import GatedFusion, LongTermEncoder, ShortTermEncoder
from sdm.model.neighbours import NeighbourTable
from sdm.model.repeat import History, RepeatHead, copy_items


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
            i's value indices, padded with 0 (`ValueLists`; `pipeline.tables.load_item_values`).
            Needed for each item feature of `config.multi_valued` the variant reads.
        user_values: multi-valued user feature -> LongTensor (S, K): row s holds the value
            indices of value set s, the index users carry (`pipeline.tables.load_user_values`).
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
            "each item's value indices (items.parquet's <f>_values, `pipeline.tables.load_item_values`)",
        )  # fmt: skip

    def _check_user_values(self, config: ModelConfig, values: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """The value-set tables of the multi-valued user features this variant reads (any S >= 2 rows)."""
        return _check_value_tables(
            "user_values", self.user_multi_valued, values or {}, config.user_vocab, None,
            "each value set's value indices (users.parquet's <f>_values, `pipeline.tables.load_user_values`)",
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
        seq_items, long_items = copy_items(batch, seq["item"], long_items)
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
