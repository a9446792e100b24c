"""The behavior filter (`--behaviors`): the listed values as values of the behavior column, and the filter itself.

A row whose behavior is not listed is dropped (`normalise.tag_drops`); a
listed value no row holds is reported (`read.check_behaviors`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import polars as pl

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError


def _numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float() or isinstance(dtype, pl.Decimal)


def behavior_values(cfg: SessionizeConfig, dtype: pl.DataType) -> list[Any]:
    """`--behaviors` as values of the behavior column: numbers on a numeric column, else strings.

    On a numeric column the listed strings are parsed as numbers, so `4`, `4.0`
    and `4.00` are one value (comparing strings, the float 4.0 never equalled
    "4"). On an integer column a fraction (`4.5`) stays in the list as None:
    it matches no row, which `read.check_behaviors` reports.

    Raises:
        ConfigError: a listed value that is not a number, on a numeric column.
    """
    listed = [str(b) for b in cfg.behaviors or []]
    if not _numeric(dtype):
        return listed
    values: list[Any] = []
    for text in listed:
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise ConfigError(
                f"--behaviors {text!r} is not a number, and the behavior column {cfg.behavior_col!r} holds numbers ({dtype})"
            )
        if dtype.is_integer():
            values.append(int(number) if number == number.to_integral_value() else None)
        else:
            values.append(float(number))
    return values


def behavior_in(cfg: SessionizeConfig, dtype: pl.DataType, values: list[Any]) -> pl.Expr:
    """Whether the behavior column's value is one of `values` (`behavior_values`); null for a null behavior.

    Numbers are compared as the column's own type (a float32 column's 0.1 is
    the float32 nearest 0.1); strings as the column cast to strings.
    """
    col = pl.col(cfg.behavior_col)
    if not _numeric(dtype):
        return col.cast(pl.String).is_in(pl.Series(values, dtype=pl.String).implode())
    if dtype.is_integer():
        wanted = pl.Series([v for v in values if v is not None], strict=False).cast(dtype, strict=False).drop_nulls()
        return col.is_in(wanted.implode())
    floats = pl.Series(values, dtype=pl.Float64)
    if dtype.is_float():
        return col.is_in(floats.cast(dtype).implode())
    return col.cast(pl.Float64).is_in(floats.implode())  # a Decimal column
