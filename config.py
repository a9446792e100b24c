"""Typed configuration for every stage, loadable from TOML and from CLI flags.

One pydantic model per command (`SessionizeConfig`, `TrainConfig`,
`EvaluateConfig`), all `extra="forbid"` and `frozen=True`, so a typo in a TOML
file or a flag fails loudly. A field `user_col` is the flag `--user-col` and the
TOML key `user_col` or `user-col` in the command's section (`[sessionize]`,
`[train]`, `[evaluate]`). Precedence: flag > TOML > default.

Derived values (vocabulary sizes, cutoffs computed from fractions) are never
written back into a config: they live in the data manifest.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdm.errors import SdmError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | int | float) -> dt.timedelta:
    """Parse '10m', '7d', '1h30m', '90s' (or a number of seconds) into a timedelta.

    Raises:
        ValueError: on anything else, naming the value.
    """
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = _DURATION_RE.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ValueError(f"invalid duration {text!r}: use e.g. 10m, 90s, 7d, 1h30m")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return dt.timedelta(seconds=seconds)


def _split_list(value: Any) -> Any:
    """Accept 'a,b,c' (CLI) as well as ['a', 'b', 'c'] (TOML)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _at_least_one(v: int | None) -> int | None:
    """Validator body shared by every count field: None passes, anything below 1 fails."""
    if v is not None and v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, defer_build=True)


