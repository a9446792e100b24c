"""The ranking engine behind `sdm evaluate` and validation: full-ranking top-K metrics of a
model or baseline on held-out sessions (SPEC section 6).

Queries: every position t >= 2 of every session of the split. The user vector
at 0-based position p = t - 2 (after reading i_1 .. i_{t-1}) predicts y = i_t,
with target set G = distinct(i_t .. i_m). Candidates are every item of the
training vocabulary (padding and OOV masked), ranked exactly by chunked top-K
(`metrics.chunked_topk`) or approximately by a faiss index.

With `candidates="catalogue"` the cold items of the data directory's catalogue
(`pipeline/catalogue.py`) follow the vocabulary as candidates V .. V + C - 1: an
OOV event whose `seq_oov` hash is a cold item becomes that index (in the target,
the target set and the prefix), a cold item is scored only while the catalogue
knows it (the availability rule) and the metrics are also reported on the
queries whose target is a cold item and on those whose target is a warm one
(in the vocabulary).

Models and baselines are *scorers* (`pipeline/scoring.py`): they go through the
same top-K, masking, metric and dump code here (the dump's rows: `pipeline/topkdump.py`).
The command that writes the reports is `pipeline/evaluate.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdm.errors import ConfigError, SdmError
from sdm.pipeline.catalogue import Catalogue, CatalogueSessions, read_catalogue
from sdm.pipeline.dataset import SessionDataset, move_batch, read_manifest
from sdm.pipeline.metrics import METRICS, chunked_topk, metric_sums, overlap_at_k
from sdm.pipeline.scoring import Candidates, ModelScorer, Queries, Scorer
from sdm.pipeline.topkdump import TopkWriter, raw_items
from sdm.retrieval.index import FaissIndex

# At most this many float32 scores (256 MiB) exist at once: query chunk x item chunk.
MAX_SCORES = 1 << 26
QUERY_CHUNK = 4096


def evaluate_model(
    scorer: Scorer | torch.nn.Module,
    data_dir: Path,
    split: str,
    ks: list[int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    exclude_seen: bool = False,
    dump_topk: Path | None = None,
    progress: bool = False,
    index: str = "exact",
    dump_k: int | None = None,
    candidates: str = "vocabulary",
    exclude_history: bool = False,
    cold_factors: tuple[float, ...] = (),
    bonus_weights: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Mean SPEC-6 metrics of a model or baseline over every query of a split.

    Args:
        scorer: an SDM model (wrapped in `ModelScorer`) or a baseline scorer.
        data_dir: shard directory.
        split: "valid" or "test".
        ks: cut-offs K; a K beyond the catalogue pads the list with "no item".
        batch_size: sessions per batch (queries are further chunked).
        device: where the model and the scores live (baselines score on CPU).
        exclude_seen: mask each query's prefix items.
        dump_topk: write one row per query (raw ids, the top `dump_k`, default the largest K) to this Parquet file.
        progress: show a progress bar.
        index: "exact" or "faiss" (vector models only; adds `faiss_recall@K`
            against exact search on the same queries).
        candidates: "vocabulary", or "catalogue": also the data directory's cold items while
            they are known (`Candidates`); adds "cold_items", "cold_target_share" and
            "targets": {"cold": {...}, "warm": {...}}, each "queries" and every metric on the
            queries whose target is a cold / a vocabulary item.
        exclude_history: also mask the items of each query's long-term window (implies exclude_seen).
        cold_factors: with a model and `candidates="catalogue"`, also rank with the cold vectors
            times each factor, in the same pass (the user vectors are computed once); adds
            "cold_factors": [the result of each factor, without "table"].
        bonus_weights: with a model whose neighbour term is active, also rank with its bonus
            times each weight, in the same pass; adds "bonus_weights": [the result of each].
            With the table's weight at 1 this ranks every weight of a grid from one set of
            user vectors (`pipeline/neighbourweight.py`).

    Returns:
        {"hr@K", "recall@K", "precision@K", "f1@K", "ndcg@K", "mrr@K" for each K,
        "queries", "sessions", "users", "oov_target_share" (targets outside the vocabulary),
        "name", "split", "fingerprint", "index", "candidates"}; metrics are 0 when there are no queries.

    Raises:
        ConfigError: faiss with catalogue candidates. SdmError / DataError: as the readers.
    """
    device = torch.device(device)
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    ks = sorted(set(int(k) for k in ks))
    catalogue = read_candidates(data_dir, manifest, candidates, index)
    module = scorer if isinstance(scorer, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            if module is not None:
                scorer = ModelScorer(module, catalogue=catalogue)
            faiss_index = None
            if index == "faiss":
                if not isinstance(scorer, ModelScorer):
                    raise SdmError("--index faiss needs a model; baselines are always scored exactly")
                faiss_index = FaissIndex(scorer.items, announce=progress)
            elif index != "exact":
                raise SdmError(f"unknown index {index!r}; expected 'exact' or 'faiss'")
            cands = Candidates(int(manifest["num_items"]), catalogue, device, exclude_seen, exclude_history)
            passes = _passes(scorer, catalogue, cold_factors, bonus_weights)
            sums, counts, users = _run(
                scorer, data_dir, manifest, split, ks, batch_size, device, cands, dump_topk, dump_k, progress,
                faiss_index, passes,
            )  # fmt: skip
    finally:
        if module is not None and was_training:
            module.train()
    out = _results(scorer.name, split, manifest, ks, sums, counts, users, index, catalogue, faiss_index is not None)
    for p in passes[1:]:
        key, name, value = ("cold_factors", "factor", p.cold) if p.cold is not None else ("bonus_weights", "weight", p.bonus)
        more = _results(scorer.name, split, manifest, ks, sums, counts, users, index, catalogue, False, p.prefix)
        out.setdefault(key, []).append({name: value, **more})
    return out


@dataclass(frozen=True)
class Pass:
    """One ranking of each query chunk (`_rank`): the scorer as built (all None), its cold
    vectors times `cold`, or its neighbour bonus times `bonus`; sums go under `prefix`."""

    prefix: str = ""
    cold: float | None = None
    bonus: float | None = None

    def apply(self, scorer: Any) -> None:
        if self.cold is not None:
            scorer.rescale_cold(self.cold)
        if self.bonus is not None:
            scorer.bonus_scale = self.bonus


def _passes(scorer: Any, catalogue: Catalogue | None, cold_factors: tuple[float, ...],
            bonus_weights: tuple[float, ...]) -> tuple[Pass, ...]:  # fmt: skip
    """The passes of `_run`: the scorer as built, then each cold factor, then each bonus weight.

    Raises:
        ConfigError: cold factors without cold candidates or without a model; bonus weights
            without a model whose neighbour term is active.
    """
    model = isinstance(scorer, ModelScorer)
    if cold_factors and (catalogue is None or not model):
        raise ConfigError("cold factors need a model and candidates='catalogue'")
    if bonus_weights and not (model and scorer.has_bonus):
        raise ConfigError("bonus weights need a model with an active neighbour term")
    return (
        Pass(),
        *(Pass(f"x{f}/", cold=f) for f in cold_factors),
        *(Pass(f"w{w}/", bonus=w) for w in bonus_weights),
    )


def read_candidates(data_dir: Path, manifest: dict[str, Any], candidates: str, index: str) -> Catalogue | None:
    """The catalogue for `candidates="catalogue"` (None for the vocabulary).

    Raises:
        ConfigError: catalogue with the faiss index (its item index holds the vocabulary
            only: evaluate cold candidates with the exact index), or an unknown value.
    """
    if candidates == "vocabulary":
        return None
    if candidates != "catalogue":
        raise ConfigError(f"unknown candidates {candidates!r}; expected 'vocabulary' or 'catalogue'")
    if index == "faiss":
        raise ConfigError("--candidates catalogue ranks with the exact index only; drop --index faiss")
    return read_catalogue(data_dir, manifest)


def _results(
    name: str, split: str, manifest: dict[str, Any], ks: list[int], sums: dict[str, float], counts: dict[str, int],
    users: int, index: str, catalogue: Catalogue | None, faiss: bool, prefix: str = "",
) -> dict[str, Any]:  # fmt: skip
    """`evaluate_model`'s result from the loop's sums (keys under `prefix`) and counts."""
    n = counts["queries"]
    out: dict[str, Any] = {"name": name, "split": split, "fingerprint": manifest.get("fingerprint")}
    out.update(_means(sums, n, ks, prefix))
    if faiss:
        for k in ks:
            out[f"faiss_recall@{k}"] = sums[f"faiss_recall@{k}"] / n if n else 0.0
    out.update(
        queries=n,
        sessions=counts["sessions"],
        users=users,
        oov_target_share=counts["oov"] / n if n else 0.0,
        index=index,
        candidates="vocabulary" if catalogue is None else "catalogue",
    )
    if catalogue is not None:
        out["cold_items"] = len(catalogue)
        out["cold_target_share"] = counts["cold"] / n if n else 0.0
        out["targets"] = {
            kind: {"queries": counts[kind], **_means(sums, counts[kind], ks, f"{prefix}{kind}/")} for kind in ("cold", "warm")
        }
    return out


def _means(sums: dict[str, float], n: int, ks: list[int], prefix: str = "") -> dict[str, float]:
    """Every metric at every K: the sums of keys `prefix + "hr@K"` ... over n queries (0 when n is 0)."""
    return {f"{m}@{k}": sums.get(f"{prefix}{m}@{k}", 0.0) / n if n else 0.0 for k in ks for m in METRICS}


def _add(sums: dict[str, float], more: dict[str, float], prefix: str = "") -> None:
    for key, v in more.items():
        sums[prefix + key] = sums.get(prefix + key, 0.0) + v


def _run(
    scorer: Any,
    data_dir: Path,
    manifest: dict[str, Any],
    split: str,
    ks: list[int],
    batch_size: int,
    device: torch.device,
    cands: Candidates,
    dump_topk: Path | None,
    dump_k: int | None,
    progress: bool,
    faiss_index: FaissIndex | None,
    passes: tuple[Pass, ...] = (Pass(),),
) -> tuple[dict[str, float], dict[str, int], int]:
    """The evaluation loop: returns metric sums, counts and the number of distinct users.

    Each batch's user vectors are computed once and ranked once per entry of `passes` (`_rank`).
    """
    dataset = CatalogueSessions if cands.catalogue is not None else SessionDataset
    ds = dataset(data_dir, split, batch_size, shuffle=False, manifest=manifest)
    writer = TopkWriter(Path(dump_topk), raw_items(data_dir, cands.num_items, cands.catalogue)) if dump_topk else None
    sums: dict[str, float] = {}
    counts = {"queries": 0, "sessions": 0, "oov": 0, "cold": 0, "warm": 0}
    seen_users: set[str] = set()
    batches: Any = ds
    if progress:
        from tqdm import tqdm

        total = manifest["splits"][split].get("sessions")
        batches = tqdm(ds, desc=f"evaluate {scorer.name} on {split}", unit="session", unit_scale=batch_size,
                       total=math.ceil(total / batch_size) if total else None, dynamic_ncols=True)  # fmt: skip
    ok = False
    try:
        for batch in batches:
            batch = move_batch(batch, device)
            cands.prepare(batch)
            queries = cands.queries(batch)
            counts["sessions"] += int(batch["seq_len"].shape[0])
            seen_users.update(batch["user_id"])
            if not len(queries):
                continue
            state = scorer.begin_batch(batch)
            _rank(scorer, state, queries, batch, cands, ks, faiss_index, sums, counts, writer, dump_k, passes)
        ok = True
    finally:
        if writer is not None:
            writer.close(ok)
    return sums, counts, len(seen_users)


def _rank(
    scorer: Any, state: Any, queries: Queries, batch: dict[str, Any], cands: Candidates, ks: list[int],
    faiss_index: FaissIndex | None, sums: dict[str, float], counts: dict[str, int], writer: TopkWriter | None,
    dump_k: int | None, passes: tuple[Pass, ...],
) -> None:  # fmt: skip
    """Rank a batch's queries once per entry of `passes` (`_run`), from one set of scores per query
    chunk (the repeat head's copy scores and the neighbour bonus included), and add their metrics
    to `sums`: the first pass's (the scorer as built) as the result, the others under their prefix."""
    k_max = ks[-1]
    for start in range(0, len(queries), QUERY_CHUNK):
        q = queries.take(slice(start, start + QUERY_CHUNK))
        exclude = cands.exclude(batch, q)
        chunk_items = max(1024, MAX_SCORES // len(q))
        score = cands.score_fn(scorer, state, q, batch)  # reads the scorer's item vectors when called
        for p in passes:
            p.apply(scorer)
            topk = chunked_topk(score, cands.total, k_max, chunk_items, exclude).to(q.target.device)
            if p.prefix:
                _add_metrics(sums, q, topk, ks, cands, p.prefix)
                continue
            if faiss_index is not None:
                approx = scorer.index_topk(faiss_index, state, q, k_max, exclude).to(topk.device)
                for k in ks:
                    key = f"faiss_recall@{k}"
                    sums[key] = sums.get(key, 0.0) + float(overlap_at_k(approx[:, :k], topk[:, :k]).sum())
                topk = approx
            _add_metrics(sums, q, topk, ks, cands, "", counts)
            if writer is not None:
                writer.write(batch, q, topk[:, : dump_k or k_max])
        if len(passes) > 1:
            scorer.as_built()


def _add_metrics(
    sums: dict[str, float], q: Queries, topk: Tensor, ks: list[int], cands: Candidates, prefix: str,
    counts: dict[str, int] | None = None,
) -> None:  # fmt: skip
    """Add the metric sums of `topk` (all targets, then cold and warm ones) under `prefix`; count the queries into `counts`."""
    _add(sums, metric_sums(topk, q.target, q.targets, ks), prefix)
    for kind, mask in cands.target_kinds(q).items():
        if mask.any():
            if counts is not None:
                counts[kind] += int(mask.sum())
            _add(sums, metric_sums(topk[mask], q.target[mask], q.targets[mask], ks), f"{prefix}{kind}/")
    if counts is not None:
        counts["queries"] += len(q)
        counts["oov"] += int(cands.out_of_vocabulary(q).sum())
