"""Typed configuration for every stage, loadable from TOML and from CLI flags.

One pydantic model per command (`SessionizeConfig`, `TrainConfig`,
`EvaluateConfig`), all `extra="forbid"` and `frozen=True`, so a typo in a TOML
file or a flag fails loudly. A field `user_col` is the flag `--user-col` and the
TOML key `user_col` or `user-col` in the command's section (`[sessionize]`,
`[train]`, `[evaluate]`). Precedence: flag > TOML > default.

Every field is bounded (counts, finite floats, durations up to 100 years, cutoffs
within the int64-nanosecond range, non-empty names without NUL or line breaks), and
`build_config` turns a bad value into one `ConfigError` line naming the key, its
flag and the value.

Derived values (vocabulary sizes, cutoffs computed from fractions) are never
written back into a config: they live in the data manifest.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from sdm.errors import ConfigError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

MAX_DAYS = 36_525
"""Longest duration or day count any field takes: 100 years (a `--gap 99999999999999999999` overflowed timedelta)."""
MAX_DURATION = dt.timedelta(days=MAX_DAYS)
MIN_TIME = dt.datetime(1678, 1, 1, tzinfo=dt.timezone.utc)
"""Earliest cutoff / `--at` accepted: the start of the int64-nanosecond range every timestamp type can hold."""
MAX_TIME = dt.datetime(2262, 4, 11, tzinfo=dt.timezone.utc)
"""Latest cutoff / `--at` accepted: the end of the int64-nanosecond range."""
MAX_SEED = 2**32 - 1
MAX_NAME_LEN = 1024
"""Longest column or feature name accepted."""
MAX_PATH_LEN = 4096
"""Longest path accepted (Linux PATH_MAX)."""
_BAD_CHARS = ("\x00", "\n", "\r")


def _show(v: Any) -> str:
    """repr of a bad value for a message: one line, at most 60 characters."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 160:
        return f"an integer of about {int(v.bit_length() * 0.30103)} digits"  # repr fails past 4,300 digits
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 60 else r[:50] + "..." + r[-7:]


def parse_duration(text: str | int | float) -> dt.timedelta:
    """Parse '10m', '7d', '1h30m', '90s' (or a number of seconds) into a timedelta.

    At least 1 us and at most 100 years (`MAX_DAYS`); nan, inf and booleans are refused.

    Raises:
        ValueError: on anything else, naming the value.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {_show(text)}: use e.g. 10m, 90s, 7d, 1h30m")
    if isinstance(text, (int, float)):
        seconds = float(text) if not isinstance(text, int) or abs(text) < 10**300 else math.inf
    else:
        s = str(text).strip().lower().replace(" ", "")
        if len(s) > 100:
            raise ValueError(f"invalid duration {_show(text)}: too long (use e.g. 10m, 90s, 7d, 1h30m)")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            parts = _DURATION_RE.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ValueError(f"invalid duration {_show(text)}: use e.g. 10m, 90s, 7d, 1h30m")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if math.isnan(seconds):
        raise ValueError(f"invalid duration {_show(text)}: not a number")
    if seconds <= 0:
        raise ValueError(f"invalid duration {_show(text)}: must be positive")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {_show(text)}: at most 100 years ({MAX_DAYS}d)")
    td = dt.timedelta(seconds=seconds)
    if td <= dt.timedelta(0):
        raise ValueError(f"invalid duration {_show(text)}: must be at least 1us")
    return td


def _split_list(value: Any) -> Any:
    """Accept 'a,b,c' (CLI) as well as ['a', 'b', 'c'] (TOML)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _num(b: float) -> str:
    return str(b) if isinstance(b, int) else f"{b:g}"