class SessionizeConfig(_Base):
    """`sdm sessionize`: raw log -> sessions, long-term windows, splits, shards (SPEC 1-4)."""

    out: Path = Path("runs/data")
    """Output directory; refused when not empty unless `overwrite`."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    items: Path | None = None
    """Optional item table (Parquet/CSV) keyed by the item column."""
    users: Path | None = None
    """Optional user table (Parquet/CSV) keyed by the user column."""
    user_col: str = "user_id"
    """User column; when the default is absent but the log has a session column, each session is its own user (a name given explicitly must exist)."""
    item_col: str = "item_id"
    time_col: str = "timestamp"
    session_col: str = "session_id"
    """Back-end session id column (optional in the log; "" = ignore session ids). A name given explicitly must exist."""
    behavior_col: str = "behavior"
    behaviors: list[str] | None = None
    """Keep only these event types (comma-separated); others are dropped and counted."""
    keep_duplicates: bool = False
    """Keep exact duplicate rows (same value in every column) as events; by default they are dropped and counted as `duplicate`."""
    item_features: list[str] = []
    """Item side-info columns (from the log or the items table), comma-separated."""
    multi_valued: list[str] = []
    """Item features whose strings hold several values ('Comedy|Romance'): the model gets the first, items.parquet all (`<f>_values`)."""
    value_sep: str = "|"
    """Separator of the values of a `multi_valued` feature."""
    user_features: list[str] = []
    """User profile columns from the users table, comma-separated."""
    time_unit: Literal["s", "ms"] | None = None
    """Unit of an integer epoch timestamp column."""
    time_format: str | None = None
    """strftime pattern of a string timestamp column, e.g. '%Y-%m-%d %H:%M:%S UTC' (naive = UTC)."""
    format: Literal["auto", "csv", "parquet"] = "auto"
    """Format of the log file; auto: .csv/.tsv/.txt are CSV, anything else Parquet (side tables go by their suffix)."""
    delimiter: str | None = None
    """CSV field separator of the log and CSV side tables (default ',', tab for .tsv)."""
    gap: str = "10m"
    """Two events less than this apart are one session (e.g. 10m, 90s, 1h; a bare number is seconds)."""
    max_session_len: int = 50
    """Sessions longer than this are cut into chunks; at least 2 (a one-event session has no sample)."""
    long_window: str = "7d"
    """Long-term window before each session (e.g. 7d, 12h; a bare number is seconds)."""
    max_long_len: int = 50
    valid_start: dt.datetime | None = None
    test_start: dt.datetime | None = None
    valid_days: float | None = None
    test_days: float | None = None
    valid_fraction: float | None = None
    test_fraction: float | None = None
    rows_per_shard: int = 50_000
    """Target users (rows) per shard."""
    min_shards: int = 8
    """At least this many shards per split (when it has that many users), so every DDP rank and worker gets one."""
    buckets: int | None = None
    """Hash-partition users into this many buckets, sessionized one at a time: peak memory ~ log / buckets; same output. Default: ceil(rows / bucket_events)."""
    # 12M, not 16M: at 100M events 8-16 buckets were faster than 6-7, with less memory (README, Scale)
    bucket_events: int = 12_000_000
    """With buckets unset: log rows per bucket, so memory follows this setting, not the log (1 bucket up to 12M rows)."""
    workers: int = 1
    """Buckets sessionized in parallel processes (each with cores / workers polars threads)."""
    engine: Literal["local", "ray"] = "local"
    """Who runs the passes over the buckets: this process ("local") or Ray tasks ("ray", needs the `ray` extra)."""
    ray_address: str | None = None
    """Ray cluster to run on with engine "ray" (e.g. "ray://head:10001" or "auto"); default: a Ray started on this machine."""

    _norm_lists = field_validator("behaviors", "item_features", "user_features", "multi_valued", mode="before")(
        classmethod(lambda cls, v: _split_list(v))
    )

    @field_validator("valid_start", "test_start")
    @classmethod
    def _as_utc(cls, v: dt.datetime | None) -> dt.datetime | None:
        """Naive cutoffs are UTC, like naive log timestamps."""
        if v is not None and v.tzinfo is None:
            return v.replace(tzinfo=dt.timezone.utc)
        return v

    @field_validator("gap", "long_window")
    @classmethod
    def _check_duration(cls, v: str) -> str:
        parse_duration(v)
        return v

    _positive = field_validator(
        "max_session_len", "max_long_len", "rows_per_shard", "min_shards", "buckets", "workers", "bucket_events"
    )(classmethod(lambda cls, v: _at_least_one(v)))

    @field_validator("max_session_len")
    @classmethod
    def _two_events(cls, v: int) -> int:
        # cut at 1, every session has one event and no (prefix, next item) sample
        if v < 2:
            raise ValueError(f"must be >= 2 (a session of one event gives no training sample), got {v}")
        return v

    @model_validator(mode="after")
    def _check_split(self) -> SessionizeConfig:
        for name in ("valid", "test"):
            given = [k for k in ("start", "days", "fraction") if getattr(self, f"{name}_{k}") is not None]
            if len(given) > 1:
                raise ValueError(f"give one of {name}_start, {name}_days, {name}_fraction, not {given}")
        for k in ("valid_fraction", "test_fraction"):
            v = getattr(self, k)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{k} must be in [0, 1), got {v}")
        for k in ("valid_days", "test_days"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        if self.valid_start and self.test_start and self.valid_start > self.test_start:
            raise ValueError("valid_start must not be after test_start")
        for f in self.item_features + self.user_features:
            if f in ("item", "user"):
                raise ValueError(f"feature name {f!r} is reserved (rename the column)")
        return self

    @property
    def gap_td(self) -> dt.timedelta:
        return parse_duration(self.gap)

    @property
    def long_window_td(self) -> dt.timedelta:
        return parse_duration(self.long_window)


Variant = Literal["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN", "SASRec"]


class TrainConfig(_Base):
    """`sdm train`: streaming dataset over the shards -> SDM model checkpoint."""

    data: Path = Path("runs/data")
    out: Path = Path("runs/model")
    variant: Variant = "PSDMMAL-N"
    epochs: int = 12
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 64
    """Sessions per batch (each session contributes all its positions)."""
    lr: float = 5e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    grad_clip: float = 1.0
    item_features: list[str] | None = None
    """Item side features to use (comma-separated; default: all in the data)."""
    user_features: list[str] | None = None
    """User features for e_u (comma-separated; default: the profile, without the user id `user`)."""
    embedding_dim: int = 64
    lstm_layers: int = 1
    num_heads: int = 2
    num_blocks: int = 2
    """Transformer blocks of the SASRec variant (a baseline trained by the same trainer)."""
    dropout: float = 0.2
    num_targets: int = 5
    """N of PSDMMAL-N (next N items); the other variants use 1."""
    user_residual: bool = True
    """Short-term output h_p + user attention instead of the attention alone (beyond the paper; --no-user-residual is the paper's)."""
    state_query: bool = True
    """User attention's query adds the position's own state to e_u (beyond the paper; --no-state-query is the paper's)."""
    repeat: bool = True
    """Repeat head: items of the session and of the 7-day window get a learned re-visit score (beyond the paper; --no-repeat is the paper's model)."""
    repeat_prior: float = 2.0
    """Repeat head's initial copy bonus for the session's last item (prior * 0.5^d for d items back, gate bias prior / 2; 0 = start neutral)."""
    target_decay: float = 0.1
    """PSDMMAL-N: weight decay ** k for the target k items ahead (1.0 = all N alike, as the paper)."""
    loss: Literal["auto", "sampled", "inbatch", "full"] = "auto"
    """auto: full softmax while batch_size x max_session_len x items <= 2^28 (1 GiB of logits; 83,886 items at the defaults), sampled softmax (log-Q corrected) above."""
    num_negatives: int = 1000
    neg_power: float = 0.75
    """Negatives drawn with probability proportional to count ** neg_power."""
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = False
    """Continue from `out`/last.pt."""
    overwrite: bool = False
    """Replace the checkpoints and log of an earlier run in `out` (without it a fresh run there is refused)."""
    num_workers: int = 0
    shuffle_buffer: int = 2048
    """Sessions held in the shuffle buffer (memory bound)."""
    patience: int = 3
    """Stop after this many validations without a better `select_metric`."""
    eval_k: int = 50
    ema_decay: float = Field(0.999, ge=0, lt=1)
    """Validate and keep best.pt with a moving average of the weights: per step w_avg += (1 - d)(w - w_avg), d = min(ema_decay, (1 + step) / (10 + step)); 0 = off."""
    select_metric: Literal["hr", "ndcg", "hr+ndcg"] = "hr+ndcg"
    """Validation metric at eval_k that picks best.pt and drives early stopping (hr+ndcg: their sum)."""
    eval_every: int | None = None
    """Validate every this many steps as well as after each epoch."""
    checkpoint_every: int | None = None
    """Also write last.pt every this many steps, so a killed run resumes mid-epoch (exactly, as at an epoch end)."""
    log_every: int = 20
    amp: bool = True
    """Mixed precision (bf16) on GPU; ignored on CPU."""

    _positive = field_validator(
        "epochs", "batch_size", "embedding_dim", "lstm_layers", "num_heads", "num_blocks", "num_targets", "eval_k", "checkpoint_every"
    )(classmethod(lambda cls, v: _at_least_one(v)))

    _norm_features = field_validator("item_features", "user_features", mode="before")(
        classmethod(lambda cls, v: _split_list(v))
    )

    @field_validator("repeat_prior")
    @classmethod
    def _prior(cls, v: float) -> float:
        if not 0 <= v < float("inf"):
            raise ValueError(f"must be a finite number >= 0, got {v}")
        return v

    @field_validator("target_decay")
    @classmethod
    def _decay(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("lr", "grad_clip")
    @classmethod
    def _positive_finite(cls, v: float) -> float:
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"must be a positive finite number, got {v}")
        return v


class EvaluateConfig(_Base):
    """`sdm evaluate`: full-ranking metrics on held-out sessions (SPEC 6)."""

    data: Path = Path("runs/data")
    model: Path = Path("runs/model")
    out: Path = Path("runs/eval")
    split: Literal["test", "valid"] = "test"
    k: list[int] = [20, 50, 100]
    """Cut-offs K; the default list is capped at the catalogue size (with a note), an explicit K above it is an error."""
    overwrite: bool = False
    """Replace the reports of an earlier evaluation in `out` (without it a non-empty `out` is refused)."""
    baseline: list[Literal["popularity", "itemcf", "itemcf-repeat", "stan", "vsknn"]] = []
    """Baselines to score beside the model, comma-separated (only them when no `model` is given and the default has no best.pt)."""
    exclude_seen: bool = False
    """Never recommend items already in the query's session prefix."""
    dump_topk: bool = False
    index: Literal["exact", "faiss"] = "exact"
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _norm_k = field_validator("k", "baseline", mode="before")(classmethod(lambda cls, v: _split_list(v)))

    @field_validator("k")
    @classmethod
    def _check_k(cls, v: list[int]) -> list[int]:
        if not v or any(x < 1 for x in v):
            raise ValueError(f"k must be positive integers, got {v}")
        return sorted(set(v))


class ExportConfig(_Base):
    """`sdm export`: item vectors, a faiss index and the user tower for serving."""

    data: Path = Path("runs/data")
    """Shard directory the model was trained on (manifest, vocabularies, item table)."""
    model: Path = Path("runs/model")
    """Training output directory holding best.pt."""
    out: Path = Path("runs/export")
    """Output directory; refused when not empty unless `overwrite`."""
    overwrite: bool = False
    """Replace the export files of a non-empty output directory."""
    faiss: bool = True
    """Write items.faiss (an index chosen by catalogue size, see serve/index.py) when faiss is installed."""
    onnx: bool = True
    """Also write user_tower.onnx when the onnx extra is installed."""


class RecommendConfig(_Base):
    """`sdm recommend LOG`: top-K items for every user of a log, from the user's latest session."""

    data: Path = Path("runs/data")
    """Shard directory the model was trained on (sessionize config, vocabularies, item and user tables)."""
    model: Path = Path("runs/model")
    """Training output directory holding best.pt."""
    out: Path = Path("runs/recs.parquet")
    """Parquet file: user_id, session_start, items (raw ids, best first), scores."""
    overwrite: bool = False
    """Replace an existing output file."""
    at: dt.datetime | None = None
    """Recommend as of this time: events at or after it are ignored (default: after the last event)."""
    k: int = 100
    """Items per user."""
    exclude_seen: bool = False
    """Never recommend items of the user's current session."""
    index: Literal["exact", "faiss"] = "exact"
    """Exact chunked scoring (the code of `sdm evaluate`) or a faiss index (serve/index.py)."""
    items: Path | None = None
    """Raw items table for side features the log lacks (default: the one training used, if it still exists)."""
    batch_size: int = 1024
    """Users scored per batch."""
    bucket_events: int = 5_000_000
    """Events sessionized at a time: users are hash-partitioned into ceil(events / this) buckets (memory bound)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _positive = field_validator("k", "batch_size", "bucket_events")(classmethod(lambda cls, v: _at_least_one(v)))


class SynthConfig(_Base):
    """`sdm synth`: a synthetic e-commerce log with planted sequential structure."""

    out: Path = Path("runs/synth/logs.parquet")
    """Log file (Parquet); `items.parquet` and `users.parquet` are written next to it."""
    overwrite: bool = False
    """Replace existing output files."""
    events: int = 200_000
    """Number of events (exact)."""
    users: int | None = None
    """Number of users (default: events // 50)."""
    items: int | None = None
    """Number of items (default: events // 25, between 100 and 4,000,000)."""
    categories: int | None = None
    """Number of leaf categories (default: items // 40, between 5 and 10,000)."""
    brands: int | None = None
    """Number of brands (default: items // 20, at least 5)."""
    shops: int | None = None
    """Number of shops (default: brands // 2, at least 2)."""
    days: float = 30.0
    """Length of the logged period in days."""
    zipf: float = 0.8
    """Exponent of the Zipf item popularity (weight of the r-th item = r ** -zipf)."""
    session_mean_len: float = 6.0
    """Mean number of events per session (geometric, heavier for some users)."""
    session_id_share: float = 0.5
    """Share of sessions whose events carry a back-end session id."""
    seed: int = 0
    chunk_events: int = 1_000_000
    """Events generated and written per chunk (bounds memory)."""

    _positive = field_validator("events", "chunk_events", "users", "items", "categories", "brands", "shops")(
        classmethod(lambda cls, v: _at_least_one(v))
    )

    @field_validator("days", "zipf")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if not 0 <= self.session_id_share <= 1:
            raise ValueError(f"session_id_share must be in [0, 1], got {self.session_id_share}")
        if self.session_mean_len < 1:
            raise ValueError(f"session_mean_len must be >= 1, got {self.session_mean_len}")
        if self.num_users > self.events:
            raise ValueError(f"users ({self.num_users}) must not exceed events ({self.events})")
        return self

    @property
    def num_users(self) -> int:
        return self.users if self.users is not None else max(1, self.events // 50)

    @property
    def num_items(self) -> int:
        return self.items if self.items is not None else min(max(100, self.events // 25), 4_000_000)

    @property
    def num_categories(self) -> int:
        return self.categories if self.categories is not None else min(max(5, self.num_items // 40), 10_000)

    @property
    def num_brands(self) -> int:
        return self.brands if self.brands is not None else max(5, self.num_items // 20)

    @property
    def num_shops(self) -> int:
        return self.shops if self.shops is not None else max(2, self.num_brands // 2)


class DemoConfig(_Base):
    """`sdm demo`: synth -> sessionize -> train -> evaluate against baselines."""

    out: Path = Path("runs/demo")
    overwrite: bool = True
    """The demo replaces its own previous output by default."""
    events: int = 100_000
    """Size of the synthetic log."""
    epochs: int = 4
    max_steps: int | None = None
    seed: int = 0


SECTIONS: dict[str, type[_Base]] = {
    "sessionize": SessionizeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "recommend": RecommendConfig,
    "synth": SynthConfig,
    "demo": DemoConfig,
}


def load_toml_section(path: Path, section: str) -> dict[str, Any]:
    """Read `[section]` of a TOML file; keys may use '-' or '_'.

    A file with no sections at all is taken as the section itself.
    """
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise SdmError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise SdmError(f"{path}: config is a directory, expected a TOML file") from None
    except UnicodeDecodeError as exc:
        raise SdmError(f"{path}: config file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SdmError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdmError(f"{path}: not valid TOML ({exc})") from None
    known = set(SECTIONS)
    if any(isinstance(v, dict) for v in doc.values()):
        unknown = [k for k, v in doc.items() if isinstance(v, dict) and k not in known]
        if unknown:
            raise SdmError(f"{path}: unknown section(s) {unknown}; expected {sorted(known)}")
        body = doc.get(section, {})
    else:
        body = doc
    return {k.replace("-", "_"): v for k, v in body.items()}


def build_config(cls: type[_Base], toml: Path | None, section: str, overrides: dict[str, Any]) -> Any:
    """Merge defaults < TOML section < explicit overrides, and validate.

    Raises:
        SdmError: one line naming the offending key and value.
    """
    values: dict[str, Any] = {}
    source = "flags"
    if toml is not None:
        values.update(load_toml_section(toml, section))
        source = str(toml)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or section
        if err["type"] == "extra_forbidden":
            raise SdmError(f"{source}: unknown config key {key!r} in [{section}]") from None
        msg = err["msg"].removeprefix("Value error, ")
        has_input = (
            "input" in err and not isinstance(err["input"], dict) and "got " not in msg and repr(err["input"]) not in msg
        )
        shown = f" (got {err['input']!r})" if has_input else ""
        raise SdmError(f"{source}: invalid {key!r}: {msg}{shown}") from None


def save_config(cfg: _Base, path: Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(cfg.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
