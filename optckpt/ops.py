"""One short orchestration function per editing command: load → plan → apply → write → verify."""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import Checkpoint, ModelState, OptimizerState, SchedulerState
from .errors import FormatError, MappingError, WriteError
from .io import load
from .io.dcp import is_dcp_dir
from .io.records import PROGRESS
from .io.safepickle import PickledGlobal, PickledObject
from .io.write import (
    WriteOptions,
    commit_dir,
    commit_file,
    copy_mode,
    new_output,
    replace_at,
    resolve_output,
    temp_dir,
    temp_file,
    write_checkpoint,
)
from .kernels import fill_tensors
from .kinds import fresh_state_value
from .mapping import OptimizerMapping, infer_mapping, is_lbfgs
from .remap import (
    Policy,
    RemapPlan,
    apply_plan,
    attach_lbfgs_layout,
    build_plan,
    prepare_source,
    remap_scheduler,
    rewrite_model,
)
from .target import Target, parse_rename, resolve_source, resolve_target
from .transforms import TransformRule

__all__ = ["remap_checkpoint", "reset_checkpoint", "set_checkpoint", "convert_checkpoint", "fqn_optimizer_state",
           "ResetResult", "verify_output", "same_bits", "schedulers_of", "source_mapping"]


def _open_for_edit(path: str, out: str | None, model: str | None, optimizer_key: str | None, trust_pickle: bool,
                   w: WriteOptions) -> tuple[Checkpoint, OptimizerState, str | None]:
    """Load a checkpoint to edit, check where the result may go, and pick the optimizer."""
    ck = load(path, model=model, trust_pickle=trust_pickle)  # DCP directories are edited by the _*_dcp helpers
    if not w.dry_run:
        out = resolve_output(path, out, w.in_place, replace_backup=w.replace_backup, backup=w.backup)
    return ck, ck.optimizer(optimizer_key), out


def _remap_dcp(path: str, target_spec: str, out: str | None, *, renames: Sequence[str], policy: Policy,
               w: WriteOptions, trust_pickle: bool) -> tuple[RemapPlan, str | None]:
    """DCP is keyed by name: a remap renames FQNs (``--rename`` or a detected wrapper prefix) and
    drops the state of parameters that are gone or reshaped, in the metadata only; the shard files
    are hard-linked as they are, so memory stays bounded by the metadata. ``in_place`` replaces
    only the input's ``.metadata`` (kept as ``.metadata.bak``)."""
    from .check import guess_prefix_rename

    ck = load(path, trust_pickle=trust_pickle)
    opt = ck.optimizer()
    mapping = infer_mapping(ck, opt)
    target = resolve_target(target_spec, trust_pickle=trust_pickle)
    rules = parse_rename(renames)
    plan, report = build_plan(mapping, opt.state_dict.get("param_groups", []), target, policy, rules)
    if not rules:
        auto = guess_prefix_rename([e.name for e in mapping.entries if e.name], target.names)
        rules = [auto] if auto is not None else []
    by_source: dict[str, str | None] = {}
    for p in report.params:
        if p.source_index is None:
            continue
        keep = p.status in ("ok", "moved")
        by_source[str(p.source_index)] = p.name if keep else None

    def rename(fqn: str) -> str | None:
        if fqn in by_source:
            return by_source[fqn]
        from .check import apply_renames

        return apply_renames(fqn, rules)

    if w.dry_run:
        return plan, None
    _dcp_output(path, out, w.in_place)

    def check(tmp: str) -> None:
        if not w.verify:
            return
        new = load(tmp)
        old_models = {m.name: m for m in ck.models}
        for m in new.models:
            src_model = old_models.get(m.name)
            if src_model is None:
                continue
            back = {rename(k): k for k in src_model.meta}
            for k in m.meta:
                if not same_bits(m.tensors[k], src_model.tensors[back[k]]):
                    raise WriteError(f"{out or path}: verification failed for {k} (nothing was written)")

    return plan, _commit_dcp(path, out, w.in_place, w.replace_backup, check, rename=rename)


def _dcp_output(path: str, out: str | None, in_place: bool) -> None:
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


