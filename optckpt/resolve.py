"""One pass of evidence: every saved optimizer index named once, and checked against the new code once.

:func:`resolve` runs the evidence ladder (:func:`optckpt.mapping.infer_mapping`: saved
``param_names``, ``--source`` through the consistency gate, model order, group names, shapes), the
rungs that need the new code (its shapes for an optimizer saved with no model at all; its grouping
for what stays ambiguous), the ``--fuse`` / ``--split`` transforms, and the comparison with the
target (:mod:`optckpt.check`). The :class:`Resolution` it returns is what ``check`` reports, what
``remap`` / ``reset`` / ``set`` / ``convert`` plan from, what ``diff`` / ``inspect`` name entries
with, and what the resume API and the integrations load by: nobody downstream calls the naming code
again (``tests/test_naming_entries.py`` counts it)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .checkpoint import Checkpoint, OptimizerState
from .errors import MappingError
from .gcpause import gc_paused
from .mapping import (
    OptimizerMapping,
    Rejection,
    SourceNames,
    infer_mapping,
    name_by_target_shapes,
    pair_groups,
    settle_by_grouping,
)

if TYPE_CHECKING:  # (the comparison with a target, its renames and transforms: imported where a target is given)
    from .check import CheckReport
    from .target import RenameRule, Target
    from .transforms import Step, TransformRule

__all__ = ["Policy", "ResolvedIndex", "Resolution", "resolve", "resolve_mapping", "prepare_source"]

Missing = Literal["reset", "error"]
Unexpected = Literal["drop", "error"]
ShapeMismatch = Literal["reset", "error", "slice"]


@dataclass(frozen=True)
class Policy:
    """What a repair does with what the resolution finds (``remap`` / the resume API)."""

    missing: Missing = "reset"
    unexpected: Unexpected = "drop"
    shape_mismatch: ShapeMismatch = "reset"
    allow_ambiguous: bool = False
    hparams: Literal["checkpoint", "target"] = "checkpoint"
    group_evidence: bool = True  # let the target optimizer's grouping settle uncertain names


class ResolvedIndex(NamedTuple):
    """One saved index as the pass leaves it: its name (None: uncertain, with ``candidates``), the
    rung that named it, and its status against the target (``None`` without a target; an index no
    target parameter is compared with, e.g. one that carries no name and no state, has ``""``)."""

    index: Any
    group: int
    name: str | None
    candidates: tuple[str, ...]
    evidence: str
    has_state: bool
    status: str | None
    target_index: int | None
    target_name: str | None


@dataclass
class Resolution:
    """The one naming of one optimizer: per saved index the name, the evidence that named it, the
    evidence the consistency gate rejected, and its status against the target."""

    optimizer: str
    saved: OptimizerMapping  # the checkpoint's own naming (the evidence ladder, the gate, the target's shapes)
    mapping: OptimizerMapping  # as compared: transforms applied, settled by the new code's grouping
    indices: list[ResolvedIndex]
    rejected: list[Rejection]  # evidence the consistency gate refused (it named nothing)
    report: CheckReport | None = None  # the comparison with the target (what ``check`` prints)
    target: Target | None = None  # as compared: a model-only target takes the saved grouping
    renames: list[RenameRule] = field(default_factory=list)  # in effect: given, or a detected wrapper prefix
    steps: list[Step] = field(default_factory=list)  # --fuse / --split, as applied to the saved state
    state_dict: dict[str, Any] = field(default_factory=dict)  # the saved optimizer state dict, transforms applied
    # resolved for a plan (``plan=True``): what each target parameter keeps (ok / moved; a reshaped one under
    # --shape-mismatch slice): its saved index
    receives: dict[str, Any] = field(default_factory=dict)
    # per target group: the saved group holding most of the parameters it keeps (None: none; -1: a group of
    # parameters proven new), and the group pairing for the others (:func:`optckpt.mapping.pair_groups`)
    group_sources: list[int | None] = field(default_factory=list)
    group_pairing: tuple[list[int], str] | None = None


def resolve(ck: Checkpoint, opt: OptimizerState | None = None, target: Target | None = None, *,
            source: SourceNames | None = None, models: Sequence[str] | None = None,
            renames: Sequence[RenameRule] = (), transforms: Sequence[TransformRule] = (),
            policy: Policy = Policy(), plan: bool = False) -> Resolution:
    # (~10 small objects an index, no cycles: a collection meanwhile would rescan the whole loaded
    # checkpoint, seconds at 600k storages)
    with gc_paused():
        return _resolve(ck, opt, target, source=source, models=models, renames=renames, transforms=transforms,
                        policy=policy, plan=plan)


def _resolve(ck: Checkpoint, opt: OptimizerState | None = None, target: Target | None = None, *,
             source: SourceNames | None = None, models: Sequence[str] | None = None,
             renames: Sequence[RenameRule] = (), transforms: Sequence[TransformRule] = (),
             policy: Policy = Policy(), plan: bool = False) -> Resolution:
    """Name every index of ``opt`` (default: the checkpoint's only optimizer) and, given a ``target``,
    compare with it. ``source``: names from the old code, used only through the consistency gate;
    ``models``: the model state dicts to align with. ``plan`` (``remap``, the resume API): resolving
    for an edit, so a layout that is not torch's is refused, ``transforms`` are applied and a new
    parameter that no rule learned from the saved grouping places is refused (``check`` says so).

    An optimizer saved with no model at all is named by the target's shapes where a shape occurs
    once on each side (``target-shapes``, the weakest evidence) for every consumer alike: what
    ``check`` reports as moved, ``remap`` and the resume API move."""
    opt = opt or ck.optimizer()
    saved = infer_mapping(ck, opt, source=source, models=models)
    if target is not None and not ck.models:
        saved = name_by_target_shapes(saved, target.names, target.shapes)
    if target is None:
        return Resolution(opt.name, saved, saved, _indices(saved, None), list(saved.rejected),
                          state_dict=dict(opt.state_dict))
    if plan and saved.overridden is not None:
        raise MappingError(f"optimizer {saved.optimizer}: its state_dict() is not torch's layout "
                           f"({saved.overridden}); what belongs to which parameter there cannot be named: refused")
    mapping, sd, steps = _transform(saved, opt.state_dict, target, renames, transforms)
    return _compare(saved, mapping, sd, target, renames, policy, plan, steps)


def resolve_mapping(mapping: OptimizerMapping, source_groups: Sequence[Mapping[str, Any]], target: Target,
                    renames: Sequence[RenameRule] = (), policy: Policy = Policy(), *,
                    plan: bool = True) -> Resolution:
    """:func:`resolve` from a mapping already inferred (and transformed): the settling and the
    comparison only (``source_groups``: the saved ``param_groups``)."""
    return _compare(mapping, mapping, {"param_groups": list(source_groups)}, target, renames, policy, plan, [])


def prepare_source(mapping: OptimizerMapping, state_dict: Mapping[str, Any], target: Target,
                   renames: Sequence[RenameRule] = (), rules: Sequence[TransformRule] = ()
                   ) -> tuple[OptimizerMapping, dict[str, Any], list[Step]]:
    """The saved optimizer with ``--fuse`` / ``--split`` applied (:mod:`optckpt.transforms`); a
    layout that is not torch's is refused (for a mapping built by hand: :func:`resolve` does both)."""
    if mapping.overridden is not None:
        raise MappingError(f"optimizer {mapping.optimizer}: its state_dict() is not torch's layout "
                           f"({mapping.overridden}); what belongs to which parameter there cannot be named: refused")
    return _transform(mapping, state_dict, target, renames, rules)


def _transform(mapping: OptimizerMapping, state_dict: Mapping[str, Any], target: Target,
               renames: Sequence[RenameRule], rules: Sequence[TransformRule]
               ) -> tuple[OptimizerMapping, dict[str, Any], list[Step]]:
    if not rules:
        return mapping, dict(state_dict), []
    from .check import apply_renames
    from .kinds import guess_optimizer
    from .transforms import expand_rules, transform_source

    eff = _transform_renames(mapping, target, renames, rules)
    saved = [apply_renames(e.name, eff) for e in mapping.entries if e.name is not None]
    steps = expand_rules(rules, target.names, saved)
    kind = guess_optimizer(state_dict.get("param_groups", []))
    new_mapping, state = transform_source(mapping, state_dict.get("state", {}), steps,
                                          lambda n: apply_renames(n, eff), target.shapes, kind)
    return new_mapping, {**state_dict, "state": state}, steps


def _transform_renames(mapping: OptimizerMapping, target: Target, renames: Sequence[RenameRule],
                       rules: Sequence[TransformRule]) -> list[RenameRule]:
    """The renames the comparison applies (given, else a detected wrapper prefix), found with the
    names the transforms use counted as the target's (fuse parts, split wholes)."""
    if renames:
        return list(renames)
    from .check import guess_prefix_rename
    from .transforms import expand_rules

    saved = [c for e in mapping.entries for c in e.candidates]
    known = list(target.names)
    fuses = [r for r in rules if r.kind == "fuse"]
    known += [p for st in expand_rules(fuses, target.names, ()) for p in st.parts] if fuses else []
    for r in rules:
        if r.kind == "split":
            tails = {n.split(".", 1)[1] for n in saved if "." in n} | set(saved)
            known += [n for n in tails if (re.fullmatch(r.name, n) if r.regex else n == r.name)]
    auto = guess_prefix_rename(saved, known)
    return [auto] if auto is not None else []


def _compare(saved: OptimizerMapping, mapping: OptimizerMapping, sd: Mapping[str, Any], target: Target,
             renames: Sequence[RenameRule], policy: Policy, plan: bool, steps: list[Step]) -> Resolution:
    """Settle by the new code's grouping, compare with the target, and record what each target
    parameter and group takes from the saved ones."""
    from .check import compare_named, effective_renames, model_order, target_namer

    rules, rename_notes = effective_renames(mapping, target, renames)
    if policy.group_evidence and target.group_hparams is not None:
        mapping = settle_by_grouping(mapping, target.groups, target.shapes, target.group_hparams,
                                     target_namer(target, rules), model_order(target))
    report = compare_named(mapping, target, rules, rename_notes, place_new=plan)
    compared = report.target or target
    indices = _indices(mapping, report)
    if not plan:  # a report: what each new parameter and group takes from the saved ones is a plan's question
        return Resolution(mapping.optimizer, saved, mapping, indices, list(mapping.rejected), report, compared, rules,
                          steps, dict(sd))
    source_groups = sd.get("param_groups", [])
    receives: dict[str, Any] = {p.name: p.source_index for p in report.params if p.target_index is not None and (
        p.status in ("ok", "moved") or (p.status == "shape_mismatch" and policy.shape_mismatch == "slice"
                                        and p.has_state))}
    group_of_index: dict[Any, int] = {e.index: e.group for e in mapping.entries}
    sources: list[int | None] = []
    for names in compared.groups:
        votes = Counter(group_of_index[receives[n]] for n in names if n in receives)
        sources.append(votes.most_common(1)[0][0] if votes else None)
    # only groups that are empty, or whose parameters are merely uncertain (not proven new), follow the
    # saved group they correspond to; a group of new parameters takes the new code's hyperparameters
    # (when some saved index could be any parameter, nothing unnamed is proven new)
    unknowable = any(e.name is None and not e.candidates for e in mapping.entries)
    new = set() if unknowable else {p.name for p in report.params if p.status == "missing"}
    sources = [s if s is not None or not any(n in new for n in compared.groups[gi]) else -1
               for gi, s in enumerate(sources)]
    pairing = None
    if not all(s is not None for s in sources) and compared.group_hparams is not None:
        members: list[set[int]] = [set() for _ in source_groups]
        for gi, names in enumerate(compared.groups):
            for n in names:
                if n in receives and receives[n] in group_of_index:
                    members[group_of_index[receives[n]]].add(gi)
        sizes = ([len(g.get("params", ())) for g in source_groups], [len(g) for g in compared.groups])
        pairing = pair_groups([{k: v for k, v in g.items() if k != "params"} for g in source_groups],
                              compared.group_hparams, members=members, harmless_position=True, sizes=sizes)
    return Resolution(mapping.optimizer, saved, mapping, indices, list(mapping.rejected), report, compared, rules,
                      steps, dict(sd), receives, sources, pairing)


def _indices(mapping: OptimizerMapping, report: CheckReport | None) -> list[ResolvedIndex]:
    status: dict[Any, tuple[str, int | None, str | None]] = {}
    if report is not None:
        for p in report.params:
            if p.source_index is not None:
                status[p.source_index] = (p.status, p.target_index, p.name if p.target_index is not None else None)
    none = ("" if report is not None else None, None, None)
    get = status.get
    make = tuple.__new__  # ResolvedIndex(...) without its Python-level __new__ (one per index)
    return [make(ResolvedIndex, (e.index, e.group, e.name, e.candidates, e.evidence, e.has_state, *get(e.index, none)))
            for e in mapping.entries]
