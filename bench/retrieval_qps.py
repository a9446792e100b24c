"""Retrieval throughput: exact chunked top-K against the faiss HNSW index.

For each catalogue size (default 10 thousand, 100 thousand, 1 million items)
the script draws random unit vectors (items and queries, float32, seeded) and
measures, with the very code `sdm evaluate` runs:

* exact search: `metrics.topk_scores`, queries in chunks of `QUERY_CHUNK` and
  items in chunks of `MAX_SCORES // queries` (the evaluator's memory bound);
* the faiss index: `metrics.FaissIndex` build time and peak memory, then
  `FaissIndex.search`, and its recall against exact search (`overlap_at_k`).

Machines are noisy and differ, so next to the absolute queries per second the
table gives ratios measured in the same run: faiss / exact at the same size and
K, and every size against exact search on the smallest size. Each timing is
the median of `--repeats` runs after one warm-up run on a few queries.

Random unit vectors in 64 dimensions are close to the hardest case for a graph
index (no cluster structure), so the recall here is a lower bound for trained
embeddings rather than a forecast.

    python bench/retrieval_qps.py                      # 10k, 100k, 1M items; K 50 and 100
    python bench/retrieval_qps.py --sizes 10000,100000 --queries 1024 --k 50

Writes a Markdown table to stdout and the same rows as JSON to
`bench/results/retrieval_qps.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdm.pipeline.ranking import MAX_SCORES, QUERY_CHUNK
from sdm.pipeline.metrics import overlap_at_k, topk_scores
from sdm.retrieval.index import FaissIndex, import_faiss

FAISS_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(FaissIndex.__init__).parameters.items()
    if name in ("m", "ef_search")
}
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20


# -- memory ---------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_rss(result: dict[str, float]) -> Iterator[None]:
    """Measure the peak resident memory of the block, above the memory held when it starts.

    On Linux, writing 5 to /proc/self/clear_refs resets the kernel's high-water
    mark (VmHWM), so the peak is that of this block alone. Elsewhere only the
    process-wide peak exists; then `peak_mib` is that and `above_start_mib` is
    left out.
    """
    reset = False
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    start = _status_kib("VmRSS")
    try:
        yield
    finally:
        hwm = _status_kib("VmHWM") if reset else None
        if hwm is not None and start is not None:
            result["peak_mib"] = hwm / 1024
            result["above_start_mib"] = (hwm - start) / 1024
        else:  # ru_maxrss is KiB on Linux, bytes on macOS
            scale = 1 if sys.platform == "darwin" else 1024
            result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def process_peak_mib() -> float:
    """Peak resident memory of the whole process so far."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


# -- data and searches -------------------------------------------------------------


