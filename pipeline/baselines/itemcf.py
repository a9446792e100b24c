"""Item-CF, classic and repeat-aware: session co-occurrence similarity, prefix recency weights, `ItemCF`.

The formulas: the package docstring (`sdm.pipeline.baselines`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import torch
from torch import Tensor

from sdm.errors import SdmError
from sdm.pipeline.baselines.popularity import popularity_scores
from sdm.pipeline.baselines.scoring import ScoreFn, _Entries, _quiet_sparse
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.tables import load_item_counts


def _training_sessions(data_dir: Path, manifest: dict[str, Any], since: int | None = None) -> pl.LazyFrame:
    """(sess_id, item): each training session's distinct in-vocabulary items (`since`: only the
    sessions that start at or after this time, microseconds since the epoch)."""
    paths = [str(Path(data_dir) / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    if not paths:
        raise SdmError(f"{data_dir}: no training shards to build item-CF from")
    sessions = (
        pl.scan_parquet(paths)
        .select("seq_item", "ts", "sess_id", "sess_start", "sess_len")
        .explode(["sess_id", "sess_start", "sess_len"])
        .filter(pl.col("sess_id").is_not_null())
    )
    if since is not None:
        sessions = sessions.filter(pl.col("ts").list.get(pl.col("sess_start")).dt.epoch("us") >= since)
    return (
        sessions
        .select(
            pl.col("sess_id"),
            pl.col("seq_item").list.slice(pl.col("sess_start"), pl.col("sess_len")).list.unique().alias("item"),
        )
        .explode("item")
        .filter(pl.col("item") >= 2)
    )


def cooccurrence_counts(sessions: pl.LazyFrame) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Co-occurrence counts: (item, other, c) of every pair i != j seen together in c sessions,
    and (item, n): the sessions holding each item.

    Args:
        sessions: lazy (sess_id, item) with each item at most once per session.
    """
    sessions = sessions.select(pl.col("sess_id"), pl.col("item").cast(pl.Int64))
    n = sessions.group_by("item").agg(pl.len().cast(pl.Float64).alias("n"))
    pairs = (
        sessions.join(sessions.rename({"item": "other"}), on="sess_id")
        .filter(pl.col("item") != pl.col("other"))
        .group_by("item", "other")
        .agg(pl.len().cast(pl.Float64).alias("c"))
    )
    return pairs, n


def top_neighbours(pairs: pl.LazyFrame, n: pl.LazyFrame, neighbours: int) -> pl.DataFrame:
    """The cosine sim(i, j) = c_ij / sqrt(n_i n_j) of counted pairs, top `neighbours` per item.

    Returns:
        (item, other, sim, c) sorted by item, then by sim (largest first) and other.
    """
    return (
        pairs.join(n, on="item")
        .join(n.rename({"item": "other", "n": "n_other"}), on="other")
        .with_columns((pl.col("c") / (pl.col("n") * pl.col("n_other")).sqrt()).alias("sim"))
        .sort(["item", "sim", "other"], descending=[False, True, False])
        .group_by("item", maintain_order=True)
        .head(neighbours)
        .select("item", "other", "sim", "c")
        .collect(engine="streaming")
    )


def cooccurrence_pairs(sessions: pl.LazyFrame, neighbours: int = 100) -> pl.DataFrame:
    """Session co-occurrence cosine similarity, top `neighbours` per item, as rows.

    sim(i, j) = c_ij / sqrt(n_i n_j) for i != j.

    Args:
        sessions: lazy (sess_id, item) with each item at most once per session.
        neighbours: similar items kept per item (largest similarity; ties by item).

    Returns:
        (item, other, sim, c) sorted by item, then by sim (largest first) and other.
    """
    return top_neighbours(*cooccurrence_counts(sessions), neighbours)


