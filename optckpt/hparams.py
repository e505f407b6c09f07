"""Rewrite param-group hyperparameters so the resumed run really uses them.

The lr a resumed run trains with lives in several places: the group's ``lr`` (what the next
``optimizer.step()`` uses), ``initial_lr`` / ``max_lr`` / ``min_lr`` (OneCycleLR recomputes from
them), and the scheduler's ``base_lrs``, ``_last_lr``, ``max_lrs``, ``min_lrs`` and ``eta_min``.
Editing only ``lr`` is silently undone by the first ``scheduler.step()`` of most schedulers.

Scaling the lr of selected groups by F therefore scales **every lr-valued quantity** of those
groups, in the optimizer and in every scheduler driving it (nested SequentialLR / ChainedScheduler
children included). Each torch scheduler computes future lrs either multiplicatively from the
current lr (StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, PolynomialLR,
MultiplicativeLR, ReduceLROnPlateau), or from ``base_lrs`` / ``max_lrs`` / ``initial_lr`` (LambdaLR,
CyclicLR, OneCycleLR, closed forms), or affinely with ``eta_min`` (the cosine schedules) — so the
whole remaining schedule is multiplied by F exactly, with one exception said out loud: a cosine
schedule's ``eta_min`` is one number shared by all groups, so a nonzero ``eta_min`` scales exactly
only when every group is selected."""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError
from .mapping import OptimizerMapping

__all__ = ["Change", "parse_set", "select_groups", "rewrite", "SetResult", "scheduler_changes"]

_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHED_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")


@dataclass(frozen=True)
class Change:
    """One requested change: ``kind`` is lr | scale_lr | weight_decay | scale_weight_decay | set."""

    kind: str
    value: Any
    key: str = ""


@dataclass
class SetResult:
    optimizer: str
    groups: list[int]
    before: list[dict[str, Any]]
    after: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # what changed in the schedulers: {"scheduler", "key", "before", "after"} per changed value
    schedulers: list[dict[str, Any]] = field(default_factory=list)


def parse_set(text: str, groups: Sequence[Mapping[str, Any]]) -> Change:
    """``KEY=VALUE``, typed like the existing value of KEY (``betas=0.9,0.95`` → a tuple of floats)."""
    if "=" not in text:
        raise FormatError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key in ("params", "param_names"):
        raise FormatError(f"--set {key}: the parameter list is not a hyperparameter (use remap)")
    existing = next((g[key] for g in groups if key in g), None)
    if existing is None and not any(key in g for g in groups):
        known = ", ".join(k for k in groups[0] if k not in ("params", "param_names")) if groups else ""
        raise FormatError(f"--set {key}: no param group has this key (they have: {known})")
    value = _typed(key, raw, existing)
    _check_range(key, raw, value)
    return Change("set", value, key)


# keys torch's optimizers refuse (or misbehave on) below zero; betas must lie in [0, 1)
_NON_NEGATIVE = frozenset({"lr", "initial_lr", "max_lr", "min_lr", "base_lr", "eps", "weight_decay", "momentum",
                           "dampening", "alpha", "lr_decay", "initial_accumulator_value", "rho", "base_momentum",
                           "max_momentum", "lambd", "t0"})


