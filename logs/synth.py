"""Synthetic e-commerce interaction logs with planted sequential structure (`sdm synth`).

The log has the shape of a real one (SPEC section 1) and structure that a
sequential model with long-term memory can learn but item popularity cannot.

Generative process (all numbers are the module constants below):

Catalogue (one RNG stream, `seed`; built in `sdm.logs.synthcatalogue`):
    * Item popularity is Zipf: the r-th most popular item has weight
      r ** -zipf; ranks are a random permutation of the item ids.
    * Leaf categories have Zipf-like sizes; each belongs to one first-level
      category (`category_l1`, about ten leaves per first level).
    * Each brand has a home category; an item takes one of its category's
      brands (the first brands of a category are the big ones). Each brand sells
      through a few shops.
    * Every item has one fixed successor `next_item[i]`, drawn uniformly from
      the same category: the planted transition graph.

Users (global, `seed`): activity weights are log-normal (sigma 1.2, capped at
50x the mean), and the `events` are dealt out exactly: two per user plus a
multinomial share of the rest, so a few users are very active and most are
not. Users are then generated in contiguous chunks of about `chunk_events`
events, each chunk from its own RNG stream (`seed`, chunk number), which bounds
memory and keeps the output deterministic.

Per user (per chunk): a profile (life stage, then age from the life stage, and
gender), three preferred categories (half of the draws from the first-level
categories tied to the life stage, the rest by popularity) and two preferred
brands (brands of popular items in the preferred categories), and a personal
mean session length (log-normal around `session_mean_len`).

Sessions: a user's events are cut into sessions by an independent break before
each event with probability 1 / (personal mean length): geometric lengths,
mean about `session_mean_len`, a tail past 50 events. Each session has an intent
category: a preferred category with probability 0.7, else one by popularity.
Each event is one of:

    ======== ===== ===================================================
    kind     prob. item
    ======== ===== ===================================================
    follow   0.35  `next_item` of the previous event's item
    fresh    0.28  by popularity within the session's current category
    brand    0.10  by popularity within one of the user's brands
    revisit  0.12  an earlier item of the same session
    jump     0.15  by global popularity; moves the session's category
    ======== ===== ===================================================

(the first event of a session is `fresh`, or `brand` with probability 0.1).
So within a session most next items share the current item's category, a third
follow a fixed transition, and users come back to their categories and brands
across sessions: all invisible to a popularity ranking.

Behavior: click, cart or buy (5% / 1.5% cart / buy; 15% / 6% on re-visits).

Time: gaps within a session are log-normal (median 30 s, clipped to
[1 s, 8 min], so the 10-minute rule recovers sessions). A user is active over a
random stretch of 35-100% of `days` (cut where it overhangs the period, so
activity is roughly flat over time); the sessions are spread over it uniformly
at random with at least 30 minutes between them, giving gaps of hours to days
and several sessions within any 7-day window of an active user.

Session ids: a share `session_id_share` of sessions carry a back-end id (unique
int64); the rest have null.

Output: `out` (user_id, item_id, timestamp[us, UTC], session_id, behavior),
sorted by user then time, written chunk by chunk as row groups of one Parquet
file; `items.parquet` (item_id, category, category_l1, brand, shop) and
`users.parquet` (user_id, age, gender, life_stage) next to it. Files are written
under a temporary name and renamed when complete. Same config, same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdm.config import SynthConfig
from sdm.logs.synthcatalogue import LIFE_STAGES, Catalogue, build_catalogue
from sdm.logs.targets import claim_targets, side_paths
from sdm.outputs import scratch_name, side_config, write_text

START_US = 1_704_067_200_000_000
"""2024-01-01T00:00:00Z in microseconds: the start of every synthetic log."""

USER_SIGMA = 1.2
USER_CAP = 50.0
MIN_EVENTS_PER_USER = 2
N_FAV_CATS = 3
FAV_CAT_P = np.array([0.6, 0.3, 0.1])
N_FAV_BRANDS = 2
P_INTENT_FAV = 0.7
P_FIRST_BRAND = 0.1
# follow, fresh, brand, revisit, jump (kinds 0..4)
KIND_P = np.array([0.35, 0.28, 0.10, 0.12, 0.15])
FOLLOW, FRESH, BRAND, REVISIT, JUMP = range(5)
BEHAVIORS = ["click", "cart", "buy"]
GAP_MEDIAN_S = 30.0
GAP_SIGMA = 1.0
GAP_MAX_S = 480.0
MIN_SESSION_SEP_S = 1800.0
LIFE_STAGE_P = np.array([0.15, 0.2, 0.2, 0.2, 0.15, 0.1])
LIFE_STAGE_AGE = np.array([[16, 24], [22, 34], [26, 40], [32, 55], [45, 66], [60, 85]])

LOG_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("session_id", pa.int64()),
        ("behavior", pa.string()),
    ]
)
USER_SCHEMA = pa.schema([("user_id", pa.int64()), ("age", pa.int64()), ("gender", pa.string()), ("life_stage", pa.string())])


def user_event_counts(cfg: SynthConfig) -> np.ndarray:
    """Events per user: heavy-tailed (log-normal weights), summing exactly to `cfg.events`."""
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.num_users
    w = rng.lognormal(0.0, USER_SIGMA, size=n)
    w = np.minimum(w, USER_CAP * w.mean())
    base = min(MIN_EVENTS_PER_USER, cfg.events // n)
    return base + rng.multinomial(cfg.events - base * n, w / w.sum())


def _group_cumsum(values: np.ndarray, starts: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of `values` restarting at each group start."""
    c = np.cumsum(values)
    before = np.concatenate([[0], c])[starts]
    return c - before[group]


