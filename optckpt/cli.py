"""The ``optckpt`` command line: parse, call the library, render. Errors become one line + exit 2."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import io
from .errors import OptckptError
from .check import check_mapping
from .inspect import inspect_checkpoint
from .mapping import infer_mapping
from .render import render_check, render_inspect, to_json
from .target import parse_rename, resolve_target

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


class _Group(click.Group):
    """Turns every failure into ``optckpt: error: ...`` on stderr and exit 2 (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except OptckptError as e:
            _fail(ctx, str(e), e)
        except KeyboardInterrupt:
            click.echo("optckpt: error: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug or an unforeseen input: still one line, never a bare traceback
            _fail(ctx, f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       "(re-run with --debug for the traceback)", e)


def _fail(ctx: click.Context, message: str, exc: BaseException) -> None:
    if ctx.find_root().params.get("debug"):
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"optckpt: error: {message}", err=True)
    ctx.exit(EXIT_ERROR)


def format_option(f: F) -> F:
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                        show_default=True, help="Output format; json prints only JSON on stdout.")(f)


def load_options(f: F) -> F:
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow full pickle loading (can execute code from the file). Only for files you trust.")(f)
    f = click.option("--model", "model_path", type=click.Path(), default=None,
                     help="A separately saved model state dict (for a lone optimizer file).")(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="optckpt")
def cli(debug: bool) -> None:
    """Inspect, check and repair PyTorch training checkpoints."""


@cli.command()
@click.argument("path", type=click.Path())
@load_options
@format_option
@click.option("--stats", is_flag=True, help="Per-tensor min/max/mean/norm and NaN/Inf counts (reads tensor data).")
def inspect(path: str, model_path: str | None, trust_pickle: bool, fmt: str, stats: bool) -> None:
    """Show what a checkpoint holds: layout, model tensors, optimizers, schedulers, extras."""
    ck = io.load(path, model=model_path, trust_pickle=trust_pickle)
    report = inspect_checkpoint(ck, stats=stats)
    click.echo(to_json(report) if fmt == "json" else render_inspect(report, stats=stats))


def mapping_options(f: F) -> F:
    f = click.option("--models", "models", default=None,
                     help="Model state dicts (comma-separated names) whose concatenated order the optimizer saw.")(f)
    f = click.option("--optimizer", "optimizer_key", default=None,
                     help="Which optimizer, when the checkpoint holds several (its name in `inspect`).")(f)
    f = click.option("--source", "source", default=None,
                     help="The OLD code (module:callable, file.py:callable) or a names file: exact names.")(f)
    f = click.option("--rename", "renames", multiple=True,
                     help="OLD=NEW prefix rename (or re:PATTERN=REPL) from checkpoint names to target names.")(f)
    return f


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--target", "target_spec", required=True,
              help="The new code: module:callable, file.py:callable, a names file, or a checkpoint.")
@load_options
@mapping_options
@format_option
def check(path: str, target_spec: str, model_path: str | None, trust_pickle: bool, source: str | None,
          renames: tuple[str, ...], optimizer_key: str | None, models: str | None, fmt: str) -> None:
    """Predict what plain optimizer.load_state_dict would do under the new code.

    Exit 0 when it would be exactly right, 1 when not, 2 on error."""
    ck = io.load(path, model=model_path, trust_pickle=trust_pickle)
    opt = ck.optimizer(optimizer_key)
    source_names = resolve_target(source, trust_pickle=trust_pickle).groups if source else None
    mapping = infer_mapping(ck, opt, source_names=source_names,
                            models=models.split(",") if models else None)
    target = resolve_target(target_spec, trust_pickle=trust_pickle)
    report = check_mapping(mapping, target, parse_rename(renames)).as_json()
    click.echo(to_json(report) if fmt == "json" else render_check(report))
    sys.exit(EXIT_OK if report["safe"] else EXIT_DIFFERENT)


def main() -> None:
    cli(prog_name="optckpt")


__all__ = ["cli", "main"]
