"""Build and apply a remap plan: optimizer state moves to where the new code expects it, by name.

The plan is a printable value (``--dry-run`` shows it); applying it is a pure function from the
old optimizer state dict to the new one. No tensor is copied: moved state entries are the very
same tensor objects, relabelled with their new index."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .check import CheckReport, check_mapping
from .errors import MappingError
from .mapping import OptimizerMapping, pair_groups
from .target import RenameRule, Target

__all__ = ["Policy", "Slot", "GroupPlan", "RemapPlan", "build_plan", "apply_plan", "remap_scheduler",
           "attach_lbfgs_layout"]

Missing = Literal["reset", "error"]
Unexpected = Literal["drop", "error"]
ShapeMismatch = Literal["reset", "error"]


@dataclass(frozen=True)
class Policy:
    missing: Missing = "reset"
    unexpected: Unexpected = "drop"
    shape_mismatch: ShapeMismatch = "reset"
    allow_ambiguous: bool = False
    hparams: Literal["checkpoint", "target"] = "checkpoint"
    group_evidence: bool = True  # let the target optimizer's grouping settle uncertain names


@dataclass(frozen=True)
class Slot:
    """What the new optimizer's index ``target_index`` receives."""

    target_index: int
    group: int
    name: str
    source_index: int | None  # None: fresh state
    action: str  # "keep" (same index) | "move" | "reset" (new parameter) | "reset-shape" (shape changed)


@dataclass(frozen=True)
class GroupPlan:
    """A param group of the new optimizer: its hyperparameters come from ``source_group``
    (the old group holding most of its parameters), or from the target when no old group does."""

    group: int
    size: int
    source_group: int | None
    hparams: dict[str, Any]
    param_names: tuple[str, ...]


@dataclass
class RemapPlan:
    optimizer: str
    evidence: str
    slots: list[Slot]
    groups: list[GroupPlan]
    dropped: list[tuple[int, str]]
    notes: list[str] = field(default_factory=list)
    # LBFGS: (source indices in optimizer order, their parameters' numels) to permute flat state
    lbfgs_layout: tuple[list[int], list[int]] | None = None
    evidence_counts: dict[str, int] = field(default_factory=dict)  # saved indices per rung that named them

    def summary(self) -> dict[str, int]:
        c = Counter(s.action for s in self.slots)
        return {"keep": c["keep"], "move": c["move"], "reset": c["reset"] + c["reset-shape"],
                "drop": len(self.dropped)}

    def as_json(self) -> dict[str, Any]:
        from .render import jsonable

        return {
            "optimizer": self.optimizer,
            "evidence": self.evidence,
            "evidence_counts": dict(self.evidence_counts),
            "summary": self.summary(),
            "slots": [
                {"target_index": s.target_index, "group": s.group, "name": s.name,
                 "source_index": s.source_index, "action": s.action}
                for s in self.slots
            ],
            "dropped": [{"source_index": i, "name": n} for i, n in self.dropped],
            "groups": [
                {"group": g.group, "size": g.size, "hparams_from_group": g.source_group,
                 "hparams": jsonable(g.hparams)}
                for g in self.groups
            ],
            "notes": list(self.notes),
        }