def cooccurrence_similarity(sessions: pl.LazyFrame, num_items: int, neighbours: int = 100) -> Tensor:
    """`cooccurrence_pairs` as a (V, V) CSR tensor.

    Args:
        sessions: lazy (sess_id, item) with each item at most once per session.
        num_items: V, the catalogue size including padding and OOV.
        neighbours: similar items kept per item (largest similarity; ties by item).

    Returns:
        float32 sparse CSR (V, V); row i holds i's neighbours, the diagonal is empty.
    """
    pairs = cooccurrence_pairs(sessions, neighbours)
    rows = torch.from_numpy(pairs["item"].to_numpy().copy())
    cols = torch.from_numpy(pairs["other"].to_numpy().copy())
    vals = torch.from_numpy(pairs["sim"].to_numpy().copy()).float()
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, (num_items, num_items), check_invariants=False
    ).coalesce()
    with _quiet_sparse():
        return coo.to_sparse_csr()


class NeighbourCounts(NamedTuple):
    """A neighbour table with the counts it was computed from.

    items (V, N) int32 neighbour indices best first (0 = none), sims (V, N) float32,
    counts (V, N) float32: c_ij of each listed pair, n (V,) float32: sessions per item.
    """

    items: Tensor
    sims: Tensor
    counts: Tensor
    n: Tensor


def neighbour_table(
    data_dir: Path, manifest: dict[str, Any], neighbours: int, previous: NeighbourCounts | None = None,
    since: int | None = None,
) -> NeighbourCounts:  # fmt: skip
    """The training split's top `neighbours` per item as dense rows, best first.

    With `previous` (yesterday's table, its vocabulary a prefix of this one), the counts
    are added first: c_ij and n_i of the previous table's listed pairs and items plus
    this split's, so a table trained day by day approaches the one of all days (a pair
    the previous table did not list starts from this split's count). `since` (µs since
    the epoch): only this split's sessions from then on are counted, those before it
    being already in `previous` (a training split that reaches back over its days).
    """
    pairs, n = cooccurrence_counts(_training_sessions(data_dir, manifest, since))
    if previous is not None:
        old = torch.nonzero(previous.items > 1)
        old_pairs = pl.LazyFrame({
            "item": old[:, 0].numpy().astype("int64"),
            "other": previous.items[old[:, 0], old[:, 1]].numpy().astype("int64"),
            "c": previous.counts[old[:, 0], old[:, 1]].numpy().astype("float64"),
        })  # fmt: skip
        seen = torch.nonzero(previous.n > 0).squeeze(1)
        old_n = pl.LazyFrame({"item": seen.numpy().astype("int64"), "n": previous.n[seen].numpy().astype("float64")})
        pairs = pl.concat([pairs, old_pairs]).group_by("item", "other").agg(pl.col("c").sum())
        n = pl.concat([n, old_n]).group_by("item").agg(pl.col("n").sum())
    every = n.collect()  # once: the cosines and the counts kept both read it
    top = top_neighbours(pairs, every.lazy(), neighbours)
    V = int(manifest["num_items"])
    pos = top.select(pl.int_range(pl.len()).over("item").alias("pos"))["pos"]
    rows, cols = torch.from_numpy(top["item"].to_numpy().copy()), torch.from_numpy(pos.to_numpy().copy())
    out = NeighbourCounts(torch.zeros(V, neighbours, dtype=torch.int32), torch.zeros(V, neighbours),
                          torch.zeros(V, neighbours), torch.zeros(V))  # fmt: skip
    out.items[rows, cols] = torch.from_numpy(top["other"].to_numpy().astype("int32"))
    out.sims[rows, cols] = torch.from_numpy(top["sim"].to_numpy().astype("float32"))
    out.counts[rows, cols] = torch.from_numpy(top["c"].to_numpy().astype("float32"))
    out.n[torch.from_numpy(every["item"].to_numpy().copy())] = torch.from_numpy(every["n"].to_numpy().astype("float32"))
    return out


def prefix_weights(qp: Tensor, prefix: Tensor, decay: float) -> Tensor:
    """Normalised recency weights of each query's prefix positions.

    w_p = decay ** (qp - p) for prefix position p <= qp holding an item, divided
    by their sum, so every query's weights sum to 1.

    Args:
        qp: (Q,) last prefix position of each query (0-based).
        prefix: (Q, T) prefix item indices, 0 after position qp.
        decay: recency decay in (0, 1].

    Returns:
        (Q, T) float weights.
    """
    pos = torch.arange(prefix.shape[1], device=prefix.device)
    dist = (qp.unsqueeze(1) - pos.unsqueeze(0)).float()  # (Q, T)
    w = torch.where((prefix != 0) & (dist >= 0), decay**dist.clamp(min=0), torch.zeros_like(dist))
    return w / w.sum(1, keepdim=True).clamp(min=1e-30)


