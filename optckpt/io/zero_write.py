"""Edited ZeRO checkpoints written back in DeepSpeed's own layout (stages 1-3), without DeepSpeed.

DeepSpeed restores its flat partitions by position: ``engine.load_checkpoint`` copies each rank's
saved flat fp32 partition and flat optimizer state into the flat buffers it builds for the model it
runs. An edited checkpoint (parameters renamed, reordered, added, dropped, hyperparameters changed)
is therefore rebuilt here from the name-keyed picture, in the layout DeepSpeed computes for the new
model at load time:

* stages 1/2 (``DeepSpeedZeroOptimizer``): per param group, the parameters in optimizer order
  (round-robin reordered across ranks when ``round_robin_gradients`` is set), each but the last
  padded to ``parameter_alignment``, the whole padded to a multiple of ``2 * world``, cut into
  ``world`` equal partitions; a rank saves its fp32 partition without its tail padding
  (``group_paddings``) and the base optimizer's state over the padded partition (rigid) or without
  padding (elastic);
* bf16 with ZeRO 1 (``BF16_Optimizer``, ``bf16_zero_pp_rank_*``): the same cut without round robin
  or per-parameter padding; the fp32 partition is saved padded, the padding counted on the last rank;
* stage 3: every parameter split into ``ceil(numel / world)``-element slices (the last one padded),
  a rank's slices concatenated per sub-group (``sub_group_size``); the model states file of each
  rank holds empty tensors for the partitioned parameters.

Everything else in the files (the loss scaler and stage enum DeepSpeed pickles, its config, counters)
is written back exactly as read; pickled objects stay inert placeholders (``fragment_address``
entries are built as the same placeholders with new numbers)."""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import WriteError
from .deepspeed import _MODEL, _OPTIM, _cut_stage3, _cut_stage12, _param_shapes
from .safepickle import PickledObject
from .write import _fsync_dir, _fsync_path, _save_torch, new_output, temp_dir, temp_file

__all__ = ["ZeroEdit", "old_masters", "write_zero", "zero_step_of"]

_DEFAULT_SUB_GROUP = 1_000_000_000  # DeepSpeedZeroConfig.sub_group_size


@dataclass
class ZeroEdit:
    """What the edited checkpoint holds, by the new code's names.

    ``groups``: per param group, the parameter names in optimizer order; ``hparams``: per group, its
    hyperparameters (no ``params``); ``state``: each parameter's optimizer state (absent: fresh,
    moments at the value torch starts them at, the group's shared scalars such as ``step``);
    ``sources``: the saved parameter whose fp32 master weights each new name takes (None: from
    ``module``); ``module``: the new model state dict (None: the saved one); ``scheduler``: the new
    ``lr_scheduler`` state (``keep_scheduler``: as saved)."""

    groups: list[list[str]]
    hparams: list[dict[str, Any]]
    state: dict[str, dict[str, Any]]
    sources: dict[str, str | None]
    module: Mapping[str, torch.Tensor] | None = None
    scheduler: Any = None
    keep_scheduler: bool = True
    buffer_renames: dict[str, str] = field(default_factory=dict)  # module prefix -> new prefix
    notes: list[str] = field(default_factory=list)
    masters: dict[str, torch.Tensor] = field(default_factory=dict)  # filled in: the fp32 weights written
    flat_order: list[list[str]] = field(default_factory=list)  # filled in: per group, the names in flat order


def zero_step_of(ck: Checkpoint) -> str:
    """The step directory (relative to ``ck.path``, ``.`` for itself) the ZeRO checkpoint was read from."""
    rel = os.path.dirname(ck.optimizers[0].part)
    return rel or "."


@dataclass
class _Saved:
    """The raw files of one ZeRO step directory."""

    step_rel: str
    model_files: list[str]
    optim_files: list[str]
    models: list[dict[str, Any]]
    optims: list[dict[str, Any]]  # the whole file's dict (``optimizer_state_dict`` inside)
    kind: str  # "zero12", "bf16", "stage3"

    @property
    def world(self) -> int:
        return len(self.optim_files)

    def zero(self, r: int) -> dict[str, Any]:
        z = self.optims[r].get("optimizer_state_dict")
        assert isinstance(z, dict)
        return z

    def config(self) -> dict[str, Any]:
        for obj in (self.optims[0], self.models[0]):
            cfg = obj.get("ds_config")
            if isinstance(cfg, dict):
                return cfg
        return {}

    def zero_config(self) -> dict[str, Any]:
        z = self.config().get("zero_optimization")
        return z if isinstance(z, dict) else {}