def unit_vectors(n: int, dim: int, gen: torch.Generator) -> Tensor:
    """(n, dim) float32 rows drawn from N(0, I) and scaled to length 1."""
    x = torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def exact_search(queries: Tensor, items: Tensor, k: int) -> Tensor:
    """Exact top-k in the evaluator's chunks: QUERY_CHUNK queries x (MAX_SCORES // Q) items."""
    out = []
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        q = queries[start : start + QUERY_CHUNK]
        chunk_items = max(1024, MAX_SCORES // q.shape[0])
        out.append(topk_scores(q, items, k, chunk_items=chunk_items))
    return torch.cat(out)


def timed(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    """Median wall time of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    assert result is not None
    return statistics.median(times), result


def bench_size(
    n: int, queries: Tensor, dim: int, ks: list[int], repeats: int, seed: int, faiss_args: dict[str, int]
) -> list[dict[str, Any]]:
    """Rows (one per K) for a catalogue of `n` items plus the padding and OOV rows."""
    gen = torch.Generator().manual_seed(seed + n)
    # Rows 0 and 1 are padding and OOV, as in a real item table: both searches skip them.
    items = unit_vectors(n + 2, dim, gen)
    warm = queries[:64]
    exact_search(warm, items, max(ks))

    build_mem: dict[str, float] = {}
    with peak_rss(build_mem):
        t0 = time.perf_counter()
        index = FaissIndex(items, **faiss_args)
        build_s = time.perf_counter() - t0
    index.search(warm, max(ks))

    rows = []
    for k in ks:
        exact_mem: dict[str, float] = {}
        with peak_rss(exact_mem):
            exact_s, exact = timed(functools.partial(exact_search, queries, items, k), repeats)
        faiss_s, approx = timed(functools.partial(index.search, queries, k), repeats)
        rows.append(
            {
                "items": n,
                "k": k,
                "queries": int(queries.shape[0]),
                "exact_qps": queries.shape[0] / exact_s,
                "faiss_qps": queries.shape[0] / faiss_s,
                "faiss_recall": float(overlap_at_k(approx, exact).mean()),
                "faiss_ef_search": int(index.index.hnsw.efSearch),
                "faiss_build_s": build_s,
                "faiss_build_peak_mib": build_mem.get("above_start_mib", build_mem["peak_mib"]),
                "exact_peak_mib": exact_mem.get("above_start_mib", exact_mem["peak_mib"]),
            }
        )
        print(
            f"  {n:>9,} items, K {k}: exact {rows[-1]['exact_qps']:,.0f} q/s, faiss {rows[-1]['faiss_qps']:,.0f} q/s, "
            f"recall {rows[-1]['faiss_recall']:.4f}",
            file=sys.stderr,
        )
    del index
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """faiss / exact at the same size and K, and each QPS / exact QPS of the smallest size at that K."""
    smallest = min(r["items"] for r in rows)
    base = {r["k"]: r["exact_qps"] for r in rows if r["items"] == smallest}
    for r in rows:
        r["faiss_over_exact"] = r["faiss_qps"] / r["exact_qps"]
        r["exact_vs_base"] = r["exact_qps"] / base[r["k"]]
        r["faiss_vs_base"] = r["faiss_qps"] / base[r["k"]]


def _size(n: int) -> str:
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """A header line and one table row per (size, K)."""
    base = _size(min(r["items"] for r in rows))
    head = (
        f"Retrieval, {meta['queries']:,} queries, D = {meta['dim']}, random unit vectors; "
        f"{meta['threads']} threads ({meta['cpus']} CPUs), torch {meta['torch']}, faiss {meta['faiss']} "
        f"(HNSW M = {meta['hnsw_m']}, efSearch max({meta['ef_search']}, 2K)); median of {meta['repeats']}; "
        f"process peak RSS {meta['process_peak_mib']:,.0f} MiB."
    )
    cols = [
        "items", "K", "exact q/s", "faiss q/s", "faiss / exact", f"exact / exact {base}", f"faiss / exact {base}",
        "faiss recall@K", "faiss build s", "build peak MiB", "exact peak MiB",
    ]  # fmt: skip
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        cells = [
            _size(r["items"]), str(r["k"]), f"{r['exact_qps']:,.0f}", f"{r['faiss_qps']:,.0f}",
            f"{r['faiss_over_exact']:.1f}x", f"{r['exact_vs_base']:.3f}", f"{r['faiss_vs_base']:.2f}",
            f"{r['faiss_recall']:.4f}", f"{r['faiss_build_s']:.1f}", f"{r['faiss_build_peak_mib']:,.0f}",
            f"{r['exact_peak_mib']:,.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    values = [int(float(v)) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run every size, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=_int_list, default=[10_000, 100_000, 1_000_000], help="catalogue sizes (items)")
    p.add_argument("--queries", type=int, default=2048, help="queries per search")
    p.add_argument("--dim", type=int, default=64, help="vector dimension D")
    p.add_argument("--k", type=_int_list, default=[50, 100], help="list lengths K")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per search (the median is kept)")
    p.add_argument("--seed", type=int, default=0)
    # Defaults are FaissIndex's own (what `sdm evaluate --index faiss` uses), read from its signature.
    p.add_argument("--hnsw-m", type=int, default=FAISS_DEFAULTS["m"], help="HNSW neighbours per node")
    p.add_argument("--ef-search", type=int, default=FAISS_DEFAULTS["ef_search"], help="HNSW search breadth")
    p.add_argument("--out", type=Path, default=RESULTS / "retrieval_qps.json", help="JSON output")
    args = p.parse_args(argv)
    if args.queries < 1 or args.dim < 1 or args.repeats < 1:
        p.error("--queries, --dim and --repeats must be >= 1")
    if max(args.k) > min(args.sizes):
        p.error(f"K {max(args.k)} is larger than the smallest catalogue ({min(args.sizes)} items)")

    faiss = import_faiss()
    torch.set_grad_enabled(False)
    faiss_args = {"kind": "hnsw", "m": args.hnsw_m, "ef_search": args.ef_search}  # the HNSW graph this bench measures
    queries = unit_vectors(args.queries, args.dim, torch.Generator().manual_seed(args.seed))
    rows: list[dict[str, Any]] = []
    for n in sorted(args.sizes):
        print(f"{n:,} items ...", file=sys.stderr)
        rows += bench_size(n, queries, args.dim, sorted(args.k), args.repeats, args.seed, faiss_args)
    add_ratios(rows)

    meta = {
        "queries": args.queries,
        "dim": args.dim,
        "ks": sorted(args.k),
        "repeats": args.repeats,
        "seed": args.seed,
        "hnsw_m": args.hnsw_m,
        "ef_search": args.ef_search,
        "query_chunk": QUERY_CHUNK,
        "max_scores": MAX_SCORES,
        "threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "process_peak_mib": process_peak_mib(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table = markdown(rows, meta)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
