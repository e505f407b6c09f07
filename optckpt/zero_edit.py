"""``remap`` / ``set`` / ``reset`` results written to a DeepSpeed ZeRO directory in DeepSpeed's own layout.

The editing commands work on the name-keyed picture the reader makes of a ZeRO checkpoint; this
module turns their result (the new optimizer state dict, the new scheduler and model state dicts)
into a :class:`~optckpt.io.zero_write.ZeroEdit` and has it written as flat partitions that the
unchanged training script's ``engine.load_checkpoint`` restores by position
(:mod:`optckpt.io.zero_write`), then reads the result back and compares it by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .errors import FormatError, WriteError
from .io import load
from .io.write import WriteOptions
from .io.zero_write import ZeroEdit, old_masters, write_zero
from .tensors import has_record_tensors, materialize

__all__ = ["write_zero_edits", "refuse_zero_lr_change"]

_NOT_HPARAMS = ("params", "param_names")


def _names_and_state(sd: Mapping[str, Any]) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """Per group the parameter names (``param_names`` of a remap result, or the name-keyed
    ``params`` the reader makes), and the state keyed by those names."""
    groups: list[list[str]] = []
    name_of: dict[Any, str] = {}
    for g in sd.get("param_groups", []):
        params = list(g.get("params", []))
        names = g.get("param_names")
        names = list(names) if isinstance(names, list) and len(names) == len(params) else params
        if not all(isinstance(n, str) for n in names):
            raise WriteError("internal: a ZeRO edit needs every parameter named")
        groups.append(names)
        name_of.update(zip(params, names))
    state = {name_of[k]: dict(v) for k, v in sd.get("state", {}).items() if k in name_of}
    return groups, state


def _prefix_renames(sources: Mapping[str, str | None]) -> dict[str, str]:
    """Module renames implied by parameter renames (``enc.weight`` → ``encoder.weight``: ``enc`` →
    ``encoder``), for the buffer names DeepSpeed lists beside the module."""
    out: dict[str, str] = {}
    for new, old in sources.items():
        if old is None or old == new:
            continue
        o, _, ol = old.rpartition(".")
        n, _, nl = new.rpartition(".")
        if ol == nl and o and n:
            out.setdefault(o, n)
    return out


def write_zero_edits(ck: Checkpoint, out: str | None, edits: Sequence[tuple[Any, Any]], *, w: WriteOptions,
                     plan: Any = None, notes: list[str] | None = None) -> str:
    """Write the edited parts (``edits``: ``(where, new)`` as the editing commands build them) of the
    ZeRO checkpoint ``ck``. ``plan`` (a remap's): which saved parameter each new name comes from;
    without it every name keeps its own. What the layout forces (fresh moments sharing their group's
    step) is added to ``plan.notes`` / ``notes``."""
    _materialize(ck)  # the flat partitions are rebuilt with torch: record references (a lazy read) become tensors
    edits = [(where, materialize(new)) for where, new in edits]
    opt_new = next((new for where, new in edits if isinstance(where, OptimizerState)), None)
    opt = ck.optimizer()
    sd = opt_new if opt_new is not None else opt.state_dict
    if plan is None and opt_new is not None:  # set: the hyperparameters DeepSpeed would really resume with
        old_groups = opt.state_dict.get("param_groups", [])
        refuse_zero_lr_change(ck, sorted({k for a, b in zip(old_groups, opt_new.get("param_groups", []))
                                          for k in b if k not in _NOT_HPARAMS and not _same(a.get(k), b[k])}))
    groups, state = _names_and_state(sd)
    hparams = [{k: v for k, v in g.items() if k not in _NOT_HPARAMS} for g in sd.get("param_groups", [])]
    if plan is not None:
        if getattr(plan, "transforms", None) or getattr(plan, "sliced", None):
            raise WriteError(f"{ck.path}: --fuse / --split / --shape-mismatch slice are not supported for DeepSpeed "
                             "ZeRO checkpoints yet")
        sources: dict[str, str | None] = {s.name: (s.source_index if s.action in ("keep", "move") else None)
                                          for s in plan.slots}
    else:
        sources = {n: n for names in groups for n in names}
    module = next((dict(new) for where, new in edits if isinstance(where, ModelState)), None)
    edit = ZeroEdit(groups, hparams, state, sources, module=module,
                    buffer_renames=_prefix_renames(sources))
    for where, new in edits:
        if isinstance(where, SchedulerState):
            edit.scheduler, edit.keep_scheduler = new, False
    for names in groups:
        for n in names:
            if sources.get(n) is None and (module is None or n not in module):
                raise WriteError(f"{n}: a new parameter of the ZeRO checkpoint has no model tensor to start its "
                                 "fp32 master weights from; refused")

    def check(tmp: str) -> None:
        if w.verify:
            _verify(tmp, edit)

    written = write_zero(ck, edit, out, in_place=w.in_place, verify=check)
    if plan is not None:
        plan.notes.extend(edit.notes)
    elif notes is not None:
        notes.extend(edit.notes)
    return written


def _materialize(ck: Checkpoint) -> None:
    """``ck`` with real tensors where a lazy read left record references (its files' objects and the
    state cut from them): values equal, read from the same records."""
    if not has_record_tensors([p.obj for p in ck.parts]):
        return
    for p in ck.parts:
        p.obj = materialize(p.obj)
    for o in ck.optimizers:
        o.state_dict = materialize(o.state_dict)
    for m in ck.models:
        m.tensors = materialize(m.tensors)
    for s in ck.schedulers:
        s.state_dict = materialize(s.state_dict)


def _verify(tmp: str, edit: ZeroEdit) -> None:
    """The written directory read back: the same names per group, the same hyperparameters, each
    parameter's state and fp32 master weights as meant (bit for bit)."""
    got = load(tmp)
    opt = got.optimizer()
    groups = [list(g["params"]) for g in opt.state_dict["param_groups"]]
    if groups != (edit.flat_order or edit.groups):  # the reader lists the flat order (round robin shuffles it)
        raise WriteError(f"{tmp}: verification failed: the param groups read back differ (nothing was written)")
    for g, want in zip(opt.state_dict["param_groups"], edit.hparams):
        hp = {k: v for k, v in g.items() if k not in _NOT_HPARAMS}
        if not _same(hp, want):
            raise WriteError(f"{tmp}: verification failed: hyperparameters differ (nothing was written)")
    for name, entry in edit.state.items():
        back = opt.state.get(name, {})
        for k, v in entry.items():
            if not _same(back.get(k), v):
                raise WriteError(f"{tmp}: verification failed for {name} {k!r} (nothing was written)")
    masters = old_masters(got)
    for name, t in edit.masters.items():
        if not _same(masters.get(name), t.reshape(masters[name].shape) if name in masters else t):
            raise WriteError(f"{tmp}: verification failed: fp32 master weights of {name} (nothing was written)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def refuse_zero_lr_change(ck: Checkpoint, keys: Sequence[str]) -> None:
    """DeepSpeed's own lr schedulers (``WarmupLR``, ``OneCycle``, ...) save only their position and
    set the lr from the config at every step: an lr written into the checkpoint would last one step.
    An elastic stage 1/2 checkpoint restores no hyperparameters at all."""
    if ck.layout != "deepspeed" or not keys:
        return
    part = next(p for p in ck.parts if p.relpath == ck.models[0].part)
    sched = part.obj.get("lr_scheduler") if isinstance(part.obj, dict) else None
    if "lr" in keys and sched is not None and not ck.schedulers:
        raise FormatError(f"{ck.path}: the lr DeepSpeed resumes with comes from its own lr scheduler (configured in "
                          "ds_config, saved as its position only): change the scheduler's config instead")
    zero = next(p.obj for p in ck.parts if p.relpath == ck.optimizers[0].part).get("optimizer_state_dict")
    if isinstance(zero, dict) and isinstance(zero.get("base_optimizer_state"), list):
        raise FormatError(f"{ck.path}: an elastic ZeRO checkpoint: DeepSpeed restores no hyperparameters from it "
                          "(the config's apply)")
