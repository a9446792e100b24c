"""Numeric features (`sessionize.numeric`): bucketised by quantiles of the training split.

Checked: the edges are numpy's inverted-CDF quantiles of the training values
(events for a log or items-table feature, users for a profile feature), on a
tiny hand-checked case and on random columns with nulls, NaN and ties (every
value lands in the bucket whose [lo, hi) holds it, missing values in the
missing bucket, at most `numeric_buckets` buckets); validation and test values
outside the training range fall in the end buckets; serving buckets a live
event as the sessionizer does; `--vocab-from` keeps the edges; two buckets
give the one-bucket output; which columns are numeric by default and which
settings are refused.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from conftest import read_sessions, write_log
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sessionize_scale import _same_output

from sdm.config import SessionizeConfig
from sdm.errors import ConfigError, DataError, SdmError
from sdm.names import vocab_file
from sdm.sessionize import encode, numeric, run

BASE = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
VALID = BASE + dt.timedelta(days=20)
TEST = BASE + dt.timedelta(days=25)


def expected_bucket(vocab: pl.DataFrame, value: float | None) -> int:
    """The oracle: the index of the row whose [lo, hi) holds `value` (+inf: the last); null/NaN: missing."""
    rows = vocab.filter(pl.col("lo").is_not_null()).sort("index")
    if value is None or math.isnan(value):
        return int(vocab.filter(pl.col("lo").is_null())["index"][0])
    if value == math.inf:
        return int(rows["index"][-1])
    hits = [i for i, lo, hi in rows.select("index", "lo", "hi").iter_rows() if lo <= value < hi]
    assert len(hits) == 1, (value, hits)
    return hits[0]


def reference_edges(values: list[float], buckets: int) -> list[float]:
    """Inner edges by numpy (`buckets` a power of 2, so k / buckets is exact): the quantiles but the smallest."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    distinct = np.unique(v)
    if len(distinct) <= buckets:
        return distinct[1:].tolist()
    q = np.quantile(v, np.arange(buckets) / buckets, method="inverted_cdf")
    return np.unique(q)[1:].tolist()


# --- the edges themselves -------------------------------------------------------------------


def test_small_case_by_hand() -> None:
    """1..100, 4 buckets: the quartiles 25, 50, 75 start the buckets; counts 24, 25, 25, 26."""
    counts = pl.DataFrame({"raw": [float(x) for x in range(1, 101)] + [None], "count": [1] * 100 + [3]})
    vocab = numeric.vocabulary(counts.drop_nulls(), total=103, buckets=4)
    assert vocab["raw"].to_list() == ["(-inf, 25)", "[25, 50)", "[50, 75)", "[75, inf)", "missing"]
    assert vocab["index"].to_list() == [2, 3, 4, 5, 6]
    assert vocab["count"].to_list() == [24, 25, 25, 26, 3]
    assert vocab["lo"].to_list() == [-math.inf, 25.0, 50.0, 75.0, None]
    assert vocab["hi"].to_list() == [25.0, 50.0, 75.0, math.inf, None]
    assert numeric.edges_of(vocab)[0].tolist() == reference_edges(list(range(1, 101)), 4) == [25.0, 50.0, 75.0]
    got = encode.encode_series(pl.Series([None, -7.0, 1.0, 24.9, 25.0, 99.0, 100.0, 1e9, float("nan")]), vocab)
    assert got.to_list() == [6, 2, 2, 2, 3, 5, 5, 5, 6]