def _saved(ck: Checkpoint) -> _Saved:
    step_rel = zero_step_of(ck)
    objs = {p.relpath: p.obj for p in ck.parts}

    def rel(n: str) -> str:
        return n if step_rel == "." else os.path.join(step_rel, n)

    names = [os.path.basename(p.relpath) for p in ck.parts]
    models = sorted((n for n in names if _MODEL.match(n)), key=lambda n: int(_MODEL.match(n).group(1) or 0))  # type: ignore[union-attr]
    optims = sorted((n for n in names if _OPTIM.match(n)), key=lambda n: int(_OPTIM.match(n).group(1)))  # type: ignore[union-attr]
    zero0 = objs[rel(optims[0])]["optimizer_state_dict"]
    if "fp32_flat_groups" in zero0:
        kind = "stage3"
    elif "zero_stage" in zero0:
        kind = "zero12"
    else:
        kind = "bf16"
    return _Saved(step_rel, models, optims, [objs[rel(n)] for n in models], [objs[rel(n)] for n in optims], kind)


# ------------------------------------------------------------------------------------------------
# layout arithmetic (DeepSpeed's, for the new model)


@dataclass
class _GroupLayout:
    order: list[int]  # flat order: indices into the group's parameter list
    offsets: list[int]  # flat offset of each parameter in flat order
    paddings: list[int]  # per-parameter alignment padding, flat order
    total: int  # padded flat size (a multiple of 2 * world)
    partition: int  # elements per rank

    def rank_padding(self, r: int, padded_numel: int) -> int:
        left = r * self.partition
        if padded_numel <= left:
            return self.partition
        if padded_numel < left + self.partition:
            return left + self.partition - padded_numel
        return 0


def _round_robin(n: int, world: int) -> list[int]:
    """DeepSpeed's ``_round_robin_reorder``: parameters ``i % world == 0`` first, then 1, ..."""
    return [i for j in range(world) for i in range(n) if i % world == j]


