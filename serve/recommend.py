"""`sdm recommend LOG`: top-K items for every user of a log, from the user's latest session.

For each user: the latest session starting before `--at` (events at or after it
are ignored) and its long-term window, built by the sessionizer's own code with
the training vocabularies (`serve.sessions`), then scored by **the code of
`sdm evaluate`**: `pipeline.dataset.collate` makes the batch,
`pipeline.scoring.ModelScorer` gives the user vectors and the score function
(whatever it adds to the dot product, e.g. a repeat head), and
`pipeline.metrics.chunked_topk` takes the top K with the same masking. So the
list for a session prefix is the list `sdm evaluate --dump-topk` gives for the
query at its end (tested). With `--index faiss` the user vectors go through
`retrieval.rank.rank` over a `retrieval.index.FaissIndex` instead.

Candidates: `--candidates vocabulary` (the default) ranks the items training saw.
`--candidates catalogue` also ranks the cold items of the data directory's
`catalogue.parquet` (`pipeline/catalogue.py`), after the vocabulary: those known at
`--at` (default: now), i.e. whose `known_from` is null or <= it, the availability
rule of `sdm evaluate --candidates catalogue` with the request's time as the
query's. Their vectors come from their side features (`ModelScorer` with the
catalogue), and an event of a cold item in a session is its candidate index for
`--exclude-seen` and the repeat head (batch key `copy_items`), as in evaluation.
`--exclude-history` also excludes the long-term window's items.

Memory: users are hash-partitioned into buckets of about `bucket_events`
events (the sessionizer's `bucket_expr`; the log is split by bucket in one
streaming pass, `sessionize.read.split_log`, into a scratch folder next to the output), each
bucket is sessionized on its own and scored in batches of `batch_size` users, and
the output is streamed to a temporary Parquet file renamed into place at the end.

Output: `outputs.OutputFile` refuses an `--out` that is the log, the data or model
directory or the items table (or lies inside one), locks it against a second run,
and removes the scratch (`.sdm-tmp-*-<name>`: the temporary Parquet file, the
bucket split) that a killed run left beside it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from sdm.config import RecommendConfig
from sdm.errors import ConfigError
from sdm.outputs import OutputFile, atomic_path, check_disjoint, scratch_name, side_config, write_text
from sdm.pipeline.catalogue import Catalogue
from sdm.pipeline.dataset import collate, move_batch, read_manifest
from sdm.pipeline.device import pick_device
from sdm.pipeline import topkdump
from sdm.pipeline.checkpoint import load_model
from sdm.pipeline.ranking import MAX_SCORES, QUERY_CHUNK
from sdm.pipeline.scoring import ModelScorer
from sdm.manifest import verify_files
from sdm.pipeline.metrics import chunked_topk
from sdm.sessionize.io import polars_errors
from sdm.sessionize.times import to_utc_us
from sdm.serve.arguments import now_us
from sdm.serve.lookups import Lookups
from sdm.serve.sessions import COLD, ColdItems, Served, bucketed, open_log, take


def session_queries_last(batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(qb, qp, prefix): one query per session, at its last event; prefix = the whole session."""
    items = batch["seq"]["item"]
    seq_len = batch["seq_len"]
    qb = torch.arange(items.shape[0], device=items.device)
    qp = (seq_len - 1).clamp(min=0)
    pos = torch.arange(items.shape[1], device=items.device)
    prefix = torch.where(pos.unsqueeze(0) <= qp.unsqueeze(1), items, torch.zeros_like(items))
    return qb, qp, prefix


def gather_scores(fn: Any, topk: Tensor, num_items: int, chunk_items: int) -> Tensor:
    """Scores of the chosen items, from the same score function (one more pass over the chunks)."""
    out = torch.full(topk.shape, float("-inf"), device=topk.device)
    for start in range(0, num_items, chunk_items):
        end = min(start + chunk_items, num_items)
        sel = (topk >= start) & (topk < end) & (topk > 1)
        if not bool(sel.any()):
            continue
        s = fn(start, end).float().to(topk.device)  # (Q, C)
        out = torch.where(sel, s.gather(1, (topk - start).clamp(0, end - start - 1)), out)
    return out


def cold_events(batch: dict[str, Any]) -> None:
    """Give events of cold candidates their candidate index (`serve.sessions.COLD`, 1 = none), in place.

    As `batch["copy_items"]` (`SDM.forward`: the repeat head's candidates), which `score_batch`
    also takes the queries' prefixes and the excluded items from; the model's inputs stay the
    item indices training used (a cold item is OOV, 1, for the user tower).
    """
    seq, long = batch["seq"].pop(COLD), batch["long"].pop(COLD)
    batch["copy_items"] = {
        "seq": torch.where(seq > 1, seq.long(), batch["seq"]["item"].long()),
        "long": torch.where(long > 1, long.long(), batch["long"]["item"].long()),
    }


def excluded(batch: dict[str, Any], prefix: Tensor, qb: Tensor, history: bool) -> Tensor:
    """(Q, X) items never to return: the session prefix, and with `history` the long-term window too."""
    if not history:
        return prefix
    long = batch["copy_items"]["long"] if "copy_items" in batch else batch["long"]["item"]
    return torch.cat([prefix, long[qb].to(prefix.dtype)], dim=1)


