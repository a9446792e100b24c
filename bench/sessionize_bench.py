"""Sessionizer benchmark: ours vs the sort floor, DuckDB SQL and pandas, in one run.

    python bench/sessionize_bench.py --sizes 100m --reps 3 --systems floor,duckdb,ours,ours_b1,ours_b4,ours_b8
    python bench/sessionize_bench.py --sizes 1m --reps 3 --systems floor,duckdb,ours,ours_f3,ours_b4,ours_ray
    python bench/sessionize_bench.py --sizes 10m --reps 5 --systems floor,duckdb,ours,ours_f3,ours_b4,ours_ray

Logs come from `sdm.logs.synth.generate` under `bench/out/sessionize_<size>/`
(generated once, reused), rewritten once in time order
(`sessionize_<size>_time/`): real logs are appended as events happen, while
synth writes them user by user, which would flatter every sort. Every system
runs in its own subprocess under `/usr/bin/time`, which gives its wall time and
peak RSS; the output size is the size of what it wrote. Before each run the
log is read once, so each starts with it in the page cache. The systems run
round-robin, `--reps` times; machines are noisy, so the table reports the
median over reps of each rep's ratio to the floor and to DuckDB of the same
rep. Results are merged into `bench/results/sessionize.json` (keyed by size).

Systems:
    ours      `sdm.sessionize.run` with its defaults (buckets: ceil(rows / 12M), so
              1 up to 12M events and 9 at 100M; ours_b1: 1 bucket, ours_b4: 4, ...;
              ours_f3: item features category, brand, shop from the items
              table; ours_ray: the Ray engine on a local Ray, 4 buckets)
    floor     polars: scan the log, sort by (user, time), write Parquet (zstd)
    duckdb    SQL: the same sessions (session id / 10-min gap, 50-cut) and
              7-day long-term window bounds, one row per session with its
              item list, written as Parquet
    pandas    a straightforward pandas version of the same (1M only)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
RESULTS = ROOT / "results" / "sessionize.json"
SIZES = {"1m": 1_000_000, "10m": 10_000_000, "100m": 100_000_000}
GAP_US = 600_000_000
WINDOW_US = 7 * 86_400_000_000
MAX_LEN = 50


def log_path(size: str) -> Path:
    """The synthetic log of `size` in time order, generated when missing (bounded memory, chunked)."""
    path = OUT / f"sessionize_{size}" / "log.parquet"
    timed = OUT / f"sessionize_{size}_time" / "log.parquet"
    if not path.exists():
        from sdm.config import SynthConfig
        from sdm.logs.synth import generate

        generate(SynthConfig(out=path, events=SIZES[size], chunk_events=1_000_000), progress=False)
    if not timed.exists():
        import polars as pl

        timed.parent.mkdir(parents=True, exist_ok=True)
        pl.scan_parquet(path).sort("timestamp", maintain_order=True).sink_parquet(timed, row_group_size=1_000_000)
        shutil.copy(path.parent / "items.parquet", timed.parent / "items.parquet")
    return timed


# --- the systems (each runs in a child process) -------------------------------------


def run_ours(log: Path, out: Path, variant: str) -> None:
    from sdm.allocator import keep_freed_pages
    from sdm.config import SessionizeConfig

    kw: dict[str, Any] = {}
    if variant.startswith("b"):
        kw["buckets"] = int(variant[1:])
    elif variant == "f3":
        kw.update(items=log.parent / "items.parquet", item_features=["category", "brand", "shop"])
    elif variant == "ray":
        import ray

        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        kw.update(engine="ray", buckets=4)
    elif variant:
        raise SystemExit(f"unknown variant ours_{variant}")
    cfg = SessionizeConfig(out=out, overwrite=True, **kw)
    keep_freed_pages(cfg.buckets)  # as `sdm sessionize` does, before polars loads
    from sdm.sessionize import run

    run(cfg, log, progress=False)


def warm(log: Path) -> None:
    """Read the log once, so every system starts with it in the page cache.

    At 100M DuckDB's 19 GB evict it on this 24 GB machine, and whichever system
    ran next paid the disk read: `ours` after DuckDB measured 39.2 s where two
    runs on their own took 30.9 and 34.2 s.
    """
    with open(log, "rb") as fh:
        while fh.read(1 << 24):
            pass


def run_floor(log: Path, out: Path) -> None:
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    pl.scan_parquet(log).sort(["user_id", "timestamp"]).collect(engine="in-memory").write_parquet(
        out / "sorted.parquet", compression="zstd"
    )


DUCKDB_SQL = """
CREATE TEMP TABLE ev AS
SELECT user_id, item_id, epoch_us(timestamp) AS ts, session_id,
       row_number() OVER () AS r