def _layout12(numels: Sequence[int], world: int, *, round_robin: bool, param_alignment: int) -> _GroupLayout:
    order = _round_robin(len(numels), world) if round_robin else list(range(len(numels)))
    offsets, paddings = [], []
    cur = 0
    for k, i in enumerate(order):
        offsets.append(cur)
        cur += numels[i]
        pad = 0 if k == len(order) - 1 else (-cur) % param_alignment
        paddings.append(pad)
        cur += pad
    align = 2 * world  # nccl_start_alignment_factor * world
    total = -(-cur // align) * align
    return _GroupLayout(order, offsets, paddings, total, total // world)


def _padded_flat(pieces: Sequence[torch.Tensor], layout: _GroupLayout, dtype: torch.dtype) -> torch.Tensor:
    """One flat buffer of ``layout.total`` elements: the pieces (in group order) at their offsets."""
    flat = torch.zeros(layout.total, dtype=dtype)
    for k, i in enumerate(layout.order):
        t = pieces[i].reshape(-1)
        flat.narrow(0, layout.offsets[k], t.numel()).copy_(t)
    return flat


def _fragments(numels: Sequence[int], layout: _GroupLayout, r: int) -> list[tuple[int, int, int]]:
    """``(index, numel, start)`` of each parameter (group order) with a piece in rank ``r``'s
    partition, as DeepSpeed's ``_init_lp_to_hp_mapping`` links them (its offsets: the padded ones
    when any padding exists, else running sums in group order)."""
    if any(layout.paddings):
        at = {i: layout.offsets[k] for k, i in enumerate(layout.order)}
        offsets = [at[i] for i in range(len(numels))]
    else:
        offsets = [sum(numels[:i]) for i in range(len(numels))]
    start, end = r * layout.partition, (r + 1) * layout.partition
    out = []
    for i, (n, off) in enumerate(zip(numels, offsets)):
        if n and (start <= off < end or off < start < off + n):
            lo, hi = max(off, start), min(off + n, end)
            out.append((i, hi - lo, lo - start))
    return out


def _sub_groups(numels: Sequence[int], world: int, size: int) -> list[list[int]]:
    """Stage 3's ``_create_fp16_sub_groups`` over partition sizes."""
    parts = [-(-n // world) for n in numels]
    if size >= sum(parts):
        return [list(range(len(numels)))]
    out: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for i, p in enumerate(parts):
        cur.append(i)
        acc += p
        if acc >= size or i == len(parts) - 1:
            out.append(cur)
            cur, acc = [], 0
    return out


# ------------------------------------------------------------------------------------------------
# the optimizer state, per group


def _group_state(names: Sequence[str], shapes: Sequence[tuple[int, ...]], state: Mapping[str, Mapping[str, Any]],
                 hparams: Mapping[str, Any], g: int) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]], int]:
    """The group's shared scalars and, per tensor key, one full tensor per parameter (fresh values
    for parameters without state); also how many parameters got fresh state."""
    from ..kinds import fresh_state_value

    scalars: dict[str, Any] = {}
    keys: list[str] = []
    who: str | None = None
    for name, shape in zip(names, shapes):
        entry = state.get(name)
        if not entry:
            continue
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape) and not (v.dim() == 0 and k == "step"):
                if k not in keys:
                    keys.append(k)
            elif k not in scalars:
                scalars[k] = v
                who = who or name
            elif not _same_value(scalars[k], v):
                raise WriteError(f"param group {g}: {name} and {who} carry different {k!r} ({_show(v)} vs "
                                 f"{_show(scalars[k])}); DeepSpeed keeps one per flat group: refused")
    tensors: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    fresh = 0
    for name, shape in zip(names, shapes):
        entry = state.get(name) or {}
        if not all(k in entry for k in keys):
            fresh += 1
        for k in keys:
            v = entry.get(k)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape):
                tensors[k].append(v)
            else:
                tensors[k].append(torch.full(shape, fresh_state_value(k, hparams), dtype=torch.float32))
    return scalars, tensors, fresh


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return bool(a == b)


def _show(v: Any) -> str:
    return str(v.item()) if isinstance(v, torch.Tensor) and v.numel() == 1 else type(v).__name__


def _entry(scalars: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, Any]:
    """A state entry with the keys in the order the saved one had them."""
    merged = {**scalars, **tensors}
    out = {k: merged[k] for k in order if k in merged}
    out.update({k: v for k, v in merged.items() if k not in out})
    return out


# ------------------------------------------------------------------------------------------------
# building the files


def _fragment_like(template: PickledObject | None, numel: int, start: int) -> Any:
    if template is None:
        raise WriteError("param_slice_mappings: no saved fragment_address to write new ones like; refused")
    new = PickledObject(template.callable, template.args, template.opcode, template.kwargs)
    new.ops = [(op, ({**v, "numel": numel, "start": start} if op == "build" and isinstance(v, dict) else v))
               for op, v in template.ops]
    return new


def _first_fragment(zero: Mapping[str, Any]) -> PickledObject | None:
    for g in zero.get("param_slice_mappings") or ():
        if isinstance(g, Mapping):
            for v in g.values():
                if isinstance(v, PickledObject):
                    return v
    return None


