"""Paired bootstrap intervals clustered by user, from evaluation top-K dumps.

A difference between two methods' HR@K on one test split is noise unless its
interval excludes zero. The queries of one user are not independent (the same
history, the same tastes), so users, not queries, are resampled: each of
`resamples` draws takes the split's users with replacement, and the statistic
is the difference of the two methods' means over every query of the drawn
users. Both methods are scored on exactly the same queries (paired), which
removes the variance the two share.

Per-query scores come from `sdm evaluate --dump-topk` files (or `evaluate_model`'s
`dump_topk`): a query's HR@K is 1 when its target is in the first K items,
its NDCG@K is 1 / log2(rank + 2) then, 0 otherwise (an OOV target is never in a
list, so it scores 0, as in the protocol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

KEYS = ("user_id", "session_start", "position")


def per_query(dump: Path, k: int) -> pl.DataFrame:
    """One row per query of a top-K dump: its keys, hr and ndcg at `k`."""
    df = pl.read_parquet(dump, columns=[*KEYS, "target", "topk"])
    ranks = [
        (lst.index(t) if t is not None and t in lst else -1)
        for lst, t in zip(df.get_column("topk").list.head(k).to_list(), df.get_column("target").to_list())
    ]
    r = np.asarray(ranks)
    hit = (r >= 0).astype(np.float64)
    ndcg = np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    return df.select(KEYS).with_columns(pl.Series("hr", hit), pl.Series("ndcg", ndcg))


def mean_of_runs(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Per-query scores averaged over several runs (seeds) of one method, on the same queries."""
    out = frames[0]
    for i, f in enumerate(frames[1:], start=1):
        out = out.join(f.rename({"hr": f"hr{i}", "ndcg": f"ndcg{i}"}), on=list(KEYS), how="inner")
    n = len(frames)
    return out.select(
        *KEYS,
        (pl.sum_horizontal(pl.col("^hr\\d*$")) / n).alias("hr"),
        (pl.sum_horizontal(pl.col("^ndcg\\d*$")) / n).alias("ndcg"),
    )


def paired_interval(
    a: pl.DataFrame, b: pl.DataFrame, metric: str, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean of `metric` (a - b) over the shared queries and its user-clustered bootstrap interval.

    Returns:
        {"diff", "low", "high", "queries", "users", "resamples", "level"}; `low` > 0 means
        a beats b beyond noise at that level, `high` < 0 the reverse.
    """
    both = a.join(b, on=list(KEYS), how="inner", suffix="_b")
    if both.height == 0:
        raise ValueError("the two dumps share no query")
    diff = (both.get_column(metric) - both.get_column(f"{metric}_b")).to_numpy()
    users, codes = np.unique(both.get_column("user_id").to_numpy().astype(str), return_inverse=True)
    per_user_sum = np.bincount(codes, weights=diff, minlength=len(users))
    per_user_n = np.bincount(codes, minlength=len(users)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(users), size=(resamples, len(users)))
    stats = per_user_sum[draws].sum(axis=1) / per_user_n[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return {
        "diff": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "queries": int(both.height),
        "users": int(len(users)),
        "resamples": resamples,
        "level": level,
    }
