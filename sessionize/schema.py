"""Validate: the columns the config names against the input tables' schemas, before any row is read.

`check_log` finds which log column plays which role (`LogSpec`) and refuses
missing columns, side-table keys that cannot join, and feature names that
would collide in an output file; `resolve_features` defaults the side
features to a table's columns. Every problem is an `SdmError` (or
`ConfigError`) naming the file and column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, SdmError
from sdm.names import vocab_file
from sdm.sessionize.columns import RESERVED_PREFIX, USER
from sdm.sessionize.numeric import default_numeric


@dataclass(frozen=True)
class LogSpec:
    """What was found in the input files: which columns play which role.

    Attributes:
        user_key: log column used as the user (the user column, or the session
            column when the log has no user column).
        session_key: log column holding back-end session ids, or None.
        log_item_features: item features taken from the log.
        table_item_features: item features taken from the items table.
        user_features: profile features (always from the users table).
        behavior: whether to filter on the behavior column.
        log_columns: every column of the log (duplicates are judged over these).
    """

    user_key: str
    session_key: str | None
    log_item_features: list[str] = field(default_factory=list)
    table_item_features: list[str] = field(default_factory=list)
    user_features: list[str] = field(default_factory=list)
    behavior: bool = False
    log_columns: list[str] = field(default_factory=list)
    user_from_session: bool = False


def _found(schema: pl.Schema) -> str:
    return ", ".join(schema.names()) or "(none)"


_CATEGORICAL = (pl.String, pl.Categorical, pl.Enum, pl.Boolean)


def _categorical(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or isinstance(dtype, _CATEGORICAL) or dtype == pl.String


def resolve_features(
    cfg: SessionizeConfig, items_schema: pl.Schema | None, users_schema: pl.Schema | None
) -> tuple[SessionizeConfig, list[str]]:
    """Default side features to the tables' columns when a table is given without a feature list.

    `--items T` without `--item-features` takes every categorical (integer,
    string, boolean) and numeric (float, decimal: bucketised, see
    `numeric`) column of T except its key; the same for `--users` and
    `--user-features`. Other columns (dates, lists, ...) are left out and
    named in the returned notes. An explicit list, even an empty one, is kept.

    Returns:
        The config with the features filled in, and one note per table
        defaulted (for the summary line and the manifest).
    """
    notes, update = [], {}
    reserved = {"item", "user"}
    for kind, schema, key, table in (
        ("item", items_schema, cfg.item_col, cfg.items),
        ("user", users_schema, cfg.user_col, cfg.users),
    ):
        field_name = f"{kind}_features"
        if schema is None or field_name in cfg.model_fields_set:
            continue
        cols = [c for c in schema.names() if c != key and c not in reserved and not c.startswith(RESERVED_PREFIX)]
        used = [c for c in cols if _categorical(schema[c]) or default_numeric(schema[c])]
        skipped = [c for c in cols if c not in used]
        if kind == "user":  # a name already an item feature would collide (see check_log)
            used = [c for c in used if c not in update.get("item_features", cfg.item_features)]
        update[field_name] = used
        listed = cfg.numeric_features
        shown = [
            f"{c} (numeric)" if (c in listed if listed is not None else default_numeric(schema[c])) else c for c in used
        ]
        note = f"{kind} features from {table}: {', '.join(shown) or 'none'}"
        if skipped:
            note += f" (neither categorical nor numeric, left out: {', '.join(skipped)})"
        notes.append(note)
    return (cfg.model_copy(update=update) if update else cfg), notes


def check_log(
    cfg: SessionizeConfig,
    path: Path,
    schema: pl.Schema,
    items_schema: pl.Schema | None,
    users_schema: pl.Schema | None,
) -> LogSpec:
    """Check that the log and side tables hold the columns the config names.

    The user is the user column when the log has one; otherwise, when the log
    has the session column, each session id is its own user (so the long-term
    window is empty). That fallback applies to the default column names only:
    a `user_col` or `session_col` the user named (flag or config file) must
    exist. Item features are looked up in the log first, then in the items
    table (the log wins when both have the column). Profile features come from
    the users table only.

    Raises:
        SdmError: naming the missing column(s) and the columns found.
    """
    names = set(schema.names())
    _check_key_columns(cfg, path, schema)
    user_from_session = cfg.user_col not in names
    user_key = cfg.session_col if user_from_session else cfg.user_col
    session_key = cfg.session_col if cfg.session_col in names else None
    _check_side_keys(cfg, path, schema, items_schema, users_schema, user_from_session)

    roles = {user_key: "the user column", cfg.item_col: "the item column", cfg.time_col: "the time column"}
    if session_key:
        roles[session_key] = "the session column"
    log_feats, table_feats = _place_item_features(cfg, path, names, items_schema, roles)
    _check_user_features(cfg, users_schema)
    _check_multi_valued(cfg, schema, items_schema, users_schema, log_feats)
    both = sorted(set(cfg.item_features) & set(cfg.user_features))
    if both:
        raise SdmError(f"feature name(s) {both} used as both item and user features; vocabularies would collide")
    behavior = cfg.behaviors is not None
    if behavior and cfg.behavior_col not in names:
        raise SdmError(
            f"{path}: --behaviors given but the log has no behavior column {cfg.behavior_col!r}; "
            f"found: {_found(schema)}"
        )
    check_output_names(cfg, log_feats, table_feats)
    return LogSpec(
        user_key=user_key,
        session_key=session_key,
        log_item_features=log_feats,
        table_item_features=table_feats,
        user_features=list(cfg.user_features),
        behavior=behavior,
        log_columns=schema.names(),
        user_from_session=user_from_session,
    )


def _check_key_columns(cfg: SessionizeConfig, path: Path, schema: pl.Schema) -> None:
    """No reserved column name; the user (or session), item and time columns exist; a named one must."""
    names = set(schema.names())
    reserved = sorted(c for c in names if c.startswith(RESERVED_PREFIX))
    if reserved:
        raise SdmError(f"{path}: column name(s) {reserved} start with {RESERVED_PREFIX!r}, reserved for the sessionizer; rename them")
    explicit = cfg.model_fields_set
    for key, flag in (("user_col", "--user-col"), ("session_col", "--session-col")):
        col = getattr(cfg, key)
        if key in explicit and col not in names and not (key == "session_col" and col == ""):
            raise SdmError(f"{path}: {flag} {col!r} is not a column of the log; found: {_found(schema)}")
    missing = [c for c in (cfg.item_col, cfg.time_col) if c not in names]
    if cfg.user_col not in names and cfg.session_col not in names:
        missing.insert(0, f"{cfg.user_col} (or a session column {cfg.session_col})")
    if missing:
        raise SdmError(f"{path}: missing required column(s) {', '.join(missing)}; found: {_found(schema)}")


def _check_side_keys(
    cfg: SessionizeConfig,
    path: Path,
    schema: pl.Schema,
    items_schema: pl.Schema | None,
    users_schema: pl.Schema | None,
    user_from_session: bool,
) -> None:
    """Each side table has its key column, of a type that joins the log's."""
    if items_schema is not None:
        if cfg.item_col not in items_schema.names():
            raise SdmError(
                f"{cfg.items}: items table has no key column {cfg.item_col!r}; found: {_found(items_schema)}"
            )
        _check_key_type(cfg.items, "items table", cfg.item_col, items_schema[cfg.item_col], schema[cfg.item_col], path)
    if users_schema is not None:
        if user_from_session:
            raise SdmError(
                f"{cfg.users}: a users table was given but the log {path} has no user column "
                f"{cfg.user_col!r}; found: {_found(schema)}"
            )
        if cfg.user_col not in users_schema.names():
            raise SdmError(
                f"{cfg.users}: users table has no key column {cfg.user_col!r}; found: {_found(users_schema)}"
            )
        _check_key_type(cfg.users, "users table", cfg.user_col, users_schema[cfg.user_col], schema[cfg.user_col], path)


