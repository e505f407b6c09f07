"""The ``optckpt`` command line: parse, call the library, render. Errors become one line + exit 2.

Each command imports the library (and with it torch) in its body: ``optckpt --help``, ``--version``
and shell completion load click and nothing else."""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import click

from .errors import OptckptError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2

# the sections `diff` reports (kept here, not imported from .diff, so that --help needs no torch)
DIFF_SECTIONS = ("model", "param_groups", "optimizer", "scheduler", "extra")


class _Group(click.Group):
    """Turns every failure into ``optckpt: error: ...`` on stderr and exit 2 (traceback with --debug);
    bare ``optckpt`` prints the help and exits 0."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            click.echo(ctx.get_help())
            ctx.exit(EXIT_OK)
        return super().parse_args(ctx, args)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        """click's own main, except that usage errors are one ``optckpt: error:`` line (exit 2)."""
        argv = list(sys.argv[1:] if args is None else args)
        global _JSON_ERRORS
        _JSON_ERRORS = any(a == "--format=json" or (a == "--format" and b == "json")
                           for a, b in zip(argv, [*argv[1:], ""]))
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _usage_line(f"{'; '.join(e.format_message().splitlines())}{where}", EXIT_ERROR, standalone_mode)
        except click.ClickException as e:
            _usage_line("; ".join(e.format_message().splitlines()), e.exit_code, standalone_mode)
        except click.exceptions.Abort:
            _usage_line("aborted", EXIT_ERROR, standalone_mode)
        else:
            code = rv if isinstance(rv, int) else EXIT_OK
            if standalone_mode:
                sys.exit(code)
            return rv
        return None

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            if not ctx.params.get("debug"):
                warnings.simplefilter("ignore")  # torch's deprecation chatter would break the one-line contract
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except OptckptError as e:
            _fail(ctx, str(e), e)
        except KeyboardInterrupt:
            _error_out("interrupted", "interrupted")
            ctx.exit(130)
        except Exception as e:  # a bug or an unforeseen input: still one line, never a bare traceback
            _fail(ctx, f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                       "(re-run with --debug for the traceback)", e)


_JSON_ERRORS = False  # the command line asked for --format json: errors are a JSON object on stdout too


def _error_out(message: str, code: str) -> None:
    """The one error line on stderr; with ``--format json`` also ``{"schema_version": 1, "error": ...}``
    on stdout (documented in docs/json-schema.md)."""
    click.echo(f"optckpt: error: {_escape(message)}", err=True)
    if _JSON_ERRORS:
        import json

        click.echo(json.dumps({"schema_version": 1, "error": {"code": code, "message": message}}))


def _code_of(exc: BaseException) -> str:
    if not isinstance(exc, OptckptError):
        return "unexpected"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def _usage_line(message: str, code: int, standalone_mode: bool) -> None:
    _error_out(message, "usage" if code == EXIT_ERROR else "error")
    if standalone_mode:
        sys.exit(code)
    raise click.exceptions.Exit(code)


