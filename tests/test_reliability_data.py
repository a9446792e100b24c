"""Issue 10, data side: bad input is refused in one line before anything is written or deleted.

Every test here failed on the code before the fix: the input lost, exit 0 with
an unusable result, a traceback, or an unclear message. Tiny hand-made logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import at, write_log
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import SessionizeConfig
from sdm.errors import SdmError
from sdm.sessionize import run


def good_log(path: Path, users: int = 3) -> Path:
    """Per user: a 3-event session on day 0, one on day 2 and one on day 4 (plenty for every split)."""
    rows = []
    for u in range(users):
        for day in (0, 2, 4):
            for k in range(3):
                rows.append((u, 10 + (u + k) % 5, at(k, days=day)))
    df = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}, orient="row")
    return write_log(df, path)


def cli(*args: object) -> tuple[int, list[str]]:
    """Run `sdm ARGS -q`; (exit code, non-empty output lines)."""
    r = CliRunner().invoke(app, [*map(str, args), "-q"] if args and args[0] in ("sessionize",) else list(map(str, args)))
    return r.exit_code, [x for x in r.output.splitlines() if x.strip()]


def one_error(code: int, lines: list[str], *fragments: str) -> str:
    assert code == 1, lines
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and len([x for x in lines if not x.startswith(("note: ", "warning: "))]) == 1, lines
    for f in fragments:
        assert f in errors[0], errors[0]
    assert "Traceback" not in "\n".join(lines)
    return errors[0]


def sessionize(log: Path, out: Path, *flags: object) -> tuple[int, list[str]]:
    return cli("sessionize", log, "--out", out, "--min-shards", 1, *flags)


# --- data loss -------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--buckets", 2, "--workers", 2)])
def test_out_holding_the_log_is_refused_and_nothing_deleted(tmp_path, flags):
    out = tmp_path / "data"
    log = good_log(out / "logs.parquet")
    items = write_log(pl.DataFrame({"item_id": [10], "c": ["a"]}), out / "items.parquet")
    before = log.read_bytes()
    code, lines = sessionize(log, out, "--overwrite", *flags)
    one_error(code, lines, "logs.parquet", "contains the log")
    assert log.read_bytes() == before and items.exists()
    code, lines = sessionize(good_log(tmp_path / "l.parquet"), out, "--overwrite", "--items", items)
    one_error(code, lines, "items.parquet", "contains the items table")
    assert items.exists()


def test_out_equal_to_the_log_is_refused(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    one_error(*sessionize(log, log, "--overwrite"), str(log), "is not a directory")
    assert log.exists()


def test_convert_out_equal_to_raw_input_is_refused(tmp_path):
    raw = tmp_path / "s.jsonl"
    raw.write_text('{"session": 1, "events": [{"aid": 1, "ts": 1659304800, "type": "clicks"}]}\n')
    code, lines = cli("convert", "otto", raw, "--out", raw, "--overwrite")
    one_error(code, lines, "writes Parquet")  # a log not named *.parquet: refused before the input is read
    assert raw.read_text().startswith('{"session": 1')
    # a raw file named like the log it would become: refused as an input
    (tmp_path / "raw").mkdir()
    other = tmp_path / "raw" / "logs.parquet"
    other.write_text(raw.read_text())
    code, lines = cli("convert", "otto", other, "--out", other, "--overwrite")
    assert code == 1 and other.read_text().startswith('{"session": 1'), lines


def test_convert_refuses_stale_side_table_without_overwrite(tmp_path):
    raw = tmp_path / "s.jsonl"
    raw.write_text('{"session": 1, "events": [{"aid": 1, "ts": 1659304800, "type": "clicks"}]}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "users.parquet").write_text("from another dataset")
    code, lines = cli("convert", "otto", raw, "--out", tmp_path / "out" / "logs.parquet")
    one_error(code, lines, "users.parquet: this dataset has no users table")


# --- exit 0 with an unusable result ------------------------------------------------------


def test_empty_training_split_refused_naming_the_settings(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    same_time = write_log(
        pl.DataFrame({"user_id": list(range(20)), "item_id": [1, 2] * 10, "timestamp": [at(0)] * 20}), tmp_path / "same.parquet"
    )
    out = tmp_path / "data"
    good = sessionize(log, out)
    assert good[0] == 0, good
    before = (out / "manifest.json").read_text()
    cases = [
        (same_time, []),
        (log, ["--valid-fraction", 0.6, "--test-fraction", 0.6]),
        (log, ["--valid-start", "2000-01-01", "--test-start", "2000-01-02"]),
        (log, ["--test-days", 1000]),
        (log, ["--test-fraction", 0.999]),
    ]
    for path, flags in cases:
        err = one_error(*sessionize(path, out, "--overwrite", *flags), "the training split is empty", "the log runs 2024-01-0")
        if not flags:
            assert "--test-fraction 0.1 (default)" in err
        for f in flags[::2]:
            assert str(f) in err
        assert (out / "manifest.json").read_text() == before  # the old output is untouched


def test_empty_valid_and_test_split_warn(tmp_path):
    out = tmp_path / "data"
    code, lines = sessionize(good_log(tmp_path / "l.parquet"), out, "--test-start", "2030-01-01", "--valid-start", "2030-01-01")
    assert code == 0, lines
    assert any(x.startswith("warning: the validation split is empty") for x in lines)
    assert any(x.startswith("warning: the test split is empty") for x in lines)
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["warnings"]) == 2 and m["splits"]["test"]["sessions"] == 0


def test_a_split_asked_to_be_empty_gives_no_warning(tmp_path):
    out = tmp_path / "data"
    code, lines = sessionize(good_log(tmp_path / "l.parquet"), out, "--valid-days", "1", "--test-days", "0")
    assert code == 0, lines
    assert not any("test split" in x for x in lines), lines
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["test"]["sessions"] == 0 and not any("test split" in w for w in m["warnings"])


def test_max_session_len_1_refused(tmp_path):
    one_error(*sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--max-session-len", 1), "max_session_len", ">= 2")


@pytest.mark.parametrize("flag", ["--user-col", "--session-col"])
def test_misspelled_explicit_column_is_an_error(tmp_path, flag):
    log = write_log(
        pl.DataFrame({"user_id": [1, 1], "session_id": [5, 5], "item_id": [1, 2], "timestamp": [at(0), at(1)]}),
        tmp_path / "l.parquet",
    )
    err = one_error(*sessionize(log, tmp_path / "o", flag, "usr_id"), f"{flag} 'usr_id' is not a column")
    assert "found: user_id, session_id, item_id, timestamp" in err


def test_default_user_column_still_falls_back_to_sessions(tmp_path):
    log = write_log(pl.DataFrame({"session_id": [5, 5, 6, 6], "item_id": [1, 2, 1, 3], "timestamp": [at(0), at(1), at(days=3), at(days=3, minutes=1)]}), tmp_path / "l.parquet")
    code, lines = sessionize(log, tmp_path / "o", "--valid-fraction", 0, "--test-fraction", 0)
    assert code == 0, lines


def test_items_and_users_tables_default_to_their_columns_with_coverage(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    items = write_log(
        pl.DataFrame({"item_id": [10, 11, 12, 12, 99], "brand": ["a", "b", "a", "c", "z"], "price": [1.0, 2.0, 3.0, 3.0, 9.0]}),
        tmp_path / "items.parquet",
    )
    users = write_log(pl.DataFrame({"user_id": [0, 1, 7], "age": [20, 30, 40]}), tmp_path / "users.parquet")
    out = tmp_path / "o"
    code, lines = sessionize(log, out, "--items", items, "--users", users)
    assert code == 0, lines
    assert any("item features from" in x and "brand" in x and "price" in x for x in lines if x.startswith("note: "))
    summary = lines[-1]
    assert "60.0% of items in the items table (1 duplicate keys)" in summary
    assert "66.7% of users in the users table" in summary
    m = json.loads((out / "manifest.json").read_text())
    assert m["item_features"] == ["item", "brand", "price"] and m["user_features"] == ["user", "age"]
    assert "price" in m["numeric"]  # a float column is a numeric feature, bucketised
    assert m["side_tables"]["items table"] == {"path": str(items), "rows": 5, "duplicate_keys": 1, "log_keys_found": 0.6}
    assert m["side_tables"]["users table"]["log_keys_found"] == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("buckets", [1, 2])
def test_items_table_coverage_counts_items_outside_training(tmp_path, buckets):
    """`log_keys_found` is over every kept item of the log: here the table knows only the two items
    of the test split, so half the log's items (not none of the training ones) are found."""
    log = write_log(
        pl.DataFrame({
            "user_id": [0, 0, 1, 1, 0, 0],
            "item_id": [1, 2, 1, 2, 3, 4],
            "timestamp": [at(0), at(1), at(2), at(3), at(days=4), at(days=4, minutes=1)],
        }),
        tmp_path / "l.parquet",
    )
    items = write_log(pl.DataFrame({"item_id": [3, 4, 99], "brand": ["a", "b", "c"]}), tmp_path / "items.parquet")
    out = tmp_path / "o"
    code, lines = sessionize(log, out, "--items", items, "--valid-fraction", 0, "--test-days", 1, "--buckets", buckets)
    assert code == 0, lines
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["events"] == 4 and m["splits"]["test"]["events"] == 2
    assert m["side_tables"]["items table"]["log_keys_found"] == 0.5
    assert not any("no item of the log is in the items table" in x for x in lines)


