"""A user's latest session and its long-term window, from raw events, exactly as training built them.

Serving must not re-implement the sessionizer: everything here calls its own
stage functions (`sessionize.io.check_log`, `timestamp_expr`,
`normalise.read_events`, `sessions.sessionize`, `windows.sessions_table`,
`long_windows`, `rows_table`, `timelines`, `encode.encode`) with the training run's resolved config
and vocabularies, then reads the result with the trainer's own
`pipeline.dataset.sessions_from_record_batch`. Only two steps are serving's:
keeping each user's *latest* session (before `at`), and taking user profiles
(and, for side features the events lack, item features) from the encoded
`users.parquet` / `items.parquet` of the data or export directory.

Side features the events lack are read, like training did, from the raw items
table: `items_raw.parquet` of the data or export directory (sessionize and export
copy it there), or the caller's `--items`. The path recorded in the training
config is never read, so answers never depend on the working directory.

A numeric feature (price) is bucketised by the training buckets its vocabulary
holds (`sessionize.numeric`), through the same `encode`. Events of items outside
the vocabulary are index 1 (OOV), as in training. Given
`ColdItems` (serving's cold candidates, `--candidates catalogue`), each such event
also gets its candidate index in `seq___cold` / `long___cold` (1 = not a cold
item), so a cold item of the session can be excluded or copied; and an item added
with `Recommender.add_items` gets its side features, in the features the events
did not carry, as if it were a row of the items table.

`Lookups` holds what is needed: a data directory (`manifest.json`) or an export
directory (`lookups.json`, written by `sdm export`) both work. Every file is
checked when it is loaded; a missing, damaged or foreign one is one `DataError`
line naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from sdm.config import SessionizeConfig
from sdm.errors import DataError, storage_error
from sdm.names import vocab_file
from sdm.pipeline.dataset import sessions_from_record_batch, user_column
# the training code itself
from sdm.sessionize import numeric
from sdm.sessionize.encode import encode
from sdm.sessionize.io import ITEM, ROW, SID, TS, USER, check_log, feat_col, timestamp_expr
from sdm.sessionize.normalise import read_events
from sdm.sessionize.read import Input as _Input
from sdm.sessionize.read import open_input as _open
from sdm.sessionize.read import read_bucket as _bucket_input
from sdm.sessionize.sessions import SESS, sessionize
from sdm.sessionize.split import SPLIT
from sdm.sessionize.windows import long_windows, rows_table, sessions_table, timelines

SPLIT_SERVE = 2  # the split label of served sessions (unused downstream; rows_table groups by it)
LOOKUPS = "lookups.json"
ITEMS_RAW = "items_raw.parquet"
"""The raw items table training read (its item column and the item features it gave, raw values), that
sessionize copies into the data directory and export into the export directory. Serving reads this file,
never the path recorded in the config, which may be relative to another working directory."""


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


COLD = "__cold"
"""Pseudo item feature of served sessions: each event's cold candidate index (`ColdItems`), 1 = none."""


@dataclass
class ColdItems:
    """Items outside the vocabulary that serving may recommend, by raw id (cold candidates).

    Attributes:
        vocab: a vocabulary frame (`raw`, `index`): raw id -> candidate index (num_items + j).
        side: (C, F) int64, row j = candidate num_items + j, columns `Lookups.item_features`:
            side feature indices that events of the item take for the features they do not
            carry themselves; 0 = keep the event's own (export's cold items: training gave them
            the events' and the items table's values, and so does serving).
    """

    vocab: pl.DataFrame
    side: np.ndarray | None = None


@dataclass
class Served:
    """Latest sessions of a group of users, as the trainer's session arrays.

    Attributes:
        arrays: `sessions_from_record_batch` output (seq_<f>, long_<f>, seq_len, long_len, user_<f>, ...).
        user_id: raw user ids (the log's type), one per session.
        session_start: (S,) session start, us since epoch UTC.
    """

    arrays: dict[str, np.ndarray]
    user_id: pl.Series

    @property
    def session_start(self) -> np.ndarray:
        return self.arrays["start_ts"]

    def __len__(self) -> int:
        return int(self.arrays["seq_len"].shape[0])