def _place_item_features(
    cfg: SessionizeConfig, path: Path, names: set[str], items_schema: pl.Schema | None, roles: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(features from the log, features from the items table); none may be a key column."""
    log_feats, table_feats = [], []
    for f in cfg.item_features:
        if f in roles:
            raise SdmError(f"item feature {f!r} is {roles[f]} of the log, not a side feature")
        if f in names:
            log_feats.append(f)
        elif items_schema is not None and f in items_schema.names():
            table_feats.append(f)
        else:
            where = f"the log {path}"
            where += f" or the items table {cfg.items}" if cfg.items else " (no --items table given)"
            raise SdmError(f"item feature column {f!r} not found in {where}")
    return log_feats, table_feats


def _check_user_features(cfg: SessionizeConfig, users_schema: pl.Schema | None) -> None:
    """Every profile feature is a column of the users table other than its key."""
    for f in cfg.user_features:
        if users_schema is None:
            raise SdmError(f"user feature column {f!r} needs a users table (--users); none was given")
        if f == cfg.user_col:
            raise SdmError(f"{cfg.users}: user feature {f!r} is the users table's key column, not a profile feature")
        if f not in users_schema.names():
            raise SdmError(
                f"{cfg.users}: user feature column {f!r} not found; found: {_found(users_schema)}"
            )


def _check_multi_valued(
    cfg: SessionizeConfig,
    schema: pl.Schema,
    items_schema: pl.Schema | None,
    users_schema: pl.Schema | None,
    log_feats: list[str],
) -> None:
    """Every multi-valued feature is an item or user feature held in a string column."""
    for f in cfg.multi_valued:
        if f in cfg.user_features:
            dtype = users_schema[f]  # type: ignore[index]
        elif f in cfg.item_features:
            dtype = schema[f] if f in log_feats else items_schema[f]  # type: ignore[index]
        else:
            raise SdmError(
                f"multi-valued feature {f!r} is neither an item nor a user feature (add it to --item-features or "
                "--user-features)"
            )
        if dtype != pl.String:
            raise SdmError(f"multi-valued feature {f!r} is {dtype}; it must be a string column ('a{cfg.value_sep}b')")


def check_flags_used(cfg: SessionizeConfig) -> None:
    """A sessionize flag the user set must act on something (`cfg` resolved: its numeric features known).

    Only `sdm sessionize` asks this: serving rebuilds the training config for events that
    may carry none of its multi-valued features.

    Raises:
        ConfigError: `--value-sep` without a multi-valued feature, `--numeric-buckets` without
            a numeric one.
    """
    explicit = cfg.model_fields_set
    if "value_sep" in explicit and not cfg.multi_valued:
        raise ConfigError(f"--value-sep {cfg.value_sep!r} splits the values of --multi-valued features, and none is named")
    if "numeric_buckets" in explicit and not cfg.numeric_features:
        raise ConfigError(
            f"--numeric-buckets {cfg.numeric_buckets} buckets numeric features, and there is none "
            "(--numeric-features names them; float columns are numeric by default)"
        )


def check_output_names(cfg: SessionizeConfig, log_feats: list[str], table_feats: list[str]) -> None:
    """Refuse feature names that would collide with another name in an output file, before anything is written.

    A feature's name becomes columns (`seq_<f>`, `oov_<f>`, `user_<f>`, `<f>` and
    `<f>_values` of items.parquet, `<f>` of catalogue.parquet) and a vocabulary file (`names.vocab_file`,
    never a path outside `vocab/`); `item` and `user` are the id vocabularies.
    Two names whose vocabulary files differ only in case would be one file on
    a case-insensitive file system.

    Raises:
        ConfigError: naming the feature and the name it collides with.
    """
    item_feats, user_feats = list(cfg.item_features), list(cfg.user_features)
    for f in (*item_feats, *user_feats):
        if f in ("item", "user"):
            raise ConfigError(f"feature {f!r}: the name of the {f} id's own vocabulary; rename the column")
    outputs = {
        "a shard": [
            "user_id", "user", *[f"user_{f}" for f in user_feats], "ts", "seq_item", *[f"seq_{f}" for f in log_feats],
            "seq_oov", *[f"oov_{f}" for f in table_feats], "sess_id", "sess_start", "sess_len", "long_start", "long_end",
        ],
        "items.parquet": ["item", "item_id", *item_feats, *[f"{f}_values" for f in cfg.multi_valued if f in item_feats]],
        "users.parquet": [USER, "user_id", "user", *user_feats, *[f"{f}_values" for f in cfg.multi_valued if f in user_feats]],
        "catalogue.parquet": ["item_id", "oov_hash", "known_from", *item_feats],
    }  # fmt: skip
    for where, columns in outputs.items():
        seen: set[str] = set()
        for c in columns:
            if c in seen:
                raise ConfigError(f"feature names collide: {where} would hold two columns {c!r}; rename a feature column")
            seen.add(c)
    files: dict[str, str] = {}
    for f in ("item", "user", *item_feats, *user_feats):
        other = files.setdefault(vocab_file(f).lower(), f)
        if other != f:
            raise ConfigError(f"features {other!r} and {f!r} differ only in case: their vocabulary files would be one")


def _check_key_type(table: Path | None, what: str, key: str, dtype: pl.DataType, log_dtype: pl.DataType, log: Path) -> None:
    """A side table's key must compare with the log's column: both integers, or both strings.

    Raises:
        SdmError: naming the table, the key and both types.
    """
    if value_kind(dtype) != value_kind(log_dtype):
        raise SdmError(
            f"{table}: {what} key {key!r} is {dtype} but the log's {key!r} is {log_dtype} "
            f"({log}); store both as integers or both as strings"
        )


def value_kind(dtype: pl.DataType) -> str:
    """What a raw value is, for comparing vocabularies: integers of any width are one kind, strings another."""
    if dtype.is_integer():
        return "integers"
    if dtype.is_float():
        return "floats"
    if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "strings"
    return str(dtype)
