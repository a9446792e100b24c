"""The normalised column names every stage uses, and the names derived from a feature's.

The log's own columns are renamed to these (`normalise.to_events`), so no
stage past the read depends on the user's column names.
"""

from __future__ import annotations

import polars as pl


# Normalised column names used by the rest of the package. `ROW` and `DROP` are
# added next to the log's own columns, so they carry a prefix no log uses
# (`RESERVED_PREFIX`, refused in a log); the others only exist after the log's
# columns were selected away (`to_events`), so any log column name is fine.
RESERVED_PREFIX = "__sdm_"
ROW, DROP = RESERVED_PREFIX + "row", RESERVED_PREFIX + "drop"
USER, ITEM, TS, SID = "_user", "_item", "_ts", "_sid"
DROP_REASONS = ("null_user", "null_item", "null_timestamp", "behavior", "duplicate")


def feat_col(name: str) -> str:
    """Normalised column name of item side feature `name`."""
    return f"_f_{name}"


def values_col(name: str) -> str:
    """Normalised column of the value list of a multi-valued feature `name`."""
    return f"_m_{name}"


def value_list(column: pl.Expr, sep: str) -> pl.Expr:
    """A multi-valued string as its values: 'Comedy| Romance' -> ['Comedy', 'Romance'] (split on
    `sep`, each value stripped, empty values dropped; a null string stays null)."""
    return column.str.split(sep).list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