def build_plan(
    mapping: OptimizerMapping,
    source_groups: Sequence[Mapping[str, Any]],
    target: Target,
    policy: Policy = Policy(),
    renames: Sequence[RenameRule] = (),
) -> tuple[RemapPlan, CheckReport]:
    """Decide, for every index of the new optimizer, where its state comes from.

    ``source_groups`` are the old ``param_groups`` (hyperparameters are read from them)."""
    report = check_mapping(mapping, target, renames, group_evidence=policy.group_evidence)
    mapping = report.mapping or mapping
    by_status: dict[str, list[Any]] = {}
    for p in report.params:
        by_status.setdefault(p.status, []).append(p)
    # an index without state has nothing to move: its uncertain name cannot lose or misplace anything
    amb = [p for p in by_status.get("ambiguous", []) if p.has_state]
    if amb and not policy.allow_ambiguous:
        shown = "; ".join(f"index {p.source_index}: {' | '.join(p.candidates[:4]) or 'no candidate'}" for p in amb[:3])
        more = f" and {len(amb) - 3} more" if len(amb) > 3 else ""
        raise MappingError(
            f"{len(amb)} optimizer indices with state have uncertain names ({shown}{more}); pass the old names "
            "(--source / source_names=), or allow resetting their state (--allow-ambiguous / allow_ambiguous=True)"
        )
    if by_status.get("missing") and policy.missing == "error":
        raise MappingError(f"new parameters without saved state: {_names(by_status['missing'])} (--missing error)")
    if by_status.get("unexpected") and policy.unexpected == "error":
        raise MappingError(f"saved state for parameters the target lacks: {_names(by_status['unexpected'])} "
                           "(--unexpected error)")
    if by_status.get("shape_mismatch") and policy.shape_mismatch == "error":
        raise MappingError(f"shape changed: {_names(by_status['shape_mismatch'])} (--shape-mismatch error)")

    status_of = {p.name: p for p in report.params if p.target_index is not None}
    entries = mapping.entries
    slots: list[Slot] = []
    t = 0
    for gi, names in enumerate(target.groups):
        for name in names:
            st = status_of.get(name)
            if st is None or st.status in ("missing", "ambiguous"):
                slots.append(Slot(t, gi, name, None, "reset"))
            elif st.status == "shape_mismatch":
                slots.append(Slot(t, gi, name, None, "reset-shape"))
            else:
                slots.append(Slot(t, gi, name, st.source_index, "keep" if st.status == "ok" else "move"))
            t += 1
    used = {s.source_index for s in slots if s.source_index is not None}
    dropped = [(e.index, e.name or f"<index {e.index}>") for e in entries
               if e.index not in used and (e.name is not None or e.has_state)]

    group_of_index = {e.index: e.group for e in entries}
    sources: list[int | None] = []
    for gi in range(len(target.groups)):
        votes = Counter(group_of_index[s.source_index] for s in slots if s.group == gi and s.source_index is not None)
        sources.append(votes.most_common(1)[0][0] if votes else None)
    # only groups that are empty, or whose parameters are merely uncertain (not proven new), follow the
    # saved group they correspond to; a group of new parameters takes the new code's hyperparameters
    new = {p.name for p in by_status.get("missing", [])}
    sources_or_new = [s if s is not None or not any(n in new for n in target.groups[gi]) else -1
                      for gi, s in enumerate(sources)]
    by_pairing = _unvoted_groups(sources_or_new, source_groups, target)
    groups = []
    for gi, names in enumerate(target.groups):
        src = sources[gi] if sources[gi] is not None else by_pairing.get(gi)
        hp = _group_hparams(gi, src, source_groups, target, policy)
        groups.append(GroupPlan(gi, len(names), src, hp, tuple(names)))
    plan = RemapPlan(mapping.optimizer, mapping.evidence, slots, groups, dropped, list(report.notes),
                     evidence_counts=dict(Counter(e.evidence if e.name is not None else "uncertain" for e in entries)))
    if by_pairing:
        plan.notes.append(f"new groups {sorted(by_pairing)} hold no certainly named saved parameter: hyperparameters "
                          f"from the saved groups they correspond to ({sorted(by_pairing.values())})")
    for g in groups:
        if g.source_group is None:
            origin = "the target optimizer" if target.group_hparams else "old group 0"
            plan.notes.append(f"new group {g.group} holds no saved parameter: hyperparameters from {origin}")
    if amb:
        plan.notes.append(f"{len(amb)} ambiguous indices with state: their state is reset (--allow-ambiguous)")
    return plan, report


def _unvoted_groups(sources: Sequence[int | None], source_groups: Sequence[Mapping[str, Any]],
                    target: Target) -> dict[int, int]:
    """Saved groups for the new groups no named parameter ties to one (empty groups, as the
    transformers Trainer's no-decay group under LoRA; groups of stateless uncertain indices): matched
    by ``name``, other hyperparameters or position (:func:`optckpt.mapping.pair_groups`), an empty
    new group only to an empty saved group, and never to a saved group another new group took."""
    if all(s is not None for s in sources) or target.group_hparams is None:
        return {}
    saved = [{k: v for k, v in g.items() if k != "params"} for g in source_groups]
    paired = pair_groups(saved, target.group_hparams)
    if paired is None:
        return {}
    back = {t: g for g, t in enumerate(paired[0])}
    taken = {s for s in sources if s is not None}
    out = {}
    for gi, s in enumerate(sources):  # -1: a group of new parameters, left alone
        g = back.get(gi)
        if s is not None or g is None or g in taken:
            continue
        if (len(target.groups[gi]) == 0) == (len(source_groups[g].get("params", ())) == 0):
            out[gi] = g
    return out


def _names(ps: Sequence[Any]) -> str:
    shown = ", ".join(p.name for p in ps[:5])
    return shown + (f" and {len(ps) - 5} more" if len(ps) > 5 else "")


def _group_hparams(gi: int, src: int | None, source_groups: Sequence[Mapping[str, Any]], target: Target,
                   policy: Policy) -> dict[str, Any]:
    if policy.hparams == "target" and target.group_hparams is not None:
        return copy.deepcopy(target.group_hparams[gi])
    if src is not None:
        return {k: copy.deepcopy(v) for k, v in source_groups[src].items() if k not in ("params", "param_names")}
    if target.group_hparams is not None:
        return copy.deepcopy(target.group_hparams[gi])
    base = source_groups[0] if source_groups else {}
    return {k: copy.deepcopy(v) for k, v in base.items() if k not in ("params", "param_names")}


