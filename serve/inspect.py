"""`sdm inspect DIR`: what a shard directory, model directory or export directory holds.

Reads only metadata (manifest.json, the checkpoint's small entries, train_log.jsonl,
the export's JSON files), never the shards or item vectors, so it answers at
once on any size. `inspect_dir(path)` returns a dict; `inspect_path` formats it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdm.errors import DataError, SdmError, first_line
from sdm.serve.lookups import read_json


def _names(items: Any) -> list[str]:
    """The `name` of each object of a list (inputs / outputs of user_tower.json), "?" where there is none."""
    if not isinstance(items, list):
        return []
    return [str(i.get("name", "?")) if isinstance(i, dict) else "?" for i in items]


def inspect_data(path: Path) -> dict[str, Any]:
    """Summary of a shard directory (from its manifest, checked as `sdm check` checks it, the hashes aside)."""
    from sdm.manifest import read_manifest

    m = read_json(path / "manifest.json", "a shard manifest")
    if m.get("format") != "sdm-shards":
        raise SdmError(f"{path / 'manifest.json'}: not an sdm shard manifest (format {m.get('format')!r})")
    m = read_manifest(path)  # keys, types, paths, sizes: a damaged manifest is one line, as for every command
    splits = {
        name: {k: v for k, v in split.items() if k != "shards"} | {"shards": len(split.get("shards", []))}
        for name, split in m.get("splits", {}).items()
    }
    cfg = m.get("config", {})
    return {
        "kind": "data",
        "path": str(path),
        "fingerprint": m.get("fingerprint"),
        "created": m.get("created"),
        "rows_in": m.get("rows_in"),
        "rows_kept": m.get("rows_kept"),
        "dropped": m.get("dropped", {}),
        "splits": splits,
        "cutoffs": m.get("cutoffs", {}),
        "item_features": m.get("item_features", []),
        "table_features": m.get("table_features", []),
        "user_features": m.get("user_features", []),
        "vocab_sizes": m.get("vocab_sizes", {}),
        "max_session_len": m.get("max_session_len"),
        "max_long_len": m.get("max_long_len"),
        "gap": cfg.get("gap"),
        "long_window": cfg.get("long_window"),
        "side_tables": m.get("side_tables", {}),
    }


def inspect_model(path: Path) -> dict[str, Any]:
    """Summary of a training run directory (best.pt / last.pt and train_log.jsonl). Its
    parameter count leaves out the data buffers (item table, value lists, neighbour table)."""
    import torch

    from sdm.pipeline.warmstart import is_data_buffer

    out: dict[str, Any] = {"kind": "model", "path": str(path), "checkpoints": {}}
    for name in ("best.pt", "last.pt"):
        p = path / name
        if not p.is_file():
            continue
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise SdmError(f"{p}: not a readable checkpoint ({first_line(exc)[:200]})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict):
            raise SdmError(f"{p}: not an sdm checkpoint (no model_config object)")
        mc = ckpt["model_config"]
        cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        state = ckpt.get("model", {}) if isinstance(ckpt.get("model"), dict) else {}
        params = sum(int(t.numel()) for k, t in state.items() if hasattr(t, "numel") and not is_data_buffer(k))
        out["checkpoints"][name] = {
            "step": ckpt.get("step"),
            "epoch": ckpt.get("epoch"),
            "best_metric": ckpt.get("best_metric"),
            # what best_metric measures: checkpoints from before --select-metric chose by HR
            "select_metric": f"{cfg.get('select_metric', 'hr')}@{cfg.get('eval_k', 50)}",
            "parameters": params,
            **(_chosen(state) if name == "best.pt" else {}),  # chosen after training, into best.pt only
        }
        out.setdefault("variant", mc.get("variant"))
        out.setdefault("data_fingerprint", ckpt.get("data_fingerprint"))
        out.setdefault(
            "model_config",
            {k: mc.get(k) for k in ("embedding_dim", "lstm_layers", "num_heads", "num_targets", "repeat",
                                    "max_session_len", "max_long_len")},
        )  # fmt: skip
        out.setdefault("item_vocab", mc.get("item_vocab"))
        out.setdefault("user_vocab", mc.get("user_vocab"))
    log = path / "train_log.jsonl"
    if log.is_file():
        vals = []
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(str(k).startswith(("valid", "hr@", "val_")) for k in rec):
                vals.append(rec)
        out["validations"] = len(vals)
        if vals:
            out["last_validation"] = vals[-1]
    if not out["checkpoints"]:
        raise SdmError(f"{path}: no best.pt or last.pt; the training run did not write a checkpoint yet")
    return out


def _chosen(state: dict[str, Any]) -> dict[str, Any]:
    """What training chose after the last epoch, as best.pt's state dict holds it: the
    neighbour term's weight and neighbours per item, the cold items' scale (absent in older
    models; the scale stays 1 for data without cold items)."""
    out: dict[str, Any] = {}
    weight, items = state.get("neighbours.weight"), state.get("neighbours.items")
    if hasattr(weight, "numel") and weight.numel() == 1:
        out["neighbour_weight"] = float(weight)
        out["neighbours"] = int(items.shape[1]) if hasattr(items, "dim") and items.dim() == 2 and items.numel() else 0
    scale = state.get("cold_scale")
    if hasattr(scale, "numel") and scale.numel() == 1:
        out["cold_scale"] = float(scale)
    return out


def inspect_export(path: Path) -> dict[str, Any]:
    """Summary of an `sdm export` directory."""
    spec = read_json(path / "user_tower.json", "a user tower spec")
    index = read_json(path / "index.json", "an index spec") if (path / "index.json").is_file() else None
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return {
        "kind": "export",
        "path": str(path),
        "finished": (path / "config.json").is_file(),
        "variant": spec.get("variant"),
        "embedding_dim": spec.get("embedding_dim"),
        "fingerprint": spec.get("fingerprint"),
        "inputs": _names(spec.get("inputs")),
        "outputs": _names(spec.get("outputs", [spec.get("output", {})])),
        "index": index,
        "onnx": "user_tower.onnx" in files,
        "files": files,
    }


def inspect_dir(path: Path) -> dict[str, Any]:
    """Summary of a shard, model or export directory.

    Raises:
        SdmError: a missing path, or a directory that is none of the three.
    """
    path = Path(path)
    if not path.exists():
        raise SdmError(f"{path}: not found")
    if not path.is_dir():
        raise SdmError(f"{path}: not a directory (sdm inspect reads a shard, model or export directory)")
    if (path / "manifest.json").is_file():
        return inspect_data(path)
    if (path / "user_tower.json").is_file():
        return inspect_export(path)
    if (path / "best.pt").is_file() or (path / "last.pt").is_file():
        return inspect_model(path)
    if (path / "partial-manifest.json").is_file():
        raise SdmError(
            f"{path}: a partial output of an older sdm (--bucket i/N), which this version no longer combines; "
            "rerun `sdm sessionize` (with --engine ray for several machines)"
        )
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise SdmError(f"{path}: not a shard, model or export directory (found: {found})")


def _fmt(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def format_summary(s: dict[str, Any]) -> str:
    """Plain-text report of `inspect_dir`'s dict."""
    lines = []
    if s["kind"] == "data":
        lines.append(f"shard directory {s['path']} (fingerprint {str(s['fingerprint'])[:12]}, created {s['created']})")
        lines.append(f"events: {_fmt(s['rows_in'])} in, {_fmt(s['rows_kept'])} kept; dropped: "
                     + (", ".join(f"{k} {_fmt(v)}" for k, v in s["dropped"].items() if v) or "none"))  # fmt: skip
        lines.append("| split | users | sessions | events | samples | shards |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, sp in s["splits"].items():
            lines.append(f"| {name} | {_fmt(sp.get('users'))} | {_fmt(sp.get('sessions'))} | {_fmt(sp.get('events'))} "
                         f"| {_fmt(sp.get('samples'))} | {_fmt(sp.get('shards'))} |")  # fmt: skip
        train = f"train {s['cutoffs']['train_start']}, " if s["cutoffs"].get("train_start") else ""
        lines.append(f"cutoffs: {train}valid {s['cutoffs'].get('valid_start')}, test {s['cutoffs'].get('test_start')}")
        lines.append(f"sessions: gap {s['gap']}, cut at {s['max_session_len']}; long-term {s['long_window']}, "
                     f"last {s['max_long_len']}")  # fmt: skip
        vs = s["vocab_sizes"]
        lines.append("item features: " + ", ".join(f"{f} ({_fmt(vs.get(f, '?'))})" for f in s["item_features"]))
        if s["table_features"]:
            lines.append("read from items.parquet by item (not stored per event): " + ", ".join(s["table_features"]))
        lines.append("user features: " + ", ".join(f"{f} ({_fmt(vs.get(f, '?'))})" for f in s["user_features"]))
        for what, t in s["side_tables"].items():
            lines.append(f"{what}: {t.get('path')}, {_fmt(t.get('rows'))} rows, {_fmt(t.get('duplicate_keys'))} "
                         f"duplicate keys, {100 * float(t.get('log_keys_found', 0)):.1f}% of the log's keys found")  # fmt: skip
        lines.append("(vocabulary sizes include padding and OOV)")
    elif s["kind"] == "model":
        mc = s.get("model_config", {})
        lines.append(f"model directory {s['path']}: {s.get('variant')}, D {mc.get('embedding_dim')}, "
                     f"repeat head {'on' if mc.get('repeat') else 'off'} (data fingerprint "
                     f"{str(s.get('data_fingerprint'))[:12]})")  # fmt: skip
        for name, c in s["checkpoints"].items():
            best = c.get("best_metric")
            best_s = f"{best:.4f}" if isinstance(best, float) else str(best)
            chosen = ""
            if c.get("neighbour_weight"):
                chosen += f", neighbour term weight {c['neighbour_weight']:g} ({c.get('neighbours')} per item)"
            elif "neighbour_weight" in c:
                chosen += ", neighbour term off"
            if c.get("cold_scale", 1.0) != 1.0:
                chosen += f", cold scale {c['cold_scale']:g}"
            lines.append(f"{name}: step {_fmt(c.get('step'))}, epoch {c.get('epoch')}, best {c.get('select_metric')} {best_s}, "
                         f"{_fmt(c.get('parameters'))} parameters{chosen}")  # fmt: skip
        iv = s.get("item_vocab") or {}
        lines.append("item features: " + ", ".join(f"{k} ({_fmt(v)})" for k, v in iv.items()))
        uv = s.get("user_vocab") or {}
        lines.append("user features: " + (", ".join(f"{k} ({_fmt(v)})" for k, v in uv.items()) or "none"))
        if "validations" in s:
            lines.append(f"validations logged: {s['validations']}"
                         + (f"; last: {json.dumps(s['last_validation'])[:200]}" if s.get("last_validation") else ""))  # fmt: skip
    else:
        from sdm.retrieval.index import describe

        lines.append(f"export directory {s['path']}: {s['variant']}, D {s['embedding_dim']}"
                     + ("" if s["finished"] else " (UNFINISHED: no config.json)"))  # fmt: skip
        lines.append("inputs: " + ", ".join(s["inputs"]))
        lines.append("outputs: " + ", ".join(s["outputs"]))
        lines.append("index: " + (describe(s["index"]) if s["index"] else "none (no faiss at export)"))
        lines.append(f"onnx: {'yes' if s['onnx'] else 'no'}")
        lines.append("files: " + ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in s["files"].items()))
    return "\n".join(lines)


def inspect_path(path: Path, as_json: bool = False) -> str:
    """`sdm inspect`'s output for `path`: text, or JSON with `as_json`.

    Raises:
        SdmError: what `inspect_dir` raises; a file whose values are not of the types sdm
            writes (an edited `config` or `model_config`) is a DataError naming the directory.
    """
    try:
        s = inspect_dir(path)
        return json.dumps(s, indent=2, default=str) if as_json else format_summary(s)
    except SdmError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: damaged: a value is not of the type sdm writes ({type(exc).__name__}: {first_line(exc)})") from None