def test_side_table_matching_nothing_warns(tmp_path):
    items = write_log(pl.DataFrame({"item_id": [1000, 1001], "brand": ["a", "b"]}), tmp_path / "items.parquet")
    code, lines = sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--items", items, "--item-features", "brand")
    assert code == 0, lines
    assert any(x.startswith("warning: no item of the log is in the items table") for x in lines)
    assert "0.0% of items in the items table" in lines[-1]


# --- tracebacks instead of one line ----------------------------------------------------------


def test_far_future_epoch_is_refused_before_the_old_output_is_cleared(tmp_path):
    out = tmp_path / "o"
    assert sessionize(good_log(tmp_path / "good.parquet"), out)[0] == 0
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1_700_000_000, 1_700_000_000_000]})
    log = write_log(df, tmp_path / "l.parquet")
    one_error(*sessionize(log, out, "--overwrite", "--time-unit", "s"), "1700000000000", "outside years 1-9999", "--time-unit ms")
    assert (out / "manifest.json").exists()
    # int64 microseconds would wrap around: refused, not turned into 1677 dates
    df = pl.DataFrame({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1_700_000_000, 10**13]})
    one_error(*sessionize(write_log(df, tmp_path / "w.parquet"), out, "--overwrite", "--time-unit", "s"), "outside years 1-9999")