def _commit_dcp(path: str, out: str | None, in_place: bool, replace_backup: bool,
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




def _write_edits(ck: Checkpoint, out: str, edits: Sequence[tuple[Any, Any]], *, w: WriteOptions,
                 trust_pickle: bool = False, plan: RemapPlan | None = None, notes: list[str] | None = None) -> str:
    """Put each new state dict where its old one sat (file + key path), write the changed files in
    the input's layout, and (``w.verify``) read them back bit for bit. A DeepSpeed ZeRO directory is
    rebuilt in DeepSpeed's own layout (:mod:`optckpt.zero_edit`)."""
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


def remap_checkpoint(
    path: str,
    target_spec: str,
    out: str | None,
    *,
    model: str | None = None,
    source: str | None = None,
    renames: Sequence[str] = (),
    policy: Policy = Policy(),
    transforms: Sequence[TransformRule] = (),
    optimizer_key: str | None = None,
    models: Sequence[str] | None = None,
    write: WriteOptions = WriteOptions(),
    trust_pickle: bool = False,
    model_output: str | None = None,
) -> tuple[RemapPlan, str | None]:
    """``optckpt remap``: rewrite the optimizer state so that plain ``load_state_dict`` is right,
    and the model state dicts beside it so that the new code loads them with ``strict=True``
    (a separate ``--model`` file is written to ``model_output``, or rewritten with ``in_place``)."""
    if is_dcp_dir(path):
        if transforms or policy.shape_mismatch == "slice":
            raise WriteError(f"{path}: --fuse / --split / --shape-mismatch slice are not supported for DCP "
                             "checkpoints yet: `optckpt convert --to torch` it first")
        return _remap_dcp(path, target_spec, out, renames=renames, policy=policy, w=write,
                          trust_pickle=trust_pickle)
    ck, opt, out = _open_for_edit(path, out, model, optimizer_key, trust_pickle, write)
    target = resolve_target(target_spec, trust_pickle=trust_pickle)
    saved_mapping = source_mapping(ck, opt, source, models, trust_pickle, target)
    rules = parse_rename(renames)
    mapping, sd, steps = prepare_source(saved_mapping, opt.state_dict, target, rules, transforms)
    plan, _ = build_plan(mapping, sd.get("param_groups", []), target, policy, rules)
    plan.transforms = steps
    if is_lbfgs(opt):
        shapes = {n: m.shape for mod in ck.models for n, m in mod.meta.items()}
        attach_lbfgs_layout(plan, mapping, {**target.shapes, **shapes})
    new_sd = apply_plan(plan, sd)
    model_edits = _model_edits(ck, saved_mapping, plan, target, rules, policy)
    joined = [(m, new) for m, new in model_edits if model is not None and m.name.split(":")[0] == model]
    separate = joined[:1]
    if separate and model_output is None and not write.in_place:
        plan.notes.append(f"model {model}: not rewritten (the new code's strict load needs the "
                          "changes above): pass --model-output PATH to write it")
    if write.dry_run:
        return plan, None
    if separate and (model_output is not None or write.in_place):
        assert model is not None
        _write_model_file(model, separate[0][0], separate[0][1], model_output, w=write, trust_pickle=trust_pickle)
    n_groups = len(opt.state_dict.get("param_groups", []))
    edits = [(opt, new_sd)] + [(s, remap_scheduler(s.state_dict, plan, n_groups)) for s in schedulers_of(ck, opt)]
    edits += [(m, new) for m, new in model_edits if not any(m is j for j, _ in joined)]
    assert out is not None
    written = _write_edits(ck, out, edits, w=write, trust_pickle=trust_pickle, plan=plan)
    return plan, written


def _model_edits(ck: Checkpoint, mapping: OptimizerMapping, plan: RemapPlan, target: Any,
                 renames: Sequence[Any], policy: Policy) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """The model state dicts of the optimizer's model (those holding most of its saved names: the
    model itself, an EMA copy), rewritten for the new code (:func:`optckpt.remap.rewrite_model`);
    each one's outcome goes into ``plan.models`` and the notes."""
    names = {e.name for e in mapping.entries if e.name is not None}
    kinds = {p.relpath: p.kind for p in ck.parts}
    edits = []
    for m in ck.models:
        if not names or len(m.tensors) != len(m.meta) or 2 * len(names & set(m.meta)) < len(names):
            continue
        kind = kinds.get(m.part, "torch")
        if kind != "torch" and not (kind == "safetensors" and m.part.endswith(".safetensors")):  # one file
            plan.models.append({"name": m.name, "part": m.part, "rewritten": False})
            plan.notes.append(f"model {m.name}: a {kind} file: its keys are not rewritten (not supported yet)")
            continue
        new, info = rewrite_model(m.tensors, plan, target, renames, policy)
        plan.models.append({"name": m.name, "part": m.part, "rewritten": new is not None, **info})
        if new is None:
            continue
        edits.append((m, new))
        said = [f"{info['renamed']} keys renamed"] + [f"{k} {', '.join(info[k][:4])}" + (
            f" and {len(info[k]) - 4} more" if len(info[k]) > 4 else "") for k in
            ("fused", "split", "sliced", "dropped", "added") if info[k]]
        plan.notes.append(f"model {m.name}: " + "; ".join(said))
        if info["shape_mismatch"]:
            plan.notes.append(f"model {m.name}: {', '.join(info['shape_mismatch'][:4])} keep their saved shape: "
                              "the new code's strict load fails on them (--shape-mismatch slice keeps the shared "
                              "region)")
    return edits


def _write_model_file(path: str, m: Any, new: dict[str, torch.Tensor], model_output: str | None, *,
                      w: WriteOptions, trust_pickle: bool) -> str:
    """A separately saved model file (``--model``), rewritten in its own layout."""
    mck = load(path, trust_pickle=trust_pickle)
    mm = next(x for x in mck.models if x.path == m.path)
    out = resolve_output(path, model_output, w.in_place, replace_backup=w.replace_backup, backup=w.backup)
    return _write_edits(mck, out, [(mm, new)], w=w, trust_pickle=trust_pickle)


@dataclass
class ResetResult:
    optimizer: str
    selected: list[tuple[Any, str]]  # (index, name); DCP's index is the parameter's FQN
    mode: str
    keys: list[str]
    notes: list[str] = field(default_factory=list)


def _fresh_like(key: str, v: Any, group: Mapping[str, Any], pending: dict[float, list[torch.Tensor]]) -> Any:
    """A re-initialised copy of ``v``; tensors are allocated here and filled later in batches."""
    fill = fresh_state_value(key, group)
    if isinstance(v, torch.Tensor):
        t = torch.empty_like(v)
        pending.setdefault(fill, []).append(t)
        return t
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return type(v)(fill)
    return v


def _select_params(mapping: OptimizerMapping, params: Sequence[str]) -> list[tuple[Any, str]]:
    """(index, name) of the optimizer entries whose name matches a glob; an entry whose possible names
    only partly match is refused."""
    selected: list[tuple[Any, str]] = []
    for e in mapping.entries:
        cands = [e.name] if e.name is not None else list(e.candidates)
        hits = [c for c in cands if any(fnmatch.fnmatchcase(c, g) for g in params)]
        if not hits:
            continue
        if len(hits) != len(cands):
            raise MappingError(
                f"index {e.index} may be {', '.join(cands[:4])}: only some match {', '.join(params)}; "
                "pass --source for exact names"
            )
        selected.append((e.index, e.name or hits[0]))
    if not selected:
        raise MappingError(f"no optimizer parameter matches {', '.join(params)}")
    return selected


def _reset_dcp(path: str, params: Sequence[str], out: str | None, *, keys: Sequence[str], mode: str,
               optimizer_key: str | None, w: WriteOptions) -> tuple[ResetResult, str | None]:
    """``reset`` on DCP: ``drop`` removes the parameters' state entries from the metadata (no byte
    of any shard is rewritten); ``zero`` writes the re-initialised tensors into one extra shard."""
    from .io.dcp import DCPTensorRef, metadata_paths, read_dcp_metadata

    ck = load(path)
    opt = ck.optimizer(optimizer_key)
    selected = _select_params(infer_mapping(ck, opt), params)
    result = ResetResult(opt.name, [(i, n) for i, n in selected], mode, list(keys))
    chosen = {str(i) for i, _ in selected}
    group_of = {str(p): g for g in opt.state_dict.get("param_groups", []) for p in g["params"]}
    flat = {p: k for k, p in metadata_paths(read_dcp_metadata(path)).items()}
    drop: list[str] = []
    fills: dict[str, float] = {}
    values: dict[tuple[Any, ...], Any] = {}
    for fqn, entry in opt.state.items():
        if str(fqn) not in chosen:
            continue
        missing = [k for k in keys if k not in entry]
        if missing:
            raise MappingError(f"{fqn} has no state key {missing[0]!r} (it has: {', '.join(entry)})")
        for k, v in entry.items():
            kpath = (*opt.path, "state", fqn, k)
            if mode == "drop":
                drop.append(flat[kpath])
            elif not keys or k in keys:
                fill = fresh_state_value(k, group_of.get(str(fqn), {}))
                if isinstance(v, DCPTensorRef):
                    fills[flat[kpath]] = fill
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[kpath] = type(v)(fill)
    if w.dry_run:
        return result, None
    _dcp_output(path, out, w.in_place)

    def check(tmp: str) -> None:
        if not w.verify:
            return
        new = load(tmp)
        state = new.optimizer(optimizer_key).state
        for fqn, entry in opt.state.items():
            if str(fqn) in chosen and mode == "drop":
                if fqn in state:
                    raise WriteError(f"{out or path}: verification failed: {fqn} still has state (nothing written)")
                continue
            for k, v in entry.items():
                got = state[fqn][k]
                if isinstance(v, DCPTensorRef):
                    key = flat[(*opt.path, "state", fqn, k)]
                    want = torch.full(v.shape, fills[key], dtype=v.dtype) if key in fills else None
                    if want is not None and not same_bits(got.load(), want):
                        raise WriteError(f"{out or path}: verification failed for {fqn}.{k} (nothing written)")
                    if got.shape != v.shape or got.dtype != v.dtype:
                        raise WriteError(f"{out or path}: verification failed for {fqn}.{k} (nothing written)")

    written = _commit_dcp(path, out, w.in_place, w.replace_backup, check, values=values, fills=fills, drop=drop)
    if mode == "drop":
        result.notes.append("the dropped entries are gone from the metadata: load with "
                            "DefaultLoadPlanner(allow_partial_load=True), or use --mode zero for a checkpoint "
                            "every strict dcp.load accepts")
    return result, written


def reset_checkpoint(
    path: str,
    params: Sequence[str],
    out: str | None,
    *,
    keys: Sequence[str] = (),
    mode: str | None = None,
    model: str | None = None,
    source: str | None = None,
    optimizer_key: str | None = None,
    models: Sequence[str] | None = None,
    write: WriteOptions = WriteOptions(),
    trust_pickle: bool = False,
) -> tuple[ResetResult, str | None]:
    """``optckpt reset``: drop or re-initialise the state of parameters matching ``params`` globs.

    ``drop`` deletes the whole state entry (torch recreates it, ``step`` included, at the next step:
    exactly a fresh parameter). ``zero`` (implied by ``keys``) re-initialises the chosen keys to the
    value torch starts them at (``sum`` → ``initial_accumulator_value``, ``step`` → 0, ...).

    The default (``mode=None``) is ``drop`` for files and ``zero`` for DCP directories: the standard DCP
    resume (``get_state_dict`` of the new objects, ``dcp.load`` with the default, strict planner,
    ``set_state_dict``) needs every key the fresh optimizer has, and zeros with ``step`` 0 are where
    torch's optimizers start (SGD's momentum buffer: as fresh with the default ``dampening=0``)."""
    dcp_dir = is_dcp_dir(path)
    if mode is None:
        mode = "zero" if keys or dcp_dir else "drop"
    if mode not in ("drop", "zero"):
        raise FormatError(f"--mode {mode!r}: expected drop or zero")
    if keys and mode == "drop":
        mode = "zero"
    if dcp_dir:
        return _reset_dcp(path, params, out, keys=keys, mode=mode, optimizer_key=optimizer_key, w=write)
    ck, opt, out = _open_for_edit(path, out, model, optimizer_key, trust_pickle, write)
    mapping = source_mapping(ck, opt, source, models, trust_pickle)
    selected = _select_params(mapping, params)
    if is_lbfgs(opt):
        raise FormatError("LBFGS keeps one global state for all parameters: it cannot be reset per parameter")
    result = ResetResult(opt.name, selected, mode, list(keys))
    group_of = {i: g for g in opt.state_dict.get("param_groups", []) for i in g["params"]}
    state = opt.state
    new_state: dict[Any, Any] = {}
    pending: dict[float, list[torch.Tensor]] = {}
    for idx, entry in state.items():
        if idx not in {i for i, _ in selected}:
            new_state[idx] = entry
            continue
        if mode == "drop":
            continue
        missing = [k for k in keys if k not in entry]
        if missing:
            raise MappingError(f"index {idx} has no state key {missing[0]!r} (it has: {', '.join(entry)})")
        new_state[idx] = {k: (_fresh_like(k, v, group_of.get(idx, {}), pending) if not keys or k in keys else v)
                          for k, v in entry.items()}
    for value, tensors in pending.items():
        fill_tensors(tensors, value)
    new_sd = {**opt.state_dict, "state": new_state}
    if write.dry_run:
        return result, None
    assert out is not None
    written = _write_edits(ck, out, [(opt, new_sd)], w=write, trust_pickle=trust_pickle, notes=result.notes)
    return result, written


def same_bits(a: Any, b: Any, same_record: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> bool:
    """Bit-for-bit equality of tensors (NaN == NaN), recursively through containers: the structure
    first, then the tensors' bytes on every core (:func:`optckpt.diff.all_bit_equal`). The bytes of
    each tensor compared go to the writers' progress hook, when one is set. ``same_record``: says
    of two tensors that they are provably the same bytes without reading them (else compared)."""
    from .diff import all_bit_equal

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if not _same_structure(a, b, same_record, pairs):
        return False
    tick = PROGRESS.get()
    return all_bit_equal(pairs, None if tick is None else lambda x: tick(x.numel() * x.element_size()))


def _same_structure(a: Any, b: Any, same_record: Callable[[torch.Tensor, torch.Tensor], bool] | None,
                    pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Equal containers and values, tensors aside: those go to ``pairs`` (unless ``same_record``
    proves them), to be compared byte for byte."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if same_record is None or not same_record(a, b):
            pairs.append((a, b))
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a.keys()) == list(b.keys()) and all(_same_structure(a[k], b[k], same_record, pairs) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_structure(x, y, same_record, pairs) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


def _same_record_in(path: str) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """For a file edited by appending (its old bytes never written): two tensors memory-mapped from
    ``path`` at the same file offset, with the same dtype, shape, strides and storage size, hold the
    same bytes, whichever version's mapping each came from."""
    from .io.records import _mappings, _offset_in

    ranges = _mappings(path)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        sa, sb = a.untyped_storage(), b.untyped_storage()
        if a.device.type != "cpu" or b.device.type != "cpu" or sa.nbytes() != sb.nbytes() or sa.nbytes() == 0:
            return False
        oa, ob = _offset_in(ranges, sa.data_ptr()), _offset_in(ranges, sb.data_ptr())
        return (oa is not None and oa == ob and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())

    return same


def verify_output(ck: Checkpoint, out: str, changed_parts: Mapping[str, Any], *, trust_pickle: bool = False) -> None:
    """Re-read what was written: every rewritten file must hold exactly the intended object (each
    tensor bit for bit: unchanged ones identical to the input, moved ones equal to their source;
    in a file edited by appending, a tensor still at its old record's offset is that record),
    and every file copied from a directory checkpoint must have its original size."""
    from .io.torchfile import load_torch_file

    single = not os.path.isdir(out)
    kinds = {p.relpath: p.kind for p in ck.parts}
    for relpath, intended in changed_parts.items():
        path = out if single else os.path.join(out, relpath)
        if kinds.get(relpath) == "safetensors":
            _verify_safetensors(path, intended)
            continue
        got = load_torch_file(path, trust_pickle=trust_pickle, quiet=True).obj
        appended = single and os.path.isfile(ck.path) and os.path.samefile(path, ck.path)
        if not same_bits(got, intended, _same_record_in(path) if appended else None):
            raise WriteError(f"{path}: verification failed: the written file differs from what was meant "
                             "(nothing was written; the input is untouched)")
    if not single:
        for p in ck.parts:
            if p.relpath in changed_parts:
                continue
            dst = os.path.join(out, p.relpath)
            if not os.path.isfile(dst) or os.path.getsize(dst) != p.nbytes:
                raise WriteError(f"{dst}: verification failed: copied file is missing or has another size")


def _verify_safetensors(path: str, intended: Mapping[str, torch.Tensor]) -> None:
    """A rewritten safetensors model file holds the intended tensors bit for bit (tied duplicates
    the writer left out excepted: each must be a tensor the file holds under its twin's name)."""
    from .io.safetensors_io import open_safetensors

    got, _, _ = open_safetensors(path)
    absent = [k for k in intended if k not in got]
    present = {intended[k].untyped_storage().data_ptr() for k in intended if k in got}
    if (set(got) - set(intended) or any(intended[k].untyped_storage().data_ptr() not in present for k in absent)
            or not same_bits({k: got[k] for k in sorted(got)}, {k: intended[k] for k in sorted(got)})):
        raise WriteError(f"{path}: verification failed: the written file differs from what was meant "
                         "(nothing was written; the input is untouched)")


def set_checkpoint(
    path: str,
    out: str | None,
    changes: Sequence[Any],
    *,
    groups: Sequence[str] = (),
    params: Sequence[str] = (),
    raw_sets: Sequence[str] = (),
    follow: bool = True,
    model: str | None = None,
    optimizer_key: str | None = None,
    models: Sequence[str] | None = None,
    write: WriteOptions = WriteOptions(),
    trust_pickle: bool = False,
) -> tuple[Any, str | None]:
    """``optckpt set``: change group hyperparameters so the resumed run really uses them."""
    from .hparams import SetResult, parse_set, rewrite, scheduler_changes, select_groups

    dcp = is_dcp_dir(path)
    if dcp:
        ck = load(path)
        opt = ck.optimizer(optimizer_key)
    else:
        ck, opt, out = _open_for_edit(path, out, model, optimizer_key, trust_pickle, write)
    sd_groups = opt.state_dict.get("param_groups", [])
    all_changes = list(changes) + [parse_set(s, sd_groups) for s in raw_sets]
    if not all_changes:
        raise FormatError("nothing to change: give --lr, --scale-lr, --weight-decay, --scale-weight-decay or --set")
    mapping = infer_mapping(ck, opt, models=models) if params else None
    selected = select_groups(sd_groups, mapping, groups, params)  # type: ignore[arg-type]
    scheds = schedulers_of(ck, opt)
    new_opt, new_scheds, notes = rewrite(opt.state_dict, [s.state_dict for s in scheds], selected, all_changes,
                                         follow=follow)
    keys = sorted({k for g in sd_groups for k in g if k not in ("params", "param_names")})
    result = SetResult(opt.name, selected,
                       [{k: sd_groups[i].get(k) for k in keys} for i in selected],
                       [{k: new_opt["param_groups"][i].get(k) for k in keys} for i in selected], notes,
                       [c for s, new in zip(scheds, new_scheds) for c in scheduler_changes(s.name, s.state_dict, new)])
    if write.dry_run:
        return result, None
    if dcp:
        return result, _set_dcp(path, out, opt, new_opt, scheds, new_scheds, w=write)
    assert out is not None
    written = _write_edits(ck, out, [(opt, new_opt), *zip(scheds, new_scheds)], w=write, trust_pickle=trust_pickle)
    return result, written


def _set_dcp(path: str, out: str | None, opt: OptimizerState, new_opt: Mapping[str, Any], scheds: Sequence[Any],
             new_scheds: Sequence[Mapping[str, Any]], *, w: WriteOptions) -> str:
    """``set`` on DCP: only the changed param-group and scheduler entries are written (into one extra
    shard, under a new ``.metadata``); every shard file is carried over as it is."""
    from .io.dcp import changed_small_values

    _dcp_output(path, out, w.in_place)
    values: dict[tuple[Any, ...], Any] = {}
    old_groups = {"param_groups": opt.state_dict.get("param_groups", [])}
    values.update(changed_small_values(path, opt.path[0], old_groups, {"param_groups": new_opt["param_groups"]}))
    for s, new in zip(scheds, new_scheds):
        values.update(changed_small_values(path, s.path[0], s.state_dict, new))

    def check(tmp: str) -> None:
        if not w.verify:
            return
        got = load(tmp)
        g_opt = next(o for o in got.optimizers if o.name == opt.name)
        want = [{k: v for k, v in g.items()} for g in new_opt["param_groups"]]
        if not same_bits(g_opt.state_dict["param_groups"], want):
            raise WriteError(f"{out or path}: verification failed: param groups differ (nothing was written)")
        got_s = {s.name: s.state_dict for s in got.schedulers}
        for s, new in zip(scheds, new_scheds):
            if not same_bits(got_s.get(s.name), new):
                raise WriteError(f"{out or path}: verification failed: scheduler {s.name} differs "
                                 "(nothing was written)")

    return _commit_dcp(path, out, w.in_place, w.replace_backup, check, values=values)


def _materialize(v: Any) -> Any:
    if hasattr(v, "load") and hasattr(v, "key"):
        return v.load()
    if isinstance(v, Mapping):
        return {k: _materialize(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_materialize(x) for x in v]
    return v


def fqn_optimizer_state(ck: Checkpoint, opt: OptimizerState, mapping: OptimizerMapping) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, exactly as
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns it."""
    if mapping.ambiguous:
        bad = mapping.ambiguous[0]
        raise MappingError(f"{opt.name}: index {bad.index} has no certain name "
                           f"({', '.join(bad.candidates[:4]) or 'no candidate'}); pass --source")
    name_of = {e.index: e.name for e in mapping.entries}
    state = {name_of[i]: dict(entry) for i, entry in opt.state.items() if i in name_of}
    groups = []
    for g in opt.state_dict.get("param_groups", []):
        hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({**hp, "params": [name_of[i] for i in g["params"]]})
    return {"state": state, "param_groups": groups}


def convert_checkpoint(path: str, to: str, out: str, *, model: str | None = None, source: str | None = None,
                       optimizer_key: str | None = None, models: Sequence[str] | None = None,
                       trust_pickle: bool = False, max_shard_size: int | None = None) -> str:
    """``optckpt convert``: between layouts. ``dcp`` follows torchtitan's top-level keys (``model``,
    ``optimizer`` FQN-keyed as ``get_state_dict`` produces it, ``lr_scheduler``, ``extra``);
    ``torch`` writes one ``torch.save`` file of the same structure (DCP → single file);
    ``safetensors`` writes the model weights (tied duplicates once): one file, or with
    ``max_shard_size`` (bytes) a directory in Hugging Face's sharded layout."""
    from .io.dcp import save_dcp
    from .io.write import atomic_torch_save

    ck = load(path, model=model, trust_pickle=trust_pickle)
    out = new_output(out)
    dest_dir, final = os.path.dirname(os.path.abspath(out)), os.path.basename(out.rstrip(os.sep))
    data_models = [m for m in ck.models if len(m.tensors) == len(m.meta)]
    if not data_models:
        raise FormatError(f"{path}: no model weights to convert")
    main = data_models[0]
    mode_from = path if os.path.isfile(path) else None
    if max_shard_size is not None and to != "safetensors":
        raise FormatError("--max-shard-size applies to --to safetensors only")
    if to == "safetensors" and max_shard_size is not None:
        return _convert_sharded_safetensors(main, out, max_shard_size, mode_from)
    if to == "safetensors":
        from .io.safetensors_io import save_safetensors

        tensors = {k: main.tensors[k] for k in main.meta if k not in main.tied}
        tmp = temp_file(dest_dir, final)
        try:
            save_safetensors(tensors, tmp)
        except BaseException:
            _remove(tmp)
            raise
        if mode_from:
            copy_mode(mode_from, tmp)
        return commit_file(tmp, out, verify=lambda t: _verify_converted(t, {"model": tensors}), no_clobber=True)
    state: dict[str, Any] = {"model": {k: main.tensors[k] for k in main.meta}}
    if ck.optimizers:
        opt = ck.optimizer(optimizer_key)
        mapping = source_mapping(ck, opt, source, models, trust_pickle)
        state["optimizer"] = _materialize(fqn_optimizer_state(ck, opt, mapping))
        scheds = schedulers_of(ck, opt)
        if len(scheds) == 1:
            state["lr_scheduler"] = _materialize(dict(scheds[0].state_dict))
    extra, lost = carried_entries(ck, placeholders=to == "torch")
    if lost:
        raise FormatError(f"{path}: convert would not carry {', '.join(lost[:4])}"
                          f"{f' and {len(lost) - 4} more' if len(lost) > 4 else ''}: nothing was written "
                          "(convert the model and optimizer of a directory's main file, or keep the originals)")
    if extra:
        state["extra"] = extra
    if to == "dcp":
        from .io.dcp import save_dcp

        tmpdir = temp_dir(dest_dir, final)
        try:
            save_dcp(state, tmpdir)
        except (KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        except BaseException as e:  # DCP's CheckpointException derives from BaseException
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise WriteError(f"{out}: DCP write failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        copy_mode(path, tmpdir)
        return commit_dir(tmpdir, out, verify=lambda t: _verify_converted(t, state))
    if to == "torch":
        from .io.write import atomic_torch_save

        return atomic_torch_save(state, out, verify=lambda t: _verify_converted(t, state), mode_from=mode_from)
    raise FormatError(f"--to {to!r}: expected dcp, torch or safetensors")


_GONE = object()  # a subtree another section of the output carries


def _without(obj: Any, paths: Sequence[tuple[Any, ...]]) -> Any:
    """``obj`` with the subtrees at ``paths`` (key paths) removed; ``_GONE`` when nothing is left."""
    if any(not p for p in paths):
        return _GONE
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            sub = [p[1:] for p in paths if p[0] == k]
            rest = _without(v, sub) if sub else v
            if rest is not _GONE:
                out[k] = rest
        return out if out else _GONE
    if isinstance(obj, (list, tuple)):
        items = [_without(v, [p[1:] for p in paths if p[0] == i]) if any(p[0] == i for p in paths) else v
                 for i, v in enumerate(obj)]
        kept = [v for v in items if v is not _GONE]
        return type(obj)(kept) if kept else _GONE
    return obj


def _plain(v: Any, placeholders: bool) -> bool:
    """What the output can hold as it was read: tensors, scalars, strings, containers of them; with
    ``placeholders`` (a torch file: written back as the exact opcodes read) also pickled objects."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                   torch.Size)):
        return True
    if placeholders and isinstance(v, (PickledObject, PickledGlobal)):
        return True
    if isinstance(v, Mapping):
        return all(_plain(k, placeholders) and _plain(x, placeholders) for k, x in v.items())
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_plain(x, placeholders) for x in v)
    return False


def carried_entries(ck: Checkpoint, *, placeholders: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Everything a checkpoint holds beside its model, optimizer and scheduler sections, for a
    conversion to carry under ``extra`` (top-level keys it does not know, nested extras, tensors such
    as an RNG state, JSON files of a directory), and what it cannot carry (files that are neither,
    objects the output format cannot hold: ``placeholders`` says whether pickled objects can be
    written back as read): nothing is dropped silently."""
    consumed: dict[str, list[tuple[Any, ...]]] = {}
    sections: list[ModelState | OptimizerState | SchedulerState] = [*ck.models, *ck.optimizers, *ck.schedulers]
    for x in sections:
        consumed.setdefault(x.part, []).append(tuple(x.path))
    torch_parts = [p for p in ck.parts if p.kind == "torch" and p.obj is not None]
    extra: dict[str, Any] = {}
    lost: list[str] = [f"{o.part} (objects: {', '.join(o.unsafe_globals[:2]) or o.reason})" for o in ck.opaque]
    opaque = {o.part for o in ck.opaque}
    for part in ck.parts:
        if part.relpath in opaque or part.kind in ("safetensors", "dcp") or (part.kind == "json" and part.relpath in (
                "config.json", "generation_config.json")):
            continue  # a model's weights / config, DCP's own files (its extras are on the checkpoint)
        if part.kind == "json" and part.obj is not None:
            extra[part.relpath] = part.obj
            continue
        if part not in torch_parts:
            lost.append(f"{part.relpath} ({part.kind})")
            continue
        rest = _without(part.obj, consumed.get(part.relpath, []))
        if rest is _GONE:
            continue
        entries = dict(rest) if isinstance(rest, Mapping) else {part.relpath: rest}
        if isinstance(entries.get("extra"), Mapping):  # torchtitan's / convert's own container: its entries
            inner = dict(entries.pop("extra"))
            entries = {**inner, **{k: v for k, v in entries.items() if k not in inner}}
        for k, v in entries.items():
            key = str(k) if str(k) not in extra and len(torch_parts) == 1 else f"{part.relpath}:{k}"
            if _plain(v, placeholders):
                extra[key] = v
            else:
                lost.append(f"{part.relpath}:{k} ({type(v).__name__})")
    if not torch_parts:  # DCP and other layouts keep their extras on the checkpoint
        extra.update({k: v for k, v in ck.extras.items() if _plain(v, placeholders)})
        lost += [k for k, v in ck.extras.items() if not _plain(v, placeholders)]
    return extra, lost


def _convert_sharded_safetensors(main: Any, out: str, max_bytes: int, mode_from: str | None) -> str:
    """The model weights as a new directory of HF-style shards (``from_pretrained`` reads it once
    the model's ``config.json`` sits beside them); one shard's tensors in memory at a time."""
    from .io.safetensors_io import save_sharded_safetensors

    if max_bytes <= 0:
        raise FormatError(f"--max-shard-size {max_bytes}: expected a positive size")
    sizes = {k: main.meta[k].nbytes for k in main.meta if k not in main.tied}
    dest_dir, final = os.path.dirname(os.path.abspath(out)), os.path.basename(out.rstrip(os.sep))
    tmpdir = temp_dir(dest_dir, final)
    try:
        save_sharded_safetensors(sizes, lambda k: main.tensors[k], tmpdir, max_bytes)
    except BaseException as e:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        raise
    if mode_from:
        copy_mode(mode_from, tmpdir)

    def check(tmp: str) -> None:
        got = load(tmp)
        model = next((m for m in got.models if len(m.meta)), None)
        if model is None or set(model.meta) != set(sizes):
            raise WriteError(f"{tmp}: verification failed: the model tensors read back differ (nothing was written)")
        for k in sizes:
            if not same_bits(model.tensors[k], main.tensors[k]):
                raise WriteError(f"{tmp}: verification failed for {k} (nothing was written)")

    return commit_dir(tmpdir, out, verify=check)


def _verify_converted(tmp: str, state: Mapping[str, Any]) -> None:
    """A converted output read back through optckpt's own loader: every model tensor bit for bit."""
    got = load(tmp)
    model = next((m for m in got.models if len(m.meta)), None)
    want = state.get("model", {})
    if model is None or set(model.meta) != set(want):
        raise WriteError(f"{tmp}: verification failed: the model tensors read back differ (nothing was written)")
    for k, t in want.items():
        if not same_bits(model.tensors[k], t):
            raise WriteError(f"{tmp}: verification failed for {k} (nothing was written)")
    torch_parts = [p for p in got.parts if p.kind == "torch" and isinstance(p.obj, Mapping)]
    if "extra" in state and torch_parts and not same_bits(torch_parts[0].obj.get("extra"), state["extra"]):
        raise WriteError(f"{tmp}: verification failed: the extra entries read back differ (nothing was written)")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
