"""The paper's ablation table (Table 2) on one dataset: every SDM variant and every baseline.

Steps, all through the library (the same code as the `sdm` commands):

1. optionally convert a public dataset's raw files (`sdm.logs.convert`);
2. sessionize the log with `--config data/<name>.toml` (its `[sessionize]`
   section) and/or `--sessionize-args` JSON into `<out>/data`;
3. train each variant of SPEC section 7 (`sdm.pipeline.train.train`) with the
   same seed and the default hyper-parameters, updated by the TOML's `[train]`
   section when it has one and then by `--train-args` JSON (the same for every
   variant);
4. evaluate each checkpoint (`best.pt`, chosen by validation HR) and the
   baselines popularity, itemcf, itemcf-repeat on the test split with
   `evaluate_model` (SPEC section 6: full ranking, seen items not filtered).

The table has one row per method and HR, Recall, NDCG at 20/50/100 plus the
training time in seconds: for a model the wall time of `train` (validation
included), for a baseline the time to fit it on the training split. The best
value of each metric column is in bold.

    python bench/ablation.py --dataset otto_sample --convert otto data/otto_sample.jsonl \\
        --config data/otto.toml --train-args '{"max_steps": 20}'
    python bench/ablation.py --dataset diginetica --log runs/diginetica/logs.parquet \\
        --config data/diginetica.toml --variants PSDMMAL-N,DNN

Writes the Markdown table to stdout and to `bench/results/ablation_<dataset>.md`,
and the rows (every metric of `evaluate_model`) to `.json` next to it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from sdm.config import SessionizeConfig, TrainConfig, Variant
from sdm.configfile import build_config, load_toml_section
from sdm.errors import SdmError
from sdm.pipeline.baselines import BASELINES, build_baseline
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.dataset import read_manifest
from sdm.pipeline.device import pick_device
from sdm.pipeline.ranking import evaluate_model

HERE = Path(__file__).resolve().parent
VARIANTS: tuple[str, ...] = get_args(Variant)  # SPEC section 7 order: SDMMA .. DNN
KS = (20, 50, 100)
TABLE_METRICS = (("hr", "HR"), ("recall", "Recall"), ("ndcg", "NDCG"))
# Set by the script itself, so `--train-args` may not change them between variants.
RESERVED_TRAIN_KEYS = ("data", "out", "variant", "seed", "resume")


def prepare_log(out: Path, log: Path | None = None, convert: Sequence[str] | None = None) -> dict[str, Any]:
    """The log to sessionize: `log` as is, or the raw files `convert = [FORMAT, RAW...]` converted into `out`.

    Returns:
        {"log": path, "items": items table or None, "users": users table or None}
        (the tables are only set when converted).
    """
    if (log is None) == (convert is None):
        raise SdmError("give either a log or --convert FORMAT RAW...")
    if log is not None:
        if not Path(log).is_file():
            raise SdmError(f"{log}: log file not found")
        return {"log": Path(log), "items": None, "users": None}
    from sdm.logs.convert import convert as run_convert

    fmt, *raw = convert  # type: ignore[misc]
    if not raw:
        raise SdmError("--convert needs a format and at least one raw file")
    s = run_convert(fmt, [Path(r) for r in raw], Path(out) / "logs.parquet", overwrite=True)
    return {"log": Path(s["out"]), "items": s["items_path"], "users": s["users_path"]}


def sessionize_config(
    data_dir: Path,
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
    side_tables: dict[str, Any] | None = None,
) -> SessionizeConfig:
    """The `[sessionize]` section of `config`, updated by `overrides`, writing to `data_dir`.

    A ready config (`data/<name>.toml`) names its items / users tables under
    `runs/<name>/`; when the log was converted here, those names point at the
    tables the converter just wrote instead.
    """
    values = dict(overrides or {})
    named = load_toml_section(config, "sessionize") if config is not None else {}
    for key in ("items", "users"):
        if side_tables and side_tables.get(key) and (named.get(key) or values.get(key)):
            values[key] = side_tables[key]
    values.update(out=Path(data_dir), overwrite=True)
    return build_config(SessionizeConfig, config, "sessionize", values)


def train_config(
    data_dir: Path, model_dir: Path, variant: str, seed: int, config: Path | None, train_args: dict[str, Any]
) -> TrainConfig:
    """Defaults < the TOML's `[train]` < `train_args`; data, out, variant and seed set here."""
    bad = [k for k in train_args if k in RESERVED_TRAIN_KEYS]
    if bad:
        raise SdmError(f"--train-args may not set {bad}: the script sets them (use --seed for the seed)")
    values = {**train_args, "data": data_dir, "out": model_dir, "variant": variant, "seed": seed}
    # A TOML without sections is one command's section; only an explicit [train] applies here.
    return build_config(TrainConfig, config if _has_section(config, "train") else None, "train", values)


