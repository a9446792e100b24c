"""Hostile config values: every field of every command is bounded, and a bad value is one
`ConfigError` line naming the field (as its flag) and the value, never a traceback.

Defects of the hostile review this guards against (each test names the one it covers):
  D1  `--gap 99999999999999999999` overflowed timedelta (a traceback)
  D2  `--valid-days nan` passed validation
  D3  `dropout = 1.5` passed TrainConfig (failed later, after the data was read)
  D4  `neg_power = nan` passed validation
  D5  `num_negatives = 0` passed validation
  D6  `embedding_dim = 15` with 2 heads passed TrainConfig (failed in ModelConfig, after the data was read)
  D7  evaluate `batch_size = 0` passed validation
  D8  a top-level TOML key beside the sections was silently ignored
  D9  `--max-steps 0` trained a step
  D10 about 15 fields had no bound at all (huge ints, nan/inf floats, NUL/newline names, bools as numbers)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sdm.cli import app
from sdm.config import SECTIONS, TrainConfig
from sdm.configfile import build_config, load_toml_section
from sdm.fields import parse_duration
from sdm.errors import ConfigError, SdmError

ROOT = Path(__file__).resolve().parents[2]


# --- property: build_config returns a config or raises ConfigError, one line ----------------------

HUGE = [10**20, -(10**20), 2**63, 2**64, 10**400, 10**5000]
ODD_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 1.5, -1.0]
ODD_TEXT = ["", " ", "nan", "inf", "-inf", "99999999999999999999", "1e400", "0", "-1", "a\nb", "a\x00b", "a\rb",
            "10m", "0.0000001s", "9999999999w", "x" * 5000, ",", ",,a,,", "2024-01-01", "9999-12-31T23:00-05:00"]  # fmt: skip


def _tz() -> st.SearchStrategy[dt.tzinfo | None]:
    offsets = st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59))
    return st.none() | st.builds(dt.timezone, offsets)


def _scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(),
        st.sampled_from(HUGE),
        st.integers(-3, 3),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(ODD_FLOATS),
        st.text(max_size=30),
        st.sampled_from(ODD_TEXT),
        st.booleans(),
        st.datetimes(timezones=_tz()),
        st.builds(Path, st.text(max_size=20)),
    )


def _valid_for(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of the field's own type (often in bounds): Literal choices, small numbers, names."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")) and args:
        return _valid_for(args[0])
    if origin is list:
        return st.lists(_valid_for(args[0]) if args else _scalar(), max_size=4)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(0, 100)
    if annotation is float:
        return st.floats(0, 2)
    if annotation is str:
        return st.sampled_from(["a", "user_id", "10m", "7d", "%Y"])
    if annotation is Path:
        return st.just(Path("somewhere"))
    if annotation is dt.datetime:
        return st.datetimes(timezones=_tz())
    return _scalar()


def _hostile(annotation: Any) -> st.SearchStrategy[Any]:
    return st.one_of(
        _valid_for(annotation),
        _scalar(),
        st.lists(_scalar(), max_size=4),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def _values(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """1 to 6 fields at a time (drawing all 40 of TrainConfig's each time is slow); every field alone
    is covered by `test_every_field_against_every_odd_value`."""
    fields = {name: _hostile(f.annotation) for name, f in cls.model_fields.items()}
    names = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=6, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({n: fields[n] for n in chosen}))


def _assert_config_or_one_line_error(cls: type, section: str, values: dict[str, Any]) -> None:
    try:
        cfg = build_config(cls, None, section, values)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, msg
        assert len(msg) < 600, msg
        return
    assert isinstance(cfg, cls)
    for name, value in cfg:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                assert math.isfinite(v), (name, v)
            elif isinstance(v, int):
                assert -(2**63) < v < 2**63, (name, v)
            elif isinstance(v, (str, Path)):
                assert not any(c in str(v) for c in "\x00\n\r"), (name, v)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(SECTIONS)).flatmap(lambda s: st.tuples(st.just(s), _values(SECTIONS[s]))))
def test_any_value_of_any_field_is_a_config_or_one_config_error_line(case: tuple[str, dict[str, Any]]) -> None:
    """D10: huge ints, nan/inf, empty or NUL/newline strings, wrong types in every field of every command."""
    section, values = case
    _assert_config_or_one_line_error(SECTIONS[section], section, values)


def _id(v: Any) -> str:
    return f"int{v.bit_length()}bits" if isinstance(v, int) and abs(v) > 10**30 else repr(v)[:20]


@pytest.mark.parametrize("section", list(SECTIONS))
@pytest.mark.parametrize("value", [*HUGE, *ODD_FLOATS, *ODD_TEXT, True, None, [], [""], ["a", "a"], {}], ids=_id)
def test_every_field_against_every_odd_value(section: str, value: Any) -> None:
    """D10, exhaustively for the fixed odd values: each field alone."""
    cls = SECTIONS[section]
    for name in cls.model_fields:
        _assert_config_or_one_line_error(cls, section, {name: value})


# --- the reported defects through the CLI ---------------------------------------------------------


def _cli(args: list[str]) -> tuple[int, list[str]]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    err = getattr(r, "stderr", None) or r.output
    assert "Traceback" not in r.output
    return r.exit_code, [line for line in err.splitlines() if line.strip()]


def _one_error(code: int, lines: list[str], *fragments: str) -> str:
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


BAD_FLAGS = [
    ("D1", ["sessionize", "l.parquet", "--gap", "99999999999999999999"], ["--gap", "99999999999999999999"]),
    ("D1", ["sessionize", "l.parquet", "--long-window", "nan"], ["--long-window", "nan"]),
    ("D2", ["sessionize", "l.parquet", "--valid-days", "nan"], ["--valid-days", "nan"]),
    ("D2", ["sessionize", "l.parquet", "--test-days", "inf"], ["--test-days", "inf"]),
    ("D3", ["train", "--dropout", "1.5"], ["--dropout", "1.5"]),
    ("D4", ["train", "--neg-power", "nan"], ["--neg-power", "nan"]),
    ("D5", ["train", "--num-negatives", "0"], ["--num-negatives", "got 0"]),
    ("D6", ["train", "--embedding-dim", "15", "--num-heads", "2"], ["--embedding-dim 15", "--num-heads 2"]),
    ("D7", ["evaluate", "--batch-size", "0"], ["--batch-size", "got 0"]),
    ("D9", ["train", "--max-steps", "0"], ["--max-steps", "got 0"]),
    ("D10", ["train", "--batch-size", "99999999999999999999"], ["--batch-size", "99999999999999999999"]),
    ("D10", ["train", "--lr", "inf"], ["--lr", "inf"]),
    ("D10", ["train", "--seed", "-1"], ["--seed", "got -1"]),
    ("D10", ["train", "--log-every", "0"], ["--log-every", "got 0"]),
    ("D10", ["train", "--item-features", "a,a"], ["--item-features", "'a'"]),
    ("D10", ["sessionize", "l.parquet", "--user-col", ""], ["--user-col", "empty"]),
    ("D10", ["sessionize", "l.parquet", "--valid-start", "0001-01-01"], ["--valid-start", "0001-01-01"]),
    ("D10", ["evaluate", "--k", "0,20"], ["--k", "got 0"]),
    ("D10", ["recommend", "l.parquet", "--k", "100000000000"], ["--k", "100000000000"]),
    ("D10", ["synth", "--days", "inf"], ["--days", "inf"]),
    ("D10", ["synth", "--zipf", "nan"], ["--zipf", "nan"]),
    ("D10", ["demo", "--events", "0"], ["--events", "got 0"]),
    # an empty path would be Path('') == '.', the current directory (an input, or a parent of --out)
    ("empty path", ["sessionize", "l.parquet", "--vocab-from", ""], ["--vocab-from", "must not be empty"]),
    ("empty path", ["sessionize", ""], ["log", "must not be empty"]),
    ("empty path", ["train", "--data", ""], ["--data", "must not be empty"]),
    ("empty path", ["train", "--init-from", " "], ["--init-from", "must not be empty"]),
    ("empty path", ["evaluate", "--model", ""], ["--model", "must not be empty"]),
    ("empty path", ["train", "--config", ""], ["--config", "must not be empty"]),
]


@pytest.mark.parametrize("defect, args, fragments", BAD_FLAGS, ids=[f"{d}:{' '.join(a[:1] + a[-2:])}" for d, a, _ in BAD_FLAGS])
def test_bad_flag_is_one_error_line_naming_it(tmp_path: Path, defect: str, args: list[str], fragments: list[str]) -> None:
    out = tmp_path / "out"
    _one_error(*_cli([*args, "--out", out]), *fragments)
    assert not out.exists()


BAD_TOML = [
    ("D3", "train", "[train]\ndropout = 1.5\n", ["'dropout'", "--dropout", "1.5"]),
    ("D4", "train", "[train]\nneg_power = nan\n", ["'neg_power'", "--neg-power", "nan"]),
    ("D5", "train", "[train]\nnum_negatives = 0\n", ["'num_negatives'", "--num-negatives", "got 0"]),
    ("D6", "train", "[train]\nembedding_dim = 15\nnum_heads = 2\n", ["--embedding-dim 15", "--num-heads 2"]),
    ("D7", "evaluate", "[evaluate]\nbatch_size = 0\n", ["'batch_size'", "--batch-size", "got 0"]),
    ("D8", "train", "epochs = 3\n\n[train]\nlr = 0.01\n", ["'epochs'", "outside any [section]", "[train]"]),
    ("D8", "train", "[sessionize]\ngap = '5m'\n[synth]\nevnts = 3\n", ["'evnts'", "[synth]"]),
    ("D8", "train", "[trian]\nlr = 0.01\n", ["'trian'", "unknown section"]),
    ("D9", "train", "[train]\nmax_steps = 0\n", ["'max_steps'", "--max-steps", "got 0"]),
    ("D1", "sessionize", "[sessionize]\ngap = 1e20\n", ["'gap'", "--gap", "100 years"]),
    ("empty path", "sessionize", "[sessionize]\nvocab_from = ''\n", ["'vocab_from'", "must not be empty"]),
    # a TOML value of another type is a mistake, not a value to convert: "on" turned --overwrite on
    ("toml type", "train", "[train]\noverwrite = \"on\"\n", ["'overwrite'", "expected true or false", "'on'"]),
    ("toml type", "train", "[train]\nresume = 1\n", ["'resume'", "expected true or false"]),
    ("toml type", "train", "[train]\nepochs = \"3\"\n", ["'epochs'", "expected a TOML int", "'3'"]),
    ("toml type", "train", "[train]\nepochs = 3.0\n", ["'epochs'", "expected a TOML int", "3.0"]),
    ("toml type", "train", "[train]\nlr = \"1e-3\"\n", ["'lr'", "expected a TOML float"]),
    ("empty path", "train", "[train]\ninit_from = ''\n", ["'init_from'", "must not be empty"]),
]


@pytest.mark.parametrize("defect, command, text, fragments", BAD_TOML, ids=[f"{d}:{t.splitlines()[-1]}" for d, _, t, _ in BAD_TOML])
def test_bad_toml_is_one_error_line_naming_key_and_file(
    tmp_path: Path, defect: str, command: str, text: str, fragments: list[str]
) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    out = tmp_path / "out"
    args = [command, *(["l.parquet"] if command == "sessionize" else []), "--config", toml, "--out", out]
    _one_error(*_cli(args), str(toml), *fragments)
    assert not out.exists()


def test_several_bad_values_are_one_line_naming_the_first_and_counting_the_rest(tmp_path: Path) -> None:
    """D10: one line even with three errors."""
    line = _one_error(*_cli(["train", "--max-steps", "0", "--dropout", "2", "--lr", "nan", "--out", tmp_path / "o"]))
    assert "+2 more" in line and line.count("--") >= 1


# --- the Python API -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"embedding_dim": 15, "num_heads": 2}, "--embedding-dim 15 must be divisible by --num-heads 2"),
        ({"max_steps": 0}, "--max-steps"),
        ({"dropout": 1.0}, "--dropout"),
        ({"repeat_prior": math.inf}, "--repeat-prior"),
        ({"batch_size": True}, "--batch-size"),
    ],
)
def test_train_config_errors_are_config_errors_before_any_data(overrides: dict[str, Any], fragment: str) -> None:
    """D6, D9: the bad value fails in build_config (the data directory does not even exist)."""
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        build_config(TrainConfig, None, "train", {"data": "/nonexistent", **overrides})
    assert issubclass(ConfigError, SdmError)


@pytest.mark.parametrize(
    "text, message",
    [
        ("99999999999999999999", "100 years"),
        ("9999999999w", "100 years"),
        ("nan", "invalid duration"),
        ("inf", "invalid duration"),
        ("1e400", "invalid duration"),
        ("0", "positive"),
        ("0.0000001s", "at least 1us"),
        ("1" * 5000, "too long"),
    ],
)
def test_parse_duration_refuses_huge_nan_inf_and_tiny(text: str, message: str) -> None:
    """D1: every refusal is a ValueError (pydantic reports it), never OverflowError."""
    with pytest.raises(ValueError, match=message):
        parse_duration(text)
    for number in (math.nan, math.inf, 1e20, 10**400, True):
        with pytest.raises(ValueError):
            parse_duration(number)
    assert parse_duration("36525d") == dt.timedelta(days=36525) and parse_duration(600) == dt.timedelta(minutes=10)


def test_project_values_stay_valid() -> None:
    """The bounds refuse none of the defaults, templates or values the tests and benchmarks use."""
    for cls in SECTIONS.values():
        cls()
    for toml in sorted((ROOT / "data").glob("*.toml")):
        for section, cls in SECTIONS.items():
            build_config(cls, toml, section, {})
    TrainConfig(lr=1e30, warmup_steps=1, max_steps=6, target_decay=1.0, repeat_prior=0, ema_decay=0)
    TrainConfig(batch_size=8, embedding_dim=8, num_negatives=8, epochs=2, log_every=1, num_workers=5, eval_k=100_000)
    build_config(SECTIONS["sessionize"], None, "sessionize", {"valid_days": 0, "test_days": 1000, "gap": "10", "max_session_len": 2})
    build_config(SECTIONS["evaluate"], None, "evaluate", {"k": "1,3", "baseline": "itemcf,stan"})
    for key, value in (("k", "10,10"), ("baseline", "itemcf,itemcf")):  # a list names each value once
        with pytest.raises(ConfigError, match="more than once"):
            build_config(SECTIONS["evaluate"], None, "evaluate", {key: value})


def test_verify_flag_exists_on_the_commands_that_read_data() -> None:
    for section in ("train", "evaluate", "export", "recommend"):
        field = SECTIONS[section].model_fields["verify"]
        assert field.default is True and "sha256" in (field.description or "") and "--no-verify" in field.description
    code, lines = _cli(["train", "--help"])
    assert code == 0


def test_toml_key_spelled_twice_and_flat_files(tmp_path: Path) -> None:
    """D8: `batch-size` and `batch_size` in one section is an error; a file without sections is the section."""
    twice = tmp_path / "twice.toml"
    twice.write_text("[train]\nbatch-size = 4\nbatch_size = 8\n")
    with pytest.raises(ConfigError, match="twice"):
        load_toml_section(twice, "train")
    flat = tmp_path / "flat.toml"
    flat.write_text("epochs = 3\n")
    assert build_config(TrainConfig, flat, "train", {}).epochs == 3


def test_train_bounds_fit_the_model_config() -> None:
    """D6: every TrainConfig the bounds accept builds a ModelConfig (the extremes included)."""
    from sdm.model.sdm import ModelConfig  # imports torch
    from sdm.pipeline.modelspec import build_model_config

    manifest = {"item_features": [], "user_features": [], "vocab_sizes": {"item": 10}, "max_session_len": 100_000, "max_long_len": 100_000}
    for kw in ({}, {"embedding_dim": 16_384, "num_heads": 1024, "lstm_layers": 64, "num_targets": 1000,
                    "dropout": 0.999, "repeat_prior": 1e300},
               {"variant": "SASRec", "num_blocks": 64}):  # fmt: skip
        model = build_model_config(TrainConfig(**kw), manifest)
        assert isinstance(model, ModelConfig)
    with pytest.raises(ValueError, match="repeat_prior"):
        ModelConfig(item_vocab={"item": 10}, repeat_prior=math.nan)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_none_in_the_python_api_is_a_config_or_a_validation_error(section: str) -> None:
    """`SessionizeConfig(ray_address=None)` raised a TypeError from a length constraint on an optional field;
    built from Python, a bad value is a one-line ConfigError naming the flag (it was pydantic's own error)."""
    cls = SECTIONS[section]
    for name in cls.model_fields:
        try:
            cls(**{name: None})
        except ConfigError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(cls.__name__), exc


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"variant": "PSDMMA", "num_targets": 3}, "--num-targets is the N of PSDMMAL-N"),
    ({"num_blocks": 4}, "--num-blocks acts only with --variant SASRec"),
    ({"repeat": False, "repeat_prior": 3.0}, "--no-repeat leaves out"),
    ({"loss": "full", "num_negatives": 5}, "--loss full scores every item"),
    ({"loss": "full", "neg_power": 0.5}, "--loss full scores every item"),
    ({"resume": True, "overwrite": True}, "give one of them"),
])  # fmt: skip
def test_train_flags_that_act_on_nothing_are_refused(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TrainConfig(**kw)


def test_python_config_errors_are_one_line_config_errors() -> None:
    for kw, fragment in (({"epochs": 0}, "--epochs"), ({"epochz": 1}, "--epochz"), ({"ema_decay": 1.0}, "--ema-decay")):
        with pytest.raises(ConfigError, match=fragment) as err:
            TrainConfig(**kw)
        assert "\n" not in str(err.value)


# --- property: the CLI answers any flag values with exit 0 or exactly one `error:` line ------------

FLAG_TEXT = ["0", "-1", "1", "2.5", "nan", "inf", "-inf", "1e400", "99999999999999999999", "", "x", "a,b", ",",
             "10m", "2024-01-01", "auto", "exact", "faiss", "sampled", "catalogue", "/", "../x"]  # fmt: skip
COMMANDS = {"sessionize": ["LOG"], "train": [], "evaluate": [], "export": [], "recommend": ["LOG"], "synth": [],
            "demo": []}  # fmt: skip
"""Each command with its positional arguments; every run points at inputs that do not exist (or an
--out below a file), so whatever the flags, nothing heavy can start: the answer is a refusal."""


@contextlib.contextmanager
def _inside(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    picks=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(FLAG_TEXT)), min_size=1, max_size=4),
)
def test_any_flags_of_any_command_are_exit_0_or_one_error_line(tmp_path: Path, command: str, picks: list) -> None:
    """Hostile flag values on the command line: never a traceback, never more than one line."""
    cls = SECTIONS[command]
    names = sorted(cls.model_fields)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = [command, *[str(tmp_path / "missing.parquet") for _ in COMMANDS[command]]]
    chosen = {}
    for index, value in picks:
        chosen[names[index % len(names)]] = value
    for name, value in chosen.items():
        flag = "--" + name.replace("_", "-")
        typ = str(cls.model_fields[name].annotation)
        if "bool" in typ and "Optional" not in typ and "list" not in typ:
            args.append(flag if value not in ("0", "") else "--no-" + flag[2:])
        else:
            args += [flag, value]
    for name, path in (("data", tmp_path / "no-data"), ("model", tmp_path / "no-model")):
        if name in cls.model_fields and name not in chosen:
            args += ["--" + name, str(path)]
    if "out" in cls.model_fields:  # always below a file (the last --out wins), so no run can write anything
        args += ["--out", str(blocker / "out")]
    with _inside(tmp_path):  # a relative path among the values lands in the test's folder
        r = CliRunner().invoke(app, args)
    assert r.exit_code in (0, 1), (args, r.output)
    assert "Traceback" not in r.output, (args, r.output)
    if r.exit_code == 1:
        lines = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, (args, r.output)
