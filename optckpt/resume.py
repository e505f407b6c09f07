"""The resume-script API: load optimizer state **by name** into a live optimizer."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .checkpoint import Checkpoint, OptimizerState
from .errors import FormatError, MappingError, UnsafePickleError
from .io import adopt_target_adapter, load
from .io.discover import is_optimizer_sd, model_state_from_dict
from .io.safepickle import PickledObject, first_placeholder
from .kernels import place_tensors
from .mapping import SourceNames, is_lbfgs
from .remap import apply_plan, attach_lbfgs_layout, plan_remap
from .resolve import Policy, resolve
from .target import from_live, renames_of
from .transforms import parse_transforms

__all__ = ["LoadReport", "load_optimizer_state_dict", "enable_load_by_name"]


@dataclass
class LoadReport:
    """What :func:`load_optimizer_state_dict` did, in the spirit of ``nn.Module.load_state_dict``'s
    result: every list holds parameter names."""

    moved: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)  # fused / split / sliced parameters
    evidence: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch or self.ambiguous)


def _as_checkpoint(source: Any, model_state_dict: Mapping[str, torch.Tensor] | None,
                   optimizer_key: str | None, trust_pickle: bool) -> tuple[Checkpoint, OptimizerState]:
    if isinstance(source, (str, os.PathLike)):
        ck = load(source, trust_pickle=trust_pickle)
    elif isinstance(source, Checkpoint):
        ck = source
    elif is_optimizer_sd(source):
        ck = Checkpoint(path="<state dict>", layout="torch-optimizer")
        ck.optimizers.append(OptimizerState("optimizer", "<state dict>", (), dict(source)))
    else:
        raise FormatError("source must be a path, an optckpt.Checkpoint, or an optimizer state dict")
    if model_state_dict is not None:
        ck.models.insert(0, model_state_from_dict(model_state_dict, "model_state_dict", "<given>", ()))
    return ck, ck.optimizer(optimizer_key)


def load_optimizer_state_dict(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None,
    source: str | os.PathLike[str] | Checkpoint | Mapping[str, Any],
    *,
    missing: Literal["reset", "error"] = "reset",
    unexpected: Literal["drop", "error"] = "drop",
    shape_mismatch: Literal["reset", "error", "slice"] = "reset",
    rename: Sequence[str] | Mapping[str, str] = (),
    fuse: Sequence[str] = (),
    split: Sequence[str] = (),
    strict: bool = False,
    allow_ambiguous: bool = False,
    group_evidence: bool = True,
    model_state_dict: Mapping[str, torch.Tensor] | None = None,
    source_names: Sequence[Sequence[str]] | Sequence[str] | None = None,
    optimizer_key: str | None = None,
    hparams: Literal["checkpoint", "target"] = "checkpoint",
    trust_pickle: bool = False,
) -> LoadReport:
    """Load saved optimizer state into ``optimizer`` by parameter **name** (``model`` supplies the
    names of the optimizer's parameters; ``None`` when the optimizer's groups carry them, as
    ``param_names`` or single-parameter groups' ``name`` keys).

    State of a parameter found under its name moves to wherever the new optimizer holds it; new
    parameters start fresh (``missing="reset"``), state of parameters that are gone is dropped,
    parameters whose shape changed start fresh. Param groups keep the new optimizer's grouping;
    each takes the saved hyperparameters of the old group holding most of its parameters (as torch's
    own ``load_state_dict`` restores saved hyperparameters), or keeps its own with
    ``hparams="target"``. Tensors land on each parameter's device and dtype, exactly as
    ``Optimizer.load_state_dict`` casts them. ``strict=True`` raises on any missing, unexpected or
    reshaped parameter. ``shape_mismatch="slice"`` keeps the shared region of a reshaped parameter's
    state (the rest fresh, as torch starts it); ``fuse=["qkv.weight=q.weight+k.weight+v.weight@0"]``
    and ``split=[...]`` concatenate / cut state exactly as ``optckpt remap --fuse / --split`` do
    (the report's ``transformed`` lists them). ``rename=["head.=classifier."]`` (``--rename``
    syntax, or a mapping ``{"head.": "classifier."}``) gives ``classifier.*`` the state saved under
    ``head.*``; rename hints are only applied when given.

    Uncertain names follow the CLI's contract (``optckpt remap``): when indices that hold state
    cannot be named with certainty, :class:`MappingError` names them and their candidates and
    nothing is loaded, unless ``allow_ambiguous=True`` (``--allow-ambiguous``), which resets their
    state (listed in the report's ``ambiguous``). Indices without state never block. The optimizer's
    own grouping settles what the checkpoint leaves open unless ``group_evidence=False``
    (``--no-group-evidence``).

    ``source`` is a checkpoint path, a loaded :class:`Checkpoint`, or an optimizer state dict; for a
    bare index-based state dict pass ``model_state_dict=`` (the model saved with it, registration
    order) or ``source_names=`` (names in the old optimizer order). Without either, only indices whose
    shape occurs once in the saved state and once in ``model`` are named (``target-shapes``, the
    weakest evidence, as ``optckpt check`` and ``optckpt remap`` name an optimizer saved alone); the
    others follow the uncertain-names contract above."""
    ck, opt = _as_checkpoint(source, model_state_dict, optimizer_key, trust_pickle)
    target = from_live(model, optimizer)
    adopt_target_adapter(ck, model, trust_pickle=trust_pickle)
    claim: SourceNames | None = None
    if source_names is not None:
        names = [[str(n) for n in source_names]] if source_names and isinstance(source_names[0], str) else \
            [[str(n) for n in g] for g in source_names]
        claim = SourceNames("source_names=", names, fallback_shapes=dict(target.shapes))
    policy = Policy(missing=missing, unexpected=unexpected, shape_mismatch=shape_mismatch,
                    allow_ambiguous=allow_ambiguous, hparams=hparams, group_evidence=group_evidence)
    resolution = resolve(ck, opt, target, source=claim, renames=renames_of(rename),
                         transforms=parse_transforms(fuse, split), policy=policy, plan=True)
    plan, report = plan_remap(resolution, policy)
    plan.transforms = steps = resolution.steps
    sd = resolution.state_dict
    if is_lbfgs(opt):
        attach_lbfgs_layout(plan, resolution.mapping, {**{n: m.shape for mod in ck.models for n, m in
                                                          mod.meta.items()}, **target.shapes})
    result = LoadReport(evidence=resolution.mapping.evidence)
    for p in report.params:
        if p.status == "ambiguous" and not p.has_state:
            continue  # nothing was lost: no state to reset
        bucket = {"moved": result.moved, "missing": result.missing, "unexpected": result.unexpected,
                  "shape_mismatch": result.shape_mismatch, "ambiguous": result.ambiguous}.get(p.status)
        if bucket is not None:
            bucket.append(p.name)
    if strict and (result.missing or result.unexpected or result.shape_mismatch):
        raise MappingError(
            f"strict load: missing {result.missing}, unexpected {result.unexpected}, "
            f"shape_mismatch {result.shape_mismatch}"
        )
    new_sd = apply_plan(plan, sd, with_names="param_names" in optimizer.param_groups[0])
    hit = first_placeholder(new_sd.get("state", {}))
    if hit is not None:  # read without running it: the live optimizer would get an inert record, not the object
        obj = hit[1]
        raise UnsafePickleError(ck.path or "the saved state", [obj.type_name if isinstance(obj, PickledObject)
                                                                else obj.name],
                                f"the state of index {hit[0][0]} holds a pickled object, which the live "
                                "optimizer needs built")
    result.notes = list(plan.notes)
    result.transformed = [s.whole for s in steps] + [s.name for s in plan.slots if s.action == "slice"]
    _place_state(new_sd, optimizer)
    optimizer.load_state_dict(new_sd)
    return result


def _place_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Move / cast the state to each parameter's device and dtype exactly as
    ``Optimizer.load_state_dict`` would (``step`` left alone unless capturable / fused), but in one
    batched transfer per (device, dtype) instead of one copy per tensor."""
    where: list[tuple[dict[str, Any], str]] = []
    devices: list[torch.device] = []
    dtypes: list[torch.dtype | None] = []
    for saved, live in zip(sd["param_groups"], optimizer.param_groups):
        for idx, p in zip(saved["params"], live["params"]):
            entry = sd["state"].get(idx)
            if not entry:
                continue
            for key, v in entry.items():
                if not isinstance(v, torch.Tensor) or key == "step":
                    continue
                where.append((entry, key))
                devices.append(p.device)
                dtypes.append(p.dtype if p.is_floating_point() else None)
    if not where or all(entry[key].device == dev for (entry, key), dev in zip(where, devices)):
        return  # nothing to move: torch's own per-tensor cast (a no-op or a dtype cast) is enough
    placed = place_tensors([entry[key] for entry, key in where], devices, dtypes)
    for (entry, key), t in zip(where, placed):
        entry[key] = t


def enable_load_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                        rename: Sequence[str] | Mapping[str, str] = ()) -> None:
    """Make ``optimizer`` save its parameter names and load by name from then on.

    For scripts that keep calling ``optimizer.load_state_dict(sd)``: every ``state_dict()`` records
    ``param_names`` (so later loads are exact), and every ``load_state_dict`` first remaps ``sd``
    by name — exact when ``sd`` carries ``param_names``; an index-based ``sd`` without them is
    refused with a :class:`MappingError` (pass it through :func:`load_optimizer_state_dict` with
    ``model_state_dict=`` instead), because guessing would be silent corruption. ``rename`` as in
    :func:`load_optimizer_state_dict` (for state saved under the old names)."""
    names = {id(p): n for n, p in model.named_parameters()}
    rules = renames_of(rename)

    def add_names(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        for group, saved in zip(opt.param_groups, sd["param_groups"]):
            if "param_names" not in saved:
                saved["param_names"] = [names.get(id(p), "") for p in group["params"]]
        return sd

    def remap_by_name(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        if not all("param_names" in g for g in sd.get("param_groups", [])):
            raise MappingError("this optimizer state dict has no param_names: load it with "
                               "optckpt.load_optimizer_state_dict(optimizer, model, sd, model_state_dict=...)")
        ck = Checkpoint(path="<state dict>", layout="torch-optimizer")
        ck.optimizers.append(OptimizerState("optimizer", "<state dict>", (), sd))
        target = from_live(model, opt)
        resolution = resolve(ck, ck.optimizer(), target, renames=rules, plan=True)
        plan, _ = plan_remap(resolution)
        if is_lbfgs(ck.optimizer()):
            attach_lbfgs_layout(plan, resolution.mapping, target.shapes)
        new_sd = apply_plan(plan, sd, with_names="param_names" in opt.param_groups[0])
        if "param_names" not in opt.param_groups[0]:
            for g in new_sd["param_groups"]:
                g.pop("param_names", None)
        return new_sd

    optimizer.register_state_dict_post_hook(add_names)
    optimizer.register_load_state_dict_pre_hook(remap_by_name)