def _has_section(config: Path | None, section: str) -> bool:
    """Whether the TOML file has a `[section]` table (a missing or bad file is reported by the sessionize step)."""
    if config is None:
        return False
    try:
        with open(config, "rb") as fh:
            return isinstance(tomllib.load(fh).get(section), dict)
    except (OSError, tomllib.TOMLDecodeError):
        return False


def check_split(manifest: dict[str, Any], data_dir: Path, ks: Sequence[int]) -> None:
    """Fail before any training when the test split has no queries or a K exceeds the catalogue."""
    catalogue = int(manifest["num_items"]) - 2
    if max(ks) > catalogue:
        raise SdmError(f"K {max(ks)} is larger than the catalogue of {data_dir} ({catalogue} items); pass smaller --k")
    if not manifest["splits"]["test"].get("samples", 1):
        raise SdmError(f"{data_dir}: split 'test' has no queries: no sessions of length >= 2 after the test cutoff")


def run_ablation(
    log: Path | None = None,
    *,
    out: Path,
    convert: Sequence[str] | None = None,
    config: Path | None = None,
    sessionize_args: dict[str, Any] | None = None,
    variants: Sequence[str] = VARIANTS,
    baselines: Sequence[str] = BASELINES,
    train_args: dict[str, Any] | None = None,
    seed: int = 0,
    ks: Sequence[int] = KS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Sessionize, train every variant, evaluate every variant and baseline on the test split.

    Args:
        log: the interaction log (or give `convert`).
        out: work directory: `data/` (shards), `models/<variant>/`, and the
            converted log. Models of earlier runs there are replaced.
        convert: [FORMAT, RAW...] to convert first instead of `log`.
        config: a TOML with a `[sessionize]` (and optionally `[train]`) section.
        sessionize_args: sessionize settings over the TOML's.
        variants: model variants (SPEC section 7 names).
        baselines: baseline names (popularity, itemcf, itemcf-repeat).
        train_args: training settings over the defaults, the same for every variant.
        seed: training seed of every variant.
        ks: cut-offs K.
        progress: show progress bars.

    Returns:
        One dict per method (variants first, in the order given, then the
        baselines): "method", "kind" ("model" or "baseline"), every metric of
        `evaluate_model` ("hr@20", "recall@20", "ndcg@20", ..., "queries", ...),
        "train_seconds", "eval_seconds", and for models the training summary
        ("steps", "epochs", "stopped", "best_valid": the selection metric).

    Raises:
        SdmError: bad input (unknown variant or baseline, unreadable log or
            config, empty test split, K beyond the catalogue).
    """
    unknown = [v for v in variants if v not in VARIANTS] + [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SdmError(
            f"unknown method(s) {unknown}; variants: {', '.join(VARIANTS)}; baselines: {', '.join(BASELINES)}"
        )
    if not variants and not baselines:
        raise SdmError("nothing to run: no variants and no baselines")
    ks = sorted({int(k) for k in ks})
    train_args = dict(train_args or {})
    out = Path(out)
    data_dir = out / "data"
    # Build every config before the slow steps, so a typo fails at once.
    for v in variants:
        train_config(data_dir, out / "models" / v, v, seed, config, train_args)

    src = prepare_log(out, log, convert)
    scfg = sessionize_config(data_dir, config, sessionize_args, src)
    from sdm.sessionize import run as sessionize

    manifest = sessionize(scfg, src["log"], progress=progress)
    check_split(manifest, data_dir, ks)

    rows: list[dict[str, Any]] = []
    for v in variants:
        from sdm.pipeline.train import train

        model_dir = out / "models" / v
        # A stale best.pt would survive a run cut by max_steps, so start clean.
        shutil.rmtree(model_dir, ignore_errors=True)
        tcfg = train_config(data_dir, model_dir, v, seed, config, train_args)
        summary = train(tcfg, progress=progress)
        device = pick_device(tcfg.device)
        t0 = time.perf_counter()
        model = load_model(model_dir, data_dir, manifest, device)
        metrics = evaluate_model(model, data_dir, "test", ks, device=device, progress=progress)
        rows.append(
            {
                "method": v,
                "kind": "model",
                **metrics,
                "train_seconds": summary["seconds"],
                "eval_seconds": time.perf_counter() - t0,
                "steps": summary["steps"],
                "epochs": summary["epochs"],
                "stopped": summary["stopped"],
                "best_valid": summary["best_metric"],
            }
        )
        _say(progress, rows[-1], ks)
    for b in baselines:
        t0 = time.perf_counter()
        scorer = build_baseline(b, data_dir, manifest)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluate_model(scorer, data_dir, "test", ks, device="cpu", progress=progress)
        rows.append(
            {
                "method": b,
                "kind": "baseline",
                **metrics,
                "train_seconds": fit_s,
                "eval_seconds": time.perf_counter() - t0,
            }
        )
        _say(progress, rows[-1], ks)
    return rows


def _say(progress: bool, row: dict[str, Any], ks: Sequence[int]) -> None:
    if progress:
        k = 50 if 50 in ks else ks[-1]
        print(f"{row['method']}: hr@{k} {row[f'hr@{k}']:.4f}, {row['train_seconds']:.1f}s", file=sys.stderr)


def describe(
    dataset: str, manifest: dict[str, Any], rows: list[dict[str, Any]], seed: int, train_args: dict[str, Any]
) -> dict[str, Any]:
    """What the header line states: dataset, split cutoffs, test queries, seed, settings."""
    test = rows[0] if rows else {}
    return {
        "dataset": dataset,
        "valid_start": manifest["cutoffs"]["valid_start"],
        "test_start": manifest["cutoffs"]["test_start"],
        "test_queries": test.get("queries"),
        "test_sessions": test.get("sessions"),
        "test_users": test.get("users"),
        "oov_target_share": test.get("oov_target_share"),
        "train_sessions": manifest["splits"]["train"]["sessions"],
        "items": int(manifest["num_items"]) - 2,
        "seed": seed,
        "train_args": train_args,
        "fingerprint": manifest.get("fingerprint"),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], ks: Sequence[int] = KS) -> str:
    """Header line plus the table: one row per method, HR / Recall / NDCG at each K, training seconds."""
    args = json.dumps(meta["train_args"]) if meta["train_args"] else "defaults"
    head = (
        f"**{meta['dataset']}**, test split: {meta['test_queries']:,} queries, {meta['test_sessions']:,} sessions, "
        f"{meta['test_users']:,} users (OOV targets {100 * (meta['oov_target_share'] or 0):.2f}%); "
        f"cutoffs valid {meta['valid_start']}, test {meta['test_start']}; {meta['items']:,} items, "
        f"{meta['train_sessions']:,} training sessions; seed {meta['seed']}; training: {args}."
    )
    cols = [(f"{m}@{k}", f"{name}@{k}") for m, name in TABLE_METRICS for k in ks]
    best = {key: max(r[key] for r in rows) for key, _ in cols}
    lines = [
        head,
        "",
        "| method | " + " | ".join(label for _, label in cols) + " | train s |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for r in rows:
        cells = [f"**{r[key]:.4f}**" if r[key] == best[key] and best[key] > 0 else f"{r[key]:.4f}" for key, _ in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['train_seconds']:.1f} |")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], table: str, results: Path) -> tuple[Path, Path]:
    """`ablation_<dataset>.md` and `.json` in `results`."""
    results.mkdir(parents=True, exist_ok=True)
    stem = "ablation_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", meta["dataset"])
    md, js = results / f"{stem}.md", results / f"{stem}.json"
    md.write_text(table + "\n")
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return md, js


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the ablation, print and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="label of the dataset (names the output files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", type=Path, help="interaction log (Parquet or CSV)")
    src.add_argument("--convert", nargs="+", metavar="FORMAT RAW", help="convert these raw files first (sdm convert)")
    p.add_argument("--config", type=Path, help="TOML with [sessionize] (and optionally [train]), e.g. data/otto.toml")
    p.add_argument(
        "--sessionize-args", type=_json_arg, default={}, help="JSON over the TOML, e.g. '{\"test_days\": 2}'"
    )
    p.add_argument("--out", type=Path, help="work directory (default bench/out/<dataset>)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the .md and .json go")
    p.add_argument("--variants", type=_names, default=list(VARIANTS), help="comma list (default: all)")
    p.add_argument("--baselines", type=_names, default=list(BASELINES), help="comma list (default: all; '' for none)")
    p.add_argument(
        "--train-args", type=_json_arg, default={}, help="JSON over the training defaults, e.g. '{\"epochs\": 5}'"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed of every variant")
    p.add_argument(
        "--k", type=lambda s: [int(v) for v in _names(s)], default=list(KS), help="cut-offs (default 20,50,100)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    args = p.parse_args(argv)

    out = args.out or HERE / "out" / re.sub(r"[^A-Za-z0-9_.-]+", "_", args.dataset)
    try:
        rows = run_ablation(
            args.log, out=out, convert=args.convert, config=args.config, sessionize_args=args.sessionize_args,
            variants=args.variants, baselines=args.baselines, train_args=args.train_args, seed=args.seed,
            ks=args.k, progress=not args.quiet,
        )  # fmt: skip
    except SdmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    meta = describe(args.dataset, read_manifest(out / "data"), rows, args.seed, args.train_args)
    table = markdown(rows, meta, sorted(set(args.k)))
    print(table)
    md, js = write_results(rows, meta, table, args.results)
    print(f"-> {md}, {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
