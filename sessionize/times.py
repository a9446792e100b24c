"""The log's time column: read as int64 microseconds since epoch, UTC, and checked to fit a datetime.

Integer epochs, datetimes, dates and strings (with `--time-format`) are
turned into one expression (`timestamp_expr`); the kept values are checked
against the years a datetime holds before anything is written
(`check_time_range`). Also the conversions of a config datetime to
microseconds (`to_utc_us`) and back to ISO-8601 (`from_us`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize.columns import TS


MIN_US = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in us since epoch: the earliest time a Python datetime holds."""
MAX_US = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z in us since epoch: the latest."""


def timestamp_expr(cfg: SessionizeConfig, dtype: pl.DataType, path: Path, sample: str | None = None) -> pl.Expr:
    """Expression turning the log's time column into int64 microseconds since epoch, UTC.

    Naive datetimes are taken as UTC; zoned ones are converted to UTC
    (`dt.epoch` does both). Dates are midnight UTC. Integers are epoch seconds or
    milliseconds as declared by `cfg.time_unit`. Strings are parsed with
    `cfg.time_format` (strftime codes; a value that does not match is an error).

    Args:
        sample: a value of a string column, shown in the error when no
            time_format is given.

    Raises:
        SdmError: a column of any other type, an integer column without
            time_unit, or a string column without time_format.
    """
    col = pl.col(cfg.time_col)
    if dtype == pl.String and cfg.time_format is not None:
        return col.str.to_datetime(cfg.time_format, time_unit="us", strict=True).dt.epoch("us")
    if cfg.time_format is not None:
        raise SdmError(f"{path}: --time-format is for a string time column; {cfg.time_col!r} is {dtype}")
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("us")
    if dtype == pl.Date:
        return col.cast(pl.Datetime("us")).dt.epoch("us")
    if dtype.is_integer():
        if cfg.time_unit is None:
            raise SdmError(
                f"{path}: column {cfg.time_col!r} is an integer ({dtype}); "
                "pass --time-unit s or --time-unit ms to read it as epoch seconds/milliseconds"
            )
        factor = 1_000_000 if cfg.time_unit == "s" else 1_000
        return col.cast(pl.Int64) * factor
    if dtype == pl.String:
        raise string_times(cfg, path, sample)
    raise SdmError(
        f"{path}: column {cfg.time_col!r} has type {dtype}; expected a timestamp "
        "(datetime), an integer epoch with --time-unit s|ms, or a string with --time-format"
    )


def string_times(cfg: SessionizeConfig, path: Path, sample: str | None) -> SdmError:
    """The error for a time column of strings that is read without `--time-format`."""
    shown = f" such as {sample!r}" if sample is not None else ""
    return SdmError(
        f"{path}: column {cfg.time_col!r} holds strings{shown}, not timestamps; pass --time-format "
        "with their strftime pattern (e.g. '%Y-%m-%d %H:%M:%S UTC'), or use integer epochs with --time-unit s|ms"
    )


RAW_TIME = "__sdm_raw_time"
"""An integer time column as read, kept next to the events until its range is checked."""


def check_time_range(df: pl.DataFrame, cfg: SessionizeConfig, dtype: pl.DataType, path: Path) -> None:
    """Refuse timestamps a datetime cannot hold (before year 1 or after 9999), before anything is written.

    `df` holds kept events: `TS` and, for an integer time column, `RAW_TIME`.
    Integer epochs are checked as read, before the scaling to microseconds
    (where int64 would wrap around silently).

    Raises:
        SdmError: naming the value and what it would be.
    """
    if df.height == 0:
        return
    if dtype.is_integer() and cfg.time_unit is not None:
        factor = 1_000_000 if cfg.time_unit == "s" else 1_000
        lo, hi = df.select(pl.col(RAW_TIME).cast(pl.Int64).min().alias("lo"), pl.col(RAW_TIME).cast(pl.Int64).max().alias("hi")).row(0)
        for v in (lo, hi):
            if v is not None and not MIN_US <= v * factor <= MAX_US:
                hint = " (milliseconds read as seconds? try --time-unit ms)" if cfg.time_unit == "s" else ""
                raise SdmError(
                    f"{path}: {cfg.time_col!r} value {v} is outside years 1-9999 as epoch "
                    f"{'seconds' if cfg.time_unit == 's' else 'milliseconds'}{hint}"
                )
        return
    lo, hi = df.select(pl.col(TS).min().alias("lo"), pl.col(TS).max().alias("hi")).row(0)
    for v in (lo, hi):
        if v is not None and not MIN_US <= v <= MAX_US:
            raise SdmError(f"{path}: {cfg.time_col!r} holds a time outside years 1-9999 ({v} us since 1970)")


def to_utc_us(value: dt.datetime) -> int:
    """A config datetime as microseconds since epoch, UTC (naive = UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return delta // dt.timedelta(microseconds=1)


def from_us(value: int) -> str:
    """Microseconds since epoch as an ISO-8601 UTC string."""
    base = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (base + dt.timedelta(microseconds=int(value))).isoformat()
