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
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdm.errors import ConfigError, DataError, SdmError
from sdm.model.neighbours import merge_candidates, neighbour_bonus
from sdm.model.sdm import NO_COPY
from sdm.names import vocab_file
from sdm.pipeline.catalogue import ALWAYS
from sdm.pipeline.dataset import collate, pad_values, user_column
from sdm.serve.export import CONFIG, FAISS_INDEX, INDEX_SPEC, ITEM_VECTORS, LOOKUPS, ONNX_TOWER, TOWER_SPEC, WEIGHTS
from sdm.retrieval.index import Allowed, ExactIndex, FaissIndex
from sdm.retrieval.rank import rank
from sdm.serve.sessions import COLD, ColdItems, Lookups, first_line, latest_sessions, now_us, open_frame, read_json
from sdm.serve.user_tower import load_tower
from sdm.sessionize.encode import encode, encode_values, fill_empty
from sdm.sessionize.io import feat_col, polars_errors, to_utc_us, values_col
from sdm.sessionize.normalise import split_values

INT64 = (-(2**63), 2**63 - 1)
CANDIDATES = ("vocabulary", "catalogue")


def to_frame(events: Any, what: str = "events") -> pl.DataFrame:
    """A polars DataFrame from a polars/pandas frame, a list of dicts or a dict of lists.

    Raises:
        ConfigError: anything else, rows polars cannot put in one frame, or integers beyond int64
            (naming `what`, the argument).
    """
    if isinstance(events, pl.LazyFrame):
        with polars_errors(what):
            events = events.collect()
    if isinstance(events, pl.DataFrame):
        return _check_int64(events, what)
    try:
        if type(events).__module__.startswith("pandas"):
            return _check_int64(pl.from_pandas(events), what)
        if isinstance(events, (list, tuple, dict)):
            return _check_int64(pl.DataFrame(events), what)
    except (pl.exceptions.PolarsError, pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, SdmError):
            raise
        raise ConfigError(f"{what}: not one table ({first_line(exc)})") from None
    raise ConfigError(
        f"{what}: expected a polars or pandas frame, a list of dicts or a dict of lists, got {type(events).__name__}"
    )