@dataclass(frozen=True)
class _Users:
    """One chunk's users: profile, preferred categories and brands, personal mean session length."""

    stage: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    fav_cat: np.ndarray  # (users, N_FAV_CATS)
    fav_brand: np.ndarray  # (users, N_FAV_BRANDS)
    mean_len: np.ndarray


@dataclass(frozen=True)
class _Sessions:
    """One chunk's events cut into sessions (chunk-local indices)."""

    ev_user: np.ndarray  # user of each event
    sess: np.ndarray  # session of each event
    start: np.ndarray  # first event of each session
    user: np.ndarray  # user of each session
    pos: np.ndarray  # position of each event in its session


def _gen_chunk(
    cfg: SynthConfig, cat: Catalogue, chunk: int, user0: int, counts: np.ndarray, session0: int
) -> tuple[pa.Table, pa.Table, int]:
    """Generate the events of users user0 .. user0 + len(counts) - 1.

    The stages draw from one RNG stream in this order, so the same config gives the same bytes.

    Returns:
        The log rows, the users' profiles, and the number of sessions generated.
    """
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    users = _draw_users(cfg, cat, rng, len(counts))
    sessions = _cut_sessions(rng, counts, users.mean_len)
    item, kind = _draw_items(cat, rng, users, sessions)
    behavior = _draw_behaviors(rng, kind)
    ts = _draw_times(cfg, rng, sessions, len(counts))
    ns = len(sessions.start)
    has_sid = rng.random(ns) < cfg.session_id_share  # a back-end session id on a share of sessions
    sid = session0 + np.arange(ns, dtype=np.int64) + 1

    user_ids = user0 + np.arange(len(counts), dtype=np.int64) + 1
    log = pa.table(
        {
            "user_id": pa.array(user_ids[sessions.ev_user]),
            "item_id": pa.array(item + 1),
            "timestamp": pa.array(ts, type=pa.timestamp("us", tz="UTC")),
            "session_id": pa.array(sid[sessions.sess], mask=~has_sid[sessions.sess]),
            "behavior": pa.DictionaryArray.from_arrays(pa.array(behavior.astype(np.int8)), BEHAVIORS).cast(pa.string()),
        },
        schema=LOG_SCHEMA,
    )
    profiles = pa.table(
        {
            "user_id": pa.array(user_ids),
            "age": pa.array(users.age),
            "gender": pa.array(users.gender),
            "life_stage": pa.array(np.array(LIFE_STAGES)[users.stage]),
        },
        schema=USER_SCHEMA,
    )
    return log, profiles, ns


def _cat_by_pop(cat: Catalogue, u: np.ndarray) -> np.ndarray:
    """Categories by popularity, one per uniform in `u`."""
    cat_cum = np.cumsum(cat.cat_mass)
    return np.minimum(np.searchsorted(cat_cum, u * cat_cum[-1], side="right"), len(cat.cat_mass) - 1)


def _draw_users(cfg: SynthConfig, cat: Catalogue, rng: np.random.Generator, nu: int) -> _Users:
    """Profiles, preferences (half of the categories tied to the life stage) and session lengths."""
    stage = rng.choice(len(LIFE_STAGES), size=nu, p=LIFE_STAGE_P)
    lo, hi = LIFE_STAGE_AGE[stage, 0], LIFE_STAGE_AGE[stage, 1]
    age = lo + np.floor(rng.random(nu) * (hi - lo + 1)).astype(np.int64)
    gender = np.array(["F", "M", "U"])[rng.choice(3, size=nu, p=[0.52, 0.43, 0.05])]
    by_pop = _cat_by_pop(cat, rng.random((nu, N_FAV_CATS)))
    by_stage = cat.by_stage.draw(np.repeat(stage, N_FAV_CATS).reshape(nu, N_FAV_CATS), rng.random((nu, N_FAV_CATS)))
    fav_cat = np.where(rng.random((nu, N_FAV_CATS)) < 0.5, by_stage, by_pop)
    fav_brand = cat.brand[cat.by_cat.draw(fav_cat[:, :N_FAV_BRANDS], rng.random((nu, N_FAV_BRANDS)))]
    mean_len = np.maximum(cfg.session_mean_len * rng.lognormal(0.25, 0.6, size=nu), 1.0)
    return _Users(stage, age, gender, fav_cat, fav_brand, mean_len)