def old_masters(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO checkpoint by name (views into its partitions)."""
    return _old_masters(_saved(ck))


def _old_masters(saved: _Saved) -> dict[str, torch.Tensor]:
    shapes = _param_shapes(saved.models[0], "param_shapes")
    zero = [saved.zero(r) for r in range(saved.world)]
    if saved.kind == "stage3":
        return _cut_stage3(zero, shapes, "saved partitions")[0]
    return _cut_stage12(zero, shapes, "saved partitions")[0]


def _state_key_order(saved: _Saved) -> list[str]:
    z = saved.zero(0)
    base = z.get("optimizer_state_dict") if saved.kind == "stage3" else z.get("base_optimizer_state")
    if isinstance(base, list):
        entries = [e for e in base if isinstance(e, dict)]
    elif isinstance(base, dict) and isinstance(base.get("state"), dict):
        entries = [e for e in base["state"].values() if isinstance(e, dict)]
    else:
        entries = []
    return list(entries[0]) if entries else []


def _build_12(saved: _Saved, edit: ZeroEdit, masters: Mapping[str, torch.Tensor]
              ) -> tuple[list[dict[str, Any]], list[OrderedDict[str, torch.Size]]]:
    """Each rank's new ``optimizer_state_dict`` (stages 1/2 and the bf16 optimizer), and param_shapes."""
    world = saved.world
    zcfg = saved.zero_config()
    bf16 = saved.kind == "bf16"
    round_robin = bool(zcfg.get("round_robin_gradients", False)) and not bf16
    lp_dtype = next((t.dtype for t in _module(saved).values() if isinstance(t, torch.Tensor) and t.is_floating_point()),
                    torch.float32)
    elem = torch.tensor([], dtype=lp_dtype).element_size()
    param_alignment = 16 // math.gcd(16, elem) if zcfg.get("parameter_alignment", False) and not bf16 else 1
    key_order = _state_key_order(saved)
    template = _first_fragment(saved.zero(0))
    old0 = saved.zero(0)
    elastic = isinstance(old0.get("base_optimizer_state"), list)
    new_zero = [dict(saved.zero(r)) for r in range(world)]
    fp32_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    paddings: list[list[int]] = [[] for _ in range(world)]
    align_pads: list[list[int]] = []
    slice_maps: list[list[OrderedDict[str, Any]]] = [[] for _ in range(world)]
    rigid_state: list[dict[int, dict[str, Any]]] = [{} for _ in range(world)]
    lean_states: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    shapes_out: list[OrderedDict[str, torch.Size]] = []
    for g, names in enumerate(edit.groups):
        shapes = [tuple(masters[n].shape) for n in names]
        numels = [math.prod(s) for s in shapes]
        lay = _layout12(numels, world, round_robin=round_robin, param_alignment=param_alignment)
        padded_numel = lay.offsets[-1] + numels[lay.order[-1]] if names else 0
        shapes_out.append(OrderedDict((names[i], torch.Size(shapes[i])) for i in lay.order))
        edit.flat_order.append([names[i] for i in lay.order])
        align_pads.append(list(lay.paddings))
        flat = _padded_flat([masters[n] for n in names], lay, torch.float32)
        scalars, tensors, fresh = _group_state(names, shapes, edit.state, edit.hparams[g], g)
        if fresh and tensors:
            edit.notes.append(f"param group {g}: {fresh} parameter(s) start with fresh "
                              f"{', '.join(tensors)} but share the group's step (DeepSpeed keeps one per flat group)")
        flat_state = {k: _padded_flat(v, lay, torch.float32) for k, v in tensors.items()}
        for r in range(world):
            if bf16:
                pad = lay.total - padded_numel if r == world - 1 else 0
            else:
                pad = lay.rank_padding(r, padded_numel)
            paddings[r].append(pad)
            part = flat.narrow(0, r * lay.partition, lay.partition)
            fp32_parts[r].append(part.clone() if bf16 else part[:lay.partition - pad].clone())
            pieces = {k: v.narrow(0, r * lay.partition, lay.partition).clone() for k, v in flat_state.items()}
            if scalars or pieces:
                if elastic:
                    lean = {k: v[:v.numel() - pad] for k, v in pieces.items()}
                    lean_states[r].append(_entry(scalars, lean, key_order))
                else:
                    rigid_state[r][g] = _entry(_copy_scalars(scalars), pieces, key_order)
            elif elastic:
                lean_states[r].append({})
            if "param_slice_mappings" in old0:
                slice_maps[r].append(OrderedDict((names[i], _fragment_like(template, n, s))
                                                 for i, n, s in _fragments(numels, lay, r)))
    for r in range(world):
        z = new_zero[r]
        if elastic:
            z["base_optimizer_state"] = lean_states[r]
        else:
            base = saved.zero(r).get("base_optimizer_state")
            assert isinstance(base, dict)
            z["base_optimizer_state"] = {**base, "state": rigid_state[r], "param_groups": [
                {**hp, "params": [g]} for g, hp in enumerate(edit.hparams)]}
        old_parts = saved.zero(r).get("single_partition_of_fp32_groups")
        z["single_partition_of_fp32_groups"] = _flagged(fp32_parts[r], old_parts)
        z["group_paddings"] = paddings[r]
        if "param_alignment_paddings" in z:
            z["param_alignment_paddings"] = [list(p) for p in align_pads]
        if isinstance(z.get("partition_count"), list):
            z["partition_count"] = [world] * len(edit.groups)
        if "param_slice_mappings" in z:
            z["param_slice_mappings"] = slice_maps[r]
    return new_zero, shapes_out


def _flagged(new: list[torch.Tensor], old: Any) -> list[torch.Tensor]:
    """The new flat partitions with ``requires_grad`` as DeepSpeed saved its own (its fp32 masters are
    leaf parameters)."""
    if isinstance(old, list) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in old):
        for t in new:
            t.requires_grad_(True)
    return new


