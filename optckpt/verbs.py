"""The public verbs: what each ``optckpt`` command does, as a function returning its report.

``optckpt.check(path, target=...)`` returns what ``optckpt check --format json`` prints (``to_json()``
gives the very same text; ``data`` the same object; ``exit_code`` the CLI's 0 / 1): a CI gate in
Python needs no subprocess and no JSON parsing. The CLI is these functions plus argument parsing and
rendering. Errors are raised as :class:`optckpt.OptckptError` subclasses (the CLI's exit 2)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Report", "inspect", "check", "remap", "reset", "set_hparams", "diff", "convert"]


Verify = bool | Literal["torch"]
"""How an editing verb checks what it wrote: True (read back by optckpt's reader: structure, record
keys, every copied record byte for byte), ``"torch"`` (a full ``torch.load`` read-back, every tensor
bit for bit), False (not at all)."""


@dataclass(frozen=True)
class Report:
    """A command's report: ``data`` is what ``--format json`` prints (``docs/json-schema.md``)."""

    command: str
    data: dict[str, Any]
    exit_code: int = 0  # what the CLI exits with: 0 fine / identical / safe, 1 differences found
    extras: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # rendering hints

    def to_json(self, *, indent: bool | None = None) -> str:
        """``--format json``'s text: indented (``indent=None``: up to 1 MiB), or compact (``False``)."""
        from .render import to_json

        return to_json(self.data, indent=indent)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def ok(self) -> bool:
        """``check``: safe; ``diff``: identical; the editing verbs: done."""
        return self.exit_code == 0


def _write(dry_run: bool, in_place: bool, verify: Verify, replace_backup: bool, backup: bool) -> Any:
    from .errors import WriteError
    from .io.write import WriteOptions

    if (backup or replace_backup) and not in_place:
        raise WriteError("backup / replace_backup go with in_place (--backup / --replace-backup with --in-place)")
    return WriteOptions(dry_run=dry_run, in_place=in_place, verify=verify, replace_backup=replace_backup,
                        backup=backup)


def _list(models: Sequence[str] | str | None) -> list[str] | None:
    if models is None:
        return None
    return models.split(",") if isinstance(models, str) else list(models)


def _renames(rename: Sequence[str] | Mapping[str, str]) -> list[str]:
    """``rename`` as ``--rename`` strings (a mapping of prefixes is accepted too)."""
    if isinstance(rename, Mapping):
        return [f"{old}={new}" for old, new in rename.items()]
    return list(rename)


def _guarded(in_place: bool, *inputs: str | None) -> AbstractContextManager[None]:
    """Read leases on an editing command's inputs (:func:`io.readguard.stable_reads`): a file another
    process truncates while it is read is one error and nothing committed before it, never a SIGBUS.
    ``--in-place`` edits take the file's edit lock and write to it themselves: no lease there."""
    from .io.readguard import stable_reads

    return contextlib.nullcontext() if in_place else stable_reads(*inputs)


def inspect(path: str, *, model: str | None = None, stats: bool = False, trust_pickle: bool = False) -> Report:
    """``optckpt inspect``: what a checkpoint holds."""
    from . import io
    from .inspect import inspect_checkpoint
    from .io.readguard import stable_reads

    with stable_reads(path, model):  # a file changed meanwhile: one error, never a SIGBUS
        ck = io.load(path, model=model, trust_pickle=trust_pickle, lazy=not stats)  # no values: no torch
        return Report("inspect", inspect_checkpoint(ck, stats=stats))