def _finite_nonneg(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """--lr, --weight-decay, scale factors and tolerances: a finite number >= 0."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0, not {value}")
    return value


def _fail(ctx: click.Context, message: str, exc: BaseException) -> None:
    if ctx.find_root().params.get("debug"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    _error_out(message, _code_of(exc))
    ctx.exit(EXIT_ERROR)


def _escape(text: str, *, newlines: bool = True) -> str:
    from .render import escape

    return escape(text, newlines=newlines)


def _note_stale(out: str | None) -> None:
    """Name the temp files that earlier, killed runs writing ``out`` left beside it."""
    from .io.write import stale_temps

    stale = stale_temps(out) if out else []
    if stale:
        click.echo(f"optckpt: note: {len(stale)} temp file(s) left by an interrupted earlier run beside {out}; "
                   f"remove with: rm -r {' '.join(_shell_quote(p) for p in stale)}", err=True)


def _shell_quote(p: str) -> str:
    import shlex

    return shlex.quote(p)


def format_option(f: F) -> F:
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                        show_default=True, help="Output format; json prints only JSON on stdout.")(f)


def target_option(f: F) -> F:
    return click.option("--target", "target_spec", required=True,
                        help="The new code: module:callable, file.py:callable, a names file, or a checkpoint.")(f)


def load_options(f: F) -> F:
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow full pickle loading (can execute code from the file). Only for files you trust. "
                          "The classes it names are imported with the current directory on the import path, as "
                          "--target does; a pickled nn.Module is rewritten by remap as the --target module.")(f)
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
@click.option("--stats", is_flag=True, help="Per-tensor min/max/mean/norm and NaN/Inf counts of model and optimizer "
                                            "state (reads tensor data).")
def inspect(path: str, model_path: str | None, trust_pickle: bool, fmt: str, stats: bool) -> None:
    """Show what a checkpoint holds: layout, model tensors, optimizers, schedulers, extras."""
    from . import verbs
    from .render import render_inspect

    r = verbs.inspect(path, model=model_path, stats=stats, trust_pickle=trust_pickle)
    click.echo(_json(r) if fmt == "json" else _escape(render_inspect(r.data, stats=stats), newlines=False))


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


def group_evidence_option(f: F) -> F:
    return click.option("--no-group-evidence", "no_group_evidence", is_flag=True,
                        help="Do not let the target optimizer's param groups settle uncertain names "
                             "(that evidence assumes the grouping rule is unchanged).")(f)


@cli.command()
@click.argument("path", type=click.Path())
@target_option
@load_options
@mapping_options
@group_evidence_option
@format_option
def check(path: str, target_spec: str, model_path: str | None, trust_pickle: bool, source: str | None,
          renames: tuple[str, ...], optimizer_key: str | None, models: str | None, no_group_evidence: bool,
          fmt: str) -> None:
    """Predict what plain optimizer.load_state_dict would do under the new code.

    Exit 0 when it would be exactly right, 1 when not, 2 on error."""
    from . import verbs
    from .render import render_check

    r = verbs.check(path, target_spec, model=model_path, source=source, rename=renames, optimizer=optimizer_key,
                    models=models, group_evidence=not no_group_evidence, trust_pickle=trust_pickle)
    click.echo(_json(r) if fmt == "json" else _escape(render_check(r.data), newlines=False))
    sys.exit(r.exit_code)


def _json(r: Any) -> str:
    """A report's JSON: indented for a terminal (up to 1 MiB), compact for a pipe or a file: a script
    parses it either way, and Python writes compact JSON in C, indented JSON in Python (slower)."""
    return str(r.to_json(indent=None if sys.stdout.isatty() else False))


def _remember_verify_torch(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta["optckpt_verify_torch"] = value


def _verify(no_verify: bool) -> Any:
    """What ``--no-verify`` / ``--verify-torch`` ask for: False, "torch", or True (the default check)."""
    torch_read = bool(click.get_current_context().meta.get("optckpt_verify_torch"))
    if no_verify and torch_read:
        raise click.UsageError("--no-verify and --verify-torch contradict each other")
    return "torch" if torch_read else not no_verify


def _write_opts(dry_run: bool, in_place: bool, no_verify: bool, replace_backup: bool, backup: bool) -> Any:
    """The write options (``write_options`` below) as one value."""
    from .io.write import WriteOptions

    if (backup or replace_backup) and not in_place:
        raise click.UsageError("--backup / --replace-backup go with --in-place")
    return WriteOptions(dry_run=dry_run, in_place=in_place, verify=_verify(no_verify),
                        replace_backup=replace_backup, backup=backup)


verbose_option = click.option("--verbose", "-v", "verbose", is_flag=True,
                              help="Every row of the plan in the table (default: counts and the first rows).")


def write_options(f: F) -> F:
    f = click.option("--no-verify", "no_verify", is_flag=True,
                     help="Skip re-reading the output to check it bit for bit.")(f)
    f = click.option("--verify-torch", is_flag=True, expose_value=False, callback=_remember_verify_torch,
                     help="Verify the output by a full torch.load read-back, every tensor bit for bit (the "
                          "default check reads the new pickle back with optckpt's reader and compares the "
                          "records it copied byte for byte).")(f)
    f = click.option("--replace-backup", is_flag=True,
                     help="With --in-place: replace an existing PATH.bak (refused otherwise).")(f)
    f = click.option("--backup", is_flag=True,
                     help="With --in-place on a torch zip file: also keep a full copy as PATH.bak "
                          "(other layouts always keep PATH.bak).")(f)
    f = click.option("--in-place", is_flag=True,
                     help="Rewrite PATH itself. A torch zip file gets the new version appended (the tensor "
                          "records stay where they are; `optckpt restore PATH` undoes it); other layouts are "
                          "rewritten beside it, the original kept as PATH.bak.")(f)
    f = click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(f)
    f = click.option("-o", "--output", "output", type=click.Path(), default=None, help="Where to write.")(f)
    return f


@cli.command()
@click.argument("path", type=click.Path())
@target_option
@load_options
@mapping_options
@write_options
@click.option("--missing", type=click.Choice(["reset", "error"]), default="reset", show_default=True,
              help="New parameters (no saved state): start fresh, or fail.")
@click.option("--unexpected", type=click.Choice(["drop", "error"]), default="drop", show_default=True,
              help="Saved state of parameters the target lacks: drop it, or fail.")
@click.option("--shape-mismatch", type=click.Choice(["reset", "error", "slice"]), default="reset", show_default=True,
              help="Parameters whose shape changed: start fresh, fail, or keep the shared region of weights and "
                   "state (slice: vocabulary growth; the rest from the target's initialisation / fresh state).")
@click.option("--fuse", "fuses", multiple=True,
              help="NEW=OLD1+OLD2[@DIM] (or re:PATTERN=TEMPLATE+...): concatenate saved parameters and their "
                   "state into one new parameter along DIM (default 0). Repeatable.")
@click.option("--split", "splits", multiple=True,
              help="OLD=NEW1+NEW2[@DIM] (or re:PATTERN=TEMPLATE+...): cut a saved parameter and its state into "
                   "new parameters along DIM (default 0), sizes from the target. Repeatable.")
@click.option("--model-output", "model_output", type=click.Path(), default=None,
              help="Where to write the --model file when its keys change for the new code.")
@click.option("--allow-ambiguous", is_flag=True, help="Reset (instead of refusing) indices whose name is uncertain.")
@click.option("--hparams", type=click.Choice(["checkpoint", "target"]), default="checkpoint", show_default=True,
              help="Group hyperparameters from the checkpoint (as torch's load_state_dict does) "
                   "or from the target optimizer.")
@group_evidence_option
@verbose_option
@format_option
def remap(path: str, target_spec: str, model_path: str | None, trust_pickle: bool, source: str | None,
          renames: tuple[str, ...], optimizer_key: str | None, models: str | None, output: str | None,
          dry_run: bool, in_place: bool, replace_backup: bool, backup: bool, no_verify: bool, missing: str,
          unexpected: str, shape_mismatch: str, fuses: tuple[str, ...], splits: tuple[str, ...],
          model_output: str | None, allow_ambiguous: bool, hparams: str, no_group_evidence: bool,
          verbose: bool, fmt: str) -> None:
    """Rewrite optimizer state so the unchanged resume script (plain load_state_dict) is right.

    Writes the same layout as PATH; moved state keeps its bytes, new parameters start fresh,
    removed ones are dropped, param groups and scheduler lists follow the target's grouping (a
    target without an optimizer keeps the saved grouping). The model state dicts are rewritten to
    match: renamed, fused / split / sliced, removed keys dropped, new ones from the target."""
    from . import verbs
    from .render import render_plan

    _write_opts(dry_run, in_place, no_verify, replace_backup, backup)  # usage errors first
    with _write_progress(path, dry_run=dry_run, verify=bool(_verify(no_verify)), fmt=fmt, in_place=in_place):
        r = verbs.remap(path, target_spec, output, in_place=in_place, dry_run=dry_run, verify=_verify(no_verify),
                        backup=backup, replace_backup=replace_backup, model=model_path, model_output=model_output,
                        source=source, rename=renames, fuse=fuses, split=splits,
                        missing=missing, unexpected=unexpected, shape_mismatch=shape_mismatch,  # type: ignore[arg-type]
                        allow_ambiguous=allow_ambiguous, hparams=hparams,  # type: ignore[arg-type]
                        group_evidence=not no_group_evidence, optimizer=optimizer_key, models=models,
                        trust_pickle=trust_pickle)
    _note_stale(r["written"])
    click.echo(_json(r) if fmt == "json" else _escape(render_plan(r.data, verbose=verbose), newlines=False))


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--params", "params", multiple=True, required=True,
              help="Glob of parameter names whose state to reset (repeatable), e.g. 'classifier.*'.")
@click.option("--keys", default="", help="Comma-separated state keys to re-initialise (e.g. exp_avg,step); "
                                          "default: the whole entry.")
@click.option("--mode", type=click.Choice(["drop", "zero"]), default=None,
              help="drop: delete the entry (fresh state at the next step); zero: re-initialise in place. "
                   "Default: drop for files; zero for DCP directories (a strict dcp.load needs every key).")
@load_options
@mapping_options
@write_options
@verbose_option
@format_option
def reset(path: str, params: tuple[str, ...], keys: str, mode: str | None, model_path: str | None, trust_pickle: bool,
          source: str | None, renames: tuple[str, ...], optimizer_key: str | None, models: str | None,
          output: str | None, dry_run: bool, in_place: bool, replace_backup: bool, backup: bool, no_verify: bool,
          verbose: bool, fmt: str) -> None:
    """Drop or re-initialise the optimizer state of selected parameters (e.g. a re-initialised head)."""
    from . import verbs
    from .render import first_rows, plural, table

    _write_opts(dry_run, in_place, no_verify, replace_backup, backup)  # usage errors first
    with _write_progress(path, dry_run=dry_run, verify=bool(_verify(no_verify)), fmt=fmt, in_place=in_place):
        r = verbs.reset(path, params, output, keys=[k for k in keys.split(",") if k], mode=mode,  # type: ignore[arg-type]
                        in_place=in_place, dry_run=dry_run, verify=_verify(no_verify), backup=backup,
                        replace_backup=replace_backup, model=model_path, source=source, optimizer=optimizer_key,
                        models=models, trust_pickle=trust_pickle)
    written = r["written"]
    _note_stale(written)
    if fmt == "json":
        click.echo(_json(r))
    else:
        what = f"keys {', '.join(r['keys'])}" if r["keys"] else "whole state entries"
        n = plural(len(r["selected"]), "parameter")
        click.echo(f"optimizer {r['optimizer']}: {r['mode']} {what} of {n}:")
        shown, more = first_rows([[x["index"], x["name"]] for x in r["selected"]], verbose)
        click.echo(table(shown, ["index", "parameter"]))
        if more:
            click.echo(more)
        click.echo(f"written: {written}" if written else "dry run: nothing written")


@cli.command(name="set")
@click.argument("path", type=click.Path())
@click.option("--group", "groups", multiple=True, help="A param group by index or by its 'name' key (repeatable).")
@click.option("--params", "params", multiple=True,
              help="Every group whose parameters all match this glob (repeatable), e.g. 'classifier.*'.")
@click.option("--lr", type=float, default=None, callback=_finite_nonneg,
              help="The lr the next step uses; the schedule follows.")
@click.option("--scale-lr", type=float, default=None, callback=_finite_nonneg,
              help="Multiply every future lr of the groups by F.")
@click.option("--weight-decay", type=float, default=None, callback=_finite_nonneg,
              help="New weight_decay.")
@click.option("--scale-weight-decay", type=float, default=None, callback=_finite_nonneg,
              help="Multiply weight_decay by F.")
@click.option("--set", "raw_sets", multiple=True, help="KEY=VALUE for any other group key (betas=0.9,0.95, "
                                                       "momentum=0.95, lr_mult=2), typed like its current value.")
@click.option("--scheduler", "sched_mode", type=click.Choice(["follow", "keep"]), default="follow",
              show_default=True, help="follow: rescale the schedulers so the change lasts; keep: edit groups only.")
@click.option("--optimizer", "optimizer_key", default=None, help="Which optimizer, when there are several.")
@click.option("--models", "models", default=None, help="Model state dicts whose order the optimizer saw.")
@load_options
@write_options
@format_option
def set_cmd(path: str, groups: tuple[str, ...], params: tuple[str, ...], lr: float | None, scale_lr: float | None,
            weight_decay: float | None, scale_weight_decay: float | None, raw_sets: tuple[str, ...],
            sched_mode: str, optimizer_key: str | None, models: str | None, model_path: str | None,
            trust_pickle: bool, output: str | None, dry_run: bool, in_place: bool, replace_backup: bool, backup: bool,
            no_verify: bool, fmt: str) -> None:
    """Change param-group hyperparameters (lr, weight_decay, any key) consistently with schedulers."""
    from . import verbs
    from .render import render_set

    if lr is not None and scale_lr is not None:  # usage errors first (the verb raises them too)
        raise click.UsageError("--lr and --scale-lr are exclusive")
    if weight_decay is not None and scale_weight_decay is not None:
        raise click.UsageError("--weight-decay and --scale-weight-decay are exclusive")
    _write_opts(dry_run, in_place, no_verify, replace_backup, backup)
    with _write_progress(path, dry_run=dry_run, verify=bool(_verify(no_verify)), fmt=fmt, in_place=in_place):
        r = verbs.set_hparams(path, output, lr=lr, scale_lr=scale_lr, weight_decay=weight_decay,
                              scale_weight_decay=scale_weight_decay, set=raw_sets, groups=groups, params=params,
                              scheduler=sched_mode, in_place=in_place, dry_run=dry_run,  # type: ignore[arg-type]
                              verify=_verify(no_verify), backup=backup, replace_backup=replace_backup,
                              model=model_path, optimizer=optimizer_key, models=models or None,
                              trust_pickle=trust_pickle)
    _note_stale(r["written"])
    click.echo(_json(r) if fmt == "json" else _escape(render_set(r.data), newlines=False))


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--model-a", type=click.Path(), default=None, help="Model state dict file joined to A.")
@click.option("--model-b", type=click.Path(), default=None, help="Model state dict file joined to B.")
@click.option("--atol", type=float, default=0.0, show_default=True, callback=_finite_nonneg,
              help="Absolute tolerance.")
@click.option("--rtol", type=float, default=0.0, show_default=True, callback=_finite_nonneg,
              help="Relative tolerance (of |A|).")
@click.option("--only", "only", multiple=True, type=click.Choice(DIFF_SECTIONS),
              help="Compare only these sections (repeatable).")
@click.option("--params", "params", multiple=True, help="Only parameters matching this glob (repeatable).")
@click.option("--stats", is_flag=True, help="Add cosine similarity and the count of changed elements.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N detail rows in the table.")
@click.option("--device", default=None, help="Compute on this device (e.g. cuda) when present.")
@click.option("--trust-pickle", is_flag=True, help="Allow full pickle loading (files you trust only).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table",
              show_default=True)
def diff(a: str, b: str, model_a: str | None, model_b: str | None, atol: float, rtol: float,
         only: tuple[str, ...], params: tuple[str, ...], stats: bool, limit: int | None, device: str | None,
         trust_pickle: bool, fmt: str) -> None:
    """What changed between checkpoints A and B (any layouts). Exit 0 identical, 1 different."""
    from . import verbs
    from .render import render_diff

    if device is not None:
        import torch

        try:
            torch.empty(0, device=device)
        except Exception as e:
            raise click.UsageError(f"--device {device}: not available here ({str(e).splitlines()[0]})") from None
    with _LazyProgress("comparing", fmt) as bar:
        r = verbs.diff(a, b, model_a=model_a, model_b=model_b, atol=atol, rtol=rtol, only=only, params=params,
                       stats=stats, device=device, trust_pickle=trust_pickle, progress=bar.tick,
                       progress_total=bar.start)
    click.echo(_json(r) if fmt == "json" else _escape(render_diff(r.data, fmt=fmt, limit=limit), newlines=False))
    sys.exit(r.exit_code)


class _LazyProgress(contextlib.ExitStack):
    """``_progress`` for work whose size is known only once it has started (``start(total)``, called by
    the verb before its first ``tick``); the bar closes when this context does."""

    def __init__(self, label: str, fmt: str) -> None:
        super().__init__()
        self.label, self.fmt = label, fmt
        self._tick: Callable[[int], None] | None = None

    def start(self, total: int) -> None:
        self._tick = self.enter_context(_progress(total, self.label, self.fmt))

    def tick(self, n: int) -> None:
        if self._tick is not None:
            self._tick(n)


@contextlib.contextmanager
def _progress(total: int, label: str, fmt: str = "table") -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr (yields its ``update``, else None): only on a terminal, only for work
    worth showing (> 256 MB), never while JSON goes to a pipe."""
    if not sys.stderr.isatty() or total < (256 << 20) or (fmt == "json" and not sys.stdout.isatty()):
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update
        bar.update(max(0, total - bar.pos))  # done: the estimate of the total was the file size


