"""`sdm demo`: the whole pipeline on a synthetic log, in a few minutes on a laptop CPU.

synth -> sessionize -> train the full model -> evaluate it and the baselines on
the test split -> one comparison table (stdout and `<out>/report.md`). Every
stage writes where the standalone commands would, under `out`, so each step
can be inspected or re-run by hand with the printed commands.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdm.config import DemoConfig, SessionizeConfig, SynthConfig, TrainConfig
from sdm.configfile import save_config
from sdm.outputs import OutputDir, atomic_path, nested, write_json, write_text
from sdm.pipeline.runstate import OWN_FILES as TRAIN_OWNS
from sdm.sessionize.write import OWNS as SESSIONIZE_OWNS

BASELINES = ("popularity", "itemcf", "itemcf-repeat", "stan", "vsknn")
# What the demo writes in `out`: --overwrite removes these and nothing else.
OWN = ("config.json", "logs.parquet", "logs.config.json", "items.parquet", "users.parquet", "report.md", "report.png",
       "metrics.json", *nested("data", SESSIONIZE_OWNS), *nested("model", TRAIN_OWNS))  # fmt: skip


def _table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    head = "| method | " + " | ".join(f"HR@{k} | NDCG@{k}" for k in ks) + " | train s |"
    sep = "|---|" + "---:|---:|" * len(ks) + "---:|"
    lines = [head, sep]
    for r in rows:
        cells = " | ".join(f"{r[f'hr@{k}']:.4f} | {r[f'ndcg@{k}']:.4f}" for k in ks)
        lines.append(f"| {r['name']} | {cells} | {r.get('train_seconds', '')} |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns {"rows": [...], "table": str, "out": path}.

    Raises:
        OutputError: `out` holds files the demo did not write, or its earlier output without `overwrite`.
    """

    out = Path(cfg.out)
    with OutputDir(out, "demo", OWN, overwrite=cfg.overwrite) as guard:
        guard.prepare(first=["report.md"])
        with atomic_path(out / "config.json") as tmp:
            save_config(cfg, tmp)
        return _run(cfg, out, progress)


def _run(cfg: DemoConfig, out: Path, progress: bool) -> dict[str, Any]:
    """The demo's stages, in an `out` this process holds."""
    from sdm.pipeline.baselines import build_baseline
    from sdm.pipeline.checkpoint import load_model
    from sdm.pipeline.ranking import evaluate_model
    from sdm.pipeline.report import build_report, curve_ks, method_entry, plot_report
    from sdm.pipeline.dataset import read_manifest
    from sdm.logs.synth import generate
    from sdm.pipeline.train import train
    from sdm.sessionize import run as sessionize

    t0 = time.time()

    synth_cfg = SynthConfig(out=out / "logs.parquet", events=cfg.events, seed=cfg.seed)
    generate(synth_cfg, progress=progress)
    ses_cfg = SessionizeConfig(
        out=out / "data",
        items=out / "items.parquet",
        users=out / "users.parquet",
        item_features=["category", "category_l1", "brand", "shop"],
        user_features=["age", "gender", "life_stage"],
        valid_days=2,
        test_days=2,
    )
    sessionize(ses_cfg, out / "logs.parquet", progress=progress)
    train_cfg = TrainConfig(
        data=out / "data", out=out / "model", epochs=cfg.epochs, max_steps=cfg.max_steps, seed=cfg.seed
    )
    summary = train(train_cfg, progress=progress)

    ks = [20, 50]
    manifest = read_manifest(out / "data")
    curve = curve_ks(int(manifest["num_items"]) - 2)
    every_k = sorted(set(ks) | set(curve))
    model = load_model(out / "model", out / "data", manifest, "cpu")
    rows = [{**evaluate_model(model, out / "data", "test", every_k), "train_seconds": round(summary["seconds"], 1)}]
    for name in BASELINES:
        rows.append(evaluate_model(build_baseline(name, out / "data", manifest), out / "data", "test", every_k))
    entries = [method_entry(r, "model" if i == 0 else "baseline", ks, curve,
                            **({"checkpoint_step": summary["steps"], "train_seconds": r["train_seconds"]} if i == 0 else {}))
               for i, r in enumerate(rows)]  # fmt: skip
    metrics = build_report(manifest, rows[0], ks, entries)
    plot_report(metrics, out / "report.png")
    table = _table(rows, ks)
    q = rows[0]["queries"]
    report = (
        f"# sdm demo\n\n{cfg.events:,} synthetic events (seed {cfg.seed}); test split: {q:,} queries; "
        f"{time.time() - t0:.0f}s in all.\n\n{table}\n"
    )
    write_json(out / "metrics.json", metrics)  # the structure of `sdm evaluate`
    write_text(out / "report.md", report)
    return {"rows": rows, "table": table, "out": str(out), "seconds": time.time() - t0}