def check(path: str, target: str, *, model: str | None = None, source: str | None = None,
          rename: Sequence[str] | Mapping[str, str] = (), optimizer: str | None = None,
          models: Sequence[str] | str | None = None, group_evidence: bool = True,
          trust_pickle: bool = False) -> Report:
    """``optckpt check``: what plain ``optimizer.load_state_dict`` would do under the new code
    (``target``: ``module:callable``, a names file or a checkpoint). ``exit_code`` 0 only when safe."""
    from . import io
    from .io.readguard import stable_reads
    from .resolve import Policy, resolve
    from .target import parse_rename, resolve_source, resolve_target

    with stable_reads(path, model, target, source):  # (a target / source that is a checkpoint too)
        ck = io.load(path, model=model, trust_pickle=trust_pickle, lazy=True)  # names and shapes: no values
        opt = ck.optimizer(optimizer)
        tgt = resolve_target(target, trust_pickle=trust_pickle)
        io.adopt_target_adapter(ck, tgt.module, trust_pickle=trust_pickle)
        claim = resolve_source(source, trust_pickle=trust_pickle, fallback=tgt) if source else None
        resolution = resolve(ck, opt, tgt, source=claim, models=_list(models), renames=parse_rename(_renames(rename)),
                             policy=Policy(group_evidence=group_evidence))
        assert resolution.report is not None
        data = resolution.report.as_json()
    return Report("check", data, 0 if data["safe"] else 1)


def remap(path: str, target: str, output: str | None = None, *, in_place: bool = False, dry_run: bool = False,
          verify: Verify = True, backup: bool = False, replace_backup: bool = False, model: str | None = None,
          model_output: str | None = None, source: str | None = None,
          rename: Sequence[str] | Mapping[str, str] = (), fuse: Sequence[str] = (), split: Sequence[str] = (),
          missing: Literal["reset", "error"] = "reset", unexpected: Literal["drop", "error"] = "drop",
          shape_mismatch: Literal["reset", "error", "slice"] = "reset", allow_ambiguous: bool = False,
          hparams: Literal["checkpoint", "target"] = "checkpoint", group_evidence: bool = True,
          optimizer: str | None = None, models: Sequence[str] | str | None = None,
          trust_pickle: bool = False) -> Report:
    """``optckpt remap``: rewrite the checkpoint so that the new code's plain ``load_state_dict`` is right."""
    from .cmd_remap import remap_checkpoint
    from .remap import Policy
    from .transforms import parse_transforms

    policy = Policy(missing=missing, unexpected=unexpected, shape_mismatch=shape_mismatch,
                    allow_ambiguous=allow_ambiguous, hparams=hparams, group_evidence=group_evidence)
    with _guarded(in_place, path, model, target, source):
        plan, written = remap_checkpoint(
            path, target, output, model=model, source=source, renames=_renames(rename), policy=policy,
            transforms=parse_transforms(fuse, split), model_output=model_output, optimizer_key=optimizer,
            models=_list(models), write=_write(dry_run, in_place, verify, replace_backup, backup),
            trust_pickle=trust_pickle)
    return Report("remap", plan.as_json() | {"written": written})


def reset(path: str, params: Sequence[str], output: str | None = None, *, keys: Sequence[str] = (),
          mode: Literal["drop", "zero"] | None = None, in_place: bool = False, dry_run: bool = False,
          verify: Verify = True, backup: bool = False, replace_backup: bool = False, model: str | None = None,
          source: str | None = None, optimizer: str | None = None, models: Sequence[str] | str | None = None,
          trust_pickle: bool = False) -> Report:
    """``optckpt reset``: drop or re-initialise the state of parameters matching the ``params`` globs."""
    from .cmd_reset import reset_checkpoint

    with _guarded(in_place, path, model, source):
        result, written = reset_checkpoint(
            path, list(params), output, keys=list(keys), mode=mode, model=model, source=source,
            optimizer_key=optimizer, models=_list(models),
            write=_write(dry_run, in_place, verify, replace_backup, backup), trust_pickle=trust_pickle)
    return Report("reset", {"optimizer": result.optimizer, "mode": result.mode, "keys": result.keys,
                            "selected": [{"index": i, "name": n} for i, n in result.selected], "written": written})