def _copy_scalars(scalars: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in scalars.items()}


def _build_3(saved: _Saved, edit: ZeroEdit, masters: Mapping[str, torch.Tensor]
             ) -> tuple[list[dict[str, Any]], list[OrderedDict[str, torch.Size]]]:
    world = saved.world
    size = saved.zero_config().get("sub_group_size", _DEFAULT_SUB_GROUP)
    size = int(size) if isinstance(size, (int, float)) and size > 0 else _DEFAULT_SUB_GROUP
    key_order = _state_key_order(saved)
    flats: list[list[torch.Tensor]] = [[] for _ in range(world)]
    states: list[dict[int, dict[str, Any]]] = [{} for _ in range(world)]
    group_params: list[list[int]] = []
    shapes_out: list[OrderedDict[str, torch.Size]] = []
    sub = 0
    for g, names in enumerate(edit.groups):
        shapes = [tuple(masters[n].shape) for n in names]
        numels = [math.prod(s) for s in shapes]
        scalars, tensors, fresh = _group_state(names, shapes, edit.state, edit.hparams[g], g)
        if fresh and tensors:
            edit.notes.append(f"param group {g}: {fresh} parameter(s) start with fresh "
                              f"{', '.join(tensors)} but share the group's step (DeepSpeed keeps one per flat group)")
        ids = []
        edit.flat_order.append(list(names))
        for members in _sub_groups(numels, world, size):
            shapes_out.append(OrderedDict((names[i], torch.Size(shapes[i])) for i in members))
            for r in range(world):
                flats[r].append(_slices([masters[names[i]] for i in members], world, r))
                pieces = {k: _slices([v[i] for i in members], world, r) for k, v in tensors.items()}
                if scalars or pieces:
                    states[r][sub] = _entry(_copy_scalars(scalars), pieces, key_order)
            ids.append(sub)
            sub += 1
        group_params.append(ids)
    new_zero = []
    for r in range(world):
        z = dict(saved.zero(r))
        base = z.get("optimizer_state_dict")
        assert isinstance(base, dict)
        z["optimizer_state_dict"] = {**base, "state": states[r], "param_groups": [
            {**hp, "params": ids} for hp, ids in zip(edit.hparams, group_params)]}
        z["fp32_flat_groups"] = _flagged(flats[r], z.get("fp32_flat_groups"))
        new_zero.append(z)
    return new_zero, shapes_out


