"""Config files: a command's TOML section, merged with the flags into its validated config, and saved.

`build_config` merges defaults < the TOML section < the flags the user set and
validates them (`sdm.config`'s models); a bad value becomes one `ConfigError` line
naming the key, its flag and the value. `save_config` writes the resolved config
next to every output.
"""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdm.config import RAW_ERRORS, SECTIONS
from sdm.errors import ConfigError
from sdm.fields import show_value


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


def build_config(cls: type[BaseModel], toml: Path | None, section: str, overrides: dict[str, Any]) -> Any:
    """Merge defaults < TOML section < explicit overrides, and validate.

    Raises:
        ConfigError: one line naming the offending key (and its flag) and value; with
            several bad values the first, and how many more ("+2 more").
    """
    values: dict[str, Any] = {}
    if toml is not None:
        values.update(load_toml_section(toml, section))
        for key, value in values.items():
            _check_toml_type(cls, key, value, toml, section)
    flags = {k: v for k, v in overrides.items() if v is not None}
    values.update(flags)
    token = RAW_ERRORS.set(True)  # pydantic's errors, not the Python API's ConfigError: worded below
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
            "input" in err and not isinstance(err["input"], dict) and "got " not in msg and show_value(err["input"]) not in msg
        )
        shown = f" (got {show_value(err['input'])})" if has_input else ""
        if not loc:  # a check across fields: its message names the flags
            where = f"{toml} [{section}]" if toml is not None else f"invalid {section} config"
            raise ConfigError(_one_line(f"{where}: {msg}{more}")) from None
        if from_flag:
            raise ConfigError(_one_line(f"{_flag(loc)}: invalid {key!r}: {msg}{shown}{more}")) from None
        raise ConfigError(_one_line(f"{toml} [{section}]: invalid {key!r} (flag {_flag(loc)}): {msg}{shown}{more}")) from None
    finally:
        RAW_ERRORS.reset(token)


def _plain_type(annotation: Any) -> Any:
    """`bool`, `int` or `float` behind Annotated / Optional, else None."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    return annotation if annotation in (bool, int, float) else None


def _check_toml_type(cls: type[BaseModel], key: str, value: Any, toml: Path, section: str) -> None:
    """A TOML value has its field's type: pydantic would take `overwrite = "on"` as true and
    `epochs = "3"` as 3, where the file most likely holds a mistake.

    Raises:
        ConfigError: naming the file, the key and the value.
    """
    field = cls.model_fields.get(key)
    want = _plain_type(field.annotation) if field is not None else None
    if want is None:
        return
    ok = isinstance(value, bool) if want is bool else (
        isinstance(value, int) and not isinstance(value, bool) if want is int else
        isinstance(value, (int, float)) and not isinstance(value, bool)
    )  # fmt: skip
    if not ok:
        raise ConfigError(_one_line(
            f"{toml} [{section}]: invalid {key!r} (flag {_flag((key,))}): expected {'true or false' if want is bool else f'a TOML {want.__name__}'}, got {show_value(value)}"
        ))  # fmt: skip


def save_config(cfg: BaseModel, path: Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(cfg.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
