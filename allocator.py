"""Polars' allocator for a bucketed sessionizer run: keep freed pages for reuse a while.

Polars configures its allocator (jemalloc) when it is imported, with freed pages
handed back to the kernel after 0.5 s (`dirty_decay_ms:500`), and appends
`_RJEM_MALLOC_CONF` to that, so a value there wins. With 0.5 s, every bucket of a
sessionizer run handed its large blocks back and faulted them in again, zeroed.
Measured at 100M events with the default 9 buckets (fresh processes, 2-core
machine): 5.1-5.2M minor page faults and 35.4-36.9 s with polars' setting, 2.1M
and 29.5-31.3 s with 5 s.

Only with the default bucket count: each bucket then holds at most about
`bucket_events` events, so what is kept is bounded by that setting. At 100M the
peak was 2.15-2.40 GiB in five runs, against 2.03-2.11 GiB in two. With one
bucket of the whole log it is not: one bucket of 100M events peaked at 6.9-8.3
GiB with 5 s (five runs), against 6.0-7.2 GiB with polars' 0.5 s (nine runs),
and an explicit 4 buckets at 4.13-4.38 GiB, against 2.97-3.08 GiB (two runs each).
Without the row count (which needs polars) the events per bucket of an explicit
count are unknown, so an explicit `--buckets` keeps polars' setting.
"""

from __future__ import annotations

import os
import sys

DECAY = "dirty_decay_ms:5000"


def keep_freed_pages(buckets: int | None) -> bool:
    """Set `_RJEM_MALLOC_CONF` to `DECAY` for a run with the default bucket count (`buckets` None).

    Call it before polars is imported (jemalloc reads the variable once, when
    polars loads). Nothing is changed when the user set the variable, when
    polars is already loaded, or for an explicit bucket count.

    Returns:
        Whether the setting was made.
    """
    if buckets is not None or "polars" in sys.modules or "_RJEM_MALLOC_CONF" in os.environ:
        return False
    os.environ["_RJEM_MALLOC_CONF"] = DECAY
    return True