def _cut_sessions(rng: np.random.Generator, counts: np.ndarray, mean_len: np.ndarray) -> _Sessions:
    """A break before each event with probability 1 / the user's mean length (and before each user's first)."""
    n = int(counts.sum())
    ev_user = np.repeat(np.arange(len(counts)), counts)
    user_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    brk = rng.random(n) < 1.0 / mean_len[ev_user]
    brk[user_start] = True
    sess = np.cumsum(brk) - 1
    start = np.flatnonzero(brk)
    return _Sessions(ev_user, sess, start, ev_user[start], np.arange(n) - start[sess])


def _draw_items(
    cat: Catalogue, rng: np.random.Generator, users: _Users, sessions: _Sessions
) -> tuple[np.ndarray, np.ndarray]:
    """(item, kind) of each event: kinds drawn, then items by kind (module docs)."""
    n, ns = len(sessions.sess), len(sessions.start)
    kind = rng.choice(len(KIND_P), size=n, p=KIND_P)
    first = sessions.pos == 0
    kind[first] = np.where(rng.random(int(first.sum())) < P_FIRST_BRAND, BRAND, FRESH)

    # Session intent category, moved by each jump: forward-fill the position of
    # the last jump (or session start) within the session.
    intent = np.where(
        rng.random(ns) < P_INTENT_FAV,
        users.fav_cat[sessions.user, rng.choice(N_FAV_CATS, size=ns, p=FAV_CAT_P)],
        _cat_by_pop(cat, rng.random(ns)),
    )
    item = np.full(n, -1, dtype=np.int64)
    u = rng.random(n)
    jump = kind == JUMP
    item[jump] = np.minimum(np.searchsorted(np.cumsum(cat.pop), u[jump] * cat.pop.sum(), side="right"), len(cat.pop) - 1)
    marker = np.where(jump | first, np.arange(n), 0)
    last = np.maximum.accumulate(marker)
    cur_cat = np.where(jump[last], cat.category[np.maximum(item[last], 0)], intent[sessions.sess])
    fresh = kind == FRESH
    item[fresh] = cat.by_cat.draw(cur_cat[fresh], u[fresh])
    brand = kind == BRAND
    which = rng.integers(0, N_FAV_BRANDS, size=n)
    item[brand] = cat.by_brand.draw(users.fav_brand[sessions.ev_user[brand], which[brand]], u[brand])

    # follow / revisit depend on an earlier event: resolve in rounds, each
    # settling every event whose source is already settled.
    start = sessions.start[sessions.sess]
    dep = np.where(kind == FOLLOW, np.arange(n) - 1, start + np.floor(u * sessions.pos).astype(np.int64))
    pending = np.flatnonzero((kind == FOLLOW) | (kind == REVISIT))
    while pending.size:
        src = item[dep[pending]]
        ready = src >= 0
        p = pending[ready]
        item[p] = np.where(kind[p] == FOLLOW, cat.next_item[src[ready]], src[ready])
        pending = pending[~ready]
    return item, kind


def _draw_behaviors(rng: np.random.Generator, kind: np.ndarray) -> np.ndarray:
    """0 click, 1 cart, 2 buy; re-visits are carted and bought more often."""
    ub = rng.random(len(kind))
    rev = kind == REVISIT
    p_cart, p_buy = np.where(rev, 0.15, 0.05), np.where(rev, 0.06, 0.015)
    return np.where(ub < p_buy, 2, np.where(ub < p_buy + p_cart, 1, 0))