def test_uncreatable_and_unwritable_out(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    (tmp_path / "afile").write_text("x")
    one_error(*sessionize(log, tmp_path / "afile" / "out"), "cannot create the output directory", "afile is a file")
    one_error(*sessionize(log, Path("/sys/sdm-test-out")), "/sys/sdm-test-out: ")
    code, lines = cli("synth", "--out", tmp_path / "afile" / "logs.parquet", "--events", 100)
    one_error(code, lines, "cannot create the output directory", "afile is a file")


def test_config_directory_or_not_utf8(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    one_error(*sessionize(log, tmp_path / "o", "--config", tmp_path), "config is a directory")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[sessionize]\ngap = '\xff\xfe'\n")
    one_error(*sessionize(log, tmp_path / "o", "--config", bad), "not UTF-8")


@pytest.mark.parametrize("line, field", [('state_query = "sometimes"', "state_query"), ("repeat_prior = -2.0", "repeat_prior"),
                                        ('select_metric = "mrr"', "select_metric"), ("ema_decay = 1.5", "ema_decay")])
def test_bad_model_flag_in_a_config_file_is_one_line(tmp_path, line, field):
    """The model and selection switches of issue 9 given in a TOML config: one line naming the file and the field, nothing written."""
    bad = tmp_path / "train.toml"
    bad.write_text(f"[train]\n{line}\n")
    out = tmp_path / "model"
    one_error(*cli("train", "--config", bad, "--data", tmp_path / "nowhere", "--out", out), str(bad), f"'{field}'")
    assert not out.exists()


# --- kill -9 of a bucketed run ---------------------------------------------------------------


def test_spill_lives_inside_out_and_stale_spill_is_removed(tmp_path, monkeypatch):
    import tempfile

    from sdm.sessionize import write

    out = tmp_path / "o"
    out.mkdir()
    stale = out / (write.WORK_PREFIX + "killed")
    (stale / "input").mkdir(parents=True)
    (stale / "input" / "x.parquet").write_text("spill of a killed run")
    seen = []
    real = tempfile.mkdtemp

    def spy(*a, **k):
        path = real(*a, **k)
        seen.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    # a directory holding only stale spill counts as empty: no --overwrite needed
    cfg = SessionizeConfig(out=out, buckets=2, min_shards=1)
    run(cfg, good_log(tmp_path / "l.parquet"), progress=False)
    work = [p for p in seen if p.name.startswith(write.WORK_PREFIX)]
    assert work and all(p.parent == out for p in work)
    assert not stale.exists() and not any(p.name.startswith(write.WORK_PREFIX) for p in out.iterdir())
    assert not any(p.name.startswith(".sdm-") for p in tmp_path.iterdir())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_workers_die_with_a_killed_parent(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from sdm.sessionize.engine import process_map
from worker_jobs import sleep_job
process_map(sleep_job, [{str(pids)!r}] * 2, 2)
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while len(list(pids.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "workers did not start"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
        for w in [int(p.name) for p in pids.iterdir()]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# --- unclear messages ------------------------------------------------------------------------------


def test_items_key_of_wrong_type_blames_the_items_table(tmp_path):
    items = write_log(pl.DataFrame({"item_id": ["10", "11"], "brand": ["a", "b"]}), tmp_path / "items.parquet")
    err = one_error(*sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--items", items))
    assert err.startswith(f"error: {items}: items table key 'item_id' is String but the log's 'item_id' is Int64")


def test_header_only_csv_is_an_empty_log(tmp_path):
    log = tmp_path / "l.csv"
    log.write_text("user_id,item_id,timestamp\n")
    one_error(*sessionize(log, tmp_path / "o"), "empty log (0 rows, only a header)")
    # with an items table too: its integer key against the header's strings is not the problem
    items = write_log(pl.DataFrame({"item_id": [10], "brand": ["a"]}), tmp_path / "items.parquet")
    one_error(*sessionize(log, tmp_path / "o", "--items", items), "empty log (0 rows, only a header)")


def test_unterminated_quote_is_named(tmp_path):
    log = tmp_path / "l.csv"
    log.write_text('user_id,item_id,timestamp\n1,"a,2024-01-01T00:00:00\n2,b,2024-01-01T00:00:00\n')
    one_error(*sessionize(log, tmp_path / "o"), "not a readable CSV file", "unterminated quote")


def test_time_column_as_item_feature_is_named_as_such(tmp_path):
    one_error(
        *sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--item-features", "timestamp"),
        "item feature 'timestamp' is the time column",
    )


def test_log_column_named_row_is_fine(tmp_path):
    df = pl.read_parquet(good_log(tmp_path / "g.parquet")).with_columns(
        pl.lit(1).alias("_row"), pl.lit("x").alias("_drop"), pl.lit(2).alias("_bucket")
    )
    log = write_log(df, tmp_path / "l.parquet")
    assert sessionize(log, tmp_path / "o")[0] == 0
    assert sessionize(log, tmp_path / "o2", "--buckets", 2)[0] == 0
    reserved = write_log(df.with_columns(pl.lit(1).alias("__sdm_row")), tmp_path / "r.parquet")
    one_error(*sessionize(reserved, tmp_path / "o3"), "'__sdm_row'", "reserved")


def test_cutoff_in_error_is_a_timestamp_not_microseconds(tmp_path):
    err = one_error(*sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--valid-start", "2024-01-10", "--test-days", 3))
    assert "2024-01-02T00:02:00.000001+00:00" in err and " us" not in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["sessionize", "l.parquet", "--min-shards", "x"], "'--min-shards'"),
        (["sessionize"], "Missing argument 'log'"),
        (["sessionize", "l.parquet", "--no-such-flag"], "--no-such-flag"),
        (["train", "--epochs", "1.5"], "'--epochs'"),
        (["train", "--repeat-prior", "-1"], "repeat_prior"),
        (["train", "--select-metric", "mrr"], "select_metric"),
        (["train", "--ema-decay", "1.5"], "ema_decay"),
        (["sessionize", "l.parquet", "--bucket-events", "0"], "bucket_events"),
        (["sessionize", "l.parquet", "--engine", "spark"], "engine"),
    ],
)
def test_usage_errors_are_one_line_exit_1(args, fragment):
    r = CliRunner().invoke(app, args)
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output


def test_help_still_works():
    r = CliRunner().invoke(app, ["sessionize", "--help"])
    assert r.exit_code == 0 and "--time-format" in r.output
    assert "a bare number is" in r.output  # --gap 10 means seconds, documented
    r = CliRunner().invoke(app, [])
    assert r.exit_code == 0 and "sessionize" in r.output


def test_error_does_not_repeat_the_value(tmp_path):
    err = one_error(*sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--gap", "10x"))
    assert err.count("10x") == 1


# --- inputs users have --------------------------------------------------------------------------------


def test_time_format_for_string_timestamps(tmp_path):
    log = tmp_path / "l.csv"
    log.write_text("user_id,item_id,timestamp\n1,1,Oct 01 2019 00:03\n1,2,Oct 01 2019 00:05\n2,3,Oct 02 2019 10:00\n")
    one_error(*sessionize(log, tmp_path / "o"), "holds strings such as 'Oct 01 2019 00:03'", "--time-format")
    code, lines = sessionize(log, tmp_path / "o", "--time-format", "%b %d %Y %H:%M", "--valid-fraction", 0, "--test-fraction", 0)
    assert code == 0, lines
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["splits"]["train"]["sessions"] == 2 and m["rows_kept"] == 3
    one_error(*sessionize(log, tmp_path / "o2", "--time-format", "%Y-%m-%d"), "l.csv")


@pytest.mark.parametrize(
    "name, flags",
    [("l.tsv", []), ("l.txt", ["--delimiter", "\t"]), ("l.dat", ["--format", "csv", "--delimiter", "\\t"])],
)
def test_csv_with_other_suffix_and_delimiter(tmp_path, name, flags):
    df = pl.read_parquet(good_log(tmp_path / "g.parquet"))
    log = tmp_path / name
    df.write_csv(log, separator="\t")
    code, lines = sessionize(log, tmp_path / "o", *flags)
    assert code == 0, lines
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["rows_kept"] == df.height
    fmt = flags[:2] if flags[:1] == ["--format"] else []
    one_error(*sessionize(log, tmp_path / "o2", *fmt, "--delimiter", ";;"), "--delimiter ';;'")


def test_seconds_given_as_milliseconds_warn(tmp_path):
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3], "timestamp": [1_700_000_000, 1_700_000_100, 1_700_090_000]})
    code, lines = sessionize(write_log(df, tmp_path / "l.parquet"), tmp_path / "o", "--time-unit", "ms", "--valid-fraction", 0, "--test-fraction", 0)
    assert code == 0, lines
    assert any("before 1980" in x and "--time-unit s" in x for x in lines if x.startswith("warning: "))


def test_single_event_centuries_away_warns(tmp_path):
    df = pl.read_parquet(good_log(tmp_path / "g.parquet"))
    far = pl.DataFrame({"user_id": [99], "item_id": [10], "timestamp": [at(days=365 * 500)]}, schema=df.schema)
    code, lines = sessionize(write_log(pl.concat([df, far]), tmp_path / "l.parquet"), tmp_path / "o")
    assert code == 0, lines
    assert any("latest event" in x and "over 100 years" in x for x in lines if x.startswith("warning: "))


def test_nan_item_ids_are_null_item(tmp_path):
    df = pl.DataFrame({"user_id": [1, 1, 1], "item_id": [1.0, float("nan"), 2.0], "timestamp": [at(0), at(1), at(2)]})
    code, lines = sessionize(write_log(df, tmp_path / "l.parquet"), tmp_path / "o", "--valid-fraction", 0, "--test-fraction", 0)
    assert code == 0, lines
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["dropped"]["null_item"] == 1 and m["rows_kept"] == 2 and m["num_items"] == 4


def test_duplicate_user_keys_counted(tmp_path):
    users = write_log(pl.DataFrame({"user_id": [0, 0, 1, 2], "age": [1, 2, 3, 4]}), tmp_path / "u.parquet")
    code, lines = sessionize(good_log(tmp_path / "l.parquet"), tmp_path / "o", "--users", users)
    assert code == 0, lines
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["side_tables"]["users table"]["duplicate_keys"] == 1 and m["side_tables"]["users table"]["log_keys_found"] == 1.0


def test_multi_valued_feature_is_split(tmp_path):
    log = good_log(tmp_path / "l.parquet")
    genres = ["Comedy|Romance", "Drama", " Comedy | Horror |", None, "Romance"]
    items = write_log(pl.DataFrame({"item_id": list(range(10, 15)), "genres": genres, "year": [1, 2, 3, 4, 5]}), tmp_path / "i.parquet")
    outs = []
    for buckets in (1, 2):
        out = tmp_path / f"o{buckets}"
        code, lines = sessionize(log, out, "--items", items, "--item-features", "genres,year", "--multi-valued", "genres", "--buckets", buckets)
        assert code == 0, lines
        outs.append(out)
    vocab = dict(pl.read_parquet(outs[0] / "vocab" / "genres.parquet").select("raw", "index").iter_rows())
    assert set(vocab) == {"Comedy", "Romance", "Drama", "Horror"}  # values, not combinations
    table = pl.read_parquet(outs[0] / "items.parquet").sort("item_id")
    assert table["genres_values"].to_list() == [
        [vocab["Comedy"], vocab["Romance"]], [vocab["Drama"]], [vocab["Comedy"], vocab["Horror"]], [], [vocab["Romance"]],
    ]
    # the model's single-valued input is the first value
    assert table["genres"].to_list() == [vocab["Comedy"], vocab["Drama"], vocab["Comedy"], 1, vocab["Romance"]]
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert m["multi_valued"] == {"genres": {"sep": "|", "items_column": "genres_values"}}
    assert pl.read_parquet(outs[1] / "items.parquet").equals(pl.read_parquet(outs[0] / "items.parquet"))
    one_error(*sessionize(log, tmp_path / "x", "--items", items, "--item-features", "year", "--multi-valued", "genres"), "'genres' is neither an item nor a user feature")
    one_error(*sessionize(log, tmp_path / "y", "--items", items, "--item-features", "year", "--multi-valued", "year"), "must be a string column")
