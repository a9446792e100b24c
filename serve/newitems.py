"""Items added to a loaded export (`Recommender.add_items`), read as `sdm sessionize` reads an
items table: the ids checked against the export's, each multi-valued feature split with the
data's separator, and every side feature looked up in its training vocabulary (1 = unknown).

`read_new_items` returns what the item tower needs (`NewItems`); the vectors and the index
stay with the `Recommender`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import polars as pl

from sdm.errors import ConfigError, first_line
from sdm.serve.lookups import Lookups
from sdm.sessionize import numeric
from sdm.sessionize.columns import feat_col, values_col
from sdm.sessionize.encode import encode, encode_values, fill_empty
from sdm.sessionize.io import polars_errors
from sdm.sessionize.normalise import split_values
from sdm.sessionize.schema import value_kind


class NewItems(NamedTuple):
    """New items, encoded.

    Attributes:
        ids: (A,) their raw ids, cast to the export's id type.
        side: (A, F) int64 index of each side feature (`Lookups.item_features`); 1 = unknown.
        values: per multi-valued feature, (A,) lists of the indices of all its values.
    """

    ids: pl.Series
    side: np.ndarray
    values: dict[str, pl.Series]

    def table(self, lookups: Lookups) -> pl.DataFrame:
        """The item column, each side feature's index, then `<f>_values` of each multi-valued feature."""
        features = [pl.Series(f, self.side[:, j], dtype=pl.Int32) for j, f in enumerate(lookups.item_features)]
        return pl.DataFrame([self.ids, *features, *[v.alias(f"{f}_values") for f, v in self.values.items()]])


def read_new_items(frame: pl.DataFrame, lookups: Lookups, item_col: str, id_type: pl.DataType,
                   known: set[Any]) -> NewItems:  # fmt: skip
    """Encode the rows of `frame` (the item column and raw side features) for the item tower.

    Raises:
        ConfigError: no item column, ids of another kind than `id_type` (strings for
            integer ids, floats, booleans), a null or repeated id, an id in `known` (naming
            it), a column that is no side feature of the data, a feature column of another
            kind than its vocabulary's raw values, a multi-valued feature that is not a
            string column, or a value a vocabulary cannot look up.
    """
    ids = _new_ids(frame, item_col, id_type, known)
    _check_features(frame, lookups, item_col)
    split = _split_values(frame, lookups)
    return NewItems(ids, _encode_side(split, lookups, item_col), _encode_values(split, lookups))


def _new_ids(frame: pl.DataFrame, item_col: str, id_type: pl.DataType, known: set[Any]) -> pl.Series:
    """The item column of `frame`, cast to `id_type`; refused when null, repeated or in `known`."""
    if item_col not in frame.columns:
        raise ConfigError(f"items: no column {item_col!r} (the item column of the data; found: {', '.join(frame.columns[:8])})")
    given = frame.get_column(item_col)
    if given.null_count():
        raise ConfigError(f"items: column {item_col!r} has nulls")
    wrong = f"items: column {item_col!r} holds {given.dtype}, not the export's item ids ({id_type})"
    if value_kind(given.dtype) != value_kind(id_type):  # a strict cast still turns 5001.7 into 5001 and True into 'true'
        raise ConfigError(wrong)
    try:
        ids = given.cast(id_type, strict=True).alias(item_col)
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
        raise ConfigError(wrong) from None
    twice = ids.filter(ids.is_duplicated())
    if len(twice):
        raise ConfigError(f"items: item {twice[0]!r} occurs twice")
    already = [v for v in ids.to_list() if v in known]
    if already:
        raise ConfigError(f"items: item {already[0]!r} is already known to this export; ids are never replaced")
    return ids


def _check_features(frame: pl.DataFrame, lookups: Lookups, item_col: str) -> None:
    """Every column but the item's is a side feature of the data, of its vocabulary's kind.

    A misspelt feature would otherwise be unknown (1) without a word, and a float or a
    struct would be looked up as if it were a category.
    """
    stray = [c for c in frame.columns if c != item_col and c not in lookups.item_features]
    if stray:
        listed = ", ".join(lookups.item_features) or "none"
        raise ConfigError(f"items: column(s) {', '.join(map(repr, stray))} are no side feature of the data (its features: {listed})")
    multi = set(lookups.multi_valued)
    for f in frame.columns:
        dtype = frame.schema[f]
        if f == item_col or f in multi or dtype == pl.Null:
            continue  # the ids are checked by `_new_ids`, multi-valued strings by `_split_values`
        vocab = lookups.vocabs[f]
        if numeric.is_numeric(vocab):
            if not numeric.numeric_dtype(dtype):
                raise ConfigError(f"items: column {f!r} holds {dtype}; the numeric feature {f!r} takes numbers")
        elif vocab.height and value_kind(dtype) != value_kind(vocab.schema["raw"]):
            raise ConfigError(f"items: column {f!r} holds {dtype}; its vocabulary's raw values are {value_kind(vocab.schema['raw'])}")


def _split_values(frame: pl.DataFrame, lookups: Lookups) -> pl.DataFrame:
    """`frame` with each multi-valued feature split as sessionize does (`normalise.split_values`):
    the column holds the first value, `_m_<f>` (`columns.values_col`) all of them."""
    multi = [f for f in lookups.multi_valued if f in frame.columns and frame.schema[f] != pl.Null]
    wrong = [f"{f} ({frame.schema[f]})" for f in multi if frame.schema[f] != pl.String]
    if wrong:
        raise ConfigError(f"items: multi-valued feature column(s) {', '.join(wrong)} must hold strings ('a|b')")
    if not multi:
        return frame
    cfg = lookups.session_config([], None)[0]  # the data's separator
    with polars_errors("items"):
        parts = split_values(frame.lazy().select(pl.col(f).alias(feat_col(f)) for f in multi), cfg, multi).collect()
    return frame.with_columns(
        *[parts.get_column(feat_col(f)).alias(f) for f in multi], *[parts.get_column(values_col(f)) for f in multi]
    )


def _encode_values(split: pl.DataFrame, lookups: Lookups) -> dict[str, pl.Series]:
    """Per multi-valued feature: (A,) lists of the indices of every value of `split` (`_split_values`);
    [] when the items do not give the feature."""
    out = {}
    for f in lookups.multi_valued:
        if values_col(f) in split.columns:
            with polars_errors("items"):
                out[f] = encode_values(fill_empty(split.get_column(values_col(f))), lookups.vocabs[f])
        else:
            out[f] = pl.Series(f, [[]] * split.height, dtype=pl.List(pl.Int32))
    return out


def _encode_side(frame: pl.DataFrame, lookups: Lookups, item_col: str) -> np.ndarray:
    """(A, F) int64 index of each side feature (`Lookups.item_features`) by its vocabulary; 1 = unknown,
    and a numeric feature the items do not give its missing bucket (`numeric.null_index`), as in training."""
    out = np.ones((frame.height, len(lookups.item_features)), dtype=np.int64)
    for j, f in enumerate(lookups.item_features):
        out[:, j] = numeric.null_index(lookups.vocabs[f])
        if f in frame.columns and f != item_col and frame.schema[f] != pl.Null:
            try:
                enc = encode(frame.lazy().select(f), f, lookups.vocabs[f], "index").collect()
            except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
                raise ConfigError(f"items: column {f!r} cannot be looked up in its vocabulary ({first_line(exc)})") from None
            out[:, j] = enc.get_column("index").to_numpy()
    return out