def test_ties_give_fewer_buckets_and_few_values_keep_their_own() -> None:
    # 60% zeros: the quantiles 0/4..2/4 are all 0, 3/4 is 15: two buckets, not four
    values = [0.0] * 60 + [float(x) for x in range(1, 41)]
    counts = pl.DataFrame({"raw": values}).group_by("raw").len("count")
    assert numeric.edges_of(numeric.vocabulary(counts, 100, 4))[0].tolist() == reference_edges(values, 4) == [15.0]
    # at most B distinct values: each one its own bucket (a rating stays five values)
    ratings = pl.DataFrame({"raw": [1, 2, 3, 4, 5], "count": [1, 1, 1, 50, 50]})
    vocab = numeric.vocabulary(ratings, 103, 16)
    assert vocab["raw"].to_list() == ["(-inf, 2)", "[2, 3)", "[3, 4)", "[4, 5)", "[5, inf)", "missing"]
    assert vocab["count"].to_list() == [1, 1, 1, 50, 50, 0]
    # one more distinct value than buckets: quantiles again, and a rare value shares a bucket
    skewed = pl.DataFrame({"raw": [1.0, 2.0, 3.0], "count": [1000, 1, 1]})
    assert numeric.edges_of(numeric.vocabulary(skewed, 1002, 2))[0].tolist() == []
    assert numeric.edges_of(numeric.vocabulary(skewed, 1002, 3))[0].tolist() == [2.0, 3.0]