def apply_plan(plan: RemapPlan, state_dict: Mapping[str, Any], *, with_names: bool = True) -> dict[str, Any]:
    """The new optimizer state dict. Moved entries keep their tensor objects (no copy); reset
    entries are absent, which torch fills with fresh state at the next ``step()``."""
    old_state = state_dict.get("state", {})
    lbfgs = "param_groups" in state_dict and state_dict["param_groups"] and \
        "history_size" in state_dict["param_groups"][0]
    new_state: dict[int, Any] = {}
    if lbfgs:
        new_state = _remap_lbfgs(plan, old_state)
    else:
        for s in plan.slots:
            if s.source_index is not None and s.source_index in old_state:
                new_state[s.target_index] = dict(old_state[s.source_index])
    groups = []
    for g in plan.groups:
        entry = dict(g.hparams)
        entry["params"] = [s.target_index for s in plan.slots if s.group == g.group]
        if with_names:
            entry["param_names"] = list(g.param_names)
        groups.append(entry)
    return {"state": new_state, "param_groups": groups}


_LBFGS_FLAT = ("d", "prev_flat_grad")
_LBFGS_LISTS = ("old_dirs", "old_stps")


def _remap_lbfgs(plan: RemapPlan, old_state: Mapping[Any, Any]) -> dict[int, Any]:
    """LBFGS keeps one global state whose vectors concatenate every parameter, in optimizer order:
    permute their segments. Any new, dropped or reshaped parameter invalidates the curvature
    history, so the state is reset (and the plan says so)."""
    glob = old_state.get(0) or (next(iter(old_state.values())) if old_state else None)
    if not glob:
        return {}
    if any(s.source_index is None for s in plan.slots) or plan.dropped or plan.lbfgs_layout is None:
        plan.notes.append("LBFGS: parameters were added, dropped or reshaped (or their sizes are unknown): "
                          "its global history is reset")
        return {}
    from .kernels import permute_segments

    order, numels = plan.lbfgs_layout
    position = {idx: k for k, idx in enumerate(order)}
    perm = [position[s.source_index] for s in plan.slots if s.source_index is not None]
    new = dict(glob)
    for key in _LBFGS_FLAT:
        v = glob.get(key)
        if isinstance(v, torch.Tensor) and v.numel() == sum(numels):
            new[key] = permute_segments(v, numels, perm)
    for key in _LBFGS_LISTS:
        v = glob.get(key)
        if isinstance(v, list):
            new[key] = [permute_segments(x, numels, perm) if isinstance(x, torch.Tensor) and x.numel() == sum(numels)
                        else x for x in v]
    return {0: new}


# --- schedulers ------------------------------------------------------------------------------------

_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "base_momentums", "max_momentums", "lr_lambdas")


def remap_scheduler(sd: Mapping[str, Any], plan: RemapPlan, n_source_groups: int) -> dict[str, Any]:
    """Reorder / extend a scheduler's per-group lists to the new groups (nested schedulers too).
    A new group without an old one takes its values from its hyperparameters (``initial_lr``)."""
    out = dict(sd)
    for key in _PER_GROUP_LISTS:
        v = sd.get(key)
        if isinstance(v, list) and len(v) == n_source_groups:
            out[key] = [copy.deepcopy(v[g.source_group]) if g.source_group is not None else
                        _fresh_value(key, g, v) for g in plan.groups]
    if isinstance(sd.get("_schedulers"), list):
        out["_schedulers"] = [remap_scheduler(c, plan, n_source_groups) if isinstance(c, Mapping) else c
                              for c in sd["_schedulers"]]
    return out


def _fresh_value(key: str, g: GroupPlan, old: list[Any]) -> Any:
    hp = g.hparams
    if key in ("base_lrs", "_last_lr", "min_lrs"):
        if key == "min_lrs":
            return old[0]
        return hp.get("initial_lr", hp.get("lr", old[0]))
    return copy.deepcopy(old[0])


def attach_lbfgs_layout(plan: RemapPlan, mapping: OptimizerMapping, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Record the per-parameter sizes an LBFGS remap needs to permute its flat vectors."""
    numels = []
    new_name = {s.source_index: s.name for s in plan.slots if s.source_index is not None}
    for e in mapping.entries:  # the saved name, else the name the plan gives it (renamed, or settled)
        shape = shapes.get(e.name or "") or shapes.get(new_name.get(e.index, ""))
        if shape is None:
            return
        n = 1
        for d in shape:
            n *= d
        numels.append(n)
    plan.lbfgs_layout = ([e.index for e in mapping.entries], numels)
