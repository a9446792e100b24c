"""Typed configuration for every stage, loadable from TOML and from CLI flags.

One pydantic model per command (`SessionizeConfig`, `TrainConfig`,
`EvaluateConfig`, ...), all `extra="forbid"` and `frozen=True`, so a typo in a TOML
file or a flag fails loudly. A field `user_col` is the flag `--user-col` and the
TOML key `user_col` or `user-col` in the command's section (`[sessionize]`,
`[train]`, `[evaluate]`). Precedence: flag > TOML > default.

Every field is bounded (`sdm.fields`: counts, finite floats, durations up to 100
years, cutoffs within the int64-nanosecond range, non-empty names without NUL or
line breaks), and `sdm.configfile.build_config` turns a bad value into one
`ConfigError` line naming the key, its flag and the value.

Derived values (vocabulary sizes, cutoffs computed from fractions) are never
written back into a config: they live in the data manifest.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from contextvars import ContextVar
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdm.errors import ConfigError
from sdm.fields import (
    MAX_DAYS,
    Days,
    Duration,
    Fraction,
    Name,
    Names,
    OptNames,
    OptPath,
    PathField,
    Seed,
    Time,
    check_name,
    event_values,
    no_duplicates,
    nonempty,
    parse_duration,
    split_list,
    within,
)


RAW_ERRORS: ContextVar[bool] = ContextVar("sdm_raw_config_errors", default=False)
"""Set by `configfile.build_config`: validation errors stay pydantic's, for it to name the TOML file."""


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, defer_build=True)

    def __init__(self, **data: Any) -> None:
        """Built from Python (`TrainConfig(epochs=3)`), a bad value is a one-line `ConfigError`
        naming the field's flag, as on the command line (`configfile.build_config`, which
        validates without this, names the TOML file too)."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if RAW_ERRORS.get():  # `build_config` words them itself
                raise
            errors = exc.errors()
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            loc = errors[0].get("loc") or ()
            flag = f"--{str(loc[0]).replace('_', '-')}: " if loc else ""
            msg = str(errors[0].get("msg", "")).removeprefix("Value error, ")
            raise ConfigError(f"{type(self).__name__}: {flag}{msg}{more}".replace("\n", " ")) from None


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
    session_col: Annotated[str, AfterValidator(lambda v: check_name(v, empty_ok=True))] = "session_id"
    """Back-end session id column (optional in the log; "" = ignore session ids). A name given explicitly must exist."""
    behavior_col: Name = "behavior"
    behaviors: Annotated[Optional[list[Name]], BeforeValidator(event_values), AfterValidator(nonempty)] = None
    """Keep only these event types (comma-separated); others are dropped and counted."""
    keep_duplicates: bool = False
    """Keep exact duplicate rows (same value in every column) as events; by default they are dropped and counted as `duplicate`."""
    item_features: Names = []
    """Item side-info columns (from the log or the items table), comma-separated."""
    multi_valued: Names = []
    """Item or user features whose strings hold several values ('Comedy|Romance'): the model embeds the mean of the values' embeddings (items.parquet / users.parquet `<f>_values`)."""
    value_sep: Annotated[str, AfterValidator(check_name), Field(max_length=16)] = "|"
    """Separator of the values of a `multi_valued` feature."""
    numeric_features: OptNames = None
    """Features bucketised by quantiles of their training values instead of used as categories (default: the float columns among the features)."""
    numeric_buckets: Annotated[int, within(2, 1000)] = 16
    """At most this many quantile buckets per numeric feature (plus one for missing values)."""
    user_features: Names = []
    """User profile columns from the users table, comma-separated."""
    time_unit: Literal["s", "ms"] | None = None
    """Unit of an integer epoch timestamp column."""
    time_format: Optional[Annotated[str, AfterValidator(check_name), Field(max_length=256)]] = None
    """strftime pattern of a string timestamp column, e.g. '%Y-%m-%d %H:%M:%S UTC' (naive = UTC)."""
    format: Literal["auto", "csv", "parquet"] = "auto"
    """Format of the log file; auto: .csv/.tsv/.txt are CSV, anything else Parquet (side tables go by their suffix)."""
    delimiter: Optional[Annotated[str, AfterValidator(check_name), Field(max_length=16)]] = None
    """CSV field separator of the log and CSV side tables (default ',', tab for .tsv)."""
    gap: Duration = "10m"
    """Two events less than this apart are one session (e.g. 10m, 90s, 1h; a bare number is seconds)."""
    max_session_len: Annotated[int, within(2, 100_000)] = 50
    """Sessions longer than this are cut into chunks; at least 2 (a one-event session has no sample)."""
    long_window: Duration = "7d"
    """Long-term window before each session (e.g. 7d, 12h; a bare number is seconds)."""
    max_long_len: Annotated[int, within(1, 100_000)] = 50
    train_start: Time = None
    """Sessions starting before this time are not samples of any split: their events only fill later sessions' long-term windows (train on the newest days of a longer log, e.g. daily retraining with --init-from). Default: none."""
    valid_start: Time = None
    test_start: Time = None
    valid_days: Days = None
    test_days: Days = None
    valid_fraction: Fraction = None
    test_fraction: Fraction = None
    rows_per_shard: Annotated[int, within(1, 10**9)] = 50_000
    """Target users (rows) per shard."""
    min_shards: Annotated[int, within(1, 100_000)] = 8
    """At least this many shards per split (when it has that many users), so every DDP rank and worker gets one."""
    buckets: Annotated[Optional[int], within(1, 100_000)] = None
    """Hash-partition users into this many buckets, sessionized one at a time: peak memory ~ log / buckets; same output. Default: ceil(rows / bucket_events)."""
    # 12M, not 16M: at 100M events 8-16 buckets were faster than 6-7, with less memory (README, Scale)
    bucket_events: Annotated[int, within(1, 10**12)] = 12_000_000
    """With buckets unset: log rows per bucket, so memory follows this setting, not the log (1 bucket up to 12M rows)."""
    workers: Annotated[int, within(1, 1024)] = 1
    """Buckets sessionized in parallel processes (each with cores / workers polars threads)."""
    engine: Literal["local", "ray"] = "local"
    """Who runs the passes over the buckets: this process ("local") or Ray tasks ("ray", needs the `ray` extra)."""
    ray_address: Optional[Annotated[str, AfterValidator(check_name), Field(max_length=1024)]] = None
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
    epochs: Annotated[int, within(1, 100_000)] = 12
    max_steps: Annotated[Optional[int], within(1, 10**12)] = None
    """Stop after this many optimizer steps, or at the end of --epochs if that comes first."""
    batch_size: Annotated[int, within(1, 1_000_000)] = 64
    """Sessions per batch (each session contributes all its positions)."""
    lr: Annotated[float, within(0, lo_open=True)] = 5e-3
    weight_decay: Annotated[float, within(0)] = 1e-5
    warmup_steps: Annotated[int, within(0, 10**12)] = 100
    grad_clip: Annotated[float, within(0, lo_open=True)] = 1.0
    item_features: OptNames = None
    """Item side features to use (comma-separated; default: all in the data)."""
    user_features: OptNames = None
    """User features for e_u (comma-separated; default: the profile, without the user id `user`)."""
    embedding_dim: Annotated[int, within(1, 16_384)] = 64
    lstm_layers: Annotated[int, within(1, 64)] = 1
    num_heads: Annotated[int, within(1, 1024)] = 2
    num_blocks: Annotated[int, within(1, 64)] = 2
    """Transformer blocks of the SASRec variant (a baseline trained by the same trainer)."""
    dropout: Annotated[float, within(0, 1, hi_open=True)] = 0.2
    num_targets: Annotated[int, within(1, 1000)] = 5
    """N of PSDMMAL-N (next N items); the other variants use 1."""
    user_residual: bool = True
    """Short-term output h_p + user attention instead of the attention alone (beyond the paper; --no-user-residual is the paper's)."""
    state_query: bool = True
    """User attention's query adds the position's own state to e_u (beyond the paper; --no-state-query is the paper's)."""
    repeat: bool = True
    """Repeat head: items of the session and of the 7-day window get a learned re-visit score (beyond the paper; --no-repeat is the paper's model)."""
    repeat_prior: Annotated[float, within(0)] = 2.0
    """Repeat head's initial copy bonus for the session's last item (prior * 0.5^d for d items back, gate bias prior / 2; 0 = start neutral)."""
    target_decay: Annotated[float, within(0, 1, lo_open=True)] = 0.1
    """PSDMMAL-N: weight decay ** k for the target k items ahead (1.0 = all N alike, as the paper)."""
    loss: Literal["auto", "sampled", "inbatch", "full"] = "auto"
    """auto: full softmax while batch_size x max_session_len x items <= 2^28 (1 GiB of logits; 83,886 items at the defaults), sampled softmax (log-Q corrected) above."""
    num_negatives: Annotated[int, within(1, 1_000_000)] = 1000
    neg_power: Annotated[float, within(0, 10)] = 0.75
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
    distill_weight: Annotated[float, within(0, 1000)] = 0.0
    """With --init-from: weight of a term that keeps the previous model's scores (the KL divergence from its softmax over each step's candidates), so fine-tuning on the newest day forgets less of the days before; 0 turns it off."""
    new_item_lr_scale: Annotated[float, within(0, 1000, lo_open=True)] = 1.0
    """With --init-from: the learning rate of the id embeddings of items new since the previous model, as a multiple of --lr; they are learnt from the newest day alone while every other weight has been trained for days; 1 trains them like the rest."""
    id_dropout: Annotated[float, within(0, 1, hi_open=True)] = 0.0
    """Probability that an item's id embedding is left out of the item tower in training, so its vector must also come from side features (cold items)."""
    cold_scale: Annotated[Optional[float], within(0, 100)] = None
    """Multiplier of cold items' side-feature vectors (data with a catalogue, `--candidates catalogue`); default: chosen on validation after training, within --cold-budget."""
    cold_budget: Annotated[float, within(0, 1)] = 0.01
    """When --cold-scale is chosen: the largest relative loss of validation HR@eval_k on warm targets (items in the vocabulary) that cold candidates may cost."""
    neighbours: Annotated[int, within(0, 10_000)] = 20
    """Neighbours per item of the neighbour term (item-CF's scores added to the model's, with a weight chosen on validation after training); 0 switches the term off."""
    neighbour_weight: Annotated[Optional[float], within(0, 10_000)] = None
    """Weight of the neighbour term; default: chosen on validation after training (0 = off)."""
    overwrite: bool = False
    """Replace the checkpoints and log of an earlier run in `out` (without it a fresh run there is refused)."""
    num_workers: Annotated[int, within(0, 1024)] = 0
    shuffle_buffer: Annotated[int, within(1, 10**9)] = 2048
    """Sessions held in the shuffle buffer (memory bound)."""
    patience: Annotated[int, within(1, 1_000_000)] = 3
    """Stop after this many validations without a better `select_metric`."""
    eval_k: Annotated[int, within(1, 10_000_000)] = 50
    ema_decay: Annotated[float, within(0, 1, hi_open=True)] = 0.999
    """Validate and keep best.pt with a moving average of the weights: per step w_avg += (1 - d)(w - w_avg), d = min(ema_decay, (1 + step) / (10 + step)); 0 = off."""
    select_metric: Literal["hr", "ndcg", "hr+ndcg"] = "hr+ndcg"
    """Validation metric at eval_k that picks best.pt and drives early stopping (hr+ndcg: their sum)."""
    eval_every: Annotated[Optional[int], within(1, 10**12)] = None
    """Validate every this many steps as well as after each epoch."""
    checkpoint_every: Annotated[Optional[int], within(1, 10**12)] = None
    """Also write last.pt every this many steps, so a killed run resumes mid-epoch (exactly, as at an epoch end)."""
    log_every: Annotated[int, within(1, 10**12)] = 20
    amp: bool = True
    """Mixed precision (bf16) on GPU; ignored on CPU."""
    verify: bool = True
    """Check every data file's sha256 against the manifest before reading it: about 0.4 s per GB on 2 cores, 0.15x one read of the shards (bench/verify_bench.py); --no-verify skips it."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        """Across fields: the heads divide the dimension; --resume or --overwrite; no flag that acts on nothing."""
        # checked here, not only in ModelConfig (built after the data is read): fail before any work
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"--embedding-dim {self.embedding_dim} must be divisible by --num-heads {self.num_heads} "
                "(each attention head gets embedding_dim / num_heads dimensions)"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        given = self.model_fields_set
        for flag, unused in (
            ("num_blocks", self.variant != "SASRec" and "--num-blocks acts only with --variant SASRec"),
            ("num_targets", self.variant != "PSDMMAL-N" and f"--num-targets is the N of PSDMMAL-N; {self.variant} predicts 1"),
            ("repeat_prior", not self.repeat and "--repeat-prior sets the repeat head, which --no-repeat leaves out"),
            ("num_negatives", self.loss == "full" and "--num-negatives draws negatives; --loss full scores every item"),
            ("neg_power", self.loss == "full" and "--neg-power draws negatives; --loss full scores every item"),
        ):  # a flag that would act on nothing is a mistake the user should hear about
            if flag in given and unused:
                raise ValueError(unused)
        return self


def _check_exclusion(cfg: Any) -> Any:
    """`--exclude-history` implies `--exclude-seen`: asking for it with `--no-exclude-seen` is a contradiction."""
    if cfg.exclude_history and not cfg.exclude_seen and "exclude_seen" in cfg.model_fields_set:
        raise ValueError("--exclude-history excludes the session's items too: it contradicts --no-exclude-seen")
    return cfg


class EvaluateConfig(_Base):
    """`sdm evaluate`: full-ranking metrics on held-out sessions (SPEC 6)."""

    data: PathField = Path("runs/data")
    model: PathField = Path("runs/model")
    out: PathField = Path("runs/eval")
    split: Literal["test", "valid"] = "test"
    k: Annotated[list[Annotated[int, within(1, 10_000_000)]], BeforeValidator(split_list), AfterValidator(no_duplicates)] = [20, 50, 100]
    """Cut-offs K; the default list is capped at the catalogue size (with a note), an explicit K above it is an error."""
    overwrite: bool = False
    """Replace the reports of an earlier evaluation in `out` (without it a non-empty `out` is refused)."""
    baseline: Annotated[
        list[Literal["popularity", "itemcf", "itemcf-repeat", "stan", "vsknn", "cold-category"]],
        BeforeValidator(split_list),
        AfterValidator(no_duplicates),
    ] = []
    """Baselines to score beside the model, comma-separated (only them when no `model` is given and the default has no best.pt)."""
    exclude_seen: bool = False
    """Never recommend items already in the query's session prefix (the current session only; see --exclude-history)."""
    exclude_history: bool = False
    """Never recommend items of the query's long-term window either (the user's last 7 days before the session); implies --exclude-seen."""
    _exclusion = model_validator(mode="after")(_check_exclusion)
    candidates: Literal["vocabulary", "catalogue"] = "vocabulary"
    """vocabulary: rank the items training saw; catalogue: also cold items (side info, no training event), each from the time the catalogue knows it."""
    dump_topk: bool = False
    index: Literal["exact", "faiss"] = "exact"
    batch_size: Annotated[int, within(1, 1_000_000)] = 256
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
    k: Annotated[int, within(1, 10_000_000)] = 100
    """Items per user."""
    exclude_seen: bool = False
    """Never recommend items of the user's current session (see --exclude-history)."""
    exclude_history: bool = False
    """Never recommend items of the user's long-term window either (the last 7 days before the session); implies --exclude-seen."""
    _exclusion = model_validator(mode="after")(_check_exclusion)
    candidates: Literal["vocabulary", "catalogue"] = "vocabulary"
    """vocabulary: recommend items training saw; catalogue: also cold items with side info (their vectors come from side features)."""
    index: Literal["exact", "faiss"] = "exact"
    """Exact chunked scoring (the code of `sdm evaluate`) or a faiss index (retrieval/index.py)."""
    items: OptPath = None
    """Raw items table for side features the log lacks (default: the one training used, if it still exists)."""
    batch_size: Annotated[int, within(1, 10_000_000)] = 1024
    """Users scored per batch."""
    bucket_events: Annotated[int, within(1, 10**12)] = 5_000_000
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
    events: Annotated[int, within(1, 10**11)] = 200_000
    """Number of events (exact)."""
    users: Annotated[Optional[int], within(1, 10**9)] = None
    """Number of users (default: events // 50)."""
    items: Annotated[Optional[int], within(1, 10**9)] = None
    """Number of items (default: events // 25, between 100 and 4,000,000)."""
    categories: Annotated[Optional[int], within(1, 10**9)] = None
    """Number of leaf categories (default: items // 40, between 5 and 10,000)."""
    brands: Annotated[Optional[int], within(1, 10**9)] = None
    """Number of brands (default: items // 20, at least 5)."""
    shops: Annotated[Optional[int], within(1, 10**9)] = None
    """Number of shops (default: brands // 2, at least 2)."""
    days: Annotated[float, within(0, MAX_DAYS, lo_open=True)] = 30.0
    """Length of the logged period in days."""
    zipf: Annotated[float, within(0, 10, lo_open=True)] = 0.8
    """Exponent of the Zipf item popularity (weight of the r-th item = r ** -zipf)."""
    session_mean_len: Annotated[float, within(1, 10_000)] = 6.0
    """Mean number of events per session (geometric, heavier for some users)."""
    session_id_share: Annotated[float, within(0, 1)] = 0.5
    """Share of sessions whose events carry a back-end session id."""
    seed: Seed = 0
    chunk_events: Annotated[int, within(1, 10**11)] = 1_000_000
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
    events: Annotated[int, within(1, 10**9)] = 100_000
    """Size of the synthetic log."""
    epochs: Annotated[int, within(1, 100_000)] = 4
    max_steps: Annotated[Optional[int], within(1, 10**12)] = None
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
