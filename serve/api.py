"""Python API for services: `Recommender.load(export_dir).recommend(events, k=...)`.

Loads an `sdm export` directory once (vocabularies, item vectors, the index and
the user tower: ONNX Runtime when `user_tower.onnx` and onnxruntime are there,
else `UserTower` rebuilt from this package's model code and the tensors of
`user_tower.weights.pt`), then turns raw events of one or many users into
recommendations:

1. `serve.sessions`: each user's latest session before `at` and its long-term
   window, with the sessionizer's own stage functions and the training vocabularies;
2. the exported tower: user vector (and, with a repeat head, the history candidates
   and their copy logits) after the session's last event;
3. `retrieval.rank.rank`: index top-K merged with the re-scored history candidates.

    >>> from sdm.serve import Recommender
    >>> rec = Recommender.load("runs/export")
    >>> rec.recommend([{"user_id": 7, "item_id": 123, "timestamp": datetime(...)}], k=10)

Events use the log schema the data was sessionized from (column names of its
config); a polars / pandas frame, a list of dicts or a dict of lists. The
result is a polars frame: `user_id`, `session_start`, `items` (raw ids, best
first), `scores`, one row per user.

Candidates: "vocabulary" (the default) ranks the items training saw, exactly as
before cold items existed. "catalogue" also ranks the cold items: the export's
(`item_vectors.parquet` rows with `cold` true: items with side info but no
training event) and those given to `add_items` since loading (known from the
moment they were added). A cold item is a candidate for a request at time `at`
(default: now) only when its `known_from` is null or <= `at`: the availability
rule of `sdm evaluate --candidates catalogue`, with the request's time as the
query's. `exclude_seen` drops the items of the current session, cold ones
included; `exclude_history` also those of the long-term window.

Safety: nothing in an export directory is unpickled (`user_tower.pt2` is never
loaded: `torch.export.load` unpickles, which runs code a crafted file holds).
Every file is checked as it is loaded: a missing, damaged or foreign one, or
files that do not fit each other (vector dims, index size, tower inputs), is one
`DataError` line naming the file; a bad argument (`k`, `at`, events, items) is a
`ConfigError`.

`add_items` changes the Recommender in place: do not call it while another
thread is inside `recommend` on the same object.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from sdm.errors import ConfigError, DataError, first_line
from sdm.model.neighbours import merge_candidates, neighbour_bonus
from sdm.model.repeat import NO_COPY
from sdm.pipeline.dataset import collate
from sdm.pipeline.tables import pad_values
from sdm.retrieval.index import Allowed
from sdm.retrieval.rank import rank
from sdm.serve.arguments import check_bool, check_choice, check_k, now_us, parse_at, to_frame
from sdm.serve.export import CONFIG, ITEM_VECTORS, ONNX_TOWER, TOWER_SPEC, WEIGHTS
from sdm.serve.export_reader import (
    check_features, importable, load_index, probe_tower, read_item_vectors, read_neighbours, read_spec, weights_state,
)  # fmt: skip
from sdm.serve.lookups import LOOKUPS, Lookups, read_json
from sdm.serve.newitems import read_new_items
from sdm.serve.runtime import OnnxTower, TorchTower, named_inputs
from sdm.serve.sessions import COLD, ColdItems, latest_sessions, open_frame
from sdm.sessionize.io import polars_errors

CANDIDATES = ("vocabulary", "catalogue")


class Recommender:
    """Recommendations from an export directory (see the module docstring).

    Use `Recommender.load`; the constructor takes the loaded parts.

    Attributes:
        num_items: V, the vocabulary size: item indices 2..V-1 are warm, V.. cold.
        raw_items: (V + C,) raw id of every item index (None for 0 and 1).
        item_vecs: (V + C, D) vectors by item index (rows 0, 1 zero).
        known_from: (C,) int64 us since epoch of each cold item (`ALWAYS` = known at all times).
        candidates: the default of `recommend(candidates=...)`.
    """

    def __init__(
        self, root: Path, lookups: Lookups, spec: dict[str, Any], tower: Any, index: Any, item_vecs: torch.Tensor,
        raw_items: np.ndarray, runtime: str, item_ids: pl.Series | None = None, known_from: np.ndarray | None = None,
        candidates: str = "vocabulary", neighbours: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> None:  # fmt: skip
        self.root = root
        self.neighbours = neighbours  # the neighbour term's (items, sims, weight), or None (`model/neighbours.py`)
        self.lookups = lookups
        self.spec = spec
        self.tower = tower
        self.index = index
        self.item_vecs = item_vecs
        self.raw_items = raw_items
        self.runtime = runtime
        self.candidates = candidates
        self.item_features = list(spec["item_features"])
        self.user_features = list(spec["user_features"])
        self.input_names = [i["name"] for i in spec["inputs"]]
        self.num_items = lookups.num_items
        self.item_col = str(lookups.config.get("item_col", "item_id"))
        self.item_ids = item_ids if item_ids is not None else pl.Series(self.item_col, list(raw_items[2:]))
        self.known_from = known_from if known_from is not None else np.zeros(0, dtype=np.int64)
        # side features of each cold item for the sessions' events: 0 = the events' own (`ColdItems`)
        self.cold_side = np.zeros((len(self.known_from), len(lookups.item_features)), dtype=np.int64)
        self.cold: ColdItems | None = None
        self.cold = self._cold_items()
        self._ids: set[Any] | None = None  # every known raw id, built on the first add_items
        self._model: Any = None  # the SDM whose item tower add_items runs

    @classmethod
    def load(
        cls, export_dir: Path | str, runtime: str = "auto", index: str = "auto", threads: int = 1,
        candidates: str = "vocabulary",
    ) -> Recommender:  # fmt: skip
        """Load an `sdm export` directory, checking every file it reads.

        Args:
            export_dir: the directory.
            runtime: "onnx", "torch" or "auto" (ONNX when user_tower.onnx and onnxruntime exist).
            index: "exact", "faiss" (items.faiss) or "auto" (faiss when the export has an
                approximate index and faiss is installed, else exact).
            threads: CPU threads of the tower (1 keeps a single request's latency lowest
                and leaves the other cores to other requests).
            candidates: the default of `recommend`'s `candidates`: "vocabulary" or "catalogue".

        Raises:
            ConfigError: an unknown runtime, index or candidates, threads < 1.
            DataError: not a finished export, the asked runtime / index missing, or a
                file missing, damaged or not fitting the others (naming the file).
        """
        check_choice("runtime", runtime, ("auto", "onnx", "torch"))
        check_choice("index", index, ("auto", "exact", "faiss"))
        check_choice("candidates", candidates, CANDIDATES)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        root = Path(export_dir)
        if not (root / CONFIG).is_file() or not (root / TOWER_SPEC).is_file():
            raise DataError(f"{root}: not a finished `sdm export` directory (no config.json / user_tower.json)")
        if not (root / LOOKUPS).is_file():
            raise DataError(f"{root}: no lookups.json; re-run `sdm export` with this version")
        read_json(root / CONFIG, "an sdm export config")
        spec = read_spec(root / TOWER_SPEC)
        lookups = Lookups.load(root)
        check_features(root / TOWER_SPEC, spec, lookups)
        names = [i["name"] for i in spec["inputs"]]
        onnx_path = root / ONNX_TOWER
        use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_path.is_file() and importable("onnxruntime"))
        if runtime == "onnx" and not (onnx_path.is_file() and importable("onnxruntime")):
            raise DataError(f"{root}: runtime onnx needs user_tower.onnx and onnxruntime (pip install 'sdm[onnx]')")
        torch.set_num_threads(threads)  # the torch tower and the exact index search
        if use_onnx:
            tower: Any = OnnxTower(onnx_path, threads, names)
        else:
            tower = TorchTower(root / WEIGHTS, names, lookups)
        d = int(spec["embedding_dim"])
        probe_tower(tower, spec, d)
        vecs, raw, ids, known = read_item_vectors(root / ITEM_VECTORS, d, lookups.num_items)
        idx = load_index(root, vecs, index)
        runtime = "onnx" if use_onnx else "torch"
        neighbours = None
        if "neighbours" in spec:  # the export chose the term: the torch tower holds the table, else read it
            state = tower.module.model.state_dict() if not use_onnx else weights_state(root / WEIGHTS)
            neighbours = read_neighbours(state, root / WEIGHTS, lookups.num_items)
        return cls(root, lookups, spec, tower, idx, torch.from_numpy(vecs), raw, runtime, ids, known, candidates,
                   neighbours)  # fmt: skip

    def recommend(
        self, events: Any, k: int = 10, at: dt.datetime | str | None = None, exclude_seen: bool = False,
        exclude_history: bool = False, candidates: str | None = None,
    ) -> pl.DataFrame:  # fmt: skip
        """Top-k items for every user of `events` (latest session before `at`, see the module docstring).

        Args:
            events: a polars / pandas frame, a list of dicts or a dict of lists (the log's columns).
            k: items per user (an integer >= 1; at most the candidates are returned).
            at: a datetime or an ISO 8601 string (naive = UTC): events at or after it are ignored,
                and cold items known after it are no candidates. Default: now.
            exclude_seen: never recommend items of the user's current session.
            exclude_history: never recommend items of the user's long-term window (the history
                before the session) either; implies exclude_seen.
            candidates: "vocabulary" (the items training saw) or "catalogue" (also the cold
                items known at `at`); default: the one given to `load`.

        Returns:
            polars frame: user_id, session_start (UTC), items (raw ids, best first), scores.

        Raises:
            ConfigError: a bad k, at, exclude_seen, exclude_history, candidates or events value.
            SdmError: events the training config cannot read (missing column, wrong type; a
                column of another kind than training's, such as a float user id, is a
                DataError naming it).
            DataError: an export file that fails at request time (naming it).
        """
        mode = self.candidates if candidates is None else candidates
        check_choice("candidates", mode, CANDIDATES)
        k = check_k(k)
        at_us = parse_at(at)
        seen = check_bool("exclude_seen", exclude_seen)
        history = check_bool("exclude_history", exclude_history)
        allowed, total = self._allowed(mode, at_us)
        k = min(k, total)
        frame = to_frame(events)
        # cold ids in the events matter to "catalogue" (exclusion), and added items' features to both
        cold = self.cold if self.cold is not None and (mode == "catalogue" or self.cold.side is not None) else None
        with polars_errors("events"):
            inp, missing = open_frame(self.lookups, frame)
            served = latest_sessions(inp, self.lookups, missing, at_us, cold=cold)
        user_type = frame.schema.get(inp.spec.user_key, pl.String)
        if not len(served):
            return _frame(served.user_id.cast(user_type), np.zeros(0, np.int64), [], [])
        extra = [COLD] if cold is not None else []
        batch = collate(served.arrays, self.item_features + extra, self.user_features)
        out = self.tower(named_inputs(batch, self.item_features, self.user_features))
        u = torch.from_numpy(out[0])
        exclude = _exclusion(batch, mode == "catalogue" and bool(extra), seen or history, history)
        cands = self._candidates(batch, out, mode == "catalogue" and bool(extra))
        if cands is not None:
            scores, items = rank(u, self.index, k, exclude, cands[0], cands[1], self.item_vecs, allowed=allowed,
                                 candidate_bonus=cands[2])  # fmt: skip
        else:
            scores, items = rank(u, self.index, k, exclude, allowed=allowed)
        ids = items.numpy()
        raw = [[self.raw_items[j] for j in row if j > 1] for row in ids]
        sc = [[float(s) for s, j in zip(srow, row) if j > 1] for srow, row in zip(scores.numpy(), ids)]
        return _frame(served.user_id, served.session_start, raw, sc)

    def _candidates(self, batch: dict[str, Any], out: list[np.ndarray],
                    cold: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
        """The items whose score is more than u . v_j (`retrieval.rank.rank`): the tower's history
        (items, copy logits) and the neighbour term's bonus items, or None for a plain dot product."""
        hist = (torch.from_numpy(out[1]), torch.from_numpy(out[2])) if len(out) == 3 else None
        if self.neighbours is None:
            return None if hist is None else (*hist, None)
        seq = batch["seq"]["item"].long()
        if cold:  # a cold event is its candidate index, as evaluation sees it: no neighbours either way
            seq = torch.where(batch["seq"][COLD] > 1, batch["seq"][COLD].long(), seq)
        qp = (batch["seq_len"].long() - 1).clamp(min=0)
        items, sims, weight = self.neighbours
        bonus = neighbour_bonus(items, sims, weight, seq, qp)
        return merge_candidates(hist[0] if hist else None, hist[1] if hist else None, *bonus, NO_COPY)

    def _allowed(self, mode: str, at_us: int | None) -> tuple[Allowed, int]:
        """The index rows a request may return (`retrieval.index.Allowed`), and how many.

        "vocabulary": the warm rows (all rows when there is no cold one: the search of
        an export without cold items). "catalogue": also each cold row whose `known_from`
        is <= `at_us` (default now).
        """
        warm, cold = self.num_items - 2, len(self.known_from)
        if mode == "vocabulary" or not cold:
            return (warm if cold else None), warm
        known = self.known_from <= (now_us() if at_us is None else at_us)
        n = int(np.count_nonzero(known))
        if n == cold:
            return None, warm + cold
        if n == 0:
            return warm, warm
        return np.concatenate([np.ones(warm, dtype=bool), known]), warm + n

    def add_items(self, items: Any) -> pl.DataFrame:
        """Give vectors to items added after export and put them in the index: candidates at once.

        Each is a cold item known from now (`candidates="catalogue"` returns it for requests
        at or after this call), its vector the item tower of its side features with the id
        part neutral, as export computes the catalogue's (`SDM.cold_item_vectors`, with the
        weights of user_tower.weights.pt: read on the first call under the ONNX runtime).
        A multi-valued feature's string ('Comedy|Romance') is split as sessionize split it
        (the data's separator) and its values' embeddings mean-pooled, as export pools the
        catalogue's. An event of it in a request's session is its candidate index
        (`exclude_seen`) and takes these side features where the events carry none (a
        multi-valued feature's first value), as an items table row would.

        Args:
            items: a polars / pandas frame, a list of dicts or a dict of lists: the data's item
                column (`item_col` of its sessionize config, e.g. "item_id") and raw side
                features, named as in the items table the data was sessionized with. A missing
                feature, a null, or a value its vocabulary lacks is 1 (unknown), as in training.

        Returns:
            polars frame: the item column and each side feature's index (1 = unknown; a
            multi-valued feature's first value), then `<f>_values`, the indices of all values
            of each multi-valued feature; one row per item.

        Raises:
            ConfigError: no item column, ids of another kind than the export's (strings for
                integer ids, floats, booleans: never cast), a null or repeated id, or an id the
                Recommender already knows (warm, cold, or added before: ids are never replaced),
                naming it; a column that is no side feature of the data (a misspelt one is
                not taken as unknown), a feature column of another kind than its vocabulary's
                raw values, a multi-valued feature that is not a string column.
            DataError: the weights file is missing or damaged.
        """
        if self._ids is None:
            self._ids = set(self.item_ids.to_list())
        new = read_new_items(to_frame(items, "items"), self.lookups, self.item_col, self.item_ids.dtype, self._ids)
        if len(new.ids):
            self._append(new.ids, new.side, self._cold_vectors(new.side, new.values))
        return new.table(self.lookups)

    def _cold_vectors(self, side: np.ndarray, lists: dict[str, pl.Series]) -> np.ndarray:
        """(A, D) float32 item-tower vectors of items with side features `side`, the value lists
        `lists` of the multi-valued ones, and no id."""
        model = self._item_model()
        cols = [self.lookups.item_features.index(f) for f in model.item_features[1:]]
        values = {f: torch.from_numpy(pad_values(v.to_arrow())) for f, v in lists.items()}
        try:
            with torch.no_grad():
                vecs = model.cold_item_vectors(torch.from_numpy(side[:, cols]), values)
        except (RuntimeError, IndexError) as exc:
            raise DataError(f"{self.root / WEIGHTS}: the item tower failed ({first_line(exc)})") from None
        return np.ascontiguousarray(vecs.float().numpy())

    def _item_model(self) -> Any:
        """The SDM of user_tower.weights.pt (the torch tower's own; read once under ONNX)."""
        if self._model is None:
            tower = self.tower if isinstance(self.tower, TorchTower) else None
            tower = tower or TorchTower(self.root / WEIGHTS, self.input_names, self.lookups)
            self._model = tower.module.model
        return self._model

    def _append(self, ids: pl.Series, side: np.ndarray, vecs: np.ndarray) -> None:
        """Add cold rows: the index first (the step that may fail), then every lookup."""
        self.index.add(vecs)
        self.item_vecs = torch.cat([self.item_vecs, torch.from_numpy(vecs)])
        self.raw_items = np.concatenate([self.raw_items, _objects(ids.to_list())])
        self.item_ids = pl.concat([self.item_ids, ids.alias(self.item_ids.name)])
        self.known_from = np.concatenate([self.known_from, np.full(len(ids), now_us(), dtype=np.int64)])
        self.cold_side = np.concatenate([self.cold_side, side])
        if self._ids is not None:
            self._ids.update(ids.to_list())
        self.cold = self._cold_items()

    def _cold_items(self) -> ColdItems | None:
        """Raw id -> candidate index of every cold row, for the sessions' events (None without cold rows)."""
        if self.cold is not None:  # `serve.sessions` caches lookups by the vocabulary's id(): drop the old one's
            self.lookups.row_of.pop(id(self.cold.vocab), None)
        n = len(self.known_from)
        if not n:
            return None
        vocab = pl.DataFrame(
            {"raw": self.item_ids.slice(self.num_items - 2), "index": np.arange(self.num_items, self.num_items + n)}
        )
        return ColdItems(vocab, self.cold_side if self.cold_side.any() else None)


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-d object array of `values` (np.array would nest tuples or lists)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _exclusion(batch: dict[str, Any], cold: bool, seen: bool, history: bool) -> torch.Tensor | None:
    """(B, X) item indices never to return: the session's (`seen`) and the long-term window's (`history`).

    With `cold`, an event of a cold item is its candidate index (`serve.sessions.COLD`), not OOV.
    """
    if not seen:
        return None

    def items(side: str) -> torch.Tensor:
        x = batch[side]["item"]
        return torch.where(batch[side][COLD] > 1, batch[side][COLD].long(), x.long()) if cold else x

    seq = items("seq")
    return torch.cat([seq, items("long").to(seq.dtype)], 1) if history else seq


def _frame(user_id: pl.Series, start: np.ndarray, items: list[list[Any]], scores: list[list[float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": user_id,
            "session_start": pl.Series(start, dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
            "items": items,
            "scores": pl.Series(scores, dtype=pl.List(pl.Float32)),
        }
    )