def _draw_times(cfg: SynthConfig, rng: np.random.Generator, sessions: _Sessions, nu: int) -> np.ndarray:
    """Event times (us): within-session gaps, then session starts spread over the user's active stretch."""
    n, ns = len(sessions.sess), len(sessions.start)
    s_start, sess, s_user = sessions.start, sessions.sess, sessions.user
    gap = np.clip(rng.lognormal(np.log(GAP_MEDIAN_S), GAP_SIGMA, size=n), 1.0, GAP_MAX_S)
    gap[sessions.pos == 0] = 0.0
    offset = _group_cumsum(gap, s_start, sess)  # seconds since session start
    s_dur = offset[np.concatenate([s_start[1:], [n]]) - 1]
    u_ns = np.bincount(s_user, minlength=nu)
    need = np.bincount(s_user, weights=s_dur + MIN_SESSION_SEP_S, minlength=nu)
    period = cfg.days * 86400.0
    # The stretch may start before or end after the period and is then cut at
    # its edges, so activity is about flat over the period (no thin last days).
    span = period * rng.uniform(0.35, 1.0, size=nu)
    a = rng.uniform(-0.5 * span, period - 0.5 * span)
    lo, hi = np.maximum(a, 0.0), np.minimum(a + span, period)
    span = np.maximum(hi - lo, np.minimum(need * 1.5, period))
    u_begin = np.clip(lo, 0.0, period - span)
    slack = np.maximum(span - need, 0.0)
    # Uniform order statistics via normalised exponential spacings (no sort).
    e = rng.exponential(size=ns)
    u_first_sess = np.concatenate([[0], np.cumsum(u_ns)[:-1]])
    total = np.bincount(s_user, weights=e, minlength=nu) + rng.exponential(size=nu)
    frac = _group_cumsum(e, u_first_sess, s_user) / total[s_user]
    busy_before = _group_cumsum(s_dur + MIN_SESSION_SEP_S, u_first_sess, s_user) - (s_dur + MIN_SESSION_SEP_S)
    s_begin = u_begin[s_user] + slack[s_user] * frac + busy_before
    return START_US + np.round((s_begin[sess] + offset) * 1e6).astype(np.int64)


def generate(cfg: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Write a synthetic log and its items / users tables (see the module docstring).

    Args:
        cfg: sizes, shape and output path.
        progress: show a progress bar over chunks.

    Returns:
        Summary: paths, events, users, items, sessions, share of events with a
        session id, chunks, seconds.

    Raises:
        SdmError: an output file exists and `cfg.overwrite` is false.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    items_path, users_path = side_paths(out)
    with claim_targets([out, items_path, users_path, side_config(out)], [], cfg.overwrite, "synth"):
        summary = _generate(cfg, out, items_path, users_path, t0, progress)
        write_text(side_config(out), cfg.model_dump_json(indent=2) + "\n")  # the resolved config, as every command
        return summary


def _generate(cfg: SynthConfig, out: Path, items_path: Path, users_path: Path, t0: float, progress: bool) -> dict[str, Any]:
    """Write the three files, each through a temporary name renamed when all are complete."""
    cat = build_catalogue(cfg)
    counts = user_event_counts(cfg)
    # Contiguous user ranges of about chunk_events events each.
    chunk_of_user = (np.cumsum(counts) - counts) // cfg.chunk_events
    bounds = np.flatnonzero(np.diff(chunk_of_user, prepend=-1, append=chunk_of_user[-1] + 1))

    tmp = {p: scratch_name(p) for p in (out, items_path, users_path)}
    sessions = with_sid = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.events, unit="ev", unit_scale=True, desc="synth")
    try:
        with (
            pq.ParquetWriter(tmp[out], LOG_SCHEMA, compression="zstd") as log_w,
            pq.ParquetWriter(tmp[users_path], USER_SCHEMA, compression="zstd") as user_w,
        ):
            for chunk, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                log, users, ns = _gen_chunk(cfg, cat, chunk, int(a), counts[a:b], sessions)
                log_w.write_table(log)
                user_w.write_table(users)
                sessions += ns
                with_sid += len(log) - log.column("session_id").null_count
                if bar is not None:
                    bar.update(len(log))
        items = pa.table(
            {
                "item_id": pa.array(np.arange(1, len(cat.pop) + 1, dtype=np.int64)),
                "category": pa.array(cat.category.astype(np.int64) + 1),
                "category_l1": pa.array(cat.category_l1.astype(np.int64) + 1),
                "brand": pa.array(cat.brand.astype(np.int64) + 1),
                "shop": pa.array(cat.shop.astype(np.int64) + 1),
            }
        )
        pq.write_table(items, tmp[items_path], compression="zstd")
        for final, t in tmp.items():
            t.replace(final)
    finally:
        if bar is not None:
            bar.close()
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return {
        "out": str(out),
        "items_path": str(items_path),
        "users_path": str(users_path),
        "events": int(cfg.events),
        "users": int(cfg.num_users),
        "items": int(cfg.num_items),
        "sessions": int(sessions),
        "session_id_share": with_sid / cfg.events,
        "chunks": int(len(bounds) - 1),
        "seconds": time.perf_counter() - t0,
    }