FROM read_parquet('{log}');
CREATE TEMP TABLE pos AS
WITH g AS (
  SELECT *, row_number() OVER w - 1 AS idx,
         CASE WHEN lag(ts) OVER w IS NULL THEN 1
              WHEN ts - lag(ts) OVER w < {gap} THEN 0
              WHEN session_id = lag(session_id) OVER w THEN 0 ELSE 1 END AS brk
  FROM ev WINDOW w AS (PARTITION BY user_id ORDER BY ts, r)
), s AS (
  SELECT *, sum(brk) OVER (PARTITION BY user_id ORDER BY idx ROWS UNBOUNDED PRECEDING) AS raw_sess FROM g
)
SELECT *, (row_number() OVER (PARTITION BY user_id, raw_sess ORDER BY idx) - 1) // {max_len} AS chunk FROM s;
CREATE TEMP TABLE sess AS
SELECT user_id, raw_sess, chunk, min(ts) AS start_ts, min(idx) AS start_idx, count(*) AS len,
       list(item_id ORDER BY idx) AS items
FROM pos GROUP BY user_id, raw_sess, chunk;
COPY (
  SELECT s.user_id, s.start_ts, s.start_idx, s.len, s.items,
         greatest(coalesce(lo.idx + 1, 0), coalesce(hi.idx + 1, 0) - {max_long}) AS long_start,
         coalesce(hi.idx + 1, 0) AS long_end
  FROM sess s
  ASOF LEFT JOIN pos lo ON s.user_id = lo.user_id AND s.start_ts - {window} > lo.ts
  ASOF LEFT JOIN pos hi ON s.user_id = hi.user_id AND s.start_ts > hi.ts
) TO '{out}/sessions.parquet' (FORMAT parquet, COMPRESSION zstd);
"""


def run_duckdb(log: Path, out: Path) -> None:
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET temp_directory='{out}/tmp'")
    con.execute(
        DUCKDB_SQL.format(log=log, out=out, gap=GAP_US, max_len=MAX_LEN, max_long=MAX_LEN, window=WINDOW_US)
    )


def run_pandas(log: Path, out: Path) -> None:
    import numpy as np
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(log, columns=["user_id", "item_id", "timestamp", "session_id"])
    df["ts"] = df["timestamp"].astype("int64") // 1000 if df["timestamp"].dt.unit == "ns" else df["timestamp"].astype("int64")
    df["r"] = np.arange(len(df))
    df = df.sort_values(["user_id", "ts", "r"], kind="stable").reset_index(drop=True)
    g = df.groupby("user_id", sort=False)
    gap = g["ts"].diff()
    same = (df["session_id"] == g["session_id"].shift()).fillna(False)
    brk = gap.isna() | ~((gap < GAP_US) | same)
    df["idx"] = g.cumcount()
    df["raw"] = brk.cumsum()
    df["chunk"] = df.groupby("raw").cumcount() // MAX_LEN
    sess = df.groupby(["raw", "chunk"], sort=False).agg(
        user_id=("user_id", "first"), start_ts=("ts", "first"), start_idx=("idx", "first"),
        len=("ts", "size"), items=("item_id", list),
    ).reset_index(drop=True)
    lo, hi = [], []
    for (_, ts), (_, st) in zip(df.groupby("user_id", sort=False)["ts"], sess.groupby("user_id", sort=False)["start_ts"]):
        t = ts.to_numpy()
        s = st.to_numpy()
        lo.append(np.searchsorted(t, s - WINDOW_US, side="left"))
        hi.append(np.searchsorted(t, s, side="left"))
    hi_a = np.concatenate(hi)
    sess["long_start"] = np.maximum(np.concatenate(lo), hi_a - MAX_LEN)
    sess["long_end"] = hi_a
    sess.to_parquet(out / "sessions.parquet", compression="zstd")


def child(system: str, log: Path, out: Path) -> None:
    """Entry point of the child process."""
    if system.startswith("ours"):
        run_ours(log, out, system.partition("_")[2])
    elif system == "floor":
        run_floor(log, out)
    elif system == "duckdb":
        run_duckdb(log, out)
    elif system == "pandas":
        run_pandas(log, out)
    else:
        raise SystemExit(f"unknown system {system}")


# --- the parent: measure, compare, report -------------------------------------------


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(system: str, log: Path, out: Path) -> dict[str, Any]:
    """Run one system in a child under /usr/bin/time: wall seconds, peak RSS, output bytes."""
    shutil.rmtree(out, ignore_errors=True)
    stats = out.parent / f"{out.name}.time"
    cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), sys.executable, __file__, "--child", system,
           "--log", str(log), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {"system": system, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    _, rss_kb = stats.read_text().split()[-2:]
    return {"system": system, "seconds": round(wall, 2), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "output_mb": round(dir_size(out) / 2**20, 1)}


def check_duckdb_equals_ours(ours: Path, duck: Path) -> bool:
    """Every session (user, start, length, items, long-window length) of DuckDB equals ours."""
    import polars as pl

    items = pl.read_parquet(ours / "vocab" / "item.parquet").select(pl.col("index"), pl.col("raw"))
    mine = (
        pl.scan_parquet(ours / "*" / "part-*.parquet")
        .select(pl.col("user_id"), pl.col("ts"), pl.col("seq_item"), pl.col("sess_start"), pl.col("sess_len"),
                pl.col("long_start"), pl.col("long_end"))
        .explode(["sess_start", "sess_len", "long_start", "long_end"])
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("ts").list.get(pl.col("sess_start")).alias("start_ts"),
            pl.col("sess_len").cast(pl.Int64).alias("len"),
            pl.col("seq_item").list.slice(pl.col("sess_start"), pl.col("sess_len")).alias("items"),
            (pl.col("long_end") - pl.col("long_start")).cast(pl.Int64).alias("long_len"),
        )
        .collect()
    )
    # ours stores encoded items; decode (every item of the 1M log is in the training vocabulary or OOV = 1)
    theirs = pl.read_parquet(duck / "sessions.parquet").select(
        pl.col("user_id").cast(pl.Int64), pl.col("start_ts"), pl.col("len").cast(pl.Int64), pl.col("items"),
        (pl.col("long_end") - pl.col("long_start")).cast(pl.Int64).alias("long_len"),
    )
    theirs = theirs.with_columns(
        pl.col("items").list.eval(pl.element().replace_strict(items["raw"], items["index"], default=1)).cast(pl.List(pl.Int32))
    )
    key = ["user_id", "start_ts", "len", "long_len"]
    a = mine.with_columns(pl.col("items").cast(pl.List(pl.Int32))).sort(key + ["items"])
    b = theirs.sort(key + ["items"])
    return a.height == b.height and a.equals(b)


def summarise(size: str, reps: list[list[dict[str, Any]]], input_mb: float) -> list[dict[str, Any]]:
    """One row per system: median seconds/RSS over reps and the median of per-rep ratios to floor and DuckDB."""
    import statistics

    rows = []
    for system in [r["system"] for r in reps[0]]:
        runs = [next(r for r in rep if r["system"] == system) for rep in reps]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append(runs[0])
            continue

        def ratios(base: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            vals = []
            for rep, me in zip(reps, runs):
                ref = next((r for r in rep if r["system"] == base and "error" not in r), None)
                if ref is not None and "error" not in me:
                    vals.append(round(me["seconds"] / ref["seconds"], 3))
            return vals

        def ratio(base: str) -> float | None:
            vals = ratios(base)
            return round(statistics.median(vals), 3) if vals else None

        secs = statistics.median(r["seconds"] for r in ok)
        x_duck = ratio("duckdb")
        rows.append({
            "system": system, "reps": len(ok), "seconds": round(secs, 2), "seconds_all": [r["seconds"] for r in ok],
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in ok), 1),
            "peak_rss_mb_all": [r["peak_rss_mb"] for r in ok],
            "output_mb": ok[0]["output_mb"], "events_per_s": round(SIZES[size] / secs),
            "x_floor": ratio("floor"), "x_floor_all": ratios("floor"), "x_duckdb": x_duck,
            "output_over_input": round(ok[0]["output_mb"] / input_mb, 2),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1m,10m")
    ap.add_argument("--systems", default=None, help="comma-separated; default: all that fit the size")
    ap.add_argument("--reps", type=int, default=3, help="round-robin repetitions of every system")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="JSON file the sizes' summaries are merged into (default: the main table's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--log", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.log, args.out)
        return

    import os

    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    for size in args.sizes.split(","):
        log = log_path(size)
        load = os.getloadavg()
        default = ["floor", "duckdb", "ours", "ours_f3", "ours_b4"] + (["pandas"] if size == "1m" else [])
        systems = args.systems.split(",") if args.systems else default
        reps = []
        for k in range(args.reps):
            rep = []
            # a shuffled order per repetition (seeded), so that no system always runs right after
            # DuckDB (in a fixed order the defaults did, at every 100M repetition)
            order = random.Random(k).sample(systems, len(systems))
            for system in order:
                # the last system's writes reach the disk before the next one starts: DuckDB's
                # 100M run left gigabytes of dirty pages that whoever ran next paid to write back
                os.sync()
                time.sleep(2)
                warm(log)
                r = measure(system, log, OUT / f"run_{size}_{system}")
                print(json.dumps({"rep": k, **r}), flush=True)
                rep.append(r)
            reps.append(sorted(rep, key=lambda r: systems.index(r["system"])))
        check = None
        if size == "1m" and "ours" in systems and "duckdb" in systems:
            check = check_duckdb_equals_ours(OUT / f"run_{size}_ours", OUT / f"run_{size}_duckdb")
        input_mb = log.stat().st_size / 2**20
        rows = summarise(size, reps, input_mb)
        results[size] = {
            "events": SIZES[size], "input_mb": round(input_mb, 1), "log": "time-ordered synth",
            "load_avg_before": [round(x, 1) for x in load], "cpus": os.cpu_count(),
            "duckdb_sessions_equal_ours": check, "systems": rows, "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(f"\n### {size} events ({input_mb:.0f} MiB input; load avg before {load[0]:.1f}; "
              f"{args.reps} reps; duckdb == ours: {check})\n")
        print("| system | seconds (median) | events/s | peak RSS MiB | output MiB | time / floor | time / DuckDB | output / input |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['system']} | failed: {r['error']} |")
                continue
            print(f"| {r['system']} | {r['seconds']} | {r['events_per_s']:,} | {r['peak_rss_mb']} | {r['output_mb']} | "
                  f"{r['x_floor']} | {r['x_duckdb']} | {r['output_over_input']} |")
        results.setdefault("command", {})[size] = " ".join(["python", "bench/sessionize_bench.py", *sys.argv[1:]])
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
