"""What verifying a shard directory's hashes costs, against reading the same shards once.

    python bench/verify_bench.py --events 10000000 --reps 5

train, evaluate, export and recommend compare every file of the data directory
with the sha256 its manifest recorded before they read it (`--no-verify` skips
it). This bench times, on the same directory in the same run:

    manifest   `read_manifest` (structure, paths, sizes, fingerprint: no content read)
    verify     `verify_files` (every file hashed, two at a time)
    read       every shard read once with pyarrow (what one pass of the loader reads at least)

and prints each one's median and its ratio to `read`. The data directory is a
synthetic log of `--events` events (`sdm synth`, then `sdm sessionize` with its
defaults), built once under bench/out/verify_<events>/ and reused. Results go
to bench/results/verify.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
RESULTS = ROOT / "results" / "verify.json"


def data_dir(events: int) -> Path:
    """The shard directory of a synthetic log of `events` events, made when missing."""
    from sdm.config import SessionizeConfig, SynthConfig
    from sdm.logs.synth import generate
    from sdm.sessionize import run

    base = OUT / f"verify_{events}"
    log, data = base / "log.parquet", base / "data"
    if not log.exists():
        generate(SynthConfig(out=log, events=events, chunk_events=1_000_000), progress=False)
    if not (data / "manifest.json").exists():
        run(SessionizeConfig(out=data, overwrite=True), log, progress=False)
    return data


def read_all(data: Path, manifest: dict) -> int:
    """Read every shard once (all columns); returns the rows read."""
    rows = 0
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            rows += pq.read_table(data / shard["path"]).num_rows
    return rows


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from sdm.manifest import read_manifest, verify_files

    data = data_dir(args.events)
    manifest = read_manifest(data)
    size = sum(int(f["size"]) for f in manifest["files"].values())
    systems = {
        "manifest": lambda: read_manifest(data),
        "verify": lambda: verify_files(data, manifest),
        "read": lambda: read_all(data, manifest),
    }
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.reps):  # round-robin, so a noisy moment hits every system alike
        for name, fn in systems.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "events": args.events,
        "files": len(manifest["files"]),
        "bytes": size,
        "reps": args.reps,
        "seconds": times,
        "median_s": med,
        "ratio_to_read": {name: med[name] / med["read"] for name in med},
        "verify_s_per_gb": med["verify"] / (size / 1e9),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}",
    }
    print(f"{args.events:,} events: {len(manifest['files'])} files, {size / 1e6:,.1f} MB")
    print("| step | median s | x read |\n|---|---:|---:|")
    for name in systems:
        print(f"| {name} | {med[name]:.3f} | {result['ratio_to_read'][name]:.2f}x |")
    print(f"verify: {result['verify_s_per_gb']:.2f} s per GB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