def set_hparams(path: str, output: str | None = None, *, lr: float | None = None, scale_lr: float | None = None,
                weight_decay: float | None = None, scale_weight_decay: float | None = None,
                set: Sequence[str] = (), groups: Sequence[str] = (), params: Sequence[str] = (),  # noqa: A002
                scheduler: Literal["follow", "keep"] = "follow", in_place: bool = False, dry_run: bool = False,
                verify: Verify = True, backup: bool = False, replace_backup: bool = False, model: str | None = None,
                optimizer: str | None = None, models: Sequence[str] | str | None = None,
                trust_pickle: bool = False) -> Report:
    """``optckpt set``: change param-group hyperparameters consistently with the schedulers
    (``set=["lr_mult=3"]`` is ``--set``; ``groups`` / ``params`` select groups as ``--group`` / ``--params``)."""
    from .cmd_set import set_checkpoint
    from .errors import FormatError
    from .hparams import Change

    if lr is not None and scale_lr is not None:
        raise FormatError("--lr and --scale-lr are exclusive")
    if weight_decay is not None and scale_weight_decay is not None:
        raise FormatError("--weight-decay and --scale-weight-decay are exclusive")
    changes = [Change(k, v) for k, v in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay),
                                         ("scale_weight_decay", scale_weight_decay)) if v is not None]
    with _guarded(in_place, path, model):
        result, written = set_checkpoint(
            path, output, changes, groups=tuple(groups), params=tuple(params), raw_sets=tuple(set),
            follow=scheduler == "follow", model=model, optimizer_key=optimizer, models=_list(models),
            write=_write(dry_run, in_place, verify, replace_backup, backup), trust_pickle=trust_pickle)
    return Report("set", {"optimizer": result.optimizer, "groups": result.groups, "before": result.before,
                          "after": result.after, "schedulers": result.schedulers, "notes": result.notes,
                          "written": written})


def diff(a: str, b: str, *, model_a: str | None = None, model_b: str | None = None, atol: float = 0.0,
         rtol: float = 0.0, only: Sequence[str] = (), params: Sequence[str] = (), stats: bool = False,
         device: str | None = None, trust_pickle: bool = False,
         progress: Callable[[int], None] | None = None,
         progress_total: Callable[[int], None] | None = None) -> Report:
    """``optckpt diff``: what changed between checkpoints ``a`` and ``b``. ``exit_code`` 0 when identical.

    ``progress(n)`` is called as each ``n`` bytes of tensor data have been compared; ``progress_total``
    once before that, with the bytes the comparison will read (``--only`` / ``params`` may read fewer)."""
    from . import io
    from .diff import diff_checkpoints, total_bytes
    from .io.readguard import stable_reads

    with stable_reads(a, b, model_a, model_b):
        ca = io.load(a, model=model_a, trust_pickle=trust_pickle, lazy=True)  # torch reads only tensors that differ
        cb = io.load(b, model=model_b, trust_pickle=trust_pickle, lazy=True)
        if progress_total is not None:
            progress_total(total_bytes(ca, cb))
        data = diff_checkpoints(ca, cb, atol=atol, rtol=rtol, only=tuple(only), params=tuple(params), stats=stats,
                                device=device, progress=progress).as_json()
    return Report("diff", data, 0 if data["identical"] else 1)


def convert(path: str, to: Literal["dcp", "torch", "safetensors"], output: str, *, model: str | None = None,
            source: str | None = None, optimizer: str | None = None, models: Sequence[str] | str | None = None,
            max_shard_size: int | None = None, trust_pickle: bool = False) -> Report:
    """``optckpt convert``: the checkpoint in another layout; ``data["written"]`` is the output."""
    from .cmd_convert import convert_checkpoint

    with _guarded(False, path, model, source):
        written = convert_checkpoint(path, to, output, model=model, source=source, optimizer_key=optimizer,
                                     models=_list(models), trust_pickle=trust_pickle, max_shard_size=max_shard_size)
    return Report("convert", {"written": written})