def _check_int64(frame: pl.DataFrame, what: str = "events") -> pl.DataFrame:
    """Refuse integer columns holding values beyond int64 (ids sdm's tables cannot hold)."""
    for name, dtype in frame.schema.items():
        if dtype in (pl.Int128, pl.UInt64, pl.UInt128) and frame.height:
            col = frame.get_column(name).drop_nulls()
            if len(col) and (col.min() < INT64[0] or col.max() > INT64[1]):
                bad = col.max() if col.max() > INT64[1] else col.min()
                raise ConfigError(f"{what}: column {name!r} holds {bad}, beyond the 64-bit integers sdm reads")
    return frame


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_k(k: Any) -> int:
    """k as an int >= 1 (not a bool, float or string)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k must be an integer, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    return int(k)


def _at_us(at: Any) -> int | None:
    """`at` (None, a datetime, or an ISO 8601 string; naive = UTC) as microseconds since epoch."""
    if at is None:
        return None
    value = at
    if isinstance(at, str):
        try:
            value = dt.datetime.fromisoformat(at)
        except ValueError:
            raise ConfigError(f"at: {at!r} is not an ISO 8601 date and time") from None
    if not isinstance(value, dt.datetime):
        raise ConfigError(f"at must be a datetime or an ISO 8601 string, got {at!r} ({type(at).__name__})")
    try:
        return to_utc_us(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"at: {at!r} is not a usable time ({first_line(exc)})") from None


class _OnnxTower:
    """The ONNX user tower through onnxruntime (inputs the graph dropped are not fed)."""

    def __init__(self, path: Path, threads: int, names: list[str]) -> None:
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle pool threads spin by default, stealing the cores the index search needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are plain Exceptions
            raise DataError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
        self.names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.names if n not in names]
        if unknown:
            raise DataError(f"{path}: the ONNX tower takes input(s) {unknown} that {TOWER_SPEC} does not list")

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, {n: inputs[n] for n in self.names})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are plain Exceptions
            raise DataError(f"{self.path}: the ONNX tower failed ({first_line(exc)})") from None


class _TorchTower:
    """`UserTower` rebuilt from `user_tower.weights.pt` (never the `.pt2` program: loading it unpickles)."""

    def __init__(self, path: Path, names: list[str], lookups: Lookups) -> None:
        self.path = path
        self.module = load_tower(path)
        if self.module.input_names() != names:
            raise DataError(f"{path}: the tower's inputs {self.module.input_names()} differ from {TOWER_SPEC}'s {names}")
        vocab = self.module.model.config.item_vocab
        for name, table in lookups.vocabs.items():  # vocabulary sizes include padding and OOV
            if name in vocab and vocab[name] != table.height + 2:
                raise DataError(
                    f"{path}: the tower's {name!r} vocabulary has {vocab[name]} entries, "
                    f"{vocab_file(name)} {table.height + 2}: files of two different exports"
                )
        self.names = names

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            with torch.no_grad():
                out = self.module(*[torch.from_numpy(inputs[n]) for n in self.names])
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{self.path}: the user tower failed ({first_line(exc)})") from None
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.numpy() for o in out]


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
        _choice("runtime", runtime, ("auto", "onnx", "torch"))
        _choice("index", index, ("auto", "exact", "faiss"))
        _choice("candidates", candidates, CANDIDATES)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
        root = Path(export_dir)
        if not (root / CONFIG).is_file() or not (root / TOWER_SPEC).is_file():
            raise DataError(f"{root}: not a finished `sdm export` directory (no config.json / user_tower.json)")
        if not (root / LOOKUPS).is_file():
            raise DataError(f"{root}: no lookups.json; re-run `sdm export` with this version")
        read_json(root / CONFIG, "an sdm export config")
        spec = _read_spec(root / TOWER_SPEC)
        lookups = Lookups.load(root)
        _check_features(root / TOWER_SPEC, spec, lookups)
        names = [i["name"] for i in spec["inputs"]]
        onnx_path = root / ONNX_TOWER
        use_onnx = runtime == "onnx" or (runtime == "auto" and onnx_path.is_file() and _has("onnxruntime"))
        if runtime == "onnx" and not (onnx_path.is_file() and _has("onnxruntime")):
            raise DataError(f"{root}: runtime onnx needs user_tower.onnx and onnxruntime (pip install 'sdm[onnx]')")
        torch.set_num_threads(threads)  # the torch tower and the exact index search
        if use_onnx:
            tower: Any = _OnnxTower(onnx_path, threads, names)
        else:
            tower = _TorchTower(root / WEIGHTS, names, lookups)
        d = int(spec["embedding_dim"])
        _probe(tower, spec, d)
        vecs, raw, ids, known = _read_item_vectors(root / ITEM_VECTORS, d, lookups.num_items)
        idx = _load_index(root, vecs, index)
        runtime = "onnx" if use_onnx else "torch"
        neighbours = None
        if "neighbours" in spec:  # the export chose the term: the torch tower holds the table, else read it
            state = tower.module.model.state_dict() if not use_onnx else _weights_state(root / WEIGHTS)
            neighbours = _read_neighbours(state, root / WEIGHTS, lookups.num_items)
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
            SdmError: events the training config cannot read (missing column, wrong type).
            DataError: an export file that fails at request time (naming it).
        """
        mode = self.candidates if candidates is None else candidates
        _choice("candidates", mode, CANDIDATES)
        k = _check_k(k)
        at_us = _at_us(at)
        seen = _check_bool("exclude_seen", exclude_seen)
        history = _check_bool("exclude_history", exclude_history)
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
        out = self.tower(_inputs(batch, self.item_features, self.user_features))
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
            ConfigError: no item column, a null or repeated id, an id that does not cast to the
                export's id type, or an id the Recommender already knows (warm, cold, or added
                before: ids are never replaced), naming it; a multi-valued feature that is not
                a string column.
            DataError: the weights file is missing or damaged.
        """
        frame = to_frame(items, "items")
        ids = self._new_ids(frame)
        split = self._split_values(frame)
        side = self._encode_side(split)  # (A, F)
        lists = self._encode_values(split)  # multi-valued feature -> (A,) lists of value indices
        if len(ids):
            self._append(ids, side, self._cold_vectors(side, lists))
        features = [pl.Series(f, side[:, j], dtype=pl.Int32) for j, f in enumerate(self.lookups.item_features)]
        return pl.DataFrame([ids, *features, *[v.alias(f"{f}_values") for f, v in lists.items()]])

    def _new_ids(self, frame: pl.DataFrame) -> pl.Series:
        """The item column of `frame`, cast to the export's id type; refused when null, repeated or known."""
        col = self.item_col
        if col not in frame.columns:
            raise ConfigError(f"items: no column {col!r} (the item column of the data; found: {', '.join(frame.columns[:8])})")
        given = frame.get_column(col)
        if given.null_count():
            raise ConfigError(f"items: column {col!r} has nulls")
        try:
            ids = given.cast(self.item_ids.dtype, strict=True).alias(col)
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
            raise ConfigError(f"items: column {col!r} holds {given.dtype}, not the export's item ids ({self.item_ids.dtype})") from None
        twice = ids.filter(ids.is_duplicated())
        if len(twice):
            raise ConfigError(f"items: item {twice[0]!r} occurs twice")
        if self._ids is None:
            self._ids = set(self.item_ids.to_list())
        known = [v for v in ids.to_list() if v in self._ids]
        if known:
            raise ConfigError(f"items: item {known[0]!r} is already known to this export; ids are never replaced")
        return ids

    def _split_values(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` with each multi-valued feature split as sessionize does (`normalise.split_values`):
        the column holds the first value, `_m_<f>` (`io.values_col`) all of them."""
        multi = [f for f in self.lookups.multi_valued if f in frame.columns and frame.schema[f] != pl.Null]
        wrong = [f"{f} ({frame.schema[f]})" for f in multi if frame.schema[f] != pl.String]
        if wrong:
            raise ConfigError(f"items: multi-valued feature column(s) {', '.join(wrong)} must hold strings ('a|b')")
        if not multi:
            return frame
        cfg = self.lookups.session_config([], None)[0]  # the data's separator
        with polars_errors("items"):
            parts = split_values(frame.lazy().select(pl.col(f).alias(feat_col(f)) for f in multi), cfg, multi).collect()
        return frame.with_columns(
            *[parts.get_column(feat_col(f)).alias(f) for f in multi], *[parts.get_column(values_col(f)) for f in multi]
        )

    def _encode_values(self, split: pl.DataFrame) -> dict[str, pl.Series]:
        """Per multi-valued feature: (A,) lists of the indices of every value of `split` (`_split_values`);
        [] when the items do not give the feature."""
        out = {}
        for f in self.lookups.multi_valued:
            if values_col(f) in split.columns:
                with polars_errors("items"):
                    out[f] = encode_values(fill_empty(split.get_column(values_col(f))), self.lookups.vocabs[f])
            else:
                out[f] = pl.Series(f, [[]] * split.height, dtype=pl.List(pl.Int32))
        return out

    def _encode_side(self, frame: pl.DataFrame) -> np.ndarray:
        """(A, F) int64 index of each side feature (`Lookups.item_features`) by its vocabulary; 1 = unknown."""
        out = np.ones((frame.height, len(self.lookups.item_features)), dtype=np.int64)
        for j, f in enumerate(self.lookups.item_features):
            if f in frame.columns and f != self.item_col and frame.schema[f] != pl.Null:
                try:
                    enc = encode(frame.lazy().select(f), f, self.lookups.vocabs[f], "index").collect()
                except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
                    raise ConfigError(f"items: column {f!r} cannot be looked up in its vocabulary ({first_line(exc)})") from None
                out[:, j] = enc.get_column("index").to_numpy()
        return out

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
            tower = self.tower if isinstance(self.tower, _TorchTower) else None
            tower = tower or _TorchTower(self.root / WEIGHTS, self.input_names, self.lookups)
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


def _inputs(batch: dict[str, Any], item_features: list[str], user_features: list[str]) -> dict[str, np.ndarray]:
    """The tower's named inputs from a collated batch (int64 numpy)."""
    out = {f"seq_{f}": batch["seq"][f].numpy() for f in item_features}
    out["seq_len"] = batch["seq_len"].numpy()
    out.update({f"long_{f}": batch["long"][f].numpy() for f in item_features})
    out["long_len"] = batch["long_len"].numpy()
    out.update({user_column(f): batch["user"][f].numpy() for f in user_features})
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in out.items()}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; expected {', '.join(allowed[:-1])} or {allowed[-1]}")


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _read_spec(path: Path) -> dict[str, Any]:
    """user_tower.json, checked: dims, features, and the inputs in the order `UserTower` takes them."""
    spec = read_json(path, "an sdm user tower spec")
    problem = None
    d = spec.get("embedding_dim")
    inputs = spec.get("inputs")
    if spec.get("format") != "sdm-user-tower":
        problem = f"format {spec.get('format')!r}, expected 'sdm-user-tower'"
    elif not isinstance(d, int) or isinstance(d, bool) or d < 1:
        problem = f"embedding_dim must be an integer >= 1, got {d!r}"
    elif not _names(spec.get("item_features")) or not _names(spec.get("user_features")):
        problem = "item_features and user_features must be lists of names"
    elif not isinstance(inputs, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in inputs):
        problem = "inputs must be a list of objects with a name"
    elif [i["name"] for i in inputs] != _input_names(spec["item_features"], spec["user_features"]):
        problem = "its inputs are not the tower's for its features"
    elif len(spec.get("outputs") or [None]) not in (1, 3):
        problem = "outputs must list 1 or 3 outputs"
    if problem is not None:
        raise DataError(f"{path}: damaged user tower spec ({problem}); re-run `sdm export`")
    return spec


def _input_names(item_features: list[str], user_features: list[str]) -> list[str]:
    """`UserTower.input_names()` for these features."""
    return (
        [f"seq_{f}" for f in item_features] + ["seq_len"] + [f"long_{f}" for f in item_features] + ["long_len"]
        + [user_column(u) for u in user_features]
    )  # fmt: skip


def _check_features(path: Path, spec: dict[str, Any], lookups: Lookups) -> None:
    """The tower reads only features the lookups can build, and both describe the same data."""
    items = ["item", *lookups.item_features]
    users = ["user", *lookups.user_features]
    unknown = [f for f in spec["item_features"] if f not in items] + [f for f in spec["user_features"] if f not in users]
    if unknown or "item" not in spec["item_features"]:
        raise DataError(f"{path}: the tower reads feature(s) {unknown or ['item']} that {LOOKUPS} does not describe")
    if spec.get("fingerprint") and lookups.fingerprint and spec["fingerprint"] != lookups.fingerprint:
        raise DataError(f"{path}: written for other data than {LOOKUPS} (fingerprints differ): files of two exports")


def _probe(tower: Any, spec: dict[str, Any], d: int) -> None:
    """Run the tower on one one-event session of unknown ids: it must run and give (1, d) user vectors."""
    inputs = {}
    for i in spec["inputs"]:
        name = i["name"]
        if name in ("seq_len", "long_len"):
            inputs[name] = np.array([1 if name == "seq_len" else 0], dtype=np.int64)
        elif name.startswith(("seq_", "long_")):
            inputs[name] = np.ones((1, 1), dtype=np.int64)
        else:
            inputs[name] = np.ones(1, dtype=np.int64)
    out = tower(inputs)
    want = len(spec.get("outputs") or [None])
    shapes = [tuple(np.shape(o)) for o in out]
    ok = len(out) == want and shapes[0] == (1, d)
    if ok and want == 3:
        ok = len(shapes[1]) == 2 and shapes[1] == shapes[2] and shapes[1][0] == 1
    if not ok:
        raise DataError(f"{tower.path}: the tower's outputs {shapes} do not fit {TOWER_SPEC} ({want} output(s), dim {d})")


def _weights_state(path: Path) -> dict[str, Any]:
    """The state dict of the export's weights file (`weights_only`: no code runs; `load_tower`'s checks)."""
    return load_tower(path).model.state_dict()


def _read_neighbours(state: dict[str, Any], path: Path, num_items: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The neighbour term in the state dict of the export's weights file `path` (`model/neighbours.py`),
    checked, or None when it is off.

    Raises:
        DataError: a table that does not fit the vocabulary (naming the file).
    """
    items, sims, weight = (state.get(f"neighbours.{n}") for n in ("items", "sims", "weight"))
    if items is None or sims is None or weight is None or items.numel() == 0 or float(weight) <= 0:
        return None
    ok = (
        items.dim() == 2 and items.shape == sims.shape and items.shape[0] == num_items
        and not items.is_floating_point() and int(items.min()) >= 0 and int(items.max()) < num_items
        and bool(torch.isfinite(sims).all()) and math.isfinite(float(weight))
    )  # fmt: skip
    if not ok:
        raise DataError(f"{path}: damaged neighbour table (it must be ({num_items}, N) item indices with finite sims)")
    return items.long(), sims.float(), float(weight)


def _read_item_vectors(path: Path, d: int, num_items: int) -> tuple[np.ndarray, np.ndarray, pl.Series, np.ndarray]:
    """item_vectors.parquet, checked: (N + 2, d) float32 vectors by item index (rows 0, 1 zero),
    (N + 2,) raw ids (object), the `item_id` column as stored (N,), and (C,) `known_from` of the
    cold rows (us, `ALWAYS` = known at all times). An export without `cold` column has none."""
    if not path.is_file():
        raise DataError(f"{path}: not found; re-run `sdm export`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    warm = num_items - 2
    if "vector" not in table.column_names or "item_id" not in table.column_names:
        raise DataError(f"{path}: not item vectors (no item_id / vector column; found {', '.join(table.column_names)})")
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
        raise DataError(f"{path}: column 'vector' holds {vtype}, expected fixed_size_list<float>")
    if vtype.list_size != d:
        raise DataError(f"{path}: vectors of dim {vtype.list_size}, but the user tower's are of dim {d}")
    known = _cold_rows(path, table, warm)
    n = table.num_rows
    column = table.column("vector").combine_chunks()
    if "index" in table.column_names and table.column("index").to_pylist() != list(range(2, n + 2)):
        raise DataError(f"{path}: column 'index' is not 2..{n + 1} in order")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if column.null_count or len(flat) != n * d or not np.isfinite(flat).all():
        raise DataError(f"{path}: missing or non-finite vector values")
    vecs = np.zeros((n + 2, d), dtype=np.float32)
    vecs[2:] = flat.reshape(n, d)
    ids = pl.Series("item_id", table.column("item_id").combine_chunks())
    if ids.null_count():
        raise DataError(f"{path}: column 'item_id' has nulls")
    raw = np.empty(n + 2, dtype=object)
    raw[2:] = ids.to_list()
    return vecs, raw, ids, known


def _cold_rows(path: Path, table: pa.Table, warm: int) -> np.ndarray:
    """(C,) `known_from` (us, `ALWAYS` for null) of the cold rows after the `warm` vocabulary rows.

    Raises:
        DataError: fewer rows than the vocabulary, rows beyond it without a `cold` column, a
            `cold` column that is not bool, has nulls or is not false then true, or a
            `known_from` that is missing, not a timestamp, or set on a warm row.
    """
    n = table.num_rows
    if n < warm or ("cold" not in table.column_names and n != warm):
        raise DataError(f"{path}: {n} vectors, but the catalogue has {warm} items")
    if "cold" not in table.column_names:
        return np.zeros(0, dtype=np.int64)  # an export of an older sdm: every row warm
    cold = table.column("cold")
    if not pa.types.is_boolean(cold.type) or cold.null_count:
        raise DataError(f"{path}: column 'cold' holds {cold.type} with {cold.null_count} nulls, expected bool without nulls")
    flags = cold.to_numpy()
    if flags[:warm].any() or not flags[warm:].all():
        raise DataError(f"{path}: column 'cold' must be false for the vocabulary's {warm} items and true after them")
    if "known_from" not in table.column_names:
        raise DataError(f"{path}: a 'cold' column without 'known_from'")
    known = table.column("known_from")
    if not pa.types.is_timestamp(known.type):
        raise DataError(f"{path}: column 'known_from' holds {known.type}, expected timestamp[us, tz=UTC]")
    if known.slice(0, warm).null_count != warm:
        raise DataError(f"{path}: column 'known_from' is set for an item of the vocabulary (null expected)")
    try:
        us = known.slice(warm).cast(pa.timestamp("us", tz=known.type.tz)).cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{path}: column 'known_from' is not a usable time ({first_line(exc)})") from None
    return us.fill_null(ALWAYS).to_numpy().astype(np.int64)


def _load_index(root: Path, vecs: np.ndarray, kind: str) -> Any:
    """The item index: faiss (items.faiss + index.json) when asked, or by "auto" for an approximate one; else exact."""
    spec_path, path = root / INDEX_SPEC, root / FAISS_INDEX
    has_faiss = spec_path.is_file() and path.is_file() and _has("faiss")
    if kind == "faiss" and not has_faiss:
        raise DataError(f"{root}: index faiss needs items.faiss + index.json and faiss (pip install 'sdm[faiss]')")
    if kind == "faiss" or (kind == "auto" and has_faiss):
        params = _read_index_spec(spec_path, len(vecs) - 2)
        if kind == "faiss" or params["kind"] != "flat":
            return _read_faiss(path, params, vecs.shape[1])
    return ExactIndex(vecs)


def _read_index_spec(path: Path, n: int) -> dict[str, Any]:
    """index.json, checked against the catalogue size `n`."""
    params = read_json(path, "a faiss index spec")
    kind = params.get("kind")
    problem = None
    if kind not in ("flat", "ivf", "hnsw"):
        problem = f"kind {kind!r}, expected flat, ivf or hnsw"
    elif params.get("items") != n:
        problem = f"items {params.get('items')!r}, but the catalogue has {n}"
    elif kind == "ivf" and not (isinstance(params.get("nprobe"), int) and params["nprobe"] >= 1):
        problem = f"ivf nprobe {params.get('nprobe')!r}"
    elif not isinstance(params.get("max_norm", 0.0), (int, float)) or not isinstance(params.get("ef_search", 1), int):
        problem = "max_norm / ef_search must be numbers"
    if problem is not None:
        raise DataError(f"{path}: damaged index spec ({problem}); re-run `sdm export`")
    return params


def _read_faiss(path: Path, params: dict[str, Any], d: int) -> FaissIndex:
    """items.faiss, checked to hold the catalogue's vectors at the tower's dim."""
    try:
        index = FaissIndex.read(str(path), params)
    except SdmError:
        raise
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError, or its own types
        raise DataError(f"{path}: not a readable faiss index ({first_line(exc)})") from None
    dim = d + 1 if params["kind"] == "ivf" else d
    needs = {"ivf": "nprobe", "hnsw": "hnsw", "flat": "ntotal"}[params["kind"]]
    if not hasattr(index.index, needs):
        raise DataError(f"{path}: not a faiss {params['kind']} index, which {INDEX_SPEC} says it is")
    if int(index.index.ntotal) != params["items"] or int(index.index.d) != dim:
        raise DataError(
            f"{path}: holds {index.index.ntotal} vectors of dim {index.index.d}, "
            f"expected {params['items']} of dim {dim} (item_vectors.parquet / index.json)"
        )
    return index
