"""The `sdm` command line: parse flags, build the config, call the library.

Every field of a stage's config model (`sdm.config`) is a flag of the same name
(`user_col` -> `--user-col`), generated from the model so the two can never
drift apart; `--config FILE.toml` supplies the same keys from a TOML section.
Errors in the user's input (`SdmError`) print one line and exit with code 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import typer
from typer.core import TyperGroup

from sdm.config import (
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    RecommendConfig,
    SessionizeConfig,
    SynthConfig,
    TrainConfig,
)
from sdm.configfile import build_config
from sdm.errors import SdmError, storage_error


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (`SdmError`) and refused OS operations (`OSError`: no space, read-only, permission)
    become one `error: ...` line on stderr and exit code 1, never a traceback."""
    try:
        yield
    except SdmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        typer.echo(f"error: {storage_error(exc)}", err=True)
        raise typer.Exit(code=1) from None


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad flag value, a missing argument, an unknown option) as one line and exit code 1.

    click prints the usage text and exits with 2; every other bad input of
    this CLI is one `error: ...` line and exit code 1, and so are these.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        import sys

        from typer import _click  # typer's vendored click: its exception classes

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.NoArgsIsHelpError as exc:  # `sdm` alone: the help, as before
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except _click.exceptions.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(1)
        except _click.exceptions.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(1)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
    help="SDM (Sequential Deep Matching) pipeline: sessionize -> train -> evaluate.",
    rich_markup_mode=None,
)


def _path_value(text: str) -> Path:
    """A path argument or flag: an empty one is refused, not read as Path('') == the current directory."""
    if not str(text).strip():
        raise typer.BadParameter("must not be empty (write '.' for the current directory)")
    return Path(text)


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="TOML file; its section for this command ([sessionize], [train], ...) gives the same keys as the flags.",
        parser=_path_value,
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]



def _flag_type(annotation: Any) -> tuple[Any, str]:
    """Map a config field type to what a CLI flag parses, plus a hint for --help."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is Literal:
        return str, "one of: " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin is list:
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else None
        if typing.get_origin(inner) is typing.Annotated:
            inner = typing.get_args(inner)[0]
        if typing.get_origin(inner) is Literal:
            return str, "comma-separated, of: " + ", ".join(str(a) for a in typing.get_args(inner))
        return str, "comma-separated"
    if annotation is dt.datetime:
        return str, "ISO timestamp, e.g. 2017-12-02T00:00:00Z"
    if annotation in (bool, int, float, str, Path):
        return annotation, ""
    return str, ""


def _config_options(cls: type, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter (a typer Option defaulting to None) per config field."""
    params = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        typ, hint = _flag_type(field.annotation)
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = " ".join(filter(None, [field.description or "", f"({hint})" if hint else ""]))
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if typ is bool else [flag]
        option = typer.Option(
            *decls, help=f"{help_text} (default: {shown})".strip(), show_default=False, parser=_path_value if typ is Path else None
        )
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Optional[typ], option],
            )
        )
    return params