def _in(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> WrapValidator:
    """A number field (int or float; None passes) within [lo, hi] (open ends exclusive), finite.

    true/false are refused (pydantic would read them as 1 and 0); the messages name the
    bound and the value on one line ("must be >= 1, got 0").
    """
    if math.isinf(lo):
        want = f"{'<' if hi_open else '<='} {_num(hi)}"
    elif math.isinf(hi):
        want = f"{'>' if lo_open else '>='} {_num(lo)}"
    else:
        want = f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"

    def check(v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be a number, got {v!r}")
        v = handler(v)
        if v is None:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number {want}, got {v}")
        low = v <= lo if lo_open else v < lo
        high = v >= hi if hi_open else v > hi
        if low or high:
            side = f">{'' if lo_open else '='} {_num(lo)}" if low else f"<{'' if hi_open else '='} {_num(hi)}"
            # an int names the bound it broke ("must be >= 1, got 0"), a float its interval ("in [0, 1)")
            raise ValueError(f"must be {want if isinstance(v, float) else side}, got {_show(v)}")
        return v

    return WrapValidator(check)


def _name(v: str | None, empty_ok: bool = False) -> str | None:
    """A column or feature name: not empty, no NUL or line break, at most MAX_NAME_LEN characters."""
    if v is None:
        return v
    if not v and not empty_ok:
        raise ValueError("must not be empty")
    if any(c in v for c in _BAD_CHARS):
        raise ValueError(f"must not contain a NUL or line break, got {_show(v)}")
    if len(v) > MAX_NAME_LEN:
        raise ValueError(f"is {len(v)} characters long, at most {MAX_NAME_LEN}")
    return v


def _path(v: Path | None) -> Path | None:
    """A path: no NUL or line break, at most MAX_PATH_LEN characters."""
    if v is None:
        return v
    text = str(v)
    if any(c in text for c in _BAD_CHARS):
        raise ValueError(f"must not contain a NUL or line break, got {_show(text)}")
    if len(text) > MAX_PATH_LEN:
        raise ValueError(f"is {len(text)} characters long, at most {MAX_PATH_LEN}")
    return v


def _names(v: list[str] | None) -> list[str] | None:
    """A list of column names: each valid, none twice."""
    if v is None:
        return v
    for x in v:
        _name(x)
    twice = sorted({x for x in v if v.count(x) > 1})
    if twice:
        raise ValueError(f"lists {twice} more than once")
    return v


def _no_duplicates(v: list[Any]) -> list[Any]:
    """Drop repeated entries, keeping the first (a baseline listed twice is scored once)."""
    return list(dict.fromkeys(v))


def _time(v: dt.datetime | None) -> dt.datetime | None:
    """A cutoff (naive = UTC) within [MIN_TIME, MAX_TIME]."""
    if v is None:
        return v
    utc = v.replace(tzinfo=dt.timezone.utc) if v.tzinfo is None else v
    # subtraction, not astimezone: 9999-12-31T23:00-05:00 is past datetime.max in UTC
    if utc - MIN_TIME < dt.timedelta(0) or utc - MAX_TIME > dt.timedelta(0):
        raise ValueError(f"must be between {MIN_TIME.date()} and {MAX_TIME.date()}, got {v.isoformat()}")
    return v


def _duration(v: Any) -> Any:
    """A duration field: a number from TOML is seconds, as a bare number is on the command line."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        parse_duration(v)
        return repr(v) if isinstance(v, float) else str(v)
    return v


def _duration_ok(v: str) -> str:
    parse_duration(v)
    return v


def _values(v: Any) -> Any:
    """Event type values (--behaviors): 'a,b' or a list; integers (TOML `[1, 2]`) as their text."""
    v = _split_list(v)
    if isinstance(v, list):
        return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
    return v


def _nonempty(v: list[Any] | None) -> list[Any] | None:
    if v is not None and not v:
        raise ValueError("must not be empty when given")
    return v


Name = Annotated[str, AfterValidator(_name)]
"""A column name: not empty, no NUL or line break."""
PathField = Annotated[Path, AfterValidator(_path)]
OptPath = Annotated[Optional[Path], AfterValidator(_path)]
Names = Annotated[list[Name], BeforeValidator(_split_list), AfterValidator(_names)]
"""Column names, comma-separated on the command line; each valid, none twice."""
OptNames = Annotated[Optional[list[Name]], BeforeValidator(_split_list), AfterValidator(_names)]
Duration = Annotated[str, BeforeValidator(_duration), AfterValidator(_duration_ok)]
"""'10m', '7d', '1h30m' or seconds; at least 1us, at most 100 years."""
Time = Annotated[Optional[dt.datetime], AfterValidator(_time)]
"""A UTC cutoff (naive = UTC) between MIN_TIME and MAX_TIME."""
Seed = Annotated[int, _in(0, MAX_SEED)]
Days = Annotated[Optional[float], _in(0, MAX_DAYS)]
"""A day count: finite, 0 (an empty split) to 100 years."""
Fraction = Annotated[Optional[float], _in(0, 1, hi_open=True)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, defer_build=True)


class SessionizeConfig(_Base):
    """`sdm sessionize`: raw log -> sessions, long-term windows, splits, shards (SPEC 1-4)."""

    out: PathField = Path("runs/data")
    """Output directory; refused when not empty unless `overwrite`."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    items: OptPath = None
    """Optional item table (Parquet/CSV) keyed by the item column."""
    users: OptPath = None
    """Optional user table (Parquet/CSV) keyed by the user column."""
    vocab_from: OptPath = None
    """A previous data directory whose vocabularies are kept: every raw id and feature value keeps its index, new ones are appended (daily retraining with `sdm train --init-from`)."""
    user_col: Name = "user_id"
    """User column; when the default is absent but the log has a session column, each session is its own user (a name given explicitly must exist)."""
    item_col: Name = "item_id"
    time_col: Name = "timestamp"
    session_col: Annotated[str, AfterValidator(lambda v: _name(v, empty_ok=True))] = "session_id"
    """Back-end session id column (optional in the log; "" = ignore session ids). A name given explicitly must exist."""
    behavior_col: Name = "behavior"
    behaviors: Annotated[Optional[list[Name]], BeforeValidator(_values), AfterValidator(_nonempty)] = None
    """Keep only these event types (comma-separated); others are dropped and counted."""
    keep_duplicates: bool = False
    """Keep exact duplicate rows (same value in every column) as events; by default they are dropped and counted as `duplicate`."""
    item_features: Names = []
    """Item side-info columns (from the log or the items table), comma-separated."""
    multi_valued: Names = []
    """Item or user features whose strings hold several values ('Comedy|Romance'): the model embeds the mean of the values' embeddings (items.parquet / users.parquet `<f>_values`)."""
    value_sep: Annotated[str, AfterValidator(_name), Field(max_length=16)] = "|"
    """Separator of the values of a `multi_valued` feature."""
    numeric_features: OptNames = None
    """Features bucketised by quantiles of their training values instead of used as categories (default: the float columns among the features)."""
    numeric_buckets: Annotated[int, _in(2, 1000)] = 16
    """At most this many quantile buckets per numeric feature (plus one for missing values)."""
    user_features: Names = []
    """User profile columns from the users table, comma-separated."""
    time_unit: Literal["s", "ms"] | None = None
    """Unit of an integer epoch timestamp column."""
    time_format: Optional[Annotated[str, AfterValidator(_name), Field(max_length=256)]] = None
    """strftime pattern of a string timestamp column, e.g. '%Y-%m-%d %H:%M:%S UTC' (naive = UTC)."""
    format: Literal["auto", "csv", "parquet"] = "auto"
    """Format of the log file; auto: .csv/.tsv/.txt are CSV, anything else Parquet (side tables go by their suffix)."""
    delimiter: Optional[Annotated[str, AfterValidator(_name), Field(max_length=16)]] = None
    """CSV field separator of the log and CSV side tables (default ',', tab for .tsv)."""
    gap: Duration = "10m"
    """Two events less than this apart are one session (e.g. 10m, 90s, 1h; a bare number is seconds)."""
    max_session_len: Annotated[int, _in(2, 100_000)] = 50
    """Sessions longer than this are cut into chunks; at least 2 (a one-event session has no sample)."""
    long_window: Duration = "7d"
    """Long-term window before each session (e.g. 7d, 12h; a bare number is seconds)."""
    max_long_len: Annotated[int, _in(1, 100_000)] = 50
    train_start: Time = None
    """Sessions starting before this time are not samples of any split: their events only fill later sessions' long-term windows (train on the newest days of a longer log, e.g. daily retraining with --init-from). Default: none."""
    valid_start: Time = None
    test_start: Time = None
    valid_days: Days = None
    test_days: Days = None
    valid_fraction: Fraction = None
    test_fraction: Fraction = None
    rows_per_shard: Annotated[int, _in(1, 10**9)] = 50_000
    """Target users (rows) per shard."""
    min_shards: Annotated[int, _in(1, 100_000)] = 8
    """At least this many shards per split (when it has that many users), so every DDP rank and worker gets one."""
    buckets: Annotated[Optional[int], _in(1, 100_000)] = None
    """Hash-partition users into this many buckets, sessionized one at a time: peak memory ~ log / buckets; same output. Default: ceil(rows / bucket_events)."""
    # 12M, not 16M: at 100M events 8-16 buckets were faster than 6-7, with less memory (README, Scale)
    bucket_events: Annotated[int, _in(1, 10**12)] = 12_000_000
    """With buckets unset: log rows per bucket, so memory follows this setting, not the log (1 bucket up to 12M rows)."""
    workers: Annotated[int, _in(1, 1024)] = 1
    """Buckets sessionized in parallel processes (each with cores / workers polars threads)."""
    engine: Literal["local", "ray"] = "local"
    """Who runs the passes over the buckets: this process ("local") or Ray tasks ("ray", needs the `ray` extra)."""
    ray_address: Optional[Annotated[str, AfterValidator(_name), Field(max_length=1024)]] = None
    """Ray cluster to run on with engine "ray" (e.g. "ray://head:10001" or "auto"); default: a Ray started on this machine."""

    @field_validator("train_start", "valid_start", "test_start")
    @classmethod
    def _as_utc(cls, v: dt.datetime | None) -> dt.datetime | None:
        """Naive cutoffs are UTC, like naive log timestamps."""
        if v is not None and v.tzinfo is None:
            return v.replace(tzinfo=dt.timezone.utc)
        return v

    @model_validator(mode="after")
    def _check_split(self) -> SessionizeConfig:
        for name in ("valid", "test"):
            given = [f"--{name}-{k}" for k in ("start", "days", "fraction") if getattr(self, f"{name}_{k}") is not None]
            if len(given) > 1:
                raise ValueError(f"give one of --{name}-start, --{name}-days, --{name}-fraction, not {' and '.join(given)}")
        if self.valid_start and self.test_start and self.valid_start > self.test_start:
            raise ValueError(
                f"--valid-start ({self.valid_start.isoformat()}) must not be after --test-start ({self.test_start.isoformat()})"
            )
        for name in ("valid", "test"):
            later = getattr(self, f"{name}_start")
            if self.train_start and later and self.train_start >= later:
                raise ValueError(
                    f"--train-start ({self.train_start.isoformat()}) must be before --{name}-start ({later.isoformat()}): "
                    "the training split would be empty"
                )
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

    @property
    def gap_us(self) -> int:
        """The session gap in microseconds, the unit of the sessionizer's times."""
        return self.gap_td // dt.timedelta(microseconds=1)

    @property
    def long_window_us(self) -> int:
        """The long-term window in microseconds."""
        return self.long_window_td // dt.timedelta(microseconds=1)


Variant = Literal["SDMMA", "PSDMMA", "PSDMMAL", "PSDMMAL-N", "PSDMMAL-NoS", "DNN", "SASRec"]

class TrainConfig(_Base):
    """`sdm train`: streaming dataset over the shards -> SDM model checkpoint."""

    data: PathField = Path("runs/data")
    out: PathField = Path("runs/model")
    variant: Variant = "PSDMMAL-N"
    epochs: Annotated[int, _in(1, 100_000)] = 12
    max_steps: Annotated[Optional[int], _in(1, 10**12)] = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: Annotated[int, _in(1, 1_000_000)] = 64
    """Sessions per batch (each session contributes all its positions)."""
    lr: Annotated[float, _in(0, lo_open=True)] = 5e-3
    weight_decay: Annotated[float, _in(0)] = 1e-5
    warmup_steps: Annotated[int, _in(0, 10**12)] = 100
    grad_clip: Annotated[float, _in(0, lo_open=True)] = 1.0
    item_features: OptNames = None
    """Item side features to use (comma-separated; default: all in the data)."""
    user_features: OptNames = None
    """User features for e_u (comma-separated; default: the profile, without the user id `user`)."""
    embedding_dim: Annotated[int, _in(1, 16_384)] = 64
    lstm_layers: Annotated[int, _in(1, 64)] = 1
    num_heads: Annotated[int, _in(1, 1024)] = 2
    num_blocks: Annotated[int, _in(1, 64)] = 2
    """Transformer blocks of the SASRec variant (a baseline trained by the same trainer)."""
    dropout: Annotated[float, _in(0, 1, hi_open=True)] = 0.2
    num_targets: Annotated[int, _in(1, 1000)] = 5
    """N of PSDMMAL-N (next N items); the other variants use 1."""
    user_residual: bool = True
    """Short-term output h_p + user attention instead of the attention alone (beyond the paper; --no-user-residual is the paper's)."""
    state_query: bool = True
    """User attention's query adds the position's own state to e_u (beyond the paper; --no-state-query is the paper's)."""
    repeat: bool = True
    """Repeat head: items of the session and of the 7-day window get a learned re-visit score (beyond the paper; --no-repeat is the paper's model)."""
    repeat_prior: Annotated[float, _in(0)] = 2.0
    """Repeat head's initial copy bonus for the session's last item (prior * 0.5^d for d items back, gate bias prior / 2; 0 = start neutral)."""
    target_decay: Annotated[float, _in(0, 1, lo_open=True)] = 0.1
    """PSDMMAL-N: weight decay ** k for the target k items ahead (1.0 = all N alike, as the paper)."""
    loss: Literal["auto", "sampled", "inbatch", "full"] = "auto"
    """auto: full softmax while batch_size x max_session_len x items <= 2^28 (1 GiB of logits; 83,886 items at the defaults), sampled softmax (log-Q corrected) above."""
    num_negatives: Annotated[int, _in(1, 1_000_000)] = 1000
    neg_power: Annotated[float, _in(0, 10)] = 0.75
    """Negatives drawn with probability proportional to count ** neg_power."""
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = False
    """Continue from `out`/last.pt."""
    tensorboard: OptPath = None
    """Also write loss, learning rate and validation metrics as TensorBoard scalars to this directory (the `tensorboard` extra)."""
    init_from: OptPath = None
    """Warm start: a previous model directory (best.pt) trained on data whose vocabularies this data extends (`sdm sessionize --vocab-from`); every weight carried over, tables grown."""
    init_moments: bool = True
    """With --init-from: also carry the previous run's optimizer moments (AdamW's running averages), so training continues where it stopped instead of re-settling a fresh optimizer; --no-init-moments starts a fresh one."""
    id_dropout: Annotated[float, _in(0, 1, hi_open=True)] = 0.0
    """Probability that an item's id embedding is left out of the item tower in training, so its vector must also come from side features (cold items)."""
    cold_scale: Annotated[Optional[float], _in(0, 100)] = None
    """Multiplier of cold items' side-feature vectors (data with a catalogue, `--candidates catalogue`); default: chosen on validation after training, within --cold-budget."""
    cold_budget: Annotated[float, _in(0, 1)] = 0.01
    """When --cold-scale is chosen: the largest relative loss of validation HR@eval_k on warm targets (items in the vocabulary) that cold candidates may cost."""
    neighbours: Annotated[int, _in(0, 10_000)] = 20
    """Neighbours per item of the neighbour term (item-CF's scores added to the model's, with a weight chosen on validation after training); 0 switches the term off."""
    neighbour_weight: Annotated[Optional[float], _in(0, 10_000)] = None
    """Weight of the neighbour term; default: chosen on validation after training (0 = off)."""
    overwrite: bool = False
    """Replace the checkpoints and log of an earlier run in `out` (without it a fresh run there is refused)."""
    num_workers: Annotated[int, _in(0, 1024)] = 0
    shuffle_buffer: Annotated[int, _in(1, 10**9)] = 2048
    """Sessions held in the shuffle buffer (memory bound)."""
    patience: Annotated[int, _in(1, 1_000_000)] = 3
    """Stop after this many validations without a better `select_metric`."""
    eval_k: Annotated[int, _in(1, 10_000_000)] = 50
    ema_decay: Annotated[float, _in(0, 1, hi_open=True)] = 0.999
    """Validate and keep best.pt with a moving average of the weights: per step w_avg += (1 - d)(w - w_avg), d = min(ema_decay, (1 + step) / (10 + step)); 0 = off."""
    select_metric: Literal["hr", "ndcg", "hr+ndcg"] = "hr+ndcg"
    """Validation metric at eval_k that picks best.pt and drives early stopping (hr+ndcg: their sum)."""
    eval_every: Annotated[Optional[int], _in(1, 10**12)] = None
    """Validate every this many steps as well as after each epoch."""
    checkpoint_every: Annotated[Optional[int], _in(1, 10**12)] = None
    """Also write last.pt every this many steps, so a killed run resumes mid-epoch (exactly, as at an epoch end)."""
    log_every: Annotated[int, _in(1, 10**12)] = 20
    amp: bool = True
    """Mixed precision (bf16) on GPU; ignored on CPU."""
    verify: bool = True
    """Check every data file's sha256 against the manifest before reading it: about 0.4 s per GB on 2 cores, 0.15x one read of the shards (bench/verify_bench.py); --no-verify skips it."""

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TrainConfig:
        # checked here, not only in ModelConfig (built after the data is read): fail before any work
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"--embedding-dim {self.embedding_dim} must be divisible by --num-heads {self.num_heads} "
                "(each attention head gets embedding_dim / num_heads dimensions)"
            )
        return self


class EvaluateConfig(_Base):
    """`sdm evaluate`: full-ranking metrics on held-out sessions (SPEC 6)."""

    data: PathField = Path("runs/data")
    model: PathField = Path("runs/model")
    out: PathField = Path("runs/eval")
    split: Literal["test", "valid"] = "test"
    k: Annotated[list[Annotated[int, _in(1, 10_000_000)]], BeforeValidator(_split_list)] = [20, 50, 100]
    """Cut-offs K; the default list is capped at the catalogue size (with a note), an explicit K above it is an error."""
    overwrite: bool = False
    """Replace the reports of an earlier evaluation in `out` (without it a non-empty `out` is refused)."""
    baseline: Annotated[
        list[Literal["popularity", "itemcf", "itemcf-repeat", "stan", "vsknn", "cold-category"]],
        BeforeValidator(_split_list),
        AfterValidator(_no_duplicates),
    ] = []
    """Baselines to score beside the model, comma-separated (only them when no `model` is given and the default has no best.pt)."""
    exclude_seen: bool = False
    """Never recommend items already in the query's session prefix (the current session only; see --exclude-history)."""
    exclude_history: bool = False
    """Never recommend items of the query's long-term window either (the user's last 7 days before the session); implies --exclude-seen."""
    candidates: Literal["vocabulary", "catalogue"] = "vocabulary"
    """vocabulary: rank the items training saw; catalogue: also cold items (side info, no training event), each from the time the catalogue knows it."""
    dump_topk: bool = False
    index: Literal["exact", "faiss"] = "exact"
    batch_size: Annotated[int, _in(1, 1_000_000)] = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    verify: bool = True
    """Check every data file's sha256 against the manifest before reading it: about 0.4 s per GB on 2 cores, 0.15x one read of the shards (bench/verify_bench.py); --no-verify skips it."""

    @field_validator("k")
    @classmethod
    def _check_k(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must not be empty (give cut-offs, e.g. 20,50,100)")
        return sorted(set(v))


class ExportConfig(_Base):
    """`sdm export`: item vectors, a faiss index and the user tower for serving."""

    data: PathField = Path("runs/data")
    """Shard directory the model was trained on (manifest, vocabularies, item table)."""
    model: PathField = Path("runs/model")
    """Training output directory holding best.pt."""
    out: PathField = Path("runs/export")
    """Output directory; refused when not empty unless `overwrite`."""
    overwrite: bool = False
    """Replace the export files of a non-empty output directory."""
    faiss: bool = True
    """Write items.faiss (an index chosen by catalogue size, see retrieval/index.py) when faiss is installed."""
    onnx: bool = True
    """Also write user_tower.onnx when the onnx extra is installed."""
    verify: bool = True
    """Check every data file's sha256 against the manifest before reading it: about 0.4 s per GB on 2 cores, 0.15x one read of the shards (bench/verify_bench.py); --no-verify skips it."""


class RecommendConfig(_Base):
    """`sdm recommend LOG`: top-K items for every user of a log, from the user's latest session."""

    data: PathField = Path("runs/data")
    """Shard directory the model was trained on (sessionize config, vocabularies, item and user tables)."""
    model: PathField = Path("runs/model")
    """Training output directory holding best.pt."""
    out: PathField = Path("runs/recs.parquet")
    """Parquet file: user_id, session_start, items (raw ids, best first), scores."""
    overwrite: bool = False
    """Replace an existing output file."""
    at: Time = None
    """Recommend as of this time: events at or after it are ignored (default: after the last event)."""
    k: Annotated[int, _in(1, 10_000_000)] = 100
    """Items per user."""
    exclude_seen: bool = False
    """Never recommend items of the user's current session (see --exclude-history)."""
    exclude_history: bool = False
    """Never recommend items of the user's long-term window either (the last 7 days before the session); implies --exclude-seen."""
    candidates: Literal["vocabulary", "catalogue"] = "vocabulary"
    """vocabulary: recommend items training saw; catalogue: also cold items with side info (their vectors come from side features)."""
    index: Literal["exact", "faiss"] = "exact"
    """Exact chunked scoring (the code of `sdm evaluate`) or a faiss index (retrieval/index.py)."""
    items: OptPath = None
    """Raw items table for side features the log lacks (default: the one training used, if it still exists)."""
    batch_size: Annotated[int, _in(1, 10_000_000)] = 1024
    """Users scored per batch."""
    bucket_events: Annotated[int, _in(1, 10**12)] = 5_000_000
    """Events sessionized at a time: users are hash-partitioned into ceil(events / this) buckets (memory bound)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    verify: bool = True
    """Check every data file's sha256 against the manifest before reading it: about 0.4 s per GB on 2 cores, 0.15x one read of the shards (bench/verify_bench.py); --no-verify skips it."""


class SynthConfig(_Base):
    """`sdm synth`: a synthetic e-commerce log with planted sequential structure."""

    out: PathField = Path("runs/synth/logs.parquet")
    """Log file (Parquet); `items.parquet` and `users.parquet` are written next to it."""
    overwrite: bool = False
    """Replace existing output files."""
    events: Annotated[int, _in(1, 10**11)] = 200_000
    """Number of events (exact)."""
    users: Annotated[Optional[int], _in(1, 10**9)] = None
    """Number of users (default: events // 50)."""
    items: Annotated[Optional[int], _in(1, 10**9)] = None
    """Number of items (default: events // 25, between 100 and 4,000,000)."""
    categories: Annotated[Optional[int], _in(1, 10**9)] = None
    """Number of leaf categories (default: items // 40, between 5 and 10,000)."""
    brands: Annotated[Optional[int], _in(1, 10**9)] = None
    """Number of brands (default: items // 20, at least 5)."""
    shops: Annotated[Optional[int], _in(1, 10**9)] = None
    """Number of shops (default: brands // 2, at least 2)."""
    days: Annotated[float, _in(0, MAX_DAYS, lo_open=True)] = 30.0
    """Length of the logged period in days."""
    zipf: Annotated[float, _in(0, 10, lo_open=True)] = 0.8
    """Exponent of the Zipf item popularity (weight of the r-th item = r ** -zipf)."""
    session_mean_len: Annotated[float, _in(1, 10_000)] = 6.0
    """Mean number of events per session (geometric, heavier for some users)."""
    session_id_share: Annotated[float, _in(0, 1)] = 0.5
    """Share of sessions whose events carry a back-end session id."""
    seed: Seed = 0
    chunk_events: Annotated[int, _in(1, 10**11)] = 1_000_000
    """Events generated and written per chunk (bounds memory)."""

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.num_users > self.events:
            raise ValueError(f"users ({self.num_users}) must not exceed events ({self.events}) (--users, --events)")
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

    out: PathField = Path("runs/demo")
    overwrite: bool = True
    """The demo replaces its own previous output by default."""
    events: Annotated[int, _in(1, 10**9)] = 100_000
    """Size of the synthetic log."""
    epochs: Annotated[int, _in(1, 100_000)] = 4
    max_steps: Annotated[Optional[int], _in(1, 10**12)] = None
    seed: Seed = 0


SECTIONS: dict[str, type[_Base]] = {
    "sessionize": SessionizeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "recommend": RecommendConfig,
    "synth": SynthConfig,
    "demo": DemoConfig,
}


def _toml_error(path: Path, text: str) -> ConfigError:
    return ConfigError(_one_line(f"{path}: {text}"))


def _one_line(text: str) -> str:
    """A message on one line whatever the values in it hold."""
    return " ".join(text.splitlines()) if "\n" in text or "\r" in text else text


def _sections_with(key: str) -> list[str]:
    return [name for name, cls in SECTIONS.items() if key in cls.model_fields]


def load_toml_section(path: Path, section: str) -> dict[str, Any]:
    """Read `[section]` of a TOML file; keys may use '-' or '_'.

    A file with no sections at all is taken as the section itself. A file with
    sections may hold only known sections (`SECTIONS`: `[sessionize]`, `[train]`, ...,
    as the data/*.toml templates do) and no key outside them; every key of every
    section must be a field of that section's command, so a typo in `[synth]` fails
    `sdm sessionize --config` too, not only `sdm synth`.

    Raises:
        ConfigError: unreadable or invalid TOML, an unknown section, a key outside the
            sections, an unknown key in another section, a key given both as `a-b` and `a_b`.
    """
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise _toml_error(path, "config file not found") from None
    except IsADirectoryError:
        raise _toml_error(path, "config is a directory, expected a TOML file") from None
    except UnicodeDecodeError as exc:
        raise _toml_error(path, f"config file is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _toml_error(path, f"cannot read config file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise _toml_error(path, f"not valid TOML ({exc})") from None
    known = set(SECTIONS)
    if any(isinstance(v, dict) for v in doc.values()):
        unknown = [k for k, v in doc.items() if isinstance(v, dict) and k not in known]
        if unknown:
            raise _toml_error(path, f"unknown section(s) {unknown}; expected {sorted(known)}")
        loose = [k for k, v in doc.items() if not isinstance(v, dict)]
        if loose:
            key = loose[0]
            home = _sections_with(key.replace("-", "_"))
            hint = f"; put it under [{section if section in home else home[0]}]" if home else ", and no command has it"
            more = f" (+{len(loose) - 1} more)" if len(loose) > 1 else ""
            raise _toml_error(path, f"key {key!r} is outside any [section]{hint}{more}")
        for name, body in doc.items():
            if name == section:
                continue  # its keys are checked with their values by build_config
            bad = [k for k in body if k.replace("-", "_") not in SECTIONS[name].model_fields]
            if bad:
                raise _toml_error(path, f"unknown config key {bad[0]!r} in [{name}]")
        body = doc.get(section, {})
    else:
        body = doc
    values: dict[str, Any] = {}
    for k, v in body.items():
        key = k.replace("-", "_")
        if key in values:
            raise _toml_error(path, f"[{section}] gives {key!r} twice (as '-' and '_' spellings)")
        values[key] = v
    return values


def _flag(loc: tuple[Any, ...]) -> str:
    return "--" + str(loc[0]).replace("_", "-")


def build_config(cls: type[_Base], toml: Path | None, section: str, overrides: dict[str, Any]) -> Any:
    """Merge defaults < TOML section < explicit overrides, and validate.

    Raises:
        ConfigError: one line naming the offending key (and its flag) and value; with
            several bad values the first, and how many more ("+2 more").
    """
    values: dict[str, Any] = {}
    if toml is not None:
        values.update(load_toml_section(toml, section))
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    try:
        return cls(**values)
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        from_flag = not loc or loc[0] in flags or toml is None
        if err["type"] == "extra_forbidden":
            where = "flags" if from_flag else str(toml)
            raise ConfigError(_one_line(f"{where}: unknown config key {key!r} in [{section}]{more}")) from None
        msg = err["msg"].removeprefix("Value error, ")
        has_input = (
            "input" in err and not isinstance(err["input"], dict) and "got " not in msg and _show(err["input"]) not in msg
        )
        shown = f" (got {_show(err['input'])})" if has_input else ""
        if not loc:  # a check across fields: its message names the flags
            where = f"{toml} [{section}]" if toml is not None else f"invalid {section} config"
            raise ConfigError(_one_line(f"{where}: {msg}{more}")) from None
        if from_flag:
            raise ConfigError(_one_line(f"{_flag(loc)}: invalid {key!r}: {msg}{shown}{more}")) from None
        raise ConfigError(_one_line(f"{toml} [{section}]: invalid {key!r} (flag {_flag(loc)}): {msg}{shown}{more}")) from None


def save_config(cfg: _Base, path: Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(cfg.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
