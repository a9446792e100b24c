"""ANN index at 1M items, d = 64, on vectors of a trained model: recall@100 and queries/s vs exact search.

1. Train SDM briefly (default settings, `--epochs`) on a shared public log
   (default REES46: item id + category, first-level category and brand).
2. Expand its catalogue to `--items` (default 1,000,000) realistic item vectors
   with the model's own item tower: a synthetic item is
   `item_proj([e_id'; e_f(r) for each side feature f])`, where r is a real item
   drawn uniformly (so new items share real categories and brands, as a large
   catalogue's do) and e_id' is drawn from a Gaussian with the mean and
   covariance of the trained id embeddings (rows 2..V). The real items keep
   their own vectors (rows 2..V of the expanded table).
3. Queries: `--queries` real user vectors (the model's output at every session
   position of the validation and test splits, sampled).
4. Exact baseline: faiss `IndexFlatIP` (BLAS; the fastest exact search here) and
   the evaluator's chunked torch top-k, same queries, same run. The index:
   `retrieval.index.FaissIndex()` with its automatic parameters (what `sdm export` and
   `sdm evaluate --index faiss` build), then an nprobe sweep on the same index.
   Recall@100 = |ANN top-100 ∩ exact top-100| / 100, averaged over queries.

Also measured: the same on 1M random Gaussian vectors (ANN's worst case).
Writes `bench/results/ann.json`.

    python bench/ann_bench.py            # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDM_SHARED", ROOT.parent / "shared")) / "datasets"
K = 100


def train_model(work: Path, epochs: int, seed: int) -> tuple[Any, Path]:
    """Convert + sessionize REES46 with data/rees46.toml, train briefly; returns (model, data dir)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from ablation import prepare_log, sessionize_config

    from sdm.config import TrainConfig
    from sdm.pipeline.checkpoint import load_model
    from sdm.pipeline.dataset import read_manifest
    from sdm.pipeline.train import train
    from sdm.sessionize import run as sessionize

    data = work / "data"
    model_dir = work / "model"
    if not (model_dir / "best.pt").is_file():
        src = prepare_log(work, convert=["rees46", str(SHARED / "rees46_ecommerce_sample" / "raw")])
        sessionize(sessionize_config(data, ROOT / "data" / "rees46.toml", {"overwrite": True}, src), src["log"],
                   progress=False)  # fmt: skip
        t0 = time.perf_counter()
        train(TrainConfig(data=data, out=model_dir, epochs=epochs, seed=seed, device="cpu"), progress=False)
        print(f"trained {epochs} epochs in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    manifest = read_manifest(data)
    return load_model(model_dir, data, manifest, torch.device("cpu")), data


@torch.no_grad()
def expand_items(model: Any, n: int, seed: int) -> np.ndarray:
    """(n + 2, D) item table: the real items, then synthetic ones from the item tower (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    real = model.all_item_vectors().float()  # (V, D)
    V = real.shape[0]
    ids = model.item_emb.tables[0].weight[2:].float()  # (V - 2, D) trained id embeddings
    mean = ids.mean(0)
    cov = torch.cov(ids.T) + 1e-6 * torch.eye(ids.shape[1])
    gauss = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    out = torch.empty(n + 2, real.shape[1])
    out[:V] = real
    chunk = 65536
    torch.manual_seed(seed)
    for start in range(V, n + 2, chunk):
        end = min(start + chunk, n + 2)
        m = end - start
        r = torch.randint(2, V, (m,), generator=g)  # a real item whose side features the new one shares
        feats = model.item_table[r]  # (m, F)
        embs = model.item_emb([feats[:, j] for j in range(feats.shape[1])])
        embs[0] = gauss.sample((m,))  # a new id embedding
        out[start:end] = model.item_proj(torch.cat(embs, dim=-1))
    return out.numpy()


@torch.no_grad()
def user_queries(model: Any, data: Path, n: int, seed: int) -> np.ndarray:
    """(n, D) real user vectors: every session position of the validation and test splits, sampled."""
    from sdm.pipeline.dataset import SessionDataset

    vecs = []
    for split in ("valid", "test", "train"):
        for batch in SessionDataset(data, split, 256, shuffle=False):
            u = model(batch)
            u = u[0] if isinstance(u, tuple) else u
            mask = torch.arange(u.shape[1]) < batch["seq_len"].unsqueeze(1)
            vecs.append(u[mask].float())
        if sum(len(v) for v in vecs) >= 4 * n:
            break
    allv = torch.cat(vecs).numpy()
    rng = np.random.default_rng(seed)
    return allv[rng.choice(len(allv), min(n, len(allv)), replace=False)]


def qps(fn: Any, queries: np.ndarray, repeats: int = 2) -> tuple[float, Any]:
    """Best-of-`repeats` queries/s of fn(queries) and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(queries)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, out


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact)]))