class ItemCF:
    """Item-to-item CF from training-session co-occurrence (classic or repeat-aware; module docs).

    Args:
        sim: (V, V) sparse CSR similarity, empty diagonal.
        counts: (V,) training counts (fallback order for unscored items).
        repeat: repeat-aware form (prefix items first).
        decay: recency decay of prefix weights.
    """

    def __init__(self, sim: Tensor, counts: Tensor, repeat: bool = False, decay: float = 0.8) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.sim = sim.cpu()
        # Products with the COO form: torch's CPU CSR x CSR product leaks its output.
        self.sim_coo = self.sim.to_sparse_coo().coalesce()
        self.num_items = sim.shape[0]
        self.fallback = popularity_scores(counts.cpu())  # (V,) in (-1, 0), below every cf score
        self.repeat = repeat
        self.decay = decay
        self.name = "itemcf-repeat" if repeat else "itemcf"

    @classmethod
    def from_data(
        cls,
        data_dir: Path,
        repeat: bool = False,
        neighbours: int = 100,
        decay: float = 0.8,
        manifest: dict[str, Any] | None = None,
    ) -> ItemCF:
        """Build from the training shards of a shard directory."""
        manifest = manifest or read_manifest(data_dir)
        num_items = int(manifest["num_items"])
        sim = cooccurrence_similarity(_training_sessions(data_dir, manifest), num_items, neighbours)
        return cls(sim, load_item_counts(data_dir, manifest), repeat=repeat, decay=decay)

    def begin_batch(self, batch: dict[str, Any]) -> None:
        """Nothing per batch (scores depend on the query prefix only)."""
        return None

    def query_scores(self, qp: Tensor, prefix: Tensor) -> tuple[_Entries, _Entries | None]:
        """Sparse scores of each query: cf entries and (repeat-aware) prefix bonus entries.

        Args:
            qp: (Q,) last prefix position.
            prefix: (Q, T) prefix item indices, 0 after qp.

        Returns:
            (rows, cols, values) of cf(j) > 0, each (row, col) once; and, in the
            repeat-aware form, (rows, cols, 1 + r(j)) of the prefix items, else None.
        """
        qp, prefix = qp.cpu(), prefix.cpu()
        q = prefix.shape[0]
        w = prefix_weights(qp, prefix, self.decay)  # (Q, T)
        keep = w > 0
        rows = torch.arange(q).unsqueeze(1).expand_as(prefix)[keep]
        weights = torch.sparse_coo_tensor(
            torch.stack([rows, prefix[keep]]), w[keep], (q, self.num_items), check_invariants=False
        ).coalesce()  # sums the weights of an item seen twice in the prefix
        with _quiet_sparse():
            cf = torch.sparse.mm(weights, self.sim_coo).coalesce()  # (Q, V), one entry per (q, j)
        cf_rows, cf_cols = cf.indices()
        cf_entries = _Entries(cf_rows, cf_cols, cf.values())
        bonus = None
        if self.repeat:
            r, c = weights.indices()
            bonus = _Entries(r, c, weights.values() + 1)
        return cf_entries, bonus

    def score_fn(self, state: Any, qb: Tensor, qp: Tensor, prefix: Tensor) -> ScoreFn:
        """Scores of an item chunk for Q queries (dense only per chunk)."""
        cf, bonus = self.query_scores(qp, prefix)
        q = prefix.shape[0]

        def score(start: int, end: int) -> Tensor:
            out = self.fallback[start:end].expand(q, end - start).clone()  # (Q, C)
            r, c, v = cf.in_range(start, end)
            out[r, c - start] = v
            if bonus is not None:
                # Prefix items: max(cf, 0) + 1 + r(j) > 1 >= any cf score.
                r, c, v = bonus.in_range(start, end)
                out[r, c - start] = out[r, c - start].clamp(min=0) + v
            return out

        return score