def open_log(lookups: Lookups, log: Path, items: Path | None = None) -> tuple[_Input, list[str]]:
    """Open a log file with the training config (`sessionize._open`: formats, checks, timestamps)."""
    from sdm.sessionize.io import scan_table

    _, schema = scan_table(Path(log), "log", lookups.config.get("format"), lookups.config.get("delimiter"))
    cfg, missing = lookups.session_config(schema.names(), items)
    return _open(cfg, Path(log)), missing


def open_frame(lookups: Lookups, frame: pl.DataFrame, items: Path | None = None) -> tuple[_Input, list[str]]:
    """The same as `open_log` for events already in memory (the API)."""
    source = Path("<events>")
    schema = frame.schema
    cfg, missing = lookups.session_config(schema.names(), items)
    time_col = cfg.time_col if cfg.time_col in schema else None
    sample = None
    if time_col is not None and schema[time_col] == pl.String:
        values = frame.get_column(time_col).drop_nulls()
        sample = values[0] if len(values) else None
    # The checks and expressions depend on the schema only: once per schema, not per request.
    key = (tuple((n, str(t)) for n, t in schema.items()), None if items is None else str(items), sample)
    if key not in lookups.opened:
        items_lf, items_schema = None, None
        if cfg.items is not None:
            from sdm.sessionize.io import scan_table

            items_lf, items_schema = scan_table(cfg.items, "items table", None, cfg.delimiter)
        spec = check_log(cfg, source, schema, items_schema, None)
        ts = timestamp_expr(cfg, schema[cfg.time_col], source, sample)
        lookups.opened[key] = (items_lf, spec, ts)
    items_lf, spec, ts = lookups.opened[key]
    inp = _Input(cfg=cfg, log=source, lf=frame.lazy(), schema=schema, items_lf=items_lf, users_lf=None, spec=spec, ts=ts)
    return inp, missing


def latest_sessions(
    inp: _Input, lookups: Lookups, missing: list[str], at_us: int | None, raw: pl.DataFrame | None = None,
    cold: ColdItems | None = None,
) -> Served:
    """Every user's latest session starting before `at_us` (events at or after it ignored), with its window.

    Args:
        inp: the opened log (`open_log` / `open_frame`).
        lookups: vocabularies and tables.
        missing: side features to take from items.parquet (second value of `open_*`).
        at_us: cut time in us since epoch UTC, or None for the whole log.
        raw: the raw rows to use (with `_row`), default all of `inp.lf`.
        cold: cold candidates: the arrays then also hold `seq___cold` / `long___cold` (see `ColdItems`).
    """
    cfg = inp.cfg
    if raw is None:
        raw = inp.lf.with_row_index(ROW).collect()
    if at_us is not None:
        raw = raw.filter(inp.ts < at_us)
    events, _, _ = read_events(raw.lazy(), inp, _items_for(inp, lookups, raw))
    gap_us = cfg.gap_td // _US
    ev = (
        sessionize(events.lazy(), gap_us, cfg.max_session_len)
        .drop(SID)
        .collect(engine="in-memory")
    )
    sessions = (
        sessions_table(ev.lazy(), ev.height)
        .with_columns(pl.lit(SPLIT_SERVE, dtype=pl.Int8).alias(SPLIT))
        # serving's own step: the user's latest session only
        .filter(pl.col(SESS) == pl.col(SESS).max().over(USER))
        .collect(engine="in-memory")
    )
    window_us = cfg.long_window_td // _US
    rows = rows_table(long_windows(sessions, ev, window_us, cfg.max_long_len))
    ev = ev.lazy()

    enc = encode(ev, ITEM, _vocab_for(lookups, lookups.vocabs["item"], raw, cfg.item_col), "seq_item")
    read = [f for f in lookups.item_features if f not in missing]
    for f in read:
        vocab = _vocab_for(lookups, lookups.vocabs[f], raw, f) if f in inp.spec.log_item_features else lookups.vocabs[f]
        enc = encode(enc, feat_col(f), vocab, f"seq_{f}")
    extra = []
    if cold is not None:
        enc = encode(enc, ITEM, _vocab_for(lookups, cold.vocab, raw, cfg.item_col), f"seq_{COLD}")
        extra = [f"seq_{COLD}"]
    enc = enc.select(pl.col(TS), pl.col("seq_item"), *[pl.col(f"seq_{f}") for f in read], *extra)
    # the in-memory engine, as the sessionizer's own collects: for one user's events, planning
    # and the streaming engine's hand-offs cost more than the work (7 ms vs 2.6 ms measured)
    enc_df = enc.collect(engine="in-memory")
    if missing:
        idx = enc_df.get_column("seq_item").to_numpy().astype(np.int64)
        enc_df = enc_df.with_columns(
            pl.Series(f"seq_{f}", lookups.item_table[idx, 1 + lookups.item_features.index(f)], dtype=pl.Int32)
            for f in missing
        )
    if cold is not None and cold.side is not None:
        enc_df = _cold_features(enc_df, cold.side, lookups, [f for f in lookups.item_features
                                                             if f not in inp.spec.log_item_features])  # fmt: skip
    seq_cols = ["seq_item"] + [f"seq_{f}" for f in lookups.item_features] + extra
    rows = timelines(rows, enc_df, {TS: "ts", **{c: c for c in seq_cols}})
    arrays = _to_arrays(rows, lookups, seq_cols)
    return Served(arrays, rows.get_column(USER).gather(arrays["row"]))


