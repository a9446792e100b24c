"""A small, obviously correct sessionizer in plain Python (SPEC sections 2-4).

Plain loops over sorted rows, no polars. The property tests check that
`sdm.sessionize.run` agrees with it on random logs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Hashable


@dataclass
class Event:
    row: int
    user: Hashable
    item: Hashable
    ts: int  # microseconds
    sid: Hashable | None = None


@dataclass
class Session:
    user: Hashable
    events: list[Event]
    long: list[Event]
    split: str = ""

    @property
    def start(self) -> int:
        return self.events[0].ts


def clean(rows: list[tuple]) -> list[Event]:
    """Drop rows with a null user/item/time and exact duplicates (first copy kept).

    Each row is (user, item, ts, sid); its position is its input order.
    """
    seen = set()
    events = []
    for i, (user, item, ts, sid) in enumerate(rows):
        if user is None or item is None or ts is None:
            continue
        if (user, item, ts, sid) in seen:
            continue
        seen.add((user, item, ts, sid))
        events.append(Event(i, user, item, ts, sid))
    return events


def sessionize(events: list[Event], gap: int, max_len: int, window: int, max_long: int) -> list[Session]:
    """Sessions in (user, start time) order, each with its long-term window."""
    by_user: dict[Hashable, list[Event]] = {}
    for e in events:
        by_user.setdefault(e.user, []).append(e)
    sessions = []
    for user in sorted(by_user):
        timeline = sorted(by_user[user], key=lambda e: (e.ts, e.row))
        raw: list[list[Event]] = []
        for e in timeline:
            if raw:
                prev = raw[-1][-1]
                same_sid = e.sid is not None and prev.sid is not None and e.sid == prev.sid
                if same_sid or e.ts - prev.ts < gap:
                    raw[-1].append(e)
                    continue
            raw.append([e])
        for r in raw:
            for k in range(0, len(r), max_len):
                chunk = r[k : k + max_len]
                start = chunk[0].ts
                long = [e for e in timeline if start - window <= e.ts < start]
                sessions.append(Session(user, chunk, long[len(long) - max_long :] if len(long) > max_long else long))
    return sessions


def cutoffs(
    starts: list[int],
    max_ts: int,
    valid: tuple[str, Any] | None = None,
    test: tuple[str, Any] | None = None,
) -> tuple[int, int]:
    """(valid_start, test_start) from ('start', us) / ('days', d) / ('fraction', f); default fractions 0.1."""
    starts = sorted(starts)
    n = len(starts)
    end = max_ts + 1
    kind, value = test or ("fraction", 0.1)
    if kind == "start":
        test_start = value
    elif kind == "days":
        test_start = end - round(value * 86_400_000_000)
    else:
        p = n - math.floor(value * n + 1e-9)
        test_start = starts[p] if p < n else end
    kind, value = valid or ("fraction", 0.1)
    if kind == "start":
        valid_start = value
    elif kind == "days":
        valid_start = test_start - round(value * 86_400_000_000)
    else:
        before = len([s for s in starts if s < test_start])
        p = max(0, before - math.floor(value * n + 1e-9))
        valid_start = starts[p] if p < before else test_start
    return valid_start, test_start


def assign(sessions: list[Session], valid_start: int, test_start: int) -> None:
    """Label each session train/valid/test by its start time."""
    for s in sessions:
        s.split = "train" if s.start < valid_start else "valid" if s.start < test_start else "test"


def item_vocab(sessions: list[Session]) -> dict[Hashable, int]:
    """raw item -> index (2.. by descending count in training sessions, then raw value)."""
    counts = Counter(e.item for s in sessions if s.split == "train" for e in s.events)
    ordered = sorted(counts, key=lambda v: (-counts[v], v))
    return {v: i + 2 for i, v in enumerate(ordered)}