def bench_vectors(name: str, items: np.ndarray, queries: np.ndarray, sweep: list[int]) -> dict[str, Any]:
    import faiss

    from sdm.pipeline.metrics import topk_scores
    from sdm.retrieval.index import FaissIndex, describe

    n = items.shape[0] - 2
    print(f"[{name}] {n:,} items, {len(queries):,} queries", file=sys.stderr)
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(np.ascontiguousarray(items[2:]))
    flat_qps, (_, exact) = qps(lambda q: flat.search(q, K), queries)
    exact = exact + 2  # item indices
    torch_q = queries
    items_t, torch_t = torch.from_numpy(items), torch.from_numpy(torch_q)
    torch_qps, torch_top = qps(lambda q: topk_scores(torch_t, items_t, K, chunk_items=max(1024, (1 << 26) // len(q))),
                               torch_q, 1)  # fmt: skip
    torch_recall = recall(torch_top.numpy(), exact[: len(torch_q)])

    t0 = time.perf_counter()
    index = FaissIndex(items, announce=True)
    build_s = time.perf_counter() - t0
    ann_qps, (_, approx) = qps(lambda q: index.search_scores(q, K), queries)
    row: dict[str, Any] = {
        "vectors": name,
        "items": n,
        "dim": int(items.shape[1]),
        "queries": len(queries),
        "exact_faiss_flat_qps": round(flat_qps, 1),
        "exact_torch_chunked_qps": round(torch_qps, 1),
        "exact_torch_recall_check": round(torch_recall, 4),
        "index": describe(index.params),
        "index_params": index.params,
        "build_s": round(build_s, 1),
        "auto": {"qps": round(ann_qps, 1), "recall@100": round(recall(approx.numpy(), exact), 4),
                 "speedup_vs_flat": round(ann_qps / flat_qps, 2), "speedup_vs_torch": round(ann_qps / torch_qps, 2),
                 "speedup_vs_best_exact": round(ann_qps / max(flat_qps, torch_qps), 2)},
        "sweep": [],
    }  # fmt: skip
    if index.kind == "ivf":
        tuned = index.index.nprobe
        for nprobe in sweep:
            index.index.nprobe = nprobe
            q_s, (_, a) = qps(lambda q: index.search_scores(q, K), queries, 1)
            row["sweep"].append({"nprobe": nprobe, "qps": round(q_s, 1), "recall@100": round(recall(a.numpy(), exact), 4),
                                 "speedup_vs_best_exact": round(q_s / max(flat_qps, torch_qps), 2)})  # fmt: skip
        index.index.nprobe = tuned
    print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 128])
    p.add_argument("--runs", default="trained,random", help="which runs: trained (expanded model vectors), random")
    p.add_argument("--dim", type=int, default=64, help="dimension of the random run")
    p.add_argument("--work", type=Path, default=Path("/tmp/sdm_ann_bench"))
    p.add_argument("--out", type=Path, default=RESULTS / "ann.json")
    args = p.parse_args(argv)
    runs = set(args.runs.split(","))

    # Runs not redone keep their earlier result (each run is minutes on 2 cores).
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    for r in results.get("runs", []):
        r.setdefault("load_average", results.get("machine", {}).get("load_average"))
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()}
    results["k"] = K
    fresh = []
    if "trained" in runs:
        model, data = train_model(args.work, args.epochs, args.seed)
        torch.set_grad_enabled(False)
        queries = np.ascontiguousarray(user_queries(model, data, args.queries, args.seed), dtype=np.float32)
        items = expand_items(model, args.items, args.seed)
        results.update(dataset="rees46 (data/rees46.toml)", trained_items=int(model.item_table.shape[0] - 2),
                       epochs=args.epochs)  # fmt: skip
        fresh.append(bench_vectors("trained model, expanded", items, queries, args.sweep))
        del items
    if "random" in runs:
        torch.set_grad_enabled(False)
        g = np.random.default_rng(args.seed)
        rand = g.standard_normal((args.items + 2, args.dim)).astype(np.float32)
        rq = g.standard_normal((args.queries, args.dim)).astype(np.float32)
        fresh.append(bench_vectors("random Gaussian", rand, rq, args.sweep))
    names = {r["vectors"] for r in fresh}
    results["runs"] = [r for r in results.get("runs", []) if r["vectors"] not in names] + fresh
    for r in fresh:
        r["load_average"] = results["machine"]["load_average"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