def _check_range(key: str, raw: str, value: Any) -> None:
    """The same checks ``--lr`` / ``--weight-decay`` make, for a value ``--set`` gives: every number
    finite, the keys above >= 0, each beta in [0, 1)."""
    nums = [v for v in (value if isinstance(value, (tuple, list)) else (value,))
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if any(not math.isfinite(v) for v in nums):
        raise FormatError(f"--set {key}={raw}: must be a finite number")
    if key == "betas" and not all(0 <= v < 1 for v in nums):
        raise FormatError(f"--set {key}={raw}: each beta must be in [0, 1)")
    if key in _NON_NEGATIVE and any(v < 0 for v in nums):
        raise FormatError(f"--set {key}={raw}: must be a finite number >= 0")


def _typed(key: str, raw: str, existing: Any) -> Any:
    try:
        if isinstance(existing, bool):
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if isinstance(existing, int):
            return int(raw)
        if isinstance(existing, float):
            return float(raw)
        if isinstance(existing, (tuple, list)):
            parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
            if len(parts) != len(existing):
                raise ValueError
            vals = [type(e)(p) if isinstance(e, (int, float)) and not isinstance(e, bool) else float(p)
                    for e, p in zip(existing, parts)]
            return type(existing)(vals)
        if existing is None:
            return None if raw.strip().lower() == "none" else raw
        if isinstance(existing, str):
            return raw
    except ValueError:
        pass
    raise FormatError(f"--set {key}={raw}: expected a value like the current {existing!r} "
                      f"({type(existing).__name__})")


def select_groups(groups: Sequence[Mapping[str, Any]], mapping: OptimizerMapping, group_sel: Sequence[str],
                  params: Sequence[str]) -> list[int]:
    """Indices of the selected groups: by index or ``name`` key, and/or whole groups whose parameters
    all match a glob. A glob covering part of a group is refused: a group has one lr."""
    chosen: set[int] = set()
    for sel in group_sel:
        if sel.isascii() and sel.isdigit() and int(sel) < len(groups):
            chosen.add(int(sel))
            continue
        hits = [i for i, g in enumerate(groups) if g.get("name") == sel]
        if not hits:
            known = [str(g.get("name")) for g in groups if "name" in g]
            raise FormatError(f"--group {sel}: no group with that index or name (there are {len(groups)} groups"
                              + (f"; names: {', '.join(known)})" if known else ")"))
        chosen.update(hits)
    if params:
        by_group: dict[int, list[str | None]] = {}
        for e in mapping.entries:
            by_group.setdefault(e.group, []).append(e.name)
        for gi, names in by_group.items():
            match = [n is not None and any(fnmatch.fnmatchcase(n, p) for p in params) for n in names]
            if all(match):
                chosen.add(gi)
            elif any(match):
                n_hit = sum(match)
                raise FormatError(
                    f"--params {' '.join(params)} covers {n_hit} of the {len(names)} parameters of group {gi}: "
                    "one group has one lr, so this needs a group split. Select whole groups (--group), or "
                    "build the new grouping in code and use `optckpt remap --target`"
                )
        if not chosen:
            raise FormatError(f"--params {' '.join(params)} matches no whole param group")
    if not group_sel and not params:
        chosen = set(range(len(groups)))
    return sorted(chosen)


def rewrite(opt_sd: Mapping[str, Any], schedulers: Sequence[Mapping[str, Any]], selected: Sequence[int],
            changes: Sequence[Change], *, follow: bool = True
            ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """New optimizer and scheduler state dicts with ``changes`` applied to the ``selected`` groups.

    ``follow``: lr changes scale the whole remaining schedule (see the module docstring);
    otherwise only the group keys change (a scheduler may then override them)."""
    notes: list[str] = []
    new_opt = dict(opt_sd)
    groups = [dict(g) for g in opt_sd["param_groups"]]
    new_opt["param_groups"] = groups
    scheds = [copy.deepcopy(dict(s)) for s in schedulers]
    factors: dict[int, float] = {}
    for change in changes:
        for gi in selected:
            g = groups[gi]
            if change.kind in ("lr", "scale_lr"):
                cur = float(g["lr"])
                if change.kind == "lr":
                    if cur == 0.0:
                        raise FormatError(
                            f"group {gi}: its current lr is 0 (the schedule is at a zero point), so a new lr "
                            "cannot be reached by scaling the schedule; use --scheduler keep, or --set lr=X on a "
                            "checkpoint whose lr is not 0")
                    f = float(change.value) / cur
                else:
                    f = float(change.value)
                factors[gi] = factors.get(gi, 1.0) * f
                if follow:
                    for k in _GROUP_LR_KEYS:
                        if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool):
                            g[k] = float(g[k]) * f
                    if change.kind == "lr":
                        g["lr"] = float(change.value)  # exactly X, not X/cur*cur
                else:
                    g["lr"] = float(change.value) if change.kind == "lr" else cur * f
            elif change.kind in ("weight_decay", "scale_weight_decay"):
                if "weight_decay" not in g:
                    raise FormatError(f"group {gi} has no weight_decay")
                g["weight_decay"] = float(change.value) if change.kind == "weight_decay" else \
                    float(g["weight_decay"]) * float(change.value)
            elif change.kind == "set":
                g[change.key] = copy.deepcopy(change.value)
    if follow and factors:
        all_groups = len(selected) == len(groups)
        for s in scheds:
            _scale_scheduler(s, factors, len(groups), all_groups, notes)
    elif factors and schedulers:
        notes.append("--scheduler keep: the schedulers' base_lrs / _last_lr were left alone; "
                     "most schedulers recompute lr from them at their next step")
    return new_opt, scheds, notes


def _scale_scheduler(sd: dict[str, Any], factors: Mapping[int, float], n_groups: int, all_groups: bool,
                     notes: list[str]) -> None:
    for key in _SCHED_LISTS:
        v = sd.get(key)
        if isinstance(v, list) and len(v) == n_groups:
            sd[key] = [float(x) * factors[i] if i in factors and isinstance(x, (int, float)) else x
                       for i, x in enumerate(v)]
    eta = sd.get("eta_min")
    if isinstance(eta, (int, float)) and eta != 0:
        uniform = len(set(factors.values())) == 1
        if all_groups and uniform:
            sd["eta_min"] = float(eta) * next(iter(factors.values()))
        else:
            notes.append(
                f"eta_min={eta} is shared by all groups: the cosine schedule of the changed groups now ends at "
                "the old eta_min, so their future lrs are not exactly scaled (select every group for an exact follow)")
    for child in sd.get("_schedulers", []) or []:
        if isinstance(child, dict):
            _scale_scheduler(child, factors, n_groups, all_groups, notes)


def scheduler_changes(name: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The lr-valued scheduler entries ``rewrite`` changed, old and new (children of SequentialLR /
    ChainedScheduler as ``_schedulers[i].key``)."""
    out = []
    for key in (*_SCHED_LISTS, "eta_min"):
        if key in before and repr(before[key]) != repr(after.get(key)):
            out.append({"scheduler": name, "key": key, "before": before[key], "after": after.get(key)})
    for i, (b, a) in enumerate(zip(before.get("_schedulers", []) or [], after.get("_schedulers", []) or [])):
        if isinstance(b, Mapping) and isinstance(a, Mapping):
            for c in scheduler_changes(name, b, a):
                out.append(c | {"key": f"_schedulers[{i}].{c['key']}"})
    return out
