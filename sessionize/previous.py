"""`--vocab-from PREV_DATA`: the vocabularies (and item rows) of an earlier data directory, kept stable.

Daily retraining warm-starts a model from yesterday's checkpoint, whose
embedding rows are indexed by yesterday's vocabularies. With `--vocab-from`
every raw id and feature value of PREV_DATA keeps its index; values new in
this run's training split are appended after them (`vocab.build_vocab`), and
an item this run no longer describes keeps its row of items.parquet
(`tables.items_table`). users.parquet is keyed by raw user id (one row per
user of this log), not by user index, so it has nothing to carry over.

A numeric feature keeps PREV_DATA's buckets: the same edges and indices
(`numeric.vocabulary`), so a value lands in the bucket it did yesterday;
`numeric_buckets` then has no say, and only the counts are this run's.

`load` reads and checks PREV_DATA before the first pass, so a wrong
directory costs nothing: its manifest is validated and every file's sha256
verified, and the feature sets (numeric ones included) and the raw types of
the vocabularies must be this run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sdm.errors import DataError, SdmError
from sdm.names import vocab_file
from sdm.manifest import read_manifest, verify_files
from sdm.sessionize import numeric
from sdm.sessionize.io import polars_errors
from sdm.sessionize.read import Input
from sdm.sessionize.schema import value_kind


@dataclass
class Previous:
    """What a run keeps from PREV_DATA.

    Attributes:
        vocabs: name -> `raw`, `index` (sorted by index, 2..n+1), for item, user and every feature.
        items: PREV_DATA's items.parquet (None without item side features: nothing to carry).
        entry: the manifest's `vocab_from` entry (path as given, fingerprint, vocab_sizes).
    """

    vocabs: dict[str, pl.DataFrame]
    items: pl.DataFrame | None
    entry: dict[str, Any]


def load(inp: Input) -> Previous | None:
    """PREV_DATA of `--vocab-from` (None without the flag), checked against this run's input.

    Raises:
        SdmError: PREV_DATA is not a complete, unchanged data directory; its
            item or user features (or multi-valued ones) differ from this
            run's; or a vocabulary's raw values are of another type.
    """
    cfg = inp.cfg
    if cfg.vocab_from is None:
        return None
    path = Path(cfg.vocab_from)
    try:
        manifest = read_manifest(path)
        verify_files(path, manifest)
    except DataError as exc:
        raise DataError(f"--vocab-from: {exc}") from None
    _check_features(path, manifest, inp)
    names = [*manifest["item_features"], *manifest["user_features"]]
    numbers = set(manifest.get("numeric") or {})
    vocabs = {name: _read_vocab(path, name, manifest["vocab_sizes"][name], name in numbers) for name in names}
    _check_types(path, {n: v for n, v in vocabs.items() if n not in numbers}, _source_types(inp))
    items = None
    if len(manifest["item_features"]) > 1:
        with polars_errors(f"--vocab-from {path / 'items.parquet'}"):
            items = pl.read_parquet(path / "items.parquet")
    entry = {"path": str(cfg.vocab_from), "fingerprint": manifest["fingerprint"], "vocab_sizes": manifest["vocab_sizes"]}
    return Previous(vocabs, items, entry)


def _check_features(path: Path, manifest: dict[str, Any], inp: Input) -> None:
    """The item, user, multi-valued and numeric feature sets, the separator of the multi-valued
    values and a `--numeric-buckets` the user set must be PREV_DATA's: one line naming those that differ."""
    cfg, spec = inp.cfg, inp.spec
    pairs = {
        "item features": (manifest["item_features"][1:], cfg.item_features),
        "user features": (manifest["user_features"][1:], spec.user_features),
        "multi-valued features": (list(manifest.get("multi_valued") or {}), cfg.multi_valued),
        "numeric features": (list(manifest.get("numeric") or {}), cfg.numeric_features or []),
    }
    problems = []
    for what, (before, now) in pairs.items():
        gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
        if gone or new:
            parts = ([f"{', '.join(map(repr, gone))} only in {path}"] if gone else []) + (
                [f"{', '.join(map(repr, new))} only in this run"] if new else []
            )
            hint = " (--numeric-features sets them; floats are numeric by default)" if what == "numeric features" else ""
            problems.append(f"{what}: " + " and ".join(parts) + hint)
    before = manifest.get("config") or {}
    buckets = before.get("numeric_buckets", cfg.numeric_buckets)
    if "numeric_buckets" in cfg.model_fields_set and cfg.numeric_features and buckets != cfg.numeric_buckets:
        problems.append(f"--numeric-buckets: {buckets} in {path}, {cfg.numeric_buckets} in this run (its bucket edges are kept)")
    sep = before.get("value_sep", cfg.value_sep)
    if cfg.multi_valued and sep != cfg.value_sep:  # the kept values were split with the other one
        problems.append(f"--value-sep: {sep!r} in {path}, {cfg.value_sep!r} in this run")
    if problems:
        raise SdmError(f"--vocab-from {path}: its features or settings differ ({'; '.join(problems)}); its vocabularies cannot be kept")


