"""What callers pass `Recommender`, checked: each bad argument is one `ConfigError` line naming it.

- `to_frame`: events (`recommend`) or items (`add_items`) as one polars frame, from a
  polars / pandas frame, a list of dicts or a dict of lists, refusing integers
  beyond int64;
- `check_k`, `parse_at`, `check_bool`, `check_choice`: `k`, `at` (a datetime or an ISO
  8601 string, naive = UTC), the flags, and a value out of a fixed set;
- `now_us`: the time of a request without `at` (also `sdm recommend`'s default `--at`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pydantic

from sdm.errors import ConfigError, SdmError, first_line
from sdm.fields import Time
from sdm.sessionize.io import polars_errors
from sdm.sessionize.times import to_utc_us

INT64 = (-(2**63), 2**63 - 1)


def to_frame(events: Any, what: str = "events") -> pl.DataFrame:
    """A polars DataFrame from a polars/pandas frame, a list of dicts or a dict of lists.

    Raises:
        ConfigError: anything else, rows polars cannot put in one frame, or integers beyond int64
            (naming `what`, the argument).
    """
    if isinstance(events, pl.LazyFrame):
        with polars_errors(what):
            events = events.collect()
    if isinstance(events, pl.DataFrame):
        return _check_int64(events, what)
    try:
        if type(events).__module__.startswith("pandas"):
            return _check_int64(pl.from_pandas(events), what)
        if isinstance(events, (list, tuple, dict)):
            return _check_int64(pl.DataFrame(events), what)
    except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, SdmError):
            raise
        raise ConfigError(f"{what}: not one table ({first_line(exc)})") from None
    raise ConfigError(
        f"{what}: expected a polars or pandas frame, a list of dicts or a dict of lists, got {type(events).__name__}"
    )


def _check_int64(frame: pl.DataFrame, what: str = "events") -> pl.DataFrame:
    """Refuse integer columns holding values beyond int64 (ids sdm's tables cannot hold)."""
    for name, dtype in frame.schema.items():
        if dtype in (pl.Int128, pl.UInt64, pl.UInt128) and frame.height:
            col = frame.get_column(name).drop_nulls()
            if len(col) and (col.min() < INT64[0] or col.max() > INT64[1]):
                bad = col.max() if col.max() > INT64[1] else col.min()
                raise ConfigError(f"{what}: column {name!r} holds {bad}, beyond the 64-bit integers sdm reads")
    return frame


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_k(k: Any) -> int:
    """k as an int >= 1 (not a bool, float or string)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k must be an integer, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    return int(k)


def parse_at(at: Any) -> int | None:
    """`at` (None, a datetime or an ISO 8601 string; naive = UTC) as microseconds since epoch,
    within the range `sdm recommend --at` accepts (`fields.Time`: 1678 to 2262). A number is
    refused: seconds or milliseconds, the call cannot tell."""
    if at is None:
        return None
    if not isinstance(at, (str, dt.datetime)):
        raise ConfigError(f"at must be a datetime or an ISO 8601 string, got {at!r} ({type(at).__name__})")
    if isinstance(at, dt.datetime) and at != at:  # pandas' NaT: not a time, not "no cut-off"
        raise ConfigError(f"at: {at!r} is not a time (None means now)")
    try:
        value = _TIME.validate_python(at)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"at: {at!r} is not a usable time ({exc.errors()[0]['msg']})") from None
    try:
        return to_utc_us(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"at: {at!r} is not a usable time ({first_line(exc)})") from None


_TIME = pydantic.TypeAdapter(Time)


def now_us() -> int:
    """The current time, us since epoch UTC: a request's time by default (which cold items are known),
    and the `known_from` of an item added to a `Recommender`."""
    return to_utc_us(dt.datetime.now(dt.timezone.utc))


def check_choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected {', '.join(allowed[:-1])} or {allowed[-1]}")
