"""What serving needs of the training run: its sessionize config, vocabularies and encoded tables (`Lookups`).

`Lookups.load` reads a data directory (`manifest.json`) or an export directory
(`lookups.json`, written by `sdm export`): the vocabularies (`names.vocab_file`),
the encoded `users.parquet` / `items.parquet`, and `items_raw.parquet` (the raw
items table training read) when there is one. Every file is checked when it is
loaded (`read_json`, `read_parquet`, `indices`); a missing, damaged or foreign one
is one `DataError` line naming it.

`Lookups.session_config` is the training sessionize config for a log's columns,
which `serve.sessions` runs the sessionizer with: side features the events lack
come from the caller's `--items`, else `items_raw.parquet`, never from the path
recorded in the config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sdm.config import SessionizeConfig
from sdm.errors import DataError, first_line
from sdm.names import vocab_file
from sdm.sessionize import numeric
from sdm.sessionize.write import ITEMS_RAW

LOOKUPS = "lookups.json"
"""What serving needs of the data directory (vocabulary sizes, features, session rules), written by export."""


@dataclass
class Lookups:
    """The training run's sessionize config, vocabularies and encoded item / user tables.

    Attributes:
        root: the data or export directory.
        config: the sessionize config of the training data (as written in its manifest).
        item_features: side features of the data (without "item").
        user_features: profile features of the data (without "user").
        max_session_len / max_long_len: the data's caps.
        num_items: item vocabulary size (with padding and OOV).
        vocabs: name -> vocabulary frame (raw, index, count).
        users: users.parquet (user_id as string, user, profile features encoded).
        item_table: (num_items, 1 + F) int64 numpy: item index and each side feature's index.
        fingerprint: the data's fingerprint.
        source: the file the metadata came from (lookups.json or manifest.json), for messages.
        items_raw: `items_raw.parquet` of `root` (the raw items table training read), or None.
        user_raw: the type of training's raw user ids (`vocab/user.parquet`), None if unknown.
    """

    root: Path
    config: dict[str, Any]
    item_features: list[str]
    user_features: list[str]
    max_session_len: int
    max_long_len: int
    num_items: int
    vocabs: dict[str, pl.DataFrame]
    users: pl.DataFrame
    item_table: np.ndarray
    fingerprint: str | None = None
    source: Path | None = None
    items_raw: Path | None = None
    user_raw: Any = None

    def __post_init__(self) -> None:
        ids = self.users.get_column("user_id").cast(pl.String).to_list() if self.users.height else []
        self.user_row = {u: i for i, u in enumerate(ids)}  # first row wins on (impossible) duplicates
        self.user_row.update({u: i for i, u in reversed(list(enumerate(ids)))})
        cols = ["user", *self.user_features]
        self.user_values = np.ones((len(ids), len(cols)), dtype=np.int64)
        for j, c in enumerate(cols):
            if c in self.users.columns:
                self.user_values[:, j] = self.users.get_column(c).fill_null(1).cast(pl.Int64).to_numpy()
        self._configs: dict[tuple[tuple[str, ...], str | None], tuple[SessionizeConfig, list[str]]] = {}
        self.raw_items: dict[str, pl.DataFrame] = {}  # raw items tables read by serving, by path
        self.opened: dict[Any, Any] = {}  # open_frame's checks and expressions, by schema
        self.row_of: dict[int, dict[Any, int]] = {}  # large table -> {raw key: row}, built on first use

    @classmethod
    def load(cls, root: Path) -> Lookups:
        """From a data directory (manifest.json) or an export directory (lookups.json).

        Every file is checked as it is read (readable, the columns serving uses,
        indices inside their vocabulary), so a damaged directory fails here, in
        one line naming the file, and not in the middle of a request.

        Raises:
            DataError: neither file, or a vocabulary / table missing, damaged or foreign.
        """
        root = Path(root)
        meta, source = _read_meta(root)
        item_feats = [f for f in meta["item_features"] if f != "item"]
        user_feats = [f for f in meta["user_features"] if f != "user"]
        sizes = dict(meta.get("vocab_sizes") or {})
        sizes["item"] = int(meta["num_items"])
        vocabs = {name: _read_vocab(root, name, sizes.get(name)) for name in ["item", *item_feats]}
        multi = meta.get("multi_valued") if isinstance(meta.get("multi_valued"), dict) else {}
        sets = {f: e["sets"] for f, e in multi.items() if isinstance(e, dict) and type(e.get("sets")) is int and e["sets"] >= 2}
        users = _read_users(root, meta["user_features"], user_feats, {**sizes, **sets})
        lookups = cls(
            root=root,
            config=dict(meta.get("config") or {}),
            item_features=item_feats,
            user_features=user_feats,
            max_session_len=int(meta["max_session_len"]),
            max_long_len=int(meta["max_long_len"]),
            num_items=sizes["item"],
            vocabs=vocabs,
            users=users,
            item_table=_read_item_table(root, sizes["item"], item_feats, sizes),
            fingerprint=meta.get("fingerprint"),
            source=source,
            items_raw=_raw_items_file(root, str((meta.get("config") or {}).get("item_col", "item_id"))),
            user_raw=_raw_type(root / vocab_file("user")),
        )
        lookups.session_config([], None)  # the recorded sessionize config and items_raw.parquet, checked now
        return lookups

    @property
    def multi_valued(self) -> list[str]:
        """Side features whose strings hold several values ('Comedy|Romance'), as the data was sessionized."""
        return [f for f in self.config.get("multi_valued") or [] if f in self.item_features]

    def session_config(self, columns: list[str], items: Path | None) -> tuple[SessionizeConfig, list[str]]:
        """The training sessionize config for a log with `columns`; side features it cannot read.

        Item features come from the log, else from the raw items table: `items` when
        given (the user's `--items`), else `items_raw.parquet` of the data or export
        directory; else (returned as the second value) from the encoded items.parquet.
        The path recorded in the config (`items`) is never read: relative to
        another working directory it names another file. Profiles always come from
        users.parquet, so no users table is read.

        Raises:
            DataError: the recorded config is not a valid sessionize config.
        """
        key = (tuple(columns), None if items is None else str(items))
        if key not in self._configs:
            self._configs[key] = self._session_config(columns, items)
        return self._configs[key]

    def _session_config(self, columns: list[str], items: Path | None) -> tuple[SessionizeConfig, list[str]]:
        # Only the keys training changed from the defaults: a key passed explicitly means
        # "the user asked for it" to the sessionizer's checks (e.g. an explicit session
        # column must exist), and serving events may lack optional columns.
        defaults = SessionizeConfig().model_dump(mode="json")
        base = {k: v for k, v in self.config.items() if k in SessionizeConfig.model_fields and v != defaults.get(k)}
        raw_items = Path(items) if items is not None else self.items_raw
        table_cols: list[str] = []
        if raw_items is not None:
            from sdm.sessionize.io import scan_table

            delimiter = base.get("delimiter") if items is not None else None  # items_raw.parquet is Parquet
            _, schema = scan_table(raw_items, "items table", None, delimiter if isinstance(delimiter, str) else None)
            table_cols = schema.names()
        reserved = {base.get("item_col", "item_id"), base.get("user_col", "user_id"), base.get("time_col", "timestamp")}
        in_log = [f for f in self.item_features if f in columns and f not in reserved]
        in_table = [f for f in self.item_features if f not in in_log and f in table_cols]
        missing = [f for f in self.item_features if f not in in_log and f not in in_table]
        # Fields left at their defaults are dropped, not set: an explicit None is "asked for" too.
        # (numeric features: the vocabularies' buckets say which, whatever features these events carry)
        for key in ("items", "users", "ray_address", "bucket", "plan", "plan_only", "numeric_features", "numeric_buckets"):
            base.pop(key, None)
        if in_table:
            base["items"] = raw_items
        # profiles come from users.parquet, encoded: no user feature (and no multi-valued one) is read here
        multi = [f for f in base.get("multi_valued") or [] if f in in_log + in_table]
        if "multi_valued" in base:
            base["multi_valued"] = multi
        base.update(item_features=in_log + in_table, user_features=[], buckets=1, workers=1, engine="local",
                    overwrite=True)  # fmt: skip
        try:
            return SessionizeConfig(**base), missing
        except (TypeError, ValueError) as exc:
            raise DataError(f"{self.source or self.root}: not a valid sessionize config ({first_line(exc)})") from None


def read_parquet(path: Path, what: str, columns: Sequence[str] = ()) -> pl.DataFrame:
    """A whole Parquet file that sdm wrote, with the `columns` serving reads.

    Raises:
        DataError: missing, empty, truncated, not Parquet, or lacking a column; one line naming `path`.
    """
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; re-run the command that writes it")
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError, pl.exceptions.PanicException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(frame.columns[:8]) or "none"
        raise DataError(f"{path}: not {what} (no column {', '.join(map(repr, missing))}; found: {found})")
    return frame


def indices(path: Path, frame: pl.DataFrame, column: str, low: int, size: int | None) -> np.ndarray:
    """`frame[column]` as int64 indices (null = 1, OOV), each checked to lie in low..size-1.

    Raises:
        DataError: not an integer column, or an index outside the range (its vocabulary).
    """
    series = frame.get_column(column)
    if not series.dtype.is_integer():
        raise DataError(f"{path}: column {column!r} holds {series.dtype}, expected integer indices")
    values = series.fill_null(1).cast(pl.Int64).to_numpy()
    if len(values) and (values.min() < low or (size is not None and values.max() >= size)):
        bad = values[(values < low) | (values >= (size if size is not None else np.iinfo(np.int64).max))][0]
        top = "" if size is None else f"..{size - 1}"
        raise DataError(f"{path}: column {column!r} holds index {bad}, outside {low}{top} (its vocabulary)")
    return values


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file; missing, unreadable or not an object is one DataError line naming `path`."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; re-run `sdm export`")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not {what} (a JSON {type(data).__name__}, expected an object)")
    return data


def _read_meta(root: Path) -> tuple[dict[str, Any], Path]:
    """lookups.json of an export directory, else manifest.json of a data directory, checked; and its path."""
    path = root / LOOKUPS
    if not path.is_file():
        if (root / "manifest.json").is_file():
            from sdm.pipeline.dataset import read_manifest

            return read_manifest(root), root / "manifest.json"
        raise DataError(f"{root}: neither a data directory (manifest.json) nor an export (lookups.json)")
    meta = read_json(path, "an sdm lookups file")
    problem = None
    for key in ("item_features", "user_features"):
        names = meta.get(key)
        if not isinstance(names, list) or not all(isinstance(f, str) for f in names) or len(set(names)) != len(names):
            problem = f"{key} must be a list of distinct names"
    if problem is None:
        for key, low in (("num_items", 3), ("max_session_len", 1), ("max_long_len", 0)):
            if not _is_count(meta.get(key), low):
                problem = f"{key} must be an integer >= {low}, got {meta.get(key)!r}"
    sizes = meta.get("vocab_sizes")
    if problem is None and sizes is not None and not (
        isinstance(sizes, dict) and all(_is_count(v, 2) for v in sizes.values())
    ):
        problem = "vocab_sizes must map names to integers >= 2"
    if problem is None and not isinstance(meta.get("config") or {}, dict):
        problem = "config must be an object"
    if problem is not None:
        raise DataError(f"{path}: damaged lookups file ({problem}); re-run `sdm export`")
    return meta, path


def _read_vocab(root: Path, name: str, size: int | None) -> pl.DataFrame:
    """The vocabulary of feature `name` (`names.vocab_file`), its indices checked against `size`."""
    path = root / vocab_file(name)
    vocab = read_parquet(path, f"the vocabulary of {name!r}", ["raw", "index"])
    if vocab.get_column("index").null_count():
        raise DataError(f"{path}: column 'index' has nulls")
    indices(path, vocab, "index", 2, size)
    if numeric.is_numeric(vocab):  # a numeric feature's buckets: `encode` maps a value as training did
        numeric.check(vocab, str(path))
    return vocab


def _raw_type(path: Path) -> Any:
    """The polars type of a vocabulary's `raw` column, from its Parquet schema alone (None if unreadable)."""
    try:
        return pl.read_parquet_schema(path).get("raw")
    except (OSError, pl.exceptions.PolarsError):
        return None


def _read_users(root: Path, listed: list[str], profile: list[str], sizes: dict[str, int]) -> pl.DataFrame:
    """users.parquet (required when the data has user features), its encoded columns checked
    (`sizes`: each column's number of indices; a multi-valued feature's is its number of value sets)."""
    path = root / "users.parquet"
    if not listed and not path.is_file():
        return pl.DataFrame({"user_id": [], "user": []})
    users = read_parquet(path, "an sdm users table", ["user_id", "user", *profile])
    for c in ["user", *profile]:
        indices(path, users, c, 0, sizes.get(c))
    return users


def _read_item_table(root: Path, num_items: int, features: list[str], sizes: dict[str, int]) -> np.ndarray:
    """(num_items, 1 + F) int64: each item index and its side features' indices, from items.parquet."""
    table = np.zeros((num_items, 1 + len(features)), dtype=np.int64)
    table[:, 0] = np.arange(num_items)
    table[1, 1:] = 1
    if not features:
        return table
    path = root / "items.parquet"
    items = read_parquet(path, "an sdm items table", ["item", *features])
    idx = indices(path, items, "item", 2, num_items)
    for j, f in enumerate(features):
        table[idx, 1 + j] = indices(path, items, f, 0, sizes.get(f))
    return table


def _raw_items_file(root: Path, item_col: str) -> Path | None:
    """`items_raw.parquet` of `root`, checked to be Parquet keyed by `item_col`; None when there is none."""
    path = root / ITEMS_RAW
    if not path.exists():
        return None
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    if item_col not in names:
        raise DataError(f"{path}: not a raw items table (no column {item_col!r}; found: {', '.join(names[:8])})")
    return path
