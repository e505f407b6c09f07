"""Build and apply a remap plan: optimizer state moves to where the new code expects it, by name.

The plan is a printable value (``--dry-run`` shows it); applying it is a pure function from the
old optimizer state dict to the new one. No tensor is copied: moved state entries are the very
same tensor objects, relabelled with their new index."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .check import CheckReport, apply_renames, guess_prefix_rename, hparams_key
from .errors import MappingError
from .mapping import OptimizerMapping
from .resolve import Policy, Resolution, prepare_source, resolve_mapping
from .target import RenameRule, Target
from .tensors import is_tensor, materialize
from .transforms import Step, fuse_tensors, refusal, slice_state, slice_tensor, split_tensor
from .validate import global_entries

if TYPE_CHECKING:
    import torch

__all__ = ["Policy", "Slot", "GroupPlan", "RemapPlan", "plan_remap", "build_plan", "apply_plan", "remap_scheduler",
           "attach_lbfgs_layout", "prepare_source", "rewrite_model"]


@dataclass(frozen=True)
class Slot:
    """What the new optimizer's index ``target_index`` receives."""

    target_index: int
    group: int
    name: str
    source_index: int | None  # None: fresh state
    action: str  # "keep" (same index) | "move" | "reset" (new parameter) | "reset-shape" (shape changed)
    # | "slice" (shape changed: the shared region kept, the rest fresh)


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
    transforms: list[Step] = field(default_factory=list)  # fuse / split steps applied to the saved state
    sliced: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # target index: shapes
    models: list[dict[str, Any]] = field(default_factory=list)  # what happened to each model state dict

    def summary(self) -> dict[str, int]:
        c = Counter(s.action for s in self.slots)
        out = {"keep": c["keep"], "move": c["move"], "reset": c["reset"] + c["reset-shape"],
               "drop": len(self.dropped)}
        return out | ({"slice": c["slice"]} if c["slice"] else {})

    def as_json(self) -> dict[str, Any]:
        from .render import jsonable, plain_rows

        return {
            "optimizer": self.optimizer,
            "evidence": self.evidence,
            "evidence_counts": dict(self.evidence_counts),
            "summary": self.summary(),
            "slots": plain_rows([  # (checked plain: to_json need not copy 150k rows)
                {"target_index": s.target_index, "group": s.group, "name": s.name,
                 "source_index": s.source_index, "action": s.action}
                for s in self.slots
            ]),
            "dropped": [{"source_index": i, "name": n} for i, n in self.dropped],
            "groups": [
                {"group": g.group, "size": g.size, "hparams_from_group": g.source_group,
                 "hparams": jsonable(g.hparams)}
                for g in self.groups
            ],
            "transforms": [t.as_json() for t in self.transforms] + [
                {"kind": "slice", "name": s.name, "from_shape": list(self.sliced[s.target_index][0]),
                 "to_shape": list(self.sliced[s.target_index][1])} for s in self.slots if s.action == "slice"],
            "models": [dict(m) for m in self.models],
            "notes": list(self.notes),
        }


def build_plan(
    mapping: OptimizerMapping,
    source_groups: Sequence[Mapping[str, Any]],
    target: Target,
    policy: Policy = Policy(),
    renames: Sequence[RenameRule] = (),
) -> tuple[RemapPlan, CheckReport]:
    """:func:`plan_remap` for a mapping already inferred (``source_groups``: the old ``param_groups``);
    the commands and the resume API resolve first (:func:`optckpt.resolve.resolve`)."""
    return plan_remap(resolve_mapping(mapping, source_groups, target, renames, policy), policy)