def _tree_bytes(path: str) -> int:
    import os

    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                total += os.path.getsize(full)
    return total


@contextlib.contextmanager
def _write_progress(path: str, *, dry_run: bool, verify: bool, fmt: str, in_place: bool = False) -> Iterator[None]:
    """Progress of an edit that writes (and re-reads) a checkpoint of ``path``'s size; none for an
    in-place append (it neither reads nor writes the tensor data)."""
    from .io.records import PROGRESS
    from .io.write import appends_in_place

    quick = dry_run or (in_place and appends_in_place(path))
    total = 0 if quick else _tree_bytes(path) * (2 if verify else 1)
    with _progress(total, "writing", fmt) as tick:
        token = PROGRESS.set(tick)
        try:
            yield
        finally:
            PROGRESS.reset(token)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``5GB`` / ``500MB`` (powers of 10, as transformers reads them), ``2GiB`` (powers of 2), or bytes."""
    if value is None:
        return None
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = m[2].upper() if m else ""
    if m is None or unit not in _SIZE_UNITS or float(m[1]) * _SIZE_UNITS[unit] < 1:
        raise click.BadParameter(f"{value!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m[1]) * _SIZE_UNITS[unit])


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--to", "to", type=click.Choice(["dcp", "torch", "safetensors"]), required=True,
              help="dcp: torch.distributed.checkpoint directory (torchtitan keys, FQN-keyed optimizer); "
                   "torch: one torch.save file; safetensors: model weights.")
@click.option("-o", "--output", "output", type=click.Path(), required=True, help="Where to write (must not exist).")
@click.option("--max-shard-size", "max_shard_size", default=None, callback=_byte_size, metavar="SIZE",
              help="With --to safetensors: write a directory of Hugging Face shards "
                   "(model-0000X-of-0000N.safetensors + model.safetensors.index.json) of at most SIZE each "
                   "(5GB, 500MB, 2GiB, or bytes).")
@load_options
@mapping_options
def convert(path: str, to: str, output: str, max_shard_size: int | None, model_path: str | None,
            trust_pickle: bool, source: str | None, renames: tuple[str, ...], optimizer_key: str | None,
            models: str | None) -> None:
    """Convert between layouts (index-based torch checkpoint <-> DCP, DCP -> single file, -> safetensors)."""
    from . import verbs

    written = verbs.convert(path, to, output, model=model_path, source=source,  # type: ignore[arg-type]
                            optimizer=optimizer_key, models=models, trust_pickle=trust_pickle,
                            max_shard_size=max_shard_size)["written"]
    _note_stale(written)
    click.echo(f"written: {written}")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Say which version would be restored; change nothing.")
def restore(path: str, dry_run: bool) -> None:
    """Undo the last --in-place edit of a torch zip file, or clear an interrupted one.

    An in-place edit appends the new version to the file and leaves every byte of the previous
    one where it was; this cuts the file back to the previous version (byte-identical to the
    file before that edit). Run it again to go back further."""
    import os

    from .io.append import check_previous, restore_previous, versions

    if dry_run:
        after = check_previous(path)  # the same verification as restore's; refuses in one line
        click.echo(f"{path}: {len(versions(path)) - 1} earlier version(s) kept; restore would cut it from "
                   f"{os.path.getsize(path)} to {after} bytes. Dry run: nothing changed")
        return
    before, after = restore_previous(path)  # verifies what it cuts first; refuses in one line
    click.echo(f"restored {path}: {before} -> {after} bytes (the version before the last in-place edit); "
               f"{len(versions(path)) - 1} earlier version(s) still kept")
    _stale_backup(path)


def _stale_backup(path: str) -> None:
    """After a restore, ``PATH.bak`` (kept by ``--in-place --backup``) is removed when it is a plain
    file with exactly the restored bytes (it would only block the next ``--backup``); any other is
    named, never touched."""
    import filecmp
    import os
    import stat

    from .io.write import backup_path

    bak = backup_path(path)
    try:
        st = os.lstat(bak)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and filecmp.cmp(bak, os.path.realpath(path), shallow=False):
        os.unlink(bak)
        click.echo(f"removed {bak}: the same bytes as the restored file")
    else:
        click.echo(f"note: {bak} is kept (it differs from the restored file); the next --in-place --backup "
                   "needs --replace-backup", err=True)


def main() -> None:
    cli(prog_name="optckpt")


def entry() -> None:
    """The ``optckpt`` program (the console script, ``python -m optckpt``): :func:`main`, then the
    process ends (in-process callers of :func:`main` get its ``SystemExit``). The program runs without
    the cyclic garbage collector: a command holds one checkpoint's objects until it ends and makes
    next to no reference cycles (tests/test_cli.py counts them), while every collection would walk
    all those objects again (at 600k stored tensors, seconds a command). Library callers (a resume
    script) keep their collector."""
    import gc

    gc.disable()
    try:
        main()
    except SystemExit as e:
        _exit(e)


def _exit(e: SystemExit) -> None:
    """Leave as ``sys.exit`` would, without the interpreter's teardown when it has nothing left to do:
    no exit handlers registered, no other thread running, torch not imported (torch and a user's
    ``--target`` code may register handlers) and no other program around this one (``python -m
    cProfile -m optckpt``, ``pdb``: they work after it returns). Freeing every module one by one is
    ~10 ms of a 0.1 s ``inspect``; the output is flushed first, and where flushing fails the ordinary
    exit reports it."""
    import atexit

    threading = sys.modules.get("threading")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    code = e.code
    if "torch" in sys.modules or (threading is not None and threading.active_count() > 1) \
            or getattr(atexit, "_ncallbacks", lambda: 1)() or not (code is None or type(code) is int) \
            or (spec is not None and spec.name != "optckpt.__main__"):
        raise e
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        raise e from None
    import os

    os._exit(code or 0)


__all__ = ["cli", "entry", "main"]
