"""The value types of sdm's configuration fields: bounded numbers, names, paths, durations, cutoffs.

Every field of a command's config (`sdm.config`) is one of these types, so a bad
value fails validation with a one-line message naming the bound it broke and the
value ("must be >= 1, got 0"): counts and finite floats within bounds, durations up
to 100 years, cutoffs within the int64-nanosecond range, names without NUL or line
breaks.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BeforeValidator, ValidatorFunctionWrapHandler, WrapValidator

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

MAX_DAYS = 36_525
"""Longest duration or day count any field takes: 100 years (a `--gap 99999999999999999999` overflowed timedelta)."""
MAX_DURATION = dt.timedelta(days=MAX_DAYS)
MIN_TIME = dt.datetime(1678, 1, 1, tzinfo=dt.timezone.utc)
"""Earliest cutoff / `--at` accepted: the start of the int64-nanosecond range every timestamp type can hold."""
MAX_TIME = dt.datetime(2262, 4, 11, tzinfo=dt.timezone.utc)
"""Latest cutoff / `--at` accepted: the end of the int64-nanosecond range."""
MAX_SEED = 2**32 - 1
MAX_NAME_LEN = 1024
"""Longest column or feature name accepted."""
MAX_PATH_LEN = 4096
"""Longest path accepted (Linux PATH_MAX)."""
_BAD_CHARS = ("\x00", "\n", "\r")


def show_value(v: Any) -> str:
    """repr of a bad value for a message: one line, at most 60 characters."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 160:
        return f"an integer of about {int(v.bit_length() * 0.30103)} digits"  # repr fails past 4,300 digits
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:50] + "..." + r[-7:]


def parse_duration(text: str | int | float) -> dt.timedelta:
    """Parse '10m', '7d', '1h30m', '90s' (or a number of seconds) into a timedelta.

    At least 1 us and at most 100 years (`MAX_DAYS`); nan, inf and booleans are refused.

    Raises:
        ValueError: on anything else, naming the value.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {show_value(text)}: use e.g. 10m, 90s, 7d, 1h30m")
    if isinstance(text, (int, float)):
        seconds = float(text) if not isinstance(text, int) or abs(text) < 10**300 else math.inf
    else:
        s = str(text).strip().lower().replace(" ", "")
        if len(s) > 100:
            raise ValueError(f"invalid duration {show_value(text)}: too long (use e.g. 10m, 90s, 7d, 1h30m)")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = _DURATION_RE.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ValueError(f"invalid duration {show_value(text)}: use e.g. 10m, 90s, 7d, 1h30m")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError(f"invalid duration {show_value(text)}: not a number")
    if seconds <= 0:
        raise ValueError(f"invalid duration {show_value(text)}: must be positive")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {show_value(text)}: at most 100 years ({MAX_DAYS}d)")
    td = dt.timedelta(seconds=seconds)
    if td <= dt.timedelta(0):
        raise ValueError(f"invalid duration {show_value(text)}: must be at least 1us")
    return td


def split_list(value: Any) -> Any:
    """Accept 'a,b,c' (CLI) as well as ['a', 'b', 'c'] (TOML)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _num(b: float) -> str:
    return str(b) if isinstance(b, int) else f"{b:g}"