def _slices(tensors: Sequence[torch.Tensor], world: int, r: int) -> torch.Tensor:
    """Rank ``r``'s stage-3 slice of each tensor (``ceil(numel / world)`` elements, zero padded), joined."""
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float32)
        part = -(-flat.numel() // world)
        piece = torch.zeros(part, dtype=torch.float32)
        lo = r * part
        n = max(0, min(part, flat.numel() - lo))
        if n:
            piece[:n] = flat[lo:lo + n]
        out.append(piece)
    return torch.cat(out) if out else torch.zeros(0)


def _module(saved: _Saved) -> Mapping[str, Any]:
    m = saved.models[0].get("module")
    return m if isinstance(m, Mapping) else {}


def _new_module(saved: _Saved, edit: ZeroEdit, names: set[str]) -> Any:
    old = _module(saved)
    new: Mapping[str, Any] = edit.module if edit.module is not None else old
    if saved.kind != "stage3":
        return new if isinstance(new, OrderedDict) else OrderedDict(new)
    empty = next((v for v in old.values() if isinstance(v, torch.Tensor) and v.numel() == 0), None)
    dtype = empty.dtype if empty is not None else torch.float32
    return OrderedDict((k, torch.empty(0, dtype=dtype) if k in names else v) for k, v in new.items())


def _renamer(rename: Mapping[str, str], prefixes: Mapping[str, str]) -> Callable[[str], str]:
    def new_name(old: str) -> str:
        if old in rename:
            return rename[old]
        mod, _, leaf = old.rpartition(".")
        return f"{prefixes[mod]}.{leaf}" if mod in prefixes else old
    return new_name


def _renamed_names(values: Any, new_name: Callable[[str], str], keep: set[str]) -> Any:
    """A list of names / a name-keyed mapping with the names renamed; names the new module lacks left out."""
    if isinstance(values, list):
        return [new_name(v) for v in values if isinstance(v, str) and new_name(v) in keep]
    if isinstance(values, dict):
        return type(values)((new_name(k), new_name(v) if isinstance(v, str) else v)
                            for k, v in values.items() if new_name(k) in keep)
    return values


def _model_files(saved: _Saved, edit: ZeroEdit, shapes: list[OrderedDict[str, torch.Size]]) -> list[dict[str, Any]]:
    names = {n for g in edit.groups for n in g}
    module = _new_module(saved, edit, names)
    rename = {old: new for new, old in edit.sources.items() if old is not None and old != new}
    new_name = _renamer(rename, edit.buffer_renames)
    keep = set(module)
    out = []
    for m in saved.models:
        new = dict(m)
        new["module"] = module
        new["param_shapes"] = shapes
        for k in ("buffer_names", "frozen_param_shapes", "frozen_param_fragments", "shared_params"):
            if k in new and new[k]:
                new[k] = _renamed_names(new[k], new_name, keep)
        if not edit.keep_scheduler:
            new["lr_scheduler"] = edit.scheduler
        out.append(new)
    return out


def _masters(saved: _Saved, edit: ZeroEdit) -> dict[str, torch.Tensor]:
    old = _old_masters(saved)
    out: dict[str, torch.Tensor] = {}
    for names in edit.groups:
        for n in names:
            src = edit.sources.get(n)
            if src is not None and src in old:
                out[n] = old[src]
            elif edit.module is not None and isinstance(edit.module.get(n), torch.Tensor) \
                    and edit.module[n].numel() > 0:
                out[n] = edit.module[n].detach().to(torch.float32)
            else:
                raise WriteError(f"{n}: no saved fp32 master weights and no model tensor to start it from; refused")
    return out


# ------------------------------------------------------------------------------------------------
# writing


def write_zero(ck: Checkpoint, edit: ZeroEdit, out: str | None, *, in_place: bool,
               verify: Callable[[str], None] | None = None) -> str:
    """Write the edited ZeRO checkpoint: ``out`` a new directory (the same shape as the input: a root
    with ``latest`` and one step directory, or a step directory), or ``in_place``: a new step
    directory beside the old one, ``latest`` switched to it last (the old step directory is kept)."""
    saved = _saved(ck)
    if len(edit.groups) != len(edit.hparams):
        raise WriteError("internal: one hparams entry per param group expected")
    empty = [g for g, names in enumerate(edit.groups) if not names]
    if empty:
        raise WriteError(f"param group {empty[0]} would be empty: DeepSpeed drops empty groups, so its saved "
                         "partitions could not be matched; refused")
    masters = _masters(saved, edit)
    edit.masters = masters
    if saved.kind == "stage3":
        zeros, shapes = _build_3(saved, edit, masters)
    else:
        zeros, shapes = _build_12(saved, edit, masters)
    models = _model_files(saved, edit, shapes)
    optims = [{**saved.optims[r], "optimizer_state_dict": zeros[r]} for r in range(saved.world)]
    files = dict(zip(saved.model_files, models)) | dict(zip(saved.optim_files, optims))
    root = ck.path
    step_src = root if saved.step_rel == "." else os.path.join(root, saved.step_rel)
    has_latest = saved.step_rel != "."
    if in_place:
        return _in_place(root, step_src, saved, files, has_latest, verify)
    assert out is not None
    new_output(out)
    tmp = temp_dir(os.path.dirname(os.path.abspath(out)), os.path.basename(out.rstrip(os.sep)))
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(root).st_mode))
        if has_latest:
            _copy_plain_files(root, tmp, skip={saved.step_rel, "latest"})
            step_dst = os.path.join(tmp, saved.step_rel)
            os.mkdir(step_dst)
            _write_step(step_src, step_dst, files)
            _write_latest(tmp, saved.step_rel)
        else:
            _write_step(step_src, tmp, files)
        _fsync_dir(tmp)
        if verify is not None:
            verify(tmp)
        if os.path.lexists(out):
            raise WriteError(f"{out}: appeared while writing (another run?); nothing replaced")
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"{out}: write failed: {e.strerror or e}") from None
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(out)))
    return out