def score_batch(
    scorer: ModelScorer, batch: dict[str, Any], k: int, num_items: int, exclude_seen: bool, faiss_index: Any = None,
    exclude_history: bool = False,
) -> tuple[Tensor, Tensor]:
    """(items (B, k), scores (B, k)) for the last position of every session of a batch.

    `num_items`: the candidates, indices 0 .. num_items - 1 (the vocabulary's V, or V + C
    with cold items; `cold_events` then gave the batch their indices).
    """
    # queries and prefixes over candidate indices; the model reads the batch as training did
    view = {**batch, "seq": {**batch["seq"], "item": batch["copy_items"]["seq"]}} if "copy_items" in batch else batch
    qb_all, qp_all, prefix_all = session_queries_last(view)
    state = scorer.begin_batch(batch)
    items, scores = [], []
    for start in range(0, len(qb_all), QUERY_CHUNK):
        sl = slice(start, start + QUERY_CHUNK)
        qb, qp, prefix = qb_all[sl], qp_all[sl], prefix_all[sl]
        exclude = excluded(batch, prefix, qb, exclude_history) if exclude_seen or exclude_history else None
        if faiss_index is not None:
            s, top = scorer.index_rank(faiss_index, state, qb, qp, prefix, k, exclude)
        else:
            fn = scorer.score_fn(state, qb, qp, prefix)
            chunk_items = max(1024, MAX_SCORES // len(qb))
            kept: list[Tensor] = []

            def keep(start: int, end: int, fn: Any = fn) -> Tensor:
                out = fn(start, end)
                if start == 0 and end == num_items:
                    kept.append(out)  # the whole catalogue in one chunk: its scores are all there
                return out

            top = chunked_topk(keep, num_items, k, chunk_items, exclude).to(qb.device)
            if kept:
                # chunked_topk masks padding / excluded items in place; the chosen ones keep their scores
                s = kept[0].float().to(top.device).gather(1, top)
                s = torch.where(top > 1, s, torch.full_like(s, float("-inf")))
            else:
                s = gather_scores(fn, top, num_items, chunk_items)  # a second pass over the chunks
            del kept
        items.append(top.cpu())
        scores.append(s.float().cpu())
    return torch.cat(items), torch.cat(scores)


class _Writer:
    """Streams the output rows into `tmp` (a scratch name beside the output, see `outputs.atomic_path`)."""

    def __init__(self, tmp: Path, raw_items: pa.Array, user_type: pa.DataType) -> None:
        self.raw = raw_items
        self.schema = pa.schema(
            [
                ("user_id", user_type),
                ("session_start", pa.timestamp("us", tz="UTC")),
                ("items", pa.list_(raw_items.type)),
                ("scores", pa.list_(pa.float32())),
            ]
        )
        self.writer = pq.ParquetWriter(tmp, self.schema)
        self.rows = 0

    def write(self, served: Served, items: Tensor, scores: Tensor) -> None:
        top = items.numpy()
        keep = top > 1  # 0 = "no item" (fewer than k left), at the end of a row
        counts = keep.sum(1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        flat_items = self.raw.take(pa.array(top[keep]))
        flat_scores = pa.array(scores.numpy()[keep].astype(np.float32))
        cols = [
            served.user_id.to_arrow().cast(self.schema.field("user_id").type),
            pa.array(served.session_start, pa.timestamp("us", tz="UTC")),
            pa.ListArray.from_arrays(offsets, flat_items),
            pa.ListArray.from_arrays(offsets, flat_scores),
        ]
        self.writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))
        self.rows += len(top)

    def close(self) -> None:
        self.writer.close()


def available_cold(data_dir: Path, manifest: dict[str, Any], at_us: int | None) -> Catalogue | None:
    """The data directory's cold items known at `at_us` (default now), in catalogue order; None when none is.

    A data directory without a catalogue (an older sdm) has no cold items. Their ids
    take the item vocabulary's type (the output's `items` column holds both).

    Raises:
        DataError: a damaged catalogue (`pipeline.catalogue.read_catalogue`) or item vocabulary.
    """
    from sdm.pipeline.tables import raw_item_ids
    from sdm.serve.export import read_cold

    cat = read_cold(Path(data_dir), manifest, raw_item_ids(Path(data_dir), int(manifest["num_items"])))
    if cat is None:
        return None
    keep = np.flatnonzero(cat.known_from <= (now_us() if at_us is None else at_us))
    if not len(keep):
        return None
    features = {f: v[keep] for f, v in cat.features.items()}
    return Catalogue(cat.num_items, cat.item_id.take(pa.array(keep)), cat.oov_hash[keep], cat.known_from[keep], features)


def cold_items(catalogue: Catalogue | None) -> ColdItems | None:
    """Raw id -> candidate index (V + j) of the cold candidates, for the sessions' events."""
    if catalogue is None:
        return None
    ids = pl.Series("raw", catalogue.item_id)
    index = np.arange(catalogue.num_items, catalogue.num_items + len(catalogue), dtype=np.int64)
    return ColdItems(pl.DataFrame({"raw": ids, "index": index}))


