"""The report of an evaluation: one structure for `sdm evaluate` and `sdm demo` alike.

`metrics.json` is

    {"format": "sdm-metrics", "version": 1, "split", "fingerprint", "candidates", "catalogue",
     "queries", "sessions", "users", "oov_target_share", "ks", "curve_ks",
     "methods": [{"name", "kind" ("model" | "baseline"), "checkpoint_step" (models),
                  "hr@K", "recall@K", "precision@K", "f1@K", "ndcg@K", "mrr@K" for every K of "ks",
                  "curve": {"hr": [...], "recall": [...], "ndcg": [...]} over "curve_ks"}, ...]}

with K = 1 .. min(100, catalogue) for the curves; `report.md` is `markdown_table`
and `report.png` draws the curves, one line per method. `candidates` is
"vocabulary" or "catalogue"; `catalogue` counts the items ranked (the vocabulary,
plus the cold items with "catalogue"). With "catalogue" the report also has
`cold_items` and `cold_target_share`, and each method `targets`: {"cold": {...},
"warm": {...}}, each with its `queries` and every metric at every K of "ks" on the
queries whose next item is a cold item / a vocabulary item (the top level stays
every query).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdm.outputs import atomic_path
from sdm.pipeline.metrics import METRICS

CURVE_MAX_K = 100
CURVES = (("hr", "HitRate@K"), ("recall", "Recall@K"), ("ndcg", "NDCG@K"))
NAMES = {"hr": "HR", "recall": "Recall", "precision": "Precision", "f1": "F1", "ndcg": "NDCG", "mrr": "MRR"}


def curve_ks(catalogue: int) -> list[int]:
    """K = 1 .. min(100, catalogue): the x axis of the curves."""
    return list(range(1, min(CURVE_MAX_K, catalogue) + 1))


def method_entry(metrics: dict[str, Any], kind: str, ks: list[int], curve: list[int], **extra: Any) -> dict[str, Any]:
    """One method's part of the report, from `evaluate_model`'s result (computed at ks and curve)."""
    entry: dict[str, Any] = {"name": metrics["name"], "kind": kind, **extra}
    keys = [f"{m}@{k}" for k in ks for m in METRICS] + [k for k in metrics if k.startswith("faiss_recall@")]
    entry.update({key: metrics[key] for key in keys if key in metrics})
    entry["curve"] = {m: [metrics[f"{m}@{k}"] for k in curve] for m, _ in CURVES}
    if "targets" in metrics:
        entry["targets"] = {
            kind: {"queries": part["queries"], **{f"{m}@{k}": part[f"{m}@{k}"] for k in ks for m in METRICS}}
            for kind, part in metrics["targets"].items()
        }
    return entry


def build_report(
    manifest: dict[str, Any], first: dict[str, Any], ks: list[int], methods: list[dict[str, Any]]
) -> dict[str, Any]:
    """The whole report: the split's counts (from any method's metrics, `first`) and every method."""
    catalogue = int(manifest["num_items"]) - 2 + int(first.get("cold_items", 0))
    cold = {k: first[k] for k in ("cold_items", "cold_target_share") if k in first}
    return {
        "format": "sdm-metrics",
        "version": 1,
        "split": first["split"],
        "fingerprint": manifest.get("fingerprint"),
        "candidates": first.get("candidates", "vocabulary"),
        "catalogue": catalogue,
        **cold,
        **{k: first[k] for k in ("queries", "sessions", "users", "oov_target_share")},
        "ks": ks,
        "curve_ks": curve_ks(catalogue),
        "methods": methods,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """A title line and one row per method and K; with catalogue candidates, one row per method,
    target kind (all, cold, warm) and K."""
    names = ", ".join(m["name"] for m in report["methods"])
    title = (
        f"**{names}** on {report['split']}: {report['queries']:,} queries, "
        f"{report['sessions']:,} sessions, {report['users']:,} users, "
        f"OOV targets {100 * report['oov_target_share']:.2f}%; {report['catalogue']:,} items"
    )
    faiss = any(f"faiss_recall@{report['ks'][0]}" in m for m in report["methods"])
    cols = list(METRICS) + (["faiss_recall"] if faiss else [])
    cold = "cold_items" in report
    if cold:
        title += (
            f" ({report['cold_items']:,} cold, each from the time the catalogue knows it); "
            f"cold targets {100 * report['cold_target_share']:.2f}%"
        )
    names = " | ".join(NAMES.get(c, "faiss recall") for c in cols)
    header = "| method | " + ("targets | " if cold else "") + "K | " + names + " |"
    sep = "|---|" + ("---|" if cold else "") + "---:|" + "---:|" * len(cols)
    rows = []
    for m in report["methods"]:
        parts = [(None, m)]
        if cold:
            parts = [("all", {**m, "queries": report["queries"]}), *m.get("targets", {}).items()]
        for kind, part in parts:
            label = f"{m['name']} | {kind} ({part['queries']:,})" if kind else m["name"]
            for k in report["ks"]:
                cells = [f"{part[f'{c}@{k}']:.4f}" if f"{c}@{k}" in part else "-" for c in cols]
                rows.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return "\n".join([title, "", header, sep, *rows])


def plot_report(report: dict[str, Any], path: Path) -> None:
    """HitRate@K, Recall@K and NDCG@K against K = 1..100, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = report["curve_ks"]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(13, 3.8), dpi=110)
    for ax, (metric, label) in zip(axes, CURVES, strict=True):
        for m in report["methods"]:
            ax.plot(xs, m["curve"][metric], label=m["name"], linewidth=1.6)
        ax.set_xlabel("K")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['split']} split: {report['queries']:,} queries, {report['catalogue']:,} items", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