def _read_vocab(path: Path, name: str, size: int, buckets: bool = False) -> pl.DataFrame:
    """PREV_DATA's vocabulary of `name`: `raw`, `index`, sorted by index, which must be 2..size-1,
    each raw value once and none null.

    `buckets`: a numeric feature's, read with its bounds `lo`, `hi` and checked (`numeric.check`).
    """
    file = path / vocab_file(name)
    with polars_errors(f"--vocab-from {file}"):
        vocab = pl.read_parquet(file, columns=["raw", "index", *(["lo", "hi"] if buckets else [])]).sort("index")
    if buckets:
        numeric.check(vocab, f"--vocab-from {file}")
    index = vocab.get_column("index")
    if vocab.height != size - 2 or (vocab.height and (index[0] != 2 or index[-1] != size - 1 or index.n_unique() != vocab.height)):
        raise DataError(f"--vocab-from {file}: not the indices 2..{size - 1} its manifest records")
    raw = vocab.get_column("raw")
    if raw.null_count():
        raise DataError(f"--vocab-from {file}: a null raw value (index {vocab.filter(pl.col('raw').is_null())['index'][0]})")
    twice = vocab.filter(raw.is_duplicated())
    if twice.height:  # two indices of one value: the value would keep one, the other be appended again
        raise DataError(f"--vocab-from {file}: raw value {twice['raw'][0]!r} has two indices ({', '.join(map(str, twice['index'].head(2)))})")
    return vocab.with_columns(pl.col("index").cast(pl.Int32))


def _source_types(inp: Input) -> dict[str, pl.DataType]:
    """The type of the raw values each vocabulary of this run is built from (log, items or users table)."""
    cfg, spec = inp.cfg, inp.spec
    types = {"item": inp.schema[cfg.item_col], "user": inp.schema[spec.user_key]}
    types.update({f: inp.schema[f] for f in spec.log_item_features})
    for lf, features in ((inp.items_lf, spec.table_item_features), (inp.users_lf, spec.user_features)):
        if lf is not None and features:
            with polars_errors("--vocab-from"):
                schema = lf.collect_schema()
            types.update({f: schema[f] for f in features if f in schema})
    for f in cfg.multi_valued:
        types[f] = pl.String  # its vocabulary holds the split values
    return types


def _check_types(path: Path, vocabs: dict[str, pl.DataFrame], types: dict[str, pl.DataType]) -> None:
    """Refuse a vocabulary whose raw values are of another kind than this run's column (ints vs strings)."""
    for name, vocab in vocabs.items():
        now = types.get(name)
        if vocab.height == 0 or now is None or now == pl.Null:
            continue  # nothing to keep, or nothing to compare with
        before = vocab.schema["raw"]
        if value_kind(before) != value_kind(now):
            raise SdmError(
                f"--vocab-from {path}: the raw values of {name!r} are {value_kind(before)} there ({before}) but {value_kind(now)} "
                f"in this run ({now}); its vocabulary cannot be kept"
            )


def seed(prev: pl.DataFrame | None, counts: pl.DataFrame | pl.LazyFrame, name: str) -> tuple[pl.DataFrame | pl.LazyFrame, pl.DataFrame | None]:
    """`counts` and the previous vocabulary of `name` with one raw type, for `vocab.build_vocab`.

    The previous raw values take this run's type (an int32 column and an
    int64 one hold the same ids). Counts of nothing at all (a `Tally` that saw
    no value has no type of its own) take the previous type instead.

    Raises:
        SdmError: a previous value this run's type cannot hold.
    """
    if prev is None or prev.height == 0:
        return counts, None
    dtype = counts.collect_schema()["raw"]
    if isinstance(counts, pl.DataFrame) and counts.height == 0:
        return counts.cast({"raw": prev.schema["raw"]}), prev
    if dtype == prev.schema["raw"]:
        return counts, prev
    try:
        return counts, prev.with_columns(pl.col("raw").cast(dtype, strict=True))
    except pl.exceptions.PolarsError:
        raise SdmError(
            f"--vocab-from: a raw value of {name!r} ({prev.schema['raw']}) does not fit this run's type {dtype}"
        ) from None
