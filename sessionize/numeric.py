"""Numeric features: buckets of the number line, from quantiles of the training values.

The model embeds every feature as a categorical index. A price, a rating or
a release year used as raw categories makes every distinct number a value of
its own (12.49 and 12.50 unrelated, a new price OOV); a numeric feature is
instead cut into at most `numeric_buckets` (B) buckets whose edges are
quantiles of its training values, and each value is encoded as its bucket.

Which features (`resolve`): those listed in `numeric_features` (integer,
float or decimal columns); without the setting, the float and decimal
columns among the item and user features. Integer columns stay categorical
unless listed: they are usually ids or codes (category_id, brand), whose
order means nothing.

Edges (`edges_from_counts`), over the training values (the events of
training sessions for an item feature, each event once, as the categorical
counts are; the training users, each once, for a profile feature), n of
them, finite ones only:

- more than B distinct values: the lower bounds are the quantiles q_k,
  k = 0..B-1, by the inverted CDF (the smallest training value v with
  #(values <= v) >= n*k/B; numpy's `np.quantile(values, k / B,
  method="inverted_cdf")`, computed in integers so float rounding never
  moves an edge). Equal quantiles are one bound, so a column with heavy ties
  gets fewer buckets;
- at most B distinct values: every distinct value is a lower bound, so each
  training value keeps a bucket of its own (a rating 1..5 stays five values;
  a value between two of them, seen only later, falls in the lower one's).

Bucket j is [lo_j, hi_j): lo_0 = -inf (values below the training range),
hi of the last = +inf (values above it; +inf itself too). Null and NaN are
missing: a bucket of their own, after the others. Each bucket's lower bound
is a training value, so no bucket is empty in training.

The vocabulary (`vocabulary`, the file `names.vocab_file(f)`) holds one row
per bucket: `raw` (a label, "[12.5, 20)", or "missing"), `index` (int32,
2 + j for bucket j, the missing bucket last), `count` (int64, training
values in it) and `lo`, `hi` (float64; null for the missing bucket). The
`lo`/`hi` columns mark a vocabulary as numeric: `encode.encode` then buckets
(`bucket_expr`) instead of looking values up, wherever it is called
(sessionize, the catalogue, serving). The manifest lists the edges
(`manifest_entry`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, DataError

MISSING = "missing"
"""`raw` label of the bucket of null and NaN values."""
FIRST = 2
"""Index of the first bucket (0 is padding, 1 OOV: a numeric feature never produces 1 from a value)."""


def numeric_dtype(dtype: pl.DataType) -> bool:
    """Whether a column of `dtype` may be bucketised: integers, floats, decimals (or a column of nulls only)."""
    return dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal) or dtype == pl.Null


def default_numeric(dtype: pl.DataType) -> bool:
    """Whether a feature of `dtype` is numeric without `numeric_features`: floats and decimals (not integer ids)."""
    return dtype.is_float() or isinstance(dtype, pl.Decimal)


def resolve(cfg: SessionizeConfig, types: dict[str, pl.DataType]) -> SessionizeConfig:
    """The config with `numeric_features` resolved: as given (checked), or the float/decimal features.

    Args:
        types: the raw type of every item and user feature (log, items or users table).

    Raises:
        ConfigError: a listed name that is not an item or user feature, a
            multi-valued feature, or a column that does not hold numbers.
    """
    features = [*cfg.item_features, *cfg.user_features]
    if cfg.numeric_features is None:
        picked = [f for f in features if f not in cfg.multi_valued and f in types and default_numeric(types[f])]
        return cfg.model_copy(update={"numeric_features": picked})
    for f in cfg.numeric_features:
        if f not in features:
            raise ConfigError(
                f"numeric feature {f!r} is not an item or user feature (add it to --item-features or --user-features)"
            )
        if f in cfg.multi_valued:
            raise ConfigError(f"numeric feature {f!r} is multi-valued (strings); it cannot be bucketised")
        if f in types and not numeric_dtype(types[f]):
            raise ConfigError(f"numeric feature {f!r} is {types[f]}; only integer, float or decimal columns are bucketised")
    return cfg


def edges_from_counts(values: np.ndarray, counts: np.ndarray, buckets: int) -> np.ndarray:
    """The inner edges (float64, ascending) of at most `buckets` buckets over sorted distinct `values`.

    `counts[i]` is how often `values[i]` occurs (the weights of the
    inverted-CDF quantiles, see the module docstring). Bucket j is
    [edges[j-1], edges[j]), the first open below, the last open above: the
    edges are the lower bounds but the smallest.
    """
    if len(values) <= buckets:
        return values[1:].astype(np.float64)
    n = int(counts.sum())
    cum = np.cumsum(counts.astype(np.int64))
    # q_k = the first value whose cumulative count c has c/n >= k/B, i.e. c*B >= n*k, in integers
    pos = np.searchsorted(cum * buckets, n * np.arange(buckets, dtype=np.int64), side="left")
    bounds = np.unique(values[pos])
    return bounds[1:].astype(np.float64)


def _values(counts: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    """Sorted distinct float64 values of a (`raw`, `count`) frame, their counts, and the count of NaN."""
    frame = (
        counts.lazy()
        .select(pl.col("raw").cast(pl.Float64, strict=False), pl.col("count").cast(pl.Int64))
        .drop_nulls("raw")
        .group_by("raw")
        .agg(pl.col("count").sum())
        .sort("raw")
        .collect()
    )
    nan = frame.get_column("raw").is_nan()
    n_nan = int(frame.filter(nan).get_column("count").sum())
    kept = frame.filter(~nan)
    return kept.get_column("raw").to_numpy(), kept.get_column("count").to_numpy(), n_nan


def vocabulary(counts: pl.DataFrame, total: int, buckets: int, prev: pl.DataFrame | None = None) -> pl.DataFrame:
    """A numeric feature's vocabulary from its training value counts.

    Args:
        counts: `raw` (the column's values, nulls left out) and `count` (occurrences).
        total: the number of training values counted, nulls included (events
            or users): `total - sum(count)`, plus NaN, is the missing count.
        buckets: `numeric_buckets`.
        prev: `--vocab-from`'s vocabulary of the feature: its buckets are kept
            (same edges, same indices), only the counts are this run's.

    Returns:
        `raw`, `index`, `count`, `lo`, `hi`: one row per bucket, then the missing bucket.
    """
    values, weights, nan = _values(counts)
    missing = max(0, total - int(counts.get_column("count").sum())) + nan
    if prev is not None:
        edges = edges_of(prev)[0]
    else:
        finite = np.isfinite(values)
        edges = edges_from_counts(values[finite], weights[finite], buckets)
    per_bucket = np.bincount(np.searchsorted(edges, values, side="right"), weights=weights, minlength=len(edges) + 1)
    lo = np.concatenate([[-math.inf], edges])
    hi = np.concatenate([edges, [math.inf]])
    return pl.DataFrame({
        "raw": [*(label(a, b) for a, b in zip(lo, hi)), MISSING],
        "index": pl.Series(np.arange(FIRST, FIRST + len(lo) + 1), dtype=pl.Int32),
        "count": pl.Series([*np.rint(per_bucket).astype(np.int64).tolist(), missing], dtype=pl.Int64),
        "lo": pl.Series([*lo.tolist(), None], dtype=pl.Float64),
        "hi": pl.Series([*hi.tolist(), None], dtype=pl.Float64),
    })


def label(lo: float, hi: float) -> str:
    """A bucket's `raw` label: "[12.5, 20)", "(-inf, 3)", "[80, inf)" (integral bounds without ".0")."""

    def num(x: float) -> str:
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(float(x))

    return f"{'(' if math.isinf(lo) else '['}{num(lo)}, {num(hi)})"


def is_numeric(vocab: pl.DataFrame | pl.LazyFrame) -> bool:
    """Whether a vocabulary is a numeric feature's (it has bucket bounds `lo`, `hi`)."""
    names = vocab.collect_schema().names() if isinstance(vocab, pl.LazyFrame) else vocab.columns
    return "lo" in names and "hi" in names


def edges_of(vocab: pl.DataFrame) -> tuple[np.ndarray, int]:
    """The inner edges (float64, ascending) of a numeric vocabulary and the index of its missing bucket."""
    rows = vocab.sort("index")
    lo = rows.get_column("lo")
    missing = rows.filter(lo.is_null()).get_column("index")
    edges = lo.drop_nulls().to_numpy()[1:].astype(np.float64)
    return edges, int(missing[0]) if len(missing) else FIRST + len(edges) + 1


def check(vocab: pl.DataFrame, what: str) -> None:
    """Refuse a numeric vocabulary that is not the layout `vocabulary` writes (edited or damaged).

    Value buckets at indices 2.. in order, lo ascending from -inf, each hi the
    next lo, the last +inf, then exactly one missing bucket (null bounds).

    Raises:
        DataError: naming `what` (the file) and the first problem.
    """
    rows = vocab.sort("index")
    lo, hi = rows.get_column("lo"), rows.get_column("hi")
    n = rows.height
    problem = None
    if rows.get_column("index").to_list() != list(range(FIRST, FIRST + n)):
        problem = f"indices are not {FIRST}..{FIRST + n - 1}"
    elif n < 2 or lo[-1] is not None or hi[-1] is not None or lo[:-1].null_count() or hi[:-1].null_count():
        problem = "not value buckets followed by one missing bucket"
    else:
        a, b = lo[:-1].to_numpy(), hi[:-1].to_numpy()
        if a[0] != -math.inf or b[-1] != math.inf or not np.array_equal(a[1:], b[:-1]) or np.any(a[1:] <= a[:-1]):
            problem = "bucket bounds are not ascending from -inf to inf, each hi the next lo"
    if problem is not None:
        raise DataError(f"{what}: damaged numeric vocabulary ({problem}); rerun `sdm sessionize`")


def bucket_expr(value: pl.Expr, vocab: pl.DataFrame) -> pl.Expr:
    """The bucket index (int32) of each number of `value` in a numeric vocabulary; null and NaN: the missing bucket.

    The one function that maps a number to its bucket: the sessionizer, the
    catalogue and serving all call it through `encode.encode`. A value that
    is no number (a string in a served event) counts as missing.
    """
    edges, missing = edges_of(vocab)
    x = value.cast(pl.Float64, strict=False)
    bucket = pl.lit(pl.Series(edges, dtype=pl.Float64)).search_sorted(x, side="right").cast(pl.Int32) + FIRST
    return pl.when(x.is_null() | x.is_nan()).then(pl.lit(missing, dtype=pl.Int32)).otherwise(bucket).cast(pl.Int32)


def null_index(vocab: pl.DataFrame) -> int:
    """The index of "no value at all" for a feature: the missing bucket of a numeric one, else 1 (OOV)."""
    return edges_of(vocab)[1] if is_numeric(vocab) else 1


def manifest_entry(vocabs: dict[str, pl.DataFrame]) -> dict[str, Any]:
    """The manifest's `numeric`: per numeric feature its inner `edges` and `missing_index`."""
    out = {}
    for name, vocab in vocabs.items():
        if is_numeric(vocab):
            edges, missing = edges_of(vocab)
            out[name] = {"edges": edges.tolist(), "missing_index": missing}
    return out