def _with_config_flags(cls: type, section: str, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a command `fn(cfg, **own_params)` so typer sees one flag per config field.

    The wrapper collects the config-field flags, merges them over `--config`'s
    `[section]`, validates, and calls `fn` with the built config. SdmError
    anywhere below becomes a one-line message and exit code 1.
    """

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve postponed annotations
        own = [p.replace(annotation=hints[p.name]) for p in list(inspect.signature(fn).parameters.values())[1:]]
        field_params = _config_options(cls, skip)
        field_names = {p.name for p in field_params}

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> None:
            overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
            with one_line_errors():
                cfg = build_config(cls, kwargs.get("config"), section, overrides)
                if kwargs.get("config") is not None and hasattr(cfg, "out"):
                    from sdm.outputs import check_disjoint

                    check_disjoint(cfg.out, {"--config file": kwargs["config"]})
                fn(cfg, **kwargs)

        params = own + field_params
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read __signature__, not fn's own
        return wrapper

    return decorate


def _existing_file(help_text: str) -> Any:
    # Existence is checked by the library, so a missing file is a one-line error with
    # exit code 1 like every other bad input (typer's own check exits with 2).
    return typer.Argument(help=help_text, parser=_path_value)


@app.command()
@_with_config_flags(SessionizeConfig, "sessionize")
def sessionize(
    cfg: SessionizeConfig,
    log: Annotated[Path, _existing_file("Interaction log (Parquet or CSV): a file, a directory of parts, or a quoted glob.")],
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Raw interaction log -> sessions, 7-day windows, time split -> Parquet shards."""
    from sdm.allocator import keep_freed_pages

    keep_freed_pages(cfg.buckets)  # before polars loads (sdm.sessionize imports it)
    from sdm.sessionize import run

    m = run(cfg, log, progress=not quiet)
    s = m["splits"]
    dropped = ", ".join(f"{k} {v:,}" for k, v in m["dropped"].items() if v) or "none"
    for line in m.get("notes", []):
        typer.echo(f"note: {line}", err=True)
    for line in m.get("warnings", []):
        typer.echo(f"warning: {line}", err=True)
    side = "".join(
        f"; {t['log_keys_found']:.1%} of {what.split()[0]} in the {what}" + (f" ({t['duplicate_keys']:,} duplicate keys)" if t["duplicate_keys"] else "")
        for what, t in m.get("side_tables", {}).items()
    )
    typer.echo(
        f"sessionized {m['rows_in']:,} events -> "
        + ", ".join(f"{k} {s[k]['sessions']:,} sessions" for k in ("train", "valid", "test"))
        + f"; {s['train']['users']:,} train users, {m['num_items'] - 2:,} items; dropped: {dropped}{side}; "
        f"{m['seconds']:.1f}s -> {cfg.out}"
    )


@app.command()
def check(
    data: Annotated[Path, typer.Argument(metavar="DIR", help="A shard directory written by `sdm sessionize`.", parser=_path_value)],
) -> None:
    """Verify a shard directory: manifest structure, every file's size and sha256 against the manifest."""
    from sdm.outputs import describe, written_by
    from sdm.manifest import check_data_dir

    with one_line_errors():
        if data.is_dir() and written_by(data) not in (None, "sessionize"):
            raise SdmError(f"{data}: {describe(data)}; `sdm check` verifies a shard directory written by `sdm sessionize`")
        s = check_data_dir(data)
    typer.echo(f"ok: {data}: {s['files']} files, {s['bytes'] / 1e6:,.1f} MB match the manifest's sizes and sha256")


@app.command()
@_with_config_flags(TrainConfig, "train")
def train(cfg: TrainConfig, config: ConfigOpt = None, quiet: QuietOpt = False) -> None:
    """Train SDM (or a named variant) on the shards; keeps the best checkpoint by validation HR@50 + NDCG@50."""
    from sdm.pipeline.train import train as run_train

    summary = run_train(cfg, progress=not quiet)
    if summary.get("rank", 0) == 0:
        typer.echo(
            f"trained {cfg.variant}: {summary['steps']:,} steps, {summary['epochs']} epochs, "
            f"best valid {cfg.select_metric}@{cfg.eval_k} {summary['best_metric']:.4f}; "
            f"{summary['seconds']:.1f}s -> {summary['checkpoint']}"
        )


@app.command()
@_with_config_flags(EvaluateConfig, "evaluate")
def evaluate(cfg: EvaluateConfig, config: ConfigOpt = None, quiet: QuietOpt = False) -> None:
    """Full-ranking HitRate/Recall/NDCG/MRR@K of the model and any baselines on held-out sessions, in one table."""
    from sdm.pipeline.evaluate import evaluate as run_eval

    metrics = run_eval(cfg, progress=not quiet)
    typer.echo(metrics["table"])
    typer.echo(f"-> {cfg.out}")


@app.command()
@_with_config_flags(ExportConfig, "export")
def export(cfg: ExportConfig, config: ConfigOpt = None, quiet: QuietOpt = False) -> None:
    """Write item vectors (Parquet + faiss index) and the user tower (torch.export + ONNX) for serving."""
    from sdm.serve.export import export as run_export

    s = run_export(cfg, progress=not quiet)
    typer.echo(
        f"exported {s['variant']}: {s['items']:,} item vectors"
        + (f" (+{s['cold_items']:,} cold items from side features)" if s.get("cold_items") else "")
        + f" of dim {s['dim']}, user tower, "
        f"faiss: {s['faiss']}; onnx: {s['onnx']}; {s['seconds']:.1f}s -> {s['out']}"
    )


@app.command()
@_with_config_flags(RecommendConfig, "recommend")
def recommend(
    cfg: RecommendConfig,
    log: Annotated[Path, _existing_file("Interaction log (the schema sessionize read), e.g. today's events.")],
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Top-K items for every user of LOG, from the user's latest session before --at (Parquet out)."""
    from sdm.serve.recommend import recommend as run_recommend

    s = run_recommend(cfg, log, progress=not quiet)
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in s["dropped"].items())
    typer.echo(
        f"recommended {s['k']} items to {s['users']:,} users ({s['index']}, {s['buckets']} bucket(s)); "
        + (f"dropped {sum(s['dropped'].values()):,} rows of the log ({dropped}); " if dropped else "")
        + f"{s['seconds']:.1f}s -> {s['out']}"
    )


@app.command("inspect")
def inspect_dir(
    path: Annotated[Path, typer.Argument(metavar="DIR", help="A shard, model or export directory.", parser=_path_value)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """What a shard directory, model directory or export directory holds."""
    from sdm.serve.inspect import inspect_path

    with one_line_errors():
        text = inspect_path(path, as_json=as_json)
    typer.echo(text)


# Data tooling: synth / convert / download.


@app.command()
@_with_config_flags(SynthConfig, "synth")
def synth(cfg: SynthConfig, config: ConfigOpt = None, quiet: QuietOpt = False) -> None:
    """Generate a synthetic e-commerce log (+ items and users tables) with planted sequential structure."""
    from sdm.logs.synth import generate

    s = generate(cfg, progress=not quiet)
    typer.echo(
        f"generated {s['events']:,} events, {s['users']:,} users, {s['items']:,} items, "
        f"{s['sessions']:,} sessions ({s['session_id_share']:.0%} of events with a session id); "
        f"{s['seconds']:.1f}s -> {s['out']}, {s['items_path']}, {s['users_path']}"
    )


@app.command()
def convert(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="taobao, diginetica, yoochoose, movielens, rees46 or otto.")],
    raw: Annotated[list[Path], typer.Argument(help="Raw files of the dataset (or directories holding them).", parser=_path_value)],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Log to write (default runs/FORMAT/logs.parquet); items/users tables go next to it.", parser=_path_value),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
) -> None:
    """Convert a public dataset's raw files to the SDM log; then `sdm sessionize LOG --config data/FORMAT.toml`."""
    from sdm.logs.convert import convert as run_convert

    with one_line_errors():
        s = run_convert(fmt, raw, out, overwrite=overwrite)
    side = ", ".join(p for p in (s["items_path"], s["users_path"]) if p)
    users = f"{s['users']:,} users, " if s["users"] is not None else ""
    dropped = f"; dropped {s['dropped']:,} rows ({s.get('dropped_reason', 'invalid')})" if s["dropped"] else ""
    typer.echo(
        f"converted {fmt}: {s['rows']:,} events, {users}{s['items']:,} items{dropped}; "
        f"{s['seconds']:.1f}s -> {s['out']}" + (f", {side}" if side else "")
    )


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Dataset name (see `sdm download --list`).")] = "",
    out: Annotated[Path, typer.Option("--out", help="Directory to download and extract into.", parser=_path_value)] = Path("runs/downloads"),
    list_: Annotated[bool, typer.Option("--list", help="List the datasets that can be downloaded.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a public dataset with a stable address, verify its checksum and extract it."""
    from sdm.logs.download import DATASETS
    from sdm.logs.download import download as run_download

    if list_ or not name:
        for key, ds in DATASETS.items():
            typer.echo(f"{key:16s} {ds.url}  (convert as: {ds.fmt})")
        if not name:
            return
    with one_line_errors():
        path = run_download(name, out, progress=not quiet)
    fmt = DATASETS[name].fmt
    typer.echo(f"downloaded {name} -> {path}; next: sdm convert {fmt} {path} --out runs/{fmt}/logs.parquet")


@app.command()
@_with_config_flags(DemoConfig, "demo")
def demo(cfg: DemoConfig, config: ConfigOpt = None, quiet: QuietOpt = False) -> None:
    """The whole pipeline on a synthetic log: SDM against popularity and item-CF."""
    from sdm.pipeline.demo import run_demo

    result = run_demo(cfg, progress=not quiet)
    typer.echo(result["table"])
    typer.echo(f"demo done in {result['seconds']:.0f}s -> {result['out']} (report.md, data/, model/)")


def main() -> None:
    """Console-script entry point (`sdm`)."""
    app()


if __name__ == "__main__":  # `torchrun -m sdm.cli train ...`
    main()
