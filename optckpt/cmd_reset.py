"""``optckpt reset``: drop or re-initialise the optimizer state of chosen parameters (fresh values
from :mod:`optckpt.kinds`), and its DCP variant (entries dropped from the metadata, or zeros
written into one extra shard)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .checkpoint import OptimizerState
from .edit import commit_dcp, dcp_output, open_for_edit, source_mapping, write_edits
from .errors import FormatError, MappingError, WriteError
from .io import load
from .io.paths import is_dcp_dir
from .io.write import WriteOptions
from .kinds import fresh_state_value
from .mapping import OptimizerMapping, infer_mapping, is_lbfgs
from .tensors import is_tensor
from .verify import same_bits

if TYPE_CHECKING:
    import torch

__all__ = ["reset_checkpoint", "ResetResult"]


@dataclass
class ResetResult:
    optimizer: str
    selected: list[tuple[Any, str]]  # (index, name); DCP's index is the parameter's FQN
    mode: str
    keys: list[str]
    notes: list[str] = field(default_factory=list)


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
    # drop only deletes entries: tensors read lazily (no torch); zero makes new tensors like the saved ones
    ck, opt, out = open_for_edit(path, out, model, optimizer_key, trust_pickle, write, lazy=mode == "drop")
    mapping = source_mapping(ck, opt, source, models, trust_pickle)
    selected = _select_params(mapping, params)
    if is_lbfgs(opt):
        raise FormatError("LBFGS keeps one global state for all parameters: it cannot be reset per parameter")
    result = ResetResult(opt.name, selected, mode, list(keys))
    new_sd = {**opt.state_dict, "state": _reset_state(opt, selected, mode, keys)}
    if write.dry_run:
        return result, None
    assert out is not None
    written = write_edits(ck, out, [(opt, new_sd)], w=write, trust_pickle=trust_pickle, notes=result.notes)
    return result, written


def _reset_state(opt: OptimizerState, selected: Sequence[tuple[Any, str]], mode: str,
                 keys: Sequence[str]) -> dict[Any, Any]:
    """The optimizer's ``state`` with the selected entries dropped (``drop``) or their keys (all, or
    ``keys``) re-initialised to torch's fresh values (``zero``); new tensors filled in batches."""
    chosen = {i for i, _ in selected}
    group_of = {i: g for g in opt.state_dict.get("param_groups", []) for i in g["params"]}
    new_state: dict[Any, Any] = {}
    pending: dict[float, list[torch.Tensor]] = {}
    for idx, entry in opt.state.items():
        if idx not in chosen:
            new_state[idx] = entry
            continue
        if mode == "drop":
            continue
        missing = [k for k in keys if k not in entry]
        if missing:
            raise MappingError(f"index {idx} has no state key {missing[0]!r} (it has: {', '.join(entry)})")
        new_state[idx] = {k: (_fresh_like(k, v, group_of.get(idx, {}), pending) if not keys or k in keys else v)
                          for k, v in entry.items()}
    if pending:
        from .kernels import fill_tensors

        for value, tensors in pending.items():
            fill_tensors(tensors, value)
    return new_state


def _fresh_like(key: str, v: Any, group: Mapping[str, Any], pending: dict[float, list[torch.Tensor]]) -> Any:
    """A re-initialised copy of ``v``; tensors are allocated here and filled later in batches."""
    import torch

    fill = fresh_state_value(key, group)
    if is_tensor(v):
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
    import torch

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
    dcp_output(path, out, w.in_place)

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

    written = commit_dcp(path, out, w.in_place, w.replace_backup, check, values=values, fills=fills, drop=drop)
    if mode == "drop":
        result.notes.append("the dropped entries are gone from the metadata: load with "
                            "DefaultLoadPlanner(allow_partial_load=True), or use --mode zero for a checkpoint "
                            "every strict dcp.load accepts")
    return result, written