values_st = st.lists(
    st.one_of(
        st.none(),
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, width=64),
        st.sampled_from([0.0, -0.0, 1.0, 2.5, 2.5, float("nan"), math.inf, -math.inf]),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(values=values_st, buckets=st.integers(2, 40), seen=st.lists(st.floats(allow_nan=True), max_size=20))
def test_every_value_lands_in_its_bucket(values: list[float | None], buckets: int, seen: list[float]) -> None:
    """Random training columns: edges as numpy's (exact for B a power of 2), bucket membership, counts."""
    series = pl.Series("raw", values, dtype=pl.Float64)
    counts = series.drop_nulls().to_frame().group_by("raw").len("count").with_columns(pl.col("count").cast(pl.Int64))
    vocab = numeric.vocabulary(counts, len(values), buckets)
    numeric.check(vocab, "test")
    edges, missing = numeric.edges_of(vocab)
    assert vocab.height - 1 <= buckets and missing == vocab.height + 1
    assert list(edges) == sorted(set(edges))
    finite = sorted(x for x in values if x is not None and math.isfinite(x))
    # the exact rule: lower bounds are the smallest values with #(<= v) * B >= n * k, k < B
    if len(set(finite)) > buckets:
        n = len(finite)
        bounds = sorted({finite[max(0, -(-n * k // buckets) - 1)] for k in range(buckets)})
        assert list(edges) == bounds[1:]
        if buckets & (buckets - 1) == 0:
            assert list(edges) == reference_edges(values, buckets)
    else:
        assert list(edges) == sorted(set(finite))[1:]
    # training values and later ones (any float) land where [lo, hi) says; the counts add up
    probe = pl.Series([*values, *seen], dtype=pl.Float64)
    got = encode.encode_series(probe, vocab).to_list()
    assert got == [expected_bucket(vocab, v) for v in probe.to_list()]
    assert vocab["count"].sum() == len(values)
    assert vocab["count"][-1] == sum(v is None or math.isnan(v) for v in values)


# --- through the sessionizer ----------------------------------------------------------------


def _files(tmp: Path, seed: int = 0, shift: float = 0.0) -> dict[str, Path]:
    """A log with a float `price` (nulls, a NaN), an items table with an int `release_year` and a
    string `genre`, a users table with a float `income` and an int `age`.

    Training events (before VALID) have prices 1..~60; validation and test events also have
    prices far outside that range (-5, 1e6). Item 99 is in no table row (its year is missing);
    items 200..204 (in the items table) and 300 (in none) appear only after training (cold).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        t = BASE + dt.timedelta(hours=int(rng.integers(0, 24 * 24)))
        for _ in range(int(rng.integers(6, 14))):
            t += dt.timedelta(minutes=int(rng.choice([2, 3, 600, 1440])))
            if t >= BASE + dt.timedelta(days=30):
                break
            item = int(rng.integers(0, 100))
            price = float(np.round(rng.lognormal(2.5, 0.8), 2)) + shift
            if t >= VALID:
                item = int(rng.choice([item, 200 + u % 5, 300]))
                price = float(rng.choice([price, -5.0, 1e6]))
            rows.append((u, item, t, price if rng.random() > 0.05 else None))
    log = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC"), "price": pl.Float64}, orient="row")
    log = log.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col("price")).alias("price"))
    items = pl.DataFrame({
        "item_id": [*range(99), *range(200, 205)],
        "release_year": [int(y) for y in rng.integers(1940, 2024, 104)],
        "genre": [str(g) for g in rng.choice(["drama", "comedy", "horror"], 104)],
    })
    users = pl.DataFrame({
        "user_id": list(range(40)),
        "income": [None if u % 7 == 0 else float(np.round(rng.lognormal(10, 0.5))) for u in range(40)],
        "age": [int(a) for a in rng.integers(18, 70, 40)],
    })
    return {
        "log": write_log(log, tmp / "log.parquet"),
        "items": write_log(items, tmp / "items.parquet"),
        "users": write_log(users, tmp / "users.parquet"),
    }


def _sessionize(files: dict[str, Path], out: Path, **kw: Any) -> dict[str, Any]:
    base = dict(
        out=out, items=files["items"], users=files["users"], valid_start=VALID, test_start=TEST, min_shards=2,
        item_features=["price", "release_year", "genre"], user_features=["income", "age"],
        numeric_features=["price", "release_year", "income"],
    )  # fmt: skip
    return run(SessionizeConfig(**{**base, **kw}), files["log"], progress=False)


def _vocab(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / vocab_file(name))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("numeric")
    files = _files(tmp)
    manifest = _sessionize(files, tmp / "out")
    return {"tmp": tmp, "files": files, "out": tmp / "out", "manifest": manifest}


def test_edges_are_the_training_quantiles(data: dict[str, Any]) -> None:
    """price: training events' values; release_year (items table): its value at each training event; income: training users."""
    out, files = data["out"], data["files"]
    log = pl.read_parquet(files["log"])
    train = log.filter(pl.col("timestamp") < VALID)
    years = train.join(pl.read_parquet(files["items"]), on="item_id", how="left")
    users = pl.read_parquet(files["users"]).filter(pl.col("user_id").is_in(train["user_id"].unique().implode()))
    for name, values in (
        ("price", train["price"].to_list()),
        ("release_year", years["release_year"].cast(pl.Float64).to_list()),
        ("income", users["income"].to_list()),
    ):
        vocab = _vocab(out, name)
        edges = reference_edges(values, 16)
        assert len(edges) >= 10, name  # enough distinct values to be cut by quantiles
        assert numeric.edges_of(vocab)[0].tolist() == edges, name
        assert data["manifest"]["numeric"][name] == {"edges": edges, "missing_index": 2 + len(edges) + 1}
        # counts: training values per bucket, null and NaN in the missing bucket
        want = [expected_bucket(vocab, v) for v in values]
        assert vocab["count"].to_list() == [want.count(i) for i in vocab["index"].to_list()], name
    assert _vocab(out, "price")["count"][-1] == sum(v is None or math.isnan(v) for v in train["price"].to_list()) > 0
    assert set(data["manifest"]["numeric"]) == {"price", "release_year", "income"}
    # integer codes stay categorical: raw values, no bounds
    assert not numeric.is_numeric(_vocab(out, "age")) and not numeric.is_numeric(_vocab(out, "genre"))
    assert data["manifest"]["config"]["numeric_features"] == ["price", "release_year", "income"]


def test_shards_tables_and_catalogue_use_the_buckets(data: dict[str, Any]) -> None:
    """Every event, item row, user row and cold item carries its value's bucket; out of range: the end buckets."""
    out, files = data["out"], data["files"]
    price, year, income = (_vocab(out, n) for n in ("price", "release_year", "income"))
    log = pl.read_parquet(files["log"]).sort(["user_id", "timestamp"], maintain_order=True)
    items = pl.read_parquet(files["items"])
    year_of = dict(zip(items["item_id"].to_list(), items["release_year"].to_list()))
    sessions = read_sessions(out)
    got = {}  # (user, ts) -> (price index, year index)
    users = {}
    for s in sessions:
        users[s["user_id"]] = s["user"]
        for t, p, y in zip(s["ts"], s["price"], s["release_year"]):
            got[(int(s["user_id"]), t)] = (p, y)
    seen_ends = set()
    for u, item, t, p in log.select("user_id", "item_id", "timestamp", "price").iter_rows():
        key = (u, (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1))
        want_p = expected_bucket(price, p)
        assert got[key] == (want_p, expected_bucket(year, year_of.get(item))), (u, item, t, p)
        if p in (-5.0, 1e6):
            assert t >= VALID
            seen_ends.add(want_p)
    assert seen_ends == {2, price.height}  # below the training range: first bucket, above: the last
    # items.parquet: the last training event's price; users.parquet: the profile's income (null: missing)
    table = pl.read_parquet(out / "items.parquet")
    assert set(table["release_year"].to_list()) <= set(year["index"].to_list())
    row99 = table.filter(pl.col("item_id") == 99)
    assert row99["release_year"].to_list() == [year["index"][-1]]  # no row in the items table: missing
    profiles = pl.read_parquet(files["users"])
    ut = pl.read_parquet(out / "users.parquet").with_columns(pl.col("user_id").cast(pl.Int64))
    joined = ut.join(profiles, on="user_id", suffix="_raw")
    assert joined["income"].to_list() == [expected_bucket(income, v) for v in joined["income_raw"].to_list()]
    # the catalogue: cold items 200..204 of the items table carry their year's bucket, 300 (no row) missing
    cat = pl.read_parquet(out / "catalogue.parquet")
    cold = cat.filter(pl.col("item_id") >= 200)
    assert sorted(cold["item_id"].to_list()) == [200, 201, 202, 203, 204, 300]
    assert cold["release_year"].to_list() == [expected_bucket(year, year_of.get(i)) for i in cold["item_id"].to_list()]
    assert cold.filter(pl.col("item_id") == 300)["release_year"].to_list() == [year["index"][-1]]


def test_serving_buckets_like_the_sessionizer(data: dict[str, Any]) -> None:
    """`serve.sessions` (what `Recommender` and `sdm recommend` call) encodes a live event's price and year
    with the training buckets: the function the sessionizer used, the same indices."""
    from sdm.serve.lookups import Lookups
    from sdm.serve.sessions import latest_sessions, open_frame

    out = data["out"]
    price, year = _vocab(out, "price"), _vocab(out, "release_year")
    lo, hi = numeric.edges_of(price)[0][[0, -1]]
    prices = [None, -1e9, float(lo), float((lo + hi) / 2), float(hi), 1e9, float("nan"), 3.0]
    items = [1, 2, 3, 99, 200, 5, 6, 7]  # 99: no items-table row; 200: cold, in the table
    t0 = dt.datetime(2024, 4, 10, tzinfo=dt.timezone.utc)
    frame = pl.DataFrame({
        "user_id": [7] * len(items), "item_id": items, "price": prices,
        "timestamp": [t0 + dt.timedelta(minutes=i) for i in range(len(items))],
    }, schema={"user_id": pl.Int64, "item_id": pl.Int64, "price": pl.Float64, "timestamp": pl.Datetime("us", "UTC")})
    lookups = Lookups.load(out)
    assert numeric.is_numeric(lookups.vocabs["price"])
    inp, missing = open_frame(lookups, frame)
    assert missing == []  # release_year is read from items_raw.parquet, as training read the items table
    served = latest_sessions(inp, lookups, missing, None)
    n = int(served.arrays["seq_len"][0])
    assert n == len(items)
    years = dict(zip(*pl.read_parquet(data["files"]["items"]).select("item_id", "release_year").to_dict().values()))
    assert served.arrays["seq_price"][0, :n].tolist() == [expected_bucket(price, p) for p in prices]
    assert served.arrays["seq_price"][0, :n].tolist() == encode.encode_series(pl.Series(prices), price).to_list()
    assert served.arrays["seq_release_year"][0, :n].tolist() == [expected_bucket(year, years.get(i)) for i in items]


def test_serving_refuses_columns_of_another_kind(data: dict[str, Any]) -> None:
    """A price of text would be the missing bucket, a float user id (pandas' integers with a gap) no
    profile: served as unknown without a word. Both are refused, naming the column."""
    from sdm.serve.lookups import Lookups
    from sdm.serve.sessions import open_frame

    lookups = Lookups.load(data["out"])
    t0 = dt.datetime(2024, 4, 10, tzinfo=dt.timezone.utc)
    frame = pl.DataFrame({"user_id": [7, 7], "item_id": [1, 2], "timestamp": [t0, t0 + dt.timedelta(minutes=1)]})
    open_frame(lookups, frame.with_columns(pl.Series("price", [None, None], dtype=pl.Null)))  # nulls only: missing
    open_frame(lookups, frame.with_columns(pl.col("user_id").cast(pl.String)))  # profiles are found by their text
    for bad, message in (
        (frame.with_columns(pl.Series("price", ["cheap", "12.5"])), "column 'price' holds String; the numeric feature 'price' takes numbers"),
        (frame.with_columns(pl.col("user_id").cast(pl.Float64)), "user column 'user_id' holds Float64; training's user ids are integers"),
        (frame.with_columns(pl.Series("genre", [1, 2])), "column 'genre' holds Int64; training's values of 'genre' are strings"),
    ):
        with pytest.raises(DataError, match=message) as err:
            open_frame(lookups, bad)
        assert "\n" not in str(err.value)


def test_add_items_gives_an_absent_numeric_value_the_missing_bucket(data: dict[str, Any]) -> None:
    """As training does for an item without a price, not OOV (1), a row training never fills."""
    from sdm.serve.lookups import Lookups
    from sdm.serve.newitems import read_new_items

    lookups = Lookups.load(data["out"])
    price, year = (lookups.item_features.index(f) for f in ("price", "release_year"))
    missing = numeric.null_index(lookups.vocabs["price"]), numeric.null_index(lookups.vocabs["release_year"])
    assert 1 not in missing
    for frame in (pl.DataFrame({"item_id": [5000]}), pl.DataFrame({"item_id": [5000], "price": [None]})):
        side = read_new_items(frame, lookups, "item_id", pl.Int64, set()).side
        assert (side[0, price], side[0, year]) == missing, frame.schema
    side = read_new_items(pl.DataFrame({"item_id": [5000], "price": [3.0]}), lookups, "item_id", pl.Int64, set()).side
    assert side[0, price] == expected_bucket(lookups.vocabs["price"], 3.0) != missing[0]


def test_vocab_from_keeps_the_edges(data: dict[str, Any], tmp_path: Path) -> None:
    """A second log with shifted prices: its own run cuts other edges; with --vocab-from it keeps the first's."""
    files = _files(tmp_path / "b", seed=1, shift=7.5)
    plain = _sessionize(files, tmp_path / "plain")
    kept = _sessionize(files, tmp_path / "kept", vocab_from=data["out"])
    for name in ("price", "release_year", "income"):
        before, now = _vocab(data["out"], name), _vocab(tmp_path / "kept", name)
        assert now.select("raw", "index", "lo", "hi").equals(before.select("raw", "index", "lo", "hi")), name
        assert kept["numeric"][name] == data["manifest"]["numeric"][name]
        # the counts are this run's values in the kept buckets
        assert now["count"].sum() == _vocab(tmp_path / "plain", name)["count"].sum()
    assert plain["numeric"]["price"] != data["manifest"]["numeric"]["price"]
    # the shards bucket by the kept edges
    price = _vocab(data["out"], "price")
    log = pl.read_parquet(files["log"])
    values = {p for p in log["price"].to_list()}
    sessions = read_sessions(tmp_path / "kept")
    assert {i for s in sessions for i in s["price"]} <= {expected_bucket(price, v) for v in values}
    # another bucket count is refused, not ignored: the kept edges decide
    with pytest.raises(SdmError, match=r"--numeric-buckets: 16 in .*, 4 in this run"):
        _sessionize(files, tmp_path / "other", vocab_from=data["out"], numeric_buckets=4)
    _sessionize(files, tmp_path / "same", vocab_from=data["out"], numeric_buckets=16)  # the same count: no conflict
    # another numeric set is refused: its buckets could not be kept
    with pytest.raises(SdmError, match="numeric features"):
        _sessionize(files, tmp_path / "other", vocab_from=data["out"], numeric_features=["price", "income"])


def test_two_buckets_equal_one(data: dict[str, Any], tmp_path: Path) -> None:
    m = _sessionize(data["files"], tmp_path / "b2", buckets=2)
    _same_output(data["out"], tmp_path / "b2", data["manifest"], m)
    assert m["numeric"] == data["manifest"]["numeric"]
    for name in ("price", "release_year", "income"):
        assert _vocab(tmp_path / "b2", name).equals(_vocab(data["out"], name))
    for table in ("catalogue.parquet", "items.parquet"):
        assert pl.read_parquet(tmp_path / "b2" / table).equals(pl.read_parquet(data["out"] / table))


def test_numeric_buckets_without_numeric_features_is_refused(data: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--numeric-buckets 5 buckets numeric features, and there is none"):
        _sessionize(data["files"], tmp_path / "n", numeric_features=[], numeric_buckets=5)
    assert not (tmp_path / "n").exists()


def test_numeric_buckets_caps_the_buckets(data: dict[str, Any], tmp_path: Path) -> None:
    m = _sessionize(data["files"], tmp_path / "b4", numeric_buckets=4)
    train = pl.read_parquet(data["files"]["log"]).filter(pl.col("timestamp") < VALID)
    assert m["numeric"]["price"]["edges"] == reference_edges(train["price"].to_list(), 4)
    assert m["vocab_sizes"]["price"] == 2 + 4 + 1  # padding, OOV, 4 buckets, missing


# --- which columns, and what is refused -----------------------------------------------------


def test_defaults_pick_floats_not_integer_codes(data: dict[str, Any], tmp_path: Path) -> None:
    """No feature lists: the items table's and users table's columns are picked; floats are numeric, ints categorical."""
    files = data["files"]
    items = pl.read_parquet(files["items"]).with_columns((pl.col("release_year") * 1.5).alias("rating"))
    write_log(items, tmp_path / "items.parquet")
    log = pl.read_parquet(files["log"]).drop("price")
    write_log(log, tmp_path / "log.parquet")
    cfg = SessionizeConfig(out=tmp_path / "out", items=tmp_path / "items.parquet", users=files["users"], valid_start=VALID, test_start=TEST)
    m = run(cfg, tmp_path / "log.parquet", progress=False)
    assert m["item_features"] == ["item", "release_year", "genre", "rating"]
    assert m["user_features"] == ["user", "income", "age"]
    assert set(m["numeric"]) == {"rating", "income"}  # release_year and age are integers: categorical
    assert m["config"]["numeric_features"] == ["rating", "income"]
    assert any("rating (numeric)" in note for note in m["notes"])
    # an empty list turns bucketising off: the old categorical floats
    m = run(cfg.model_copy(update={"numeric_features": [], "out": tmp_path / "off"}), tmp_path / "log.parquet", progress=False)
    assert m["numeric"] == {} and not numeric.is_numeric(_vocab(tmp_path / "off", "rating"))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"numeric_features": ["genre"]}, "numeric feature 'genre' is String"),
        ({"numeric_features": ["weight"]}, "numeric feature 'weight' is not an item or user feature"),
        ({"item_features": ["genre"], "multi_valued": ["genre"], "numeric_features": ["genre"]}, "multi-valued"),
    ],
)
def test_refused(data: dict[str, Any], tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _sessionize(data["files"], tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_damaged_bounds_are_refused(data: dict[str, Any]) -> None:
    """An edited numeric vocabulary (bounds out of order, no missing bucket) is one DataError line."""
    from sdm.errors import DataError

    vocab = _vocab(data["out"], "price")
    numeric.check(vocab, "ok")
    for bad in (vocab.with_columns(pl.col("lo").reverse()), vocab.head(-1), vocab.with_columns(pl.col("index") + 1)):
        with pytest.raises(DataError, match="damaged numeric vocabulary"):
            numeric.check(bad, "vocab/price.parquet")