_US = __import__("datetime").timedelta(microseconds=1)


def now_us() -> int:
    """The current time, us since epoch UTC: a request's time by default (which cold items are known),
    and the `known_from` of an item added to a `Recommender`."""
    import datetime as dt

    return (dt.datetime.now(dt.timezone.utc) - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // _US


def _cold_features(enc: pl.DataFrame, side: np.ndarray, lookups: Lookups, features: list[str]) -> pl.DataFrame:
    """Events of cold candidates take `side`'s non-zero values for `features` (those not read from the events)."""
    rows = enc.get_column(f"seq_{COLD}").to_numpy().astype(np.int64) - lookups.num_items
    at = np.flatnonzero(rows >= 0)
    if not len(at) or not features:
        return enc
    cols = []
    for f in features:
        values = enc.get_column(f"seq_{f}").to_numpy().astype(np.int32)  # a writable copy
        new = side[rows[at], lookups.item_features.index(f)]
        values[at[new > 0]] = new[new > 0]
        cols.append(pl.Series(f"seq_{f}", values, dtype=pl.Int32))
    return enc.with_columns(cols)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line of at most 300 characters, for one-line errors.

    A pydantic error gives its first field and reason; a message whose first line
    only announces the details ("Error(s) in loading state_dict for SDM:") keeps
    the first detail line too.
    """
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        first = exc.errors()[0]  # type: ignore[attr-defined]
        return f"{'.'.join(map(str, first.get('loc', ()))) or 'value'}: {first.get('msg', '')}"[:300]
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


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


def _items_for(inp: _Input, lookups: Lookups, raw: pl.DataFrame) -> pl.LazyFrame | None:
    """The raw items table for `to_events`, cut to the items of `raw` when that is much smaller.

    `to_events` de-duplicates and joins the whole table; for one user's events that
    cost ~9 ms on a 100k-item table per request. The table is read once per Lookups,
    and its rows for other items cannot match.
    """
    if inp.items_lf is None:
        return None
    key = str(inp.cfg.items)
    if key not in lookups.raw_items:
        try:
            lookups.raw_items[key] = inp.items_lf.collect()
        except (pl.exceptions.PolarsError, OSError, pl.exceptions.PanicException) as exc:
            raise DataError(f"{inp.cfg.items}: not a readable items table ({first_line(exc)})") from None
    table = lookups.raw_items[key]
    col = inp.cfg.item_col
    if raw.height * 4 >= table.height or col not in table.columns:
        return table.lazy()
    return _rows_for(lookups, table, col, raw.get_column(col)).lazy()
SMALL_VOCAB = 10_000


def _vocab_for(lookups: Lookups, vocab: pl.DataFrame, raw: pl.DataFrame, column: str) -> pl.DataFrame:
    """The rows of a large vocabulary whose raw value occurs in `raw[column]` (the rest cannot match).

    `encode` joins events to the vocabulary; for one user's few events, hashing a
    100k-row vocabulary each request cost ~10 ms. The subset gives the same indices.
    """
    if vocab.height <= SMALL_VOCAB or column not in raw.columns or numeric.is_numeric(vocab):
        return vocab
    return _rows_for(lookups, vocab, "raw", raw.get_column(column))


def _rows_for(lookups: Lookups, table: pl.DataFrame, key: str, values: pl.Series) -> pl.DataFrame:
    """Rows of `table` whose `key` is one of `values` (a dict lookup when the types agree, else a filter)."""
    values = values.drop_nulls().unique()
    if table.schema[key] != values.dtype:
        # encode / to_events cast the table's key to the log's type: filter the same way
        return table.filter(pl.col(key).cast(values.dtype, strict=False).is_in(values.implode()))
    index = lookups.row_of.get(id(table))
    if index is None:
        index = lookups.row_of[id(table)] = {v: i for i, v in enumerate(table.get_column(key).to_list())}
    rows = [index[v] for v in values.to_list() if v in index]
    return table[np.array(sorted(rows), dtype=np.int64)] if rows else table.clear()


def _to_arrays(rows: pl.DataFrame, lookups: Lookups, seq_cols: list[str]) -> dict[str, np.ndarray]:
    """Shard-format rows (one per user) -> the trainer's session arrays."""
    profile = ["user", *lookups.user_features]
    frame = rows.with_columns(pl.col(USER).cast(pl.String).alias("user_id"))
    # users.parquet rows by user id (a dict built once per Lookups): unknown user / profile -> OOV (1)
    pos = np.array([lookups.user_row.get(u, -1) for u in frame.get_column("user_id").to_list()], dtype=np.int64)
    user_cols = {
        user_column(f): pa.array(np.where(pos >= 0, lookups.user_values[:, j][np.maximum(pos, 0)], 1))
        for j, f in enumerate(profile)
    }
    table = pa.table(
        {
            "user_id": frame.get_column("user_id").to_arrow(),
            "ts": frame.get_column("ts").to_arrow(),
            "sess_id": frame.get_column(SESS).to_arrow(),
            "sess_start": frame.get_column("sess_start").to_arrow(),
            "sess_len": frame.get_column("sess_len").to_arrow(),
            "long_start": frame.get_column("long_start").to_arrow(),
            "long_end": frame.get_column("long_end").to_arrow(),
            **{c: frame.get_column(c).to_arrow() for c in seq_cols},
            **user_cols,
        }
    )
    rb = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    features = [c.removeprefix("seq_") for c in seq_cols]  # "item", the side features (and COLD)
    return sessions_from_record_batch(rb, features, profile, lookups.max_session_len, lookups.max_long_len, min_len=1)


def bucketed(
    inp: _Input, lookups: Lookups, missing: list[str], at_us: int | None, buckets: int, scratch: Path | None = None,
    cold: ColdItems | None = None,
) -> Iterator[Served]:
    """`latest_sessions` one hash bucket of users at a time (the sessionizer's `bucket_expr`): bounded memory.

    With `scratch` (a folder to create, e.g. `outputs.scratch_name(out)`) and several
    buckets, the log is first split by bucket in one streaming pass
    (`sessionize.read.split_log`) into it, so each bucket reads its own file instead
    of filtering the whole log again. The folder is removed at the end; one that a
    killed run left carries the `.sdm-tmp-` prefix, so the next run removes it.
    """
    import shutil

    from sdm.sessionize.read import split_log

    split = None
    if scratch is not None and buckets > 1:
        split = Path(scratch)
        try:
            split.mkdir()
        except OSError as exc:
            raise storage_error(exc, split) from None
    try:
        if split is not None:
            split_log(inp, buckets, split / "input")
        for b in range(buckets):
            raw = _bucket_input(inp, b, buckets, None if split is None else split / "input")
            if raw.height:
                yield latest_sessions(inp, lookups, missing, at_us, raw, cold)
    finally:
        if split is not None:
            shutil.rmtree(split, ignore_errors=True)


def take(served: Served, sl: slice) -> Served:
    """The sessions in `sl`."""
    return Served({k: v[sl] for k, v in served.arrays.items()}, served.user_id[sl])