def recommend(cfg: RecommendConfig, log: Path, progress: bool = False) -> dict[str, Any]:
    """Write the top-`cfg.k` items of every user of `log` to `cfg.out` (see the module docstring).

    The output is guarded by `outputs.OutputFile`: refused when it is (or lies in,
    or holds) the log, the data or model directory or the items table, or when
    another sdm process writes it; the Parquet file and its `.config.json` are each
    written under a scratch name and renamed into place, so a reader (and a killed
    run) never leaves half a file.

    Returns:
        Summary: out, users, k, index, buckets, dropped (rows of the log left out, by reason:
        null_user, null_item, null_timestamp, behavior, duplicate; only those that occurred),
        seconds.

    Raises:
        SdmError: missing or foreign model, a log the training config cannot read, K
            beyond the catalogue, an output that overlaps an input or exists without
            overwrite (OutputError), another run writing it (LockedError), a failed
            write (StorageError), faiss missing.
    """
    out = Path(cfg.out)
    inputs = {"log": log, "data directory": cfg.data, "model directory": cfg.model, "items table": cfg.items}
    check_disjoint(side_config(out), inputs)
    with OutputFile(out, "recommend", overwrite=cfg.overwrite, inputs=inputs):
        summary = _recommend(cfg, Path(log), out, progress)
        write_text(side_config(out), cfg.model_dump_json(indent=2) + "\n")
    return summary


def _recommend(cfg: RecommendConfig, log: Path, out: Path, progress: bool) -> dict[str, Any]:
    """`recommend` once the output is locked: read and check everything, then stream the output."""
    t0 = time.time()
    manifest = read_manifest(cfg.data)
    if getattr(cfg, "verify", True):
        verify_files(cfg.data, manifest)  # every data file against its recorded sha256
    num_items = int(manifest["num_items"])
    at_us = to_utc_us(cfg.at) if cfg.at is not None else None
    catalogue = available_cold(cfg.data, manifest, at_us) if cfg.candidates == "catalogue" else None
    total = num_items + (len(catalogue) if catalogue is not None else 0)  # candidate indices 0 .. total - 1
    if cfg.k > total - 2:
        what = f"{total - 2} items" + (" with the cold ones known at --at" if cfg.candidates == "catalogue" else "")
        raise ConfigError(f"--k {cfg.k} is larger than the catalogue of {cfg.data} ({what})")
    device = pick_device(cfg.device)
    model = load_model(cfg.model, cfg.data, manifest, device)
    lookups = Lookups.load(cfg.data)
    inp, missing = open_log(lookups, log, cfg.items)
    with polars_errors(str(log)):
        n_rows = inp.lf.select(pl.len()).collect().item()
    buckets = max(1, math.ceil(n_rows / cfg.bucket_events))
    cold = cold_items(catalogue)
    features = model.item_features + ([COLD] if cold is not None else [])

    with torch.no_grad():
        scorer = ModelScorer(model, catalogue=catalogue) if catalogue is not None else ModelScorer(model)
        faiss_index = None
        if cfg.index == "faiss":
            from sdm.retrieval.index import FaissIndex

            faiss_index = FaissIndex(scorer.items, announce=progress)
        user_type = pa.string()
        if inp.spec.user_key in inp.schema:
            user_type = pl.DataFrame(schema={"u": inp.schema[inp.spec.user_key]}).to_arrow().schema.field("u").type
        raw_items = topkdump.raw_items(cfg.data, num_items)
        if catalogue is not None:
            raw_items = pa.concat_arrays([raw_items, catalogue.item_id])
        from tqdm import tqdm

        bar = tqdm(desc="recommend", unit="user", dynamic_ncols=True, disable=not progress)
        dropped: dict[str, int] = {}  # rows left out, by reason, as the sessionizer counts them
        with bar, atomic_path(out) as tmp, polars_errors(str(log)):
            writer = _Writer(tmp, raw_items, user_type)
            try:
                for served in bucketed(inp, lookups, missing, at_us, buckets, scratch_name(out), cold):
                    for reason, n in served.dropped.items():
                        dropped[reason] = dropped.get(reason, 0) + n
                    for start in range(0, len(served), cfg.batch_size):
                        part = take(served, slice(start, start + cfg.batch_size))
                        batch = move_batch(collate(part.arrays, features, model.user_features), device)
                        if cold is not None:
                            cold_events(batch)
                        items, scores = score_batch(scorer, batch, cfg.k, total, cfg.exclude_seen, faiss_index,
                                                    cfg.exclude_history)  # fmt: skip
                        writer.write(part, items, scores)
                        bar.update(len(part))
            finally:
                writer.close()
    return {
        "out": str(out),
        "users": writer.rows,
        "k": cfg.k,
        "index": cfg.index if faiss_index is None else f"faiss {faiss_index.params['kind']}",
        "candidates": cfg.candidates,
        "cold_items": len(catalogue) if catalogue is not None else 0,
        "buckets": buckets,
        "dropped": dropped,
        "seconds": time.time() - t0,
    }
