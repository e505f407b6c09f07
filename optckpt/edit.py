"""What every editing command shares: open a checkpoint for an edit (and check where the result may
go), name its saved indices, find its schedulers, write the edited state dicts back in the input's
layout with read-back verification, and stage / commit a DCP edit."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from .checkpoint import Checkpoint, OptimizerState
from .errors import WriteError
from .io import adopt_target_adapter, load
from .io.write import (
    WriteOptions,
    commit_dir,
    copy_mode,
    new_output,
    replace_at,
    resolve_output,
    temp_dir,
    write_checkpoint,
)
from .mapping import OptimizerMapping, infer_mapping
from .target import Target, resolve_source
from .verify import verify_output

__all__ = ["open_for_edit", "write_edits", "source_mapping", "schedulers_of", "dcp_output", "commit_dcp"]


def open_for_edit(path: str, out: str | None, model: str | None, optimizer_key: str | None, trust_pickle: bool,
                  w: WriteOptions, *, lazy: bool = False) -> tuple[Checkpoint, OptimizerState, str | None]:
    """Load a checkpoint to edit, check where the result may go, and pick the optimizer. ``lazy``: an
    edit that needs no tensor values (tensors as record references; torch not imported for them)."""
    ck = load(path, model=model, trust_pickle=trust_pickle, lazy=lazy)  # DCP: each command's _*_dcp variant
    if not w.dry_run:
        out = resolve_output(path, out, w.in_place, replace_backup=w.replace_backup, backup=w.backup)
    return ck, ck.optimizer(optimizer_key), out


def write_edits(ck: Checkpoint, out: str, edits: Sequence[tuple[Any, Any]], *, w: WriteOptions,
                trust_pickle: bool = False, plan: Any = None, notes: list[str] | None = None) -> str:
    """Put each new state dict where its old one sat (file + key path), write the changed files in
    the input's layout, and (``w.verify``) read them back bit for bit. A DeepSpeed ZeRO directory is
    rebuilt in DeepSpeed's own layout (:mod:`optckpt.zero_edit`; ``plan``: a remap's, naming where
    each parameter comes from; what the layout forces is added to its notes or to ``notes``)."""
    if ck.layout == "deepspeed":
        from .zero_edit import write_zero_edits

        return write_zero_edits(ck, out, edits, w=w, plan=plan, notes=notes)
    part_objs = {p.relpath: p.obj for p in ck.parts}
    changed: dict[str, Any] = {}
    for where, new in edits:
        part_objs[where.part] = replace_at(part_objs[where.part], where.path, new)
        changed[where.part] = part_objs[where.part]
    check = (lambda tmp: verify_output(ck, tmp, changed, trust_pickle=trust_pickle)) if w.verify else None
    return write_checkpoint(ck, out, changed, in_place=w.in_place, verify=check, replace_backup=w.replace_backup,
                            backup=w.backup)


def source_mapping(ck: Checkpoint, opt: OptimizerState, source: str | None, models: Sequence[str] | None,
                   trust_pickle: bool, target: Target | None = None) -> OptimizerMapping:
    """The saved indices named, with ``--source`` checked by the consistency gate (the target's shapes
    check names that nothing else gives a shape)."""
    if target is not None:
        adopt_target_adapter(ck, target.module, trust_pickle=trust_pickle)
    claim = resolve_source(source, trust_pickle=trust_pickle, fallback=target) if source else None
    return infer_mapping(ck, opt, source=claim, models=models)


def schedulers_of(ck: Checkpoint, opt: OptimizerState) -> list[Any]:
    """The schedulers that drive ``opt``: all of them when it is the only optimizer, else those in
    the same file at the same position in their list (Lightning's ``lr_schedulers[i]``)."""
    if len(ck.optimizers) == 1:
        return list(ck.schedulers)
    i = ck.optimizers.index(opt)
    same_part = [s for s in ck.schedulers if s.part == opt.part]
    opts_same_part = [o for o in ck.optimizers if o.part == opt.part]
    if len(same_part) == len(opts_same_part):
        return [same_part[opts_same_part.index(opt)]]
    suffix = opt.name.rsplit("_", 1)[-1] if "_" in opt.name else None
    return [s for s in ck.schedulers if suffix and s.name.endswith("_" + suffix)] if i >= 0 else []


def dcp_output(path: str, out: str | None, in_place: bool) -> None:
    """Check where a DCP edit may go before any work: a new directory, or (``in_place``) the input."""
    if in_place:
        if out is not None and not (os.path.exists(out) and os.path.samefile(path, out)):
            raise WriteError("--in-place writes over the input: do not also give -o/--output")
        if not os.access(path, os.W_OK):
            raise WriteError(f"{path}: the directory is not writable")
        return
    if out is None:
        raise WriteError("no output given: pass -o NEW_DIR (a new DCP directory), or --in-place to edit PATH's "
                         "metadata (the old one is kept as .metadata.bak)")
    new_output(out)


def commit_dcp(path: str, out: str | None, in_place: bool, replace_backup: bool,
                check: Callable[[str], None] | None, **edit: Any) -> str:
    """Stage a DCP edit (:func:`optckpt.io.dcp.rewrite_dcp`: shards hard-linked, one extra shard,
    new ``.metadata``) in a temp directory beside its destination, verify it there, then commit it:
    renamed to ``out``, or (``in_place``) swapped into ``path`` by replacing only ``.metadata``."""
    from .io.dcp import commit_in_place, rewrite_dcp

    dest = path if in_place else out
    assert dest is not None
    real = os.path.realpath(dest) if in_place else dest
    tmp = temp_dir(os.path.dirname(os.path.abspath(real)), os.path.basename(real.rstrip(os.sep)))
    try:
        rewrite_dcp(path, tmp, **edit)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if in_place:
        commit_in_place(real, tmp, verify=check, replace_backup=replace_backup)
        return path
    copy_mode(path, tmp)
    return commit_dir(tmp, dest, verify=check)

