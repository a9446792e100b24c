"""`sdm evaluate`: the model and baselines of a run ranked on held-out sessions (SPEC
section 6), written as `metrics.json`, `report.md`, `report.png` and, with
`--dump-topk`, one top-K row per query.

The queries, candidates, availability rule of cold items and metrics are the
ranking engine's (`pipeline/ranking.py`); the model of a run's best.pt comes from
`pipeline/checkpoint.py`'s `load_model`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from sdm.config import EvaluateConfig
from sdm.configfile import save_config
from sdm.errors import ConfigError, SdmError
from sdm.manifest import verify_files
from sdm.outputs import OutputDir, atomic_path, write_json, write_text
from sdm.pipeline.checkpoint import load_model_and_checkpoint
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.device import pick_device
from sdm.pipeline.ranking import evaluate_model, read_candidates
from sdm.pipeline.report import build_report, curve_ks, markdown_table, method_entry, plot_report
from sdm.retrieval.index import import_faiss


REPORTS = ("metrics.json", "report.md", "report.png", "config.json", "topk.parquet", "topk_*.parquet")
"""evaluate's own files in `out`, the only ones --overwrite removes."""


def _cutoffs(cfg: EvaluateConfig, catalogue: int) -> list[int]:
    """cfg.k, the default list capped at the catalogue size (with a note); an explicit K above it is an error."""
    if max(cfg.k) <= catalogue:
        return list(cfg.k)
    if "k" in cfg.model_fields_set:
        raise ConfigError(f"--k {max(cfg.k)} is larger than the catalogue of {cfg.data} ({catalogue} items)")
    ks = sorted({min(k, catalogue) for k in cfg.k})
    print(f"note: the catalogue of {cfg.data} has {catalogue} items; K capped to {','.join(map(str, ks))}",
          file=sys.stderr)  # fmt: skip
    return ks


def evaluate(cfg: EvaluateConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint in `cfg.model` and the baselines of `cfg.baseline`, and write the report.

    Writes `metrics.json` (the structure of `report.py`), `report.md`, `report.png`,
    `config.json` and, with `dump_topk`, `topk.parquet` (the model) and
    `topk_<baseline>.parquet`.

    Returns:
        The first method's metrics (the model when there is one) plus "table" (the
        Markdown report) and "report" (what metrics.json holds).

    Raises:
        SdmError: K beyond the catalogue, a split without queries, a missing or
            foreign model, faiss requested but not installed or without a model,
            catalogue candidates without a (valid) catalogue or with faiss.
    """
    with OutputDir(cfg.out, "evaluate", REPORTS, overwrite=cfg.overwrite,
                   inputs={"data directory": cfg.data, "model directory": cfg.model}) as guard:  # fmt: skip
        return _evaluate(cfg, guard, progress)


def _evaluate(cfg: EvaluateConfig, guard: OutputDir, progress: bool) -> dict[str, Any]:
    """The evaluation, with `cfg.out` held by `guard`."""
    manifest = read_manifest(cfg.data)
    if cfg.verify:
        verify_files(cfg.data, manifest)
    cold = read_candidates(cfg.data, manifest, cfg.candidates, cfg.index)  # validated before any work
    catalogue = int(manifest["num_items"]) - 2 + (len(cold) if cold is not None else 0)
    ks = _cutoffs(cfg, catalogue)
    split_info = manifest["splits"].get(cfg.split, {})
    if not split_info.get("samples", 1):
        raise SdmError(
            f"{cfg.data}: split {cfg.split!r} has no queries: no sessions of length >= 2 after the "
            f"{'test' if cfg.split == 'test' else 'validation'} cutoff"
        )
    with_model = _with_model(cfg)
    if cfg.index == "faiss":
        import_faiss()
        if not with_model:
            raise SdmError("--index faiss needs a model; baselines are always scored exactly")
    methods = _methods(cfg, manifest, with_model)  # every model and baseline is loaded before anything is written
    guard.prepare(first=["metrics.json"])
    curve = curve_ks(catalogue)
    entries, first = [], None
    for name, kind, scorer, device, extra in methods:
        dump = cfg.out / ("topk.parquet" if kind == "model" else f"topk_{name}.parquet") if cfg.dump_topk else None
        m = evaluate_model(
            scorer, cfg.data, cfg.split, sorted(set(ks) | set(curve)), cfg.batch_size, device,
            exclude_seen=cfg.exclude_seen, dump_topk=dump, dump_k=max(ks), progress=progress,
            index=cfg.index if kind == "model" else "exact", candidates=cfg.candidates,
            exclude_history=cfg.exclude_history,
        )  # fmt: skip
        if m["queries"] == 0:
            raise SdmError(f"{cfg.data}: split {cfg.split!r} has no queries: no sessions of length >= 2 after the cutoff")
        first = first or m
        excluded = {"exclude_seen": cfg.exclude_seen or cfg.exclude_history}
        if cfg.exclude_history:
            excluded["exclude_history"] = True
        entries.append(method_entry(m, kind, ks, curve, **excluded, index=m["index"], **extra))
    report = build_report(manifest, first, ks, entries)
    table = markdown_table(report)
    with atomic_path(cfg.out / "config.json") as tmp:
        save_config(cfg, tmp)
    write_text(cfg.out / "report.md", table + "\n")
    plot_report(report, cfg.out / "report.png")
    write_json(cfg.out / "metrics.json", report)  # last: marks a finished evaluation
    return {**{k: v for k, v in first.items() if "@" not in k or int(k.split("@")[1]) in ks}, "table": table,
            "report": report}  # fmt: skip


def _with_model(cfg: EvaluateConfig) -> bool:
    """Score the model unless only baselines were asked for and the default model directory has none."""
    if not cfg.baseline or "model" in cfg.model_fields_set:
        return True
    if (cfg.model / "best.pt").is_file():
        return True
    print(f"note: no model in {cfg.model}; evaluating the baselines only", file=sys.stderr)
    return False


def _methods(cfg: EvaluateConfig, manifest: dict[str, Any], with_model: bool) -> list[tuple[str, str, Any, Any, dict]]:
    """(name, kind, scorer, device, extra report fields) of the model and each baseline."""
    methods = []
    if with_model:
        device = pick_device(cfg.device)
        model, ckpt = load_model_and_checkpoint(cfg.model, cfg.data, manifest, device)
        methods.append((model.config.variant, "model", model, device, {"checkpoint_step": ckpt.get("step")}))
    if cfg.baseline:
        from sdm.pipeline.baselines import build_baseline

        for name in dict.fromkeys(cfg.baseline):  # baselines score sparse products on CPU
            methods.append((name, "baseline", build_baseline(name, cfg.data, manifest), torch.device("cpu"), {}))
    return methods