def plan_remap(resolution: Resolution, policy: Policy = Policy()) -> tuple[RemapPlan, CheckReport]:
    """Decide, for every index of the new optimizer, where its state comes from, from the one
    resolution of the saved indices (resolved with ``plan=True``). Hyperparameters are read from the
    old ``param_groups``; a target model without its optimizer keeps the saved grouping
    (:func:`optckpt.check.keep_saved_grouping`)."""
    report, mapping, target = resolution.report, resolution.mapping, resolution.target
    assert report is not None and target is not None and len(resolution.group_sources) == len(target.groups), \
        "a remap plan needs a resolution against a target made for a plan: resolve(..., plan=True)"
    source_groups = resolution.state_dict.get("param_groups", [])
    by_status: dict[str, list[Any]] = {}
    for p in report.params:
        by_status.setdefault(p.status, []).append(p)
    # an index without state has nothing to move: its uncertain name cannot lose or misplace anything
    amb = [p for p in by_status.get("ambiguous", []) if p.has_state]
    if amb and not policy.allow_ambiguous:
        shown = "; ".join(f"index {p.source_index}: {' | '.join(p.candidates[:4]) or 'no candidate'}" for p in amb[:3])
        more = f" and {len(amb) - 3} more" if len(amb) > 3 else ""
        rejected = "".join(f"; {r.evidence} rejected: {r.reason}" for r in mapping.rejected[:1])
        raise MappingError(
            f"{len(amb)} optimizer indices with state have uncertain names ({shown}{more}){rejected}; pass the old "
            "names (--source / source_names=), or allow resetting their state (--allow-ambiguous / "
            "allow_ambiguous=True)"
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
    sliced: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    entry_shape = {e.index: e.shape for e in entries}
    t = 0
    for gi, names in enumerate(target.groups):
        for name in names:
            st = status_of.get(name)
            if st is None or st.status in ("missing", "ambiguous"):
                slots.append(Slot(t, gi, name, None, "reset"))
            elif st.status == "shape_mismatch" and policy.shape_mismatch == "slice" and st.has_state:
                old = entry_shape.get(st.source_index) if st.source_index is not None else None
                assert old is not None  # a shape mismatch knows both shapes
                slots.append(Slot(t, gi, name, st.source_index, "slice"))
                sliced[t] = (old, target.shapes[name])
            elif st.status == "shape_mismatch":
                slots.append(Slot(t, gi, name, None, "reset-shape"))
            else:
                slots.append(Slot(t, gi, name, st.source_index, "keep" if st.status == "ok" else "move"))
            t += 1
    used = {s.source_index for s in slots if s.source_index is not None}
    dropped = [(e.index, e.name or f"<index {e.index}>") for e in entries
               if e.index not in used and (e.name is not None or e.has_state)]

    # the saved group each new group follows (votes of the parameters it keeps), else the group it pairs
    # with: both settled by the resolution
    sources_or_new = resolution.group_sources
    sources = [None if s == -1 else s for s in sources_or_new]
    by_pairing = _unvoted_groups(sources_or_new, source_groups, target, resolution.group_pairing, policy)
    groups = []
    for gi, names in enumerate(target.groups):
        src = sources[gi] if sources[gi] is not None else by_pairing.get(gi)
        hp = _group_hparams(gi, src, source_groups, target, policy)
        groups.append(GroupPlan(gi, len(names), src, hp, tuple(names)))
    _first_group_state(groups, source_groups, target)
    plan = RemapPlan(mapping.optimizer, mapping.evidence, slots, groups, dropped,
                     [n for n in report.notes if n not in report.predictions],
                     evidence_counts=dict(Counter(e.evidence if e.name is not None else "uncertain" for e in entries)),
                     sliced=sliced)
    for s in slots:
        if s.action == "slice":
            a, b = sliced[s.target_index]
            plan.notes.append(f"slice: {s.name} {list(a)} -> {list(b)}: the shared region of its state kept, "
                              "the rest fresh")
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


def _first_group_state(groups: Sequence[GroupPlan], source_groups: Sequence[Mapping[str, Any]],
                       target: Target) -> None:
    """Some optimizers keep their global state in ``param_groups[0]`` (pytorch-optimizer's DAdaptSGD:
    ``g0_norm``, ``numerator_weighted``): keys only the saved first group has, which the new code's
    optimizer does not set in any group (so not a setting like GaLore's ``rank``). When the new
    code's first group is another saved group while saved group 0 lives on in a later one, that state
    would be misplaced: refused. (Saved group 0 gone altogether — its parameters removed from the new
    code — goes the way of any removed group, as per-group settings such as ``lr_mult`` do.)"""
    if len(source_groups) < 2 or not groups or groups[0].source_group == 0 or target.group_hparams is None:
        return
    if not any(g.source_group == 0 for g in groups):
        return
    others = {k for g in source_groups[1:] for k in g} | {k for g in target.group_hparams for k in g}
    only = [k for k in source_groups[0] if k not in others and k not in ("params", "param_names")]
    if only:
        first = "new parameters" if groups[0].source_group in (None, -1) else f"saved group {groups[0].source_group}"
        raise MappingError(f"saved param group 0 alone holds {', '.join(map(repr, only))}, state the optimizer "
                           f"keeps in its first group; the new code's first group is {first}, so that state would be "
                           "lost: refused (list that group first in the new code)")


def _unvoted_groups(sources: Sequence[int | None], source_groups: Sequence[Mapping[str, Any]],
                    target: Target, paired: tuple[list[int], str] | None, policy: Policy) -> dict[int, int]:
    """Saved groups for the new groups no named parameter ties to one (empty groups, as the
    transformers Trainer's no-decay group under LoRA; groups of stateless uncertain indices), paired
    by what they are (``paired``: the resolution's :func:`optckpt.mapping.pair_groups`: ``name``,
    membership, hyperparameters; position only where it cannot matter), an empty new group only to an
    empty saved group, and never to a saved group another new group took. A group of saved parameters
    that cannot be paired while the saved groups' hyperparameters differ is refused: guessing would
    give its parameters another group's lr (``--hparams target`` keeps the new code's own)."""
    if all(s is not None for s in sources) or target.group_hparams is None:
        return {}
    saved = [{k: v for k, v in g.items() if k != "params"} for g in source_groups]
    back = {t: g for g, t in enumerate(paired[0])} if paired is not None else {}
    taken = {s for s in sources if s is not None}
    out: dict[int, int] = {}
    for gi, src in enumerate(sources):  # -1: a group of new parameters, left alone
        g = back.get(gi)
        if src is not None:
            continue
        if g is None or g in taken:
            differ = len({hparams_key(h) for h in saved}) > 1
            if target.groups[gi] and differ and policy.hparams == "checkpoint":
                raise MappingError(
                    f"new param group {gi} ({len(target.groups[gi])} parameters, names uncertain) cannot be paired "
                    "with a saved group, and the saved groups' hyperparameters differ: its parameters could get "
                    "another group's lr. Pass --source (the old code), or --hparams target to keep the new code's")
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
    new_state: dict[Any, Any] = {}
    if lbfgs and (plan.sliced or plan.transforms):
        raise MappingError(f"{refusal('LBFGS')}: its state cannot be sliced, fused or split "
                           "(use --shape-mismatch reset)")
    if lbfgs:
        new_state = _remap_lbfgs(plan, old_state)
    else:
        for s in plan.slots:
            if s.source_index is None or s.source_index not in old_state:
                continue
            if s.action == "slice":
                old, new = plan.sliced[s.target_index]
                new_state[s.target_index] = slice_state(old_state[s.source_index], old, new,
                                                        plan.groups[s.group].hparams, s.name)
            else:
                new_state[s.target_index] = dict(old_state[s.source_index])
    if old_state and not any(isinstance(s.source_index, str) for s in plan.slots):
        new_state.update(global_entries(old_state))  # index-based state: its non-index entries travel as they are
    groups = []
    for g in plan.groups:
        entry = dict(g.hparams)
        entry["params"] = [s.target_index for s in plan.slots if s.group == g.group]
        if with_names:
            entry["param_names"] = list(g.param_names)
        groups.append(entry)
    made: dict[str, Any] = {"state": new_state, "param_groups": groups}
    own = _own_keys(plan, state_dict)
    out = {k: made[k] if k in made else own[k] for k in state_dict if k in made or k in own}  # the saved key order
    return {**out, **{k: v for k, v in made.items() if k not in out}}


def _own_keys(plan: RemapPlan, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys an optimizer's own ``state_dict()`` adds beside ``state`` and ``param_groups``
    (Ranger21's ``lookahead_step``, StableSPAM's ``total_step``, heavyball's settings): carried as
    they are (mmengine's ``base_param_settings`` too). One keyed by the optimizer's indices cannot be
    named: refused rather than left pointing at the old parameters."""
    own = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    if not own:
        return own
    indices = {i for g in state_dict.get("param_groups", []) for i in g.get("params", ())}
    moved = any(s.source_index != s.target_index for s in plan.slots) or plan.dropped or \
        any(s.source_index is None for s in plan.slots)
    for k, v in own.items():
        keyed = isinstance(v, Mapping) and any(i in indices for i in v)
        if moved and keyed:
            raise MappingError(f"the optimizer's state dict has its own key {k!r} beside 'state' and 'param_groups' "
                               "keyed by parameter index: its layout is not torch's, so what belongs to which "
                               "parameter cannot be named")
    return own


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
        if is_tensor(v) and v.numel() == sum(numels):
            new[key] = permute_segments(materialize(v), numels, perm)
    for key in _LBFGS_LISTS:
        v = glob.get(key)
        if isinstance(v, list):
            new[key] = [permute_segments(materialize(x), numels, perm) if is_tensor(x) and x.numel() == sum(numels)
                        else x for x in v]
    return {0: new}


# --- schedulers ------------------------------------------------------------------------------------

# per-group lists by name: torch's schedulers (CyclicLR, OneCycleLR, ReduceLROnPlateau, LambdaLR...) and
# mmengine's _ParamScheduler (``base_values`` / ``_last_value`` of the hyperparameter ``param_name``,
# ReduceOnPlateauParamScheduler's ``min_values``)
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs", "base_momentums", "max_momentums", "lr_lambdas",
                    "base_values", "_last_value", "min_values")
# lists known not to be per group whatever their length (SequentialLR's milestones between its schedulers)
_NOT_PER_GROUP = frozenset({"_milestones", "milestones", "_schedule_phases", "_schedulers"})


def _plain(v: Any) -> bool:
    """A plain number (not a bool), or a list / tuple of them (a group's ``betas``)."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) and not isinstance(x, (list, tuple)) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _per_group(key: str, v: Any, n_source_groups: int, trailing: int = 0) -> bool:
    """The rule for a scheduler's per-group list, which must follow the param groups when they are
    reordered, added or dropped: a list with one item per saved param group that is either named
    as per-group (:data:`_PER_GROUP_LISTS`), or, under any other key, holds only plain numbers (or
    lists of them) over at least two groups (a library's own per-group list; with a single group
    every one-item list would pass, so only named lists are taken there). Never the lists known to be
    something else (:data:`_NOT_PER_GROUP`). ``trailing`` entries after the groups' are not groups'
    (mmengine's OptimWrapper over several groups appends its ``base_param_settings`` to the groups its
    schedulers see): they stay last, unchanged."""
    if not isinstance(v, list) or len(v) != n_source_groups + trailing or key in _NOT_PER_GROUP:
        return False
    if key in _PER_GROUP_LISTS:
        return True
    return n_source_groups >= 2 and all(_plain(x) for x in v)


def remap_scheduler(sd: Mapping[str, Any], plan: RemapPlan, n_source_groups: int, *,
                    trailing: int = 0) -> dict[str, Any]:
    """Reorder / extend a scheduler's per-group lists (:func:`_per_group`) to the new groups (nested
    schedulers too). A new group without an old one takes its values from its hyperparameters
    (``initial_lr``; mmengine: ``initial_<param_name>`` / ``<param_name>``). ``trailing``: entries
    after the groups' (mmengine's ``base_param_settings``), kept last."""
    out = dict(sd)
    for key, v in sd.items():
        if isinstance(key, str) and _per_group(key, v, n_source_groups, trailing):
            out[key] = [copy.deepcopy(v[g.source_group]) if g.source_group is not None else
                        _new_group_value(key, g, v, sd.get("param_name")) for g in plan.groups]
            out[key] += copy.deepcopy(v[n_source_groups:])
    if isinstance(sd.get("_schedulers"), list):
        out["_schedulers"] = [remap_scheduler(c, plan, n_source_groups, trailing=trailing)
                              if isinstance(c, Mapping) else c for c in sd["_schedulers"]]
    return out


def _new_group_value(key: str, g: GroupPlan, old: list[Any], param_name: Any = None) -> Any:
    """A scheduler's per-group value for a new group that has no saved counterpart."""
    hp = g.hparams
    if key in ("base_lrs", "_last_lr", "min_lrs"):
        if key == "min_lrs":
            return old[0]
        return hp.get("initial_lr", hp.get("lr", old[0]))
    if key in ("base_values", "_last_value") and isinstance(param_name, str) and param_name in hp:
        # mmengine: base values are the group's initial_<param_name> (set when the scheduler was built)
        current = hp[param_name]
        return current if key == "_last_value" else hp.get(f"initial_{param_name}", current)
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


# --- transforms and model state -------------------------------------------------------------------

def rewrite_model(tensors: Mapping[str, torch.Tensor], plan: RemapPlan, target: Target,
                  renames: Sequence[RenameRule],
                  policy: Policy) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The model state dict the new code loads with ``strict=True``: keys renamed as the optimizer's
    (buffers with their module), fused / split as the plan says, reshaped weights sliced
    (``--shape-mismatch slice``: the new region from the target's own initialisation), keys of
    removed parameters and buffers dropped, new ones added from the target's initialisation. A
    wrapper prefix the keys carry (Lightning's ``net.``, ``module.``) is kept: it is how the saving
    code stores the model. ``None`` when nothing changes."""
    expected: dict[str, torch.Tensor] | None = None
    if target.module is not None:
        expected = dict(target.module.state_dict())
    known = list(expected) if expected is not None else list(target.names)
    known += [n for s in plan.transforms for n in (s.parts if s.kind == "fuse" else (s.whole,))]
    user = [apply_renames(k, renames) for k in tensors]
    wrap = guess_prefix_rename(user, known)
    prefix = wrap.pattern if wrap is not None and not wrap.repl else ""  # keys carry a wrapper prefix
    if wrap is not None and wrap.repl:  # the new code's names carry one the keys lack: renaming it is the fix
        prefix = ""
    inner: dict[str, str] = {}
    outside: list[str] = []
    for k, u in zip(tensors, user):
        if wrap is not None and not prefix:
            u = wrap.apply(u)
        if prefix and not u.startswith(prefix):
            outside.append(k)  # not the module's (a Lightning module's other state): kept as it is
            continue
        inner[k] = u[len(prefix):]
    by_inner: dict[str, torch.Tensor] = {inner[k]: tensors[k] for k in inner}
    order = [inner[k] for k in inner]
    fused, split = [], []
    for s in plan.transforms:
        what = f"model --{s.kind} {s.whole}"
        if s.kind == "fuse" and all(p in by_inner for p in s.parts):
            at = order.index(s.parts[0])
            by_inner[s.whole] = fuse_tensors([by_inner.pop(p) for p in s.parts], s.dim, what)
            order = [n for n in order if n not in s.parts]
            order.insert(at, s.whole)
            fused.append(s.whole)
        elif s.kind == "split" and s.whole in by_inner:
            shapes = [target.shapes.get(p) for p in s.parts]
            whole = by_inner.pop(s.whole)
            if any(sh is None for sh in shapes) or sum(sh[s.dim] for sh in shapes if sh) != whole.shape[s.dim]:
                raise MappingError(f"{what}: the model tensor {list(whole.shape)} does not split into "
                                   f"{[list(sh) if sh else None for sh in shapes]}")
            at = order.index(s.whole)
            order[at:at + 1] = list(s.parts)
            by_inner.update(zip(s.parts, split_tensor(whole, [sh[s.dim] for sh in shapes if sh], s.dim)))
            split.append(s.whole)
        elif s.kind == "fuse" and any(p in by_inner for p in s.parts):
            raise MappingError(f"{what}: the model state holds only some of {', '.join(s.parts)}")
    gone = {n for _, n in plan.dropped}
    info: dict[str, Any] = {"renamed": 0, "dropped": [], "added": [], "sliced": [], "fused": fused, "split": split,
                            "shape_mismatch": []}
    out: dict[str, torch.Tensor] = {}
    for k in outside:
        out[k] = tensors[k]
    for n in order:
        v = by_inner[n]
        if (expected is not None and n not in expected) or (expected is None and n in gone):
            info["dropped"].append(prefix + n)
            continue
        init = expected.get(n) if expected is not None else None
        if init is not None and tuple(v.shape) != tuple(init.shape):
            if policy.shape_mismatch == "slice":
                v = slice_tensor(v, init)
                info["sliced"].append(prefix + n)
            else:
                info["shape_mismatch"].append(prefix + n)
        elif expected is None and n in target.shapes and tuple(v.shape) != tuple(target.shapes[n]) \
                and policy.shape_mismatch == "slice":
            raise MappingError(f"{n}: slicing the model's weights needs the new code's initial weights "
                               "(give --target as module:callable)")
        out[prefix + n] = v
    from .io.discover import tied_keys

    tied = tied_keys(expected or {})
    for n, init in (expected or {}).items():
        if n not in by_inner:
            twins = [tied[n]] if n in tied else [k for k, first in tied.items() if first == n]
            twin = next((m for m in twins if prefix + m in out), None)
            if twin is not None:  # a tied weight (lm_head = wte) that the file stored once: the trained one
                out[prefix + n] = out[prefix + twin]
                info.setdefault("tied", []).append(prefix + n)
                continue
            out[prefix + n] = init.detach().clone()
            info["added"].append(prefix + n)
    if expected is not None and (fused or split):  # new tensors: the model's registration order, as state_dict()
        rank = {prefix + n: i for i, n in enumerate(expected)}
        out = dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], -1)))
    stateful = {s.name for s in plan.slots if s.source_index is not None}
    lost = [n for n in info["added"] if n[len(prefix):] in stateful]
    if lost:
        raise MappingError(f"the model state dict has no weights for {', '.join(lost[:3])} although the optimizer "
                           "has state for them: its keys do not follow the optimizer's names (pass --rename)")
    old_keys = list(tensors)
    info["renamed"] = sum(1 for k in inner if k not in out and prefix + inner[k] in out)
    if list(out) == old_keys and all(out[k] is tensors[k] for k in old_keys):
        return None, info
    return out, info