def within(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> WrapValidator:
    """A number field (int or float; None passes) within [lo, hi] (open ends exclusive), finite.

    true/false are refused (pydantic would read them as 1 and 0); the messages name the
    bound and the value on one line ("must be >= 1, got 0").
    """
    if math.isinf(lo):
        want = f"{'<' if hi_open else '<='} {_num(hi)}"
    elif math.isinf(hi):
        want = f"{'>' if lo_open else '>='} {_num(lo)}"
    else:
        want = f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"

    def check(v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number, got {v!r}")
        v = handler(v)
        if v is None:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number {want}, got {v}")
        low = v <= lo if lo_open else v < lo
        high = v >= hi if hi_open else v > hi
        if low or high:
            side = f">{'' if lo_open else '='} {_num(lo)}" if low else f"<{'' if hi_open else '='} {_num(hi)}"
            # an int names the bound it broke ("must be >= 1, got 0"), a float its interval ("in [0, 1)")
            raise ValueError(f"must be {want if isinstance(v, float) else side}, got {show_value(v)}")
        return v

    return WrapValidator(check)


def check_name(v: str | None, empty_ok: bool = False) -> str | None:
    """A column or feature name: not empty, no NUL or line break, at most MAX_NAME_LEN characters."""
    if v is None:
        return v
    if not v and not empty_ok:
        raise ValueError("must not be empty")
    if any(c in v for c in _BAD_CHARS):
        raise ValueError(f"must not contain a NUL or line break, got {show_value(v)}")
    if len(v) > MAX_NAME_LEN:
        raise ValueError(f"is {len(v)} characters long, at most {MAX_NAME_LEN}")
    return v


def _path(v: Path | None) -> Path | None:
    """A path: no NUL or line break, at most MAX_PATH_LEN characters."""
    if v is None:
        return v
    text = str(v)
    if any(c in text for c in _BAD_CHARS):
        raise ValueError(f"must not contain a NUL or line break, got {show_value(text)}")
    if len(text) > MAX_PATH_LEN:
        raise ValueError(f"is {len(text)} characters long, at most {MAX_PATH_LEN}")
    return v


def _given_path(v: Any) -> Any:
    """An empty path is refused before it becomes Path('') == Path('.'), the current directory."""
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty (write '.' for the current directory)")
    return v


def _names(v: list[str] | None) -> list[str] | None:
    """A list of column names: each valid, none twice."""
    if v is None:
        return v
    for x in v:
        check_name(x)
    twice = sorted({x for x in v if v.count(x) > 1})
    if twice:
        raise ValueError(f"lists {twice} more than once")
    return v


def no_duplicates(v: list[Any]) -> list[Any]:
    """A list names each value once (`--k 10,10` or a baseline listed twice is a typo, refused)."""
    twice = [x for i, x in enumerate(v) if x in v[:i]]
    if twice:
        raise ValueError(f"lists {twice[0]!r} more than once")
    return v


def _time(v: dt.datetime | None) -> dt.datetime | None:
    """A cutoff (naive = UTC) within [MIN_TIME, MAX_TIME]."""
    if v is None:
        return v
    utc = v.replace(tzinfo=dt.timezone.utc) if v.tzinfo is None else v
    # subtraction, not astimezone: 9999-12-31T23:00-05:00 is past datetime.max in UTC
    if utc - MIN_TIME < dt.timedelta(0) or utc - MAX_TIME > dt.timedelta(0):
        raise ValueError(f"must be between {MIN_TIME.date()} and {MAX_TIME.date()}, got {v.isoformat()}")
    return v


def _duration(v: Any) -> Any:
    """A duration field: a number from TOML is seconds, as a bare number is on the command line."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        parse_duration(v)
        return repr(v) if isinstance(v, float) else str(v)
    return v


def _duration_ok(v: str) -> str:
    parse_duration(v)
    return v


def event_values(v: Any) -> Any:
    """Event type values (--behaviors): 'a,b' or a list; integers (TOML `[1, 2]`) as their text."""
    v = split_list(v)
    if isinstance(v, list):
        return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
    return v


def nonempty(v: list[Any] | None) -> list[Any] | None:
    if v is not None and not v:
        raise ValueError("must not be empty when given")
    return v


Name = Annotated[str, AfterValidator(check_name)]
"""A column name: not empty, no NUL or line break."""
PathField = Annotated[Path, BeforeValidator(_given_path), AfterValidator(_path)]
OptPath = Annotated[Optional[Path], BeforeValidator(_given_path), AfterValidator(_path)]
Names = Annotated[list[Name], BeforeValidator(split_list), AfterValidator(_names)]
"""Column names, comma-separated on the command line; each valid, none twice."""
OptNames = Annotated[Optional[list[Name]], BeforeValidator(split_list), AfterValidator(_names)]
Duration = Annotated[str, BeforeValidator(_duration), AfterValidator(_duration_ok)]
"""'10m', '7d', '1h30m' or seconds; at least 1us, at most 100 years."""
Time = Annotated[Optional[dt.datetime], AfterValidator(_time)]
"""A UTC cutoff (naive = UTC) between MIN_TIME and MAX_TIME."""
Seed = Annotated[int, within(0, MAX_SEED)]
Days = Annotated[Optional[float], within(0, MAX_DAYS)]
"""A day count: finite, 0 (an empty split) to 100 years."""
Fraction = Annotated[Optional[float], within(0, 1, hi_open=True)]