def _in_place(root: str, step_src: str, saved: _Saved, files: Mapping[str, Any], has_latest: bool,
              verify: Callable[[str], None] | None) -> str:
    """A new step directory ``<tag>_optckpt[N]`` beside the old one, verified, then ``latest``
    switched to it by an atomic rename. A step directory given without a ``latest`` naming it is
    swapped whole instead (the old one kept as ``DIR.bak``)."""
    if not has_latest:
        parent = os.path.dirname(os.path.abspath(step_src))
        tag = os.path.basename(os.path.abspath(step_src))
        latest = os.path.join(parent, "latest")
        try:
            with open(latest, encoding="utf-8") as f:
                names_it = f.read().strip() == tag
        except (OSError, UnicodeDecodeError):
            names_it = False
        if not names_it:
            from .write import commit_dir

            tmp = temp_dir(parent, tag)
            try:
                _write_step(step_src, tmp, files)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return commit_dir(tmp, step_src, verify=verify, in_place=True)
        root, tag_rel = parent, tag
    else:
        tag_rel = saved.step_rel
    base = re.sub(r"_optckpt\d*$", "", tag_rel.rstrip(os.sep))  # a second edit: global_step3_optckpt2
    new_tag = next(f"{base}_optckpt{'' if i == 1 else i}" for i in range(1, 10_000)
                   if not os.path.lexists(os.path.join(root, f"{base}_optckpt{'' if i == 1 else i}")))
    dest = os.path.join(root, new_tag)
    tmp = temp_dir(root, new_tag)
    try:
        _write_step(os.path.join(root, tag_rel), tmp, files)
        _fsync_dir(tmp)
        if verify is not None:
            verify(tmp)
        os.rename(tmp, dest)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"{dest}: write failed: {e.strerror or e}") from None
        raise
    _write_latest(root, new_tag)
    return root if has_latest else dest


def _write_latest(root: str, tag: str) -> None:
    path = os.path.join(root, "latest")
    tmp = temp_file(root, "latest")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(tag)
    _fsync_path(tmp)
    if os.path.exists(path):
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    os.replace(tmp, path)
    _fsync_dir(root)


def _copy_plain_files(src: str, dst: str, skip: set[str]) -> None:
    """The root's regular files (DeepSpeed's zero_to_fp32.py); other step directories are not copied."""
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if name in skip or not stat.S_ISREG(os.lstat(full).st_mode):
            continue
        shutil.copy2(full, os.path.join(dst, name), follow_symlinks=False)


def _write_step(src: str, dst: str, files: Mapping[str, Any]) -> None:
    """The step directory's ZeRO files written anew, its other regular files copied as they are."""
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if name in files:
            tmp = temp_file(dst, name)
            _save_torch(files[name], tmp, legacy=False)
            os.chmod(tmp, stat.S_IMODE(os.stat(full).st_mode))
            os.replace(tmp, os.path.join(dst, name))
        elif stat.S_ISREG(os.lstat(full).st_mode):
            shutil.copy2(full, os.path.join(dst, name), follow_symlinks=False)
            _fsync_path(os.path.join(dst, name))
