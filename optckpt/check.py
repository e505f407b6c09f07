"""``optckpt check``: what would a plain ``optimizer.load_state_dict`` do with this checkpoint under
the new code? Per-parameter statuses plus a group-level verdict. The comparison of named indices
with the target; the naming itself (and its settling by the new grouping) is run once by
:func:`optckpt.resolve.resolve`, which calls :func:`compare_named`."""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import MappingError
from .mapping import IndexName, OptimizerMapping, settle_by_grouping
from .render import plain_rows
from .target import RenameRule, Target

__all__ = ["STATUSES", "RISKS", "VERDICTS", "ParamStatus", "CheckReport", "check_mapping", "apply_renames",
           "guess_prefix_rename", "rename_hints", "keep_saved_grouping", "model_only", "effective_renames",
           "target_namer", "model_order", "compare_named"]

STATUSES = ("ok", "moved", "missing", "unexpected", "shape_mismatch", "ambiguous")
#: 2: ``rename_hints`` are ``{"old", "new"}`` objects (were ``"--rename OLD=NEW"`` strings)
CHECK_SCHEMA_VERSION = 2


#: per-parameter risk of plain loading: nothing wrong / proven wrong / cannot tell
RISKS = ("none", "misapplied", "uncertain")
#: the headline: right / load_state_dict raises / proven to misapply state or hyperparameters / uncertain
VERDICTS = ("safe", "load_fails", "would_misapply", "cannot_prove_safe")


@dataclass(frozen=True)
class ParamStatus:
    name: str
    status: str
    source_index: int | None
    target_index: int | None
    shape: tuple[int, ...] | None
    silent: bool
    crash: bool = False  # plain loading would pair this target parameter with state of another shape
    candidates: tuple[str, ...] = ()
    has_state: bool = True  # the saved index keeps per-parameter state (False: only its group can matter)
    risk: str = "none"  # see RISKS
    evidence: str = ""  # the rung that named the saved index (mapping.IndexName.evidence)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "source_index": self.source_index,
            "target_index": self.target_index,
            "shape": list(self.shape) if self.shape is not None else None,
            "silent": self.silent,
            "crash": self.crash,
            "has_state": self.has_state,
            "risk": self.risk,
            "evidence": self.evidence,
        }
        if self.status == "ambiguous":
            out["candidates"] = list(self.candidates)
        return out


_new = object.__new__


def _status(name: str, status: str, source_index: int | None, target_index: int | None,
            shape: tuple[int, ...] | None, silent: bool, crash: bool = False, candidates: tuple[str, ...] = (),
            has_state: bool = True, risk: str = "none", evidence: str = "") -> ParamStatus:
    """``ParamStatus(...)``, made without the frozen dataclass's per-field ``object.__setattr__`` (a
    third of the time; one per target parameter): the same fields, in the same order, same object."""
    p = _new(ParamStatus)
    p.__dict__.update(name=name, status=status, source_index=source_index, target_index=target_index, shape=shape,
                      silent=silent, crash=crash, candidates=candidates, has_state=has_state, risk=risk,
                      evidence=evidence)
    return p


@dataclass
class CheckReport:
    optimizer: str
    evidence: str
    params: list[ParamStatus]
    source_groups: list[int]
    target_groups: list[int]
    notes: list[str] = field(default_factory=list)
    mapping: OptimizerMapping | None = field(default=None, repr=False)  # as settled (group-structure applied)
    hints: list[tuple[str, str]] = field(default_factory=list)  # (old, new) renames that would explain missing +
    # unexpected (never applied unless given)
    target: Target | None = field(default=None, repr=False)  # as compared (a model-only target: saved grouping)
    predictions: list[str] = field(default_factory=list)  # the notes about the plain load (not about a repair)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(p.status for p in self.params)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def groups_match(self) -> bool:
        return self.source_groups == self.target_groups

    @property
    def verdict(self) -> str:
        if not self.groups_match:
            return "load_fails"
        risks = {p.risk for p in self.params}
        if "misapplied" in risks:
            return "would_misapply"
        return "cannot_prove_safe" if "uncertain" in risks else "safe"

    @property
    def safe(self) -> bool:
        """True only when plain ``optimizer.load_state_dict`` would be exactly right: every state
        entry lands on its parameter and every parameter keeps its group's hyperparameters."""
        return self.verdict == "safe"

    def as_json(self) -> dict[str, Any]:
        return {
            "schema_version": CHECK_SCHEMA_VERSION,
            "safe": self.safe,
            "verdict": self.verdict,
            "counts": self.counts,
            "params": plain_rows([p.as_json() for p in _ordered(self.params)]),  # (checked: to_json need not copy)
            "optimizer": self.optimizer,
            "evidence": self.evidence,
            "evidence_counts": dict(Counter(p.evidence if p.status != "ambiguous" else "uncertain"
                                            for p in self.params if p.source_index is not None)),
            "groups": {
                "source": self.source_groups,
                "target": self.target_groups,
                "load_would_fail": not self.groups_match,
            },
            "rename_hints": [{"old": o, "new": n} for o, n in self.hints],
            "notes": list(self.notes),
        }


def _severity(p: ParamStatus) -> tuple[int, int, int, str]:
    """Crashes first, then proven misapplication, then uncertainty, then harmless changes, then ok."""
    if p.crash or p.status == "shape_mismatch":
        rank = 0
    elif p.risk == "misapplied":
        rank = 1
    elif p.risk == "uncertain":
        rank = 2
    elif p.status != "ok":
        rank = 3
    else:
        rank = 4
    # target position first; then the saved index, which is a name (str) in DCP / FQN-keyed state:
    # never compared with an int
    if p.target_index is not None:
        return rank, 0, p.target_index, ""
    src = p.source_index
    return rank, 1, src if isinstance(src, int) else 0, "" if isinstance(src, int) or src is None else str(src)


def _ordered(params: Sequence[ParamStatus]) -> list[ParamStatus]:
    return sorted(params, key=_severity)


def apply_renames(name: str, rules: Sequence[RenameRule]) -> str:
    for r in rules:
        name = r.apply(name)
    return name


def guess_prefix_rename(source: Sequence[str], target: Sequence[str]) -> RenameRule | None:
    """When the two name sets only differ by a wrapper prefix (Lightning's ``net.``, DataParallel's
    ``module.``), the rename that makes them meet; None when no single prefix does."""
    src, tgt = set(source), set(target)
    if not src or not tgt or len(src & tgt) * 2 >= min(len(src), len(tgt)):
        return None
    best: tuple[int, RenameRule] | None = None
    for prefix in {n.split(".", 1)[0] + "." for n in src if "." in n}:
        rule = RenameRule(prefix, "", False)
        hit = len({rule.apply(n) for n in src} & tgt)
        if best is None or hit > best[0]:
            best = (hit, rule)
    for prefix in {n.split(".", 1)[0] + "." for n in tgt if "." in n}:
        rule = RenameRule("", prefix, False)
        hit = len({prefix + n for n in src} & tgt)
        if best is None or hit > best[0]:
            best = (hit, rule)
    if best is not None and best[0] * 2 > min(len(src), len(tgt)):
        return best[1]
    return None


def hparams_key(hp: Mapping[str, Any]) -> str:
    """A param group's hyperparameters as one comparable value (its parameters left out)."""
    return repr(sorted((k, repr(v)) for k, v in hp.items() if k not in ("params", "param_names")))


def rename_hints(missing: Sequence[tuple[str, tuple[int, ...] | None]],
                 unexpected: Sequence[tuple[str, tuple[int, ...] | None]]) -> list[tuple[str, str]]:
    """``--rename OLD=NEW`` options that explain missing + unexpected parameters: every unexpected
    name under one prefix and every missing name under another have the same rest, shapes and order
    (``enc.*`` saved, ``encoder.*`` expected). The most general (shortest) prefixes are given."""

    def split(names: Sequence[tuple[str, tuple[int, ...] | None]]) -> dict[str, list[tuple[str, Any]]]:
        out: dict[str, list[tuple[str, Any]]] = {}
        for n, shape in names:
            for k, ch in enumerate(n):
                if ch == ".":
                    out.setdefault(n[:k + 1], []).append((n[k + 1:], shape))
        return out

    new_by_rest: dict[tuple[str, ...], list[tuple[str, list[tuple[str, Any]]]]] = {}
    for repl, rest in split(missing).items():
        new_by_rest.setdefault(tuple(r for r, _ in rest), []).append((repl, rest))
    found: list[tuple[str, str]] = []
    for old, rest in split(unexpected).items():
        for repl, rest_new in new_by_rest.get(tuple(r for r, _ in rest), []):
            if old != repl and all(a is None or b is None or a == b for (_, a), (_, b) in zip(rest, rest_new)):
                found.append((old, repl))
    found.sort(key=lambda h: len(h[0]))
    kept: list[tuple[str, str]] = []
    for old, repl in found:  # inside "enc.=encoder.", "enc.1.=encoder.1." adds nothing (and others mislead)
        if not any(old.startswith(o) or repl.startswith(r) for o, r in kept):
            kept.append((old, repl))
    return kept


def model_only(target: Target) -> bool:
    """A target that says nothing about grouping: a model without its optimizer (a names file
    states its groups: a flat list is one group)."""
    return target.optimizer is None and target.group_hparams is None and target.module is not None


def check_mapping(mapping: OptimizerMapping, target: Target, renames: Sequence[RenameRule] = (), *,
                  group_evidence: bool = True, place_new: bool = False) -> CheckReport:
    """Compare an already inferred mapping with the target's parameter order, settling what it leaves
    ambiguous by the target's grouping first (``group_evidence``). The commands, the verbs and the
    resume API go through :func:`optckpt.resolve.resolve` instead (the one pass that names, settles
    and compares); this is the same comparison for a mapping built by hand.

    A model-only target (no optimizer) is compared with the saved grouping
    (:func:`keep_saved_grouping`): whoever builds the optimizer for it is assumed to group as the old
    code did, which is what ``remap`` writes. ``place_new`` (remap) refuses a new parameter that no
    rule learned from the saved grouping places; ``check`` only says so.
"""
    rules, rename_notes = effective_renames(mapping, target, renames)
    if group_evidence and target.group_hparams is not None:
        mapping = settle_by_grouping(mapping, target.groups, target.shapes, target.group_hparams,
                                     target_namer(target, rules), model_order(target))
    return compare_named(mapping, target, rules, rename_notes, place_new=place_new)


def effective_renames(mapping: OptimizerMapping, target: Target,
                      renames: Sequence[RenameRule]) -> tuple[list[RenameRule], list[str]]:
    """The renames the comparison applies: the given ones, else a single wrapper-prefix difference
    between the checkpoint's names (every candidate) and the target's, detected (and said)."""
    if renames:
        return list(renames), []
    named = [c for e in mapping.entries for c in e.candidates]
    auto = guess_prefix_rename(named, target.names)
    if auto is None:
        return [], []
    return [auto], [f"checkpoint and target names differ by a prefix: applied --rename {auto.pattern}={auto.repl}"]


def target_namer(target: Target, rules: Sequence[RenameRule]) -> Callable[[str], str]:
    """A checkpoint name as the target calls it: renamed, then a tied parameter's other name."""
    tgt_pos = set(target.names)
    aliases = target.aliases

    def to_target(name: str) -> str:
        n = apply_renames(name, rules)
        return n if n in tgt_pos else aliases.get(n, n)

    def unrenamed(name: str) -> str:  # (no rule: one call a name, not two; 150k names)
        return name if name in tgt_pos else aliases.get(name, name)

    return to_target if rules else unrenamed


def model_order(target: Target) -> list[str] | None:
    """The new model's parameter order (the ``group-order`` rung), when the target has a module."""
    return [n for n, _ in target.module.named_parameters()] if target.module is not None else None


def compare_named(mapping: OptimizerMapping, target: Target, rules: Sequence[RenameRule],
                  rename_notes: Sequence[str] = (), *, place_new: bool = False) -> CheckReport:
    """The comparison of a settled mapping with the target (``rules``: the renames in effect, from
    :func:`effective_renames`, whose notes come with them). A model-only target over several saved
    groups is first regrouped as the checkpoint was (:func:`keep_saved_grouping`)."""
    if model_only(target) and len(mapping.group_sizes) > 1:
        first = _compare(mapping, target, rules, rename_notes)
        regrouped, notes = keep_saved_grouping(first, target, strict=place_new)
        report = _compare(mapping, regrouped, rules, rename_notes)
        report.notes[:0] = notes
        report.target = regrouped
        return report
    report = _compare(mapping, target, rules, rename_notes)
    report.target = target
    return report


def keep_saved_grouping(report: CheckReport, target: Target, *, strict: bool) -> tuple[Target, list[str]]:
    """The target regrouped as the checkpoint was: every parameter found in the checkpoint stays in
    the group it was saved in (a decay / no-decay split keeps its weight decay). A new parameter
    joins a group by a rule learned from the saved grouping (:func:`_placement`); one that no rule
    places is refused when ``strict`` (else put in the first group, and said)."""
    mapping = report.mapping
    assert mapping is not None
    n_groups = len(mapping.group_sizes)
    group_of_index = {e.index: e.group for e in mapping.entries}
    saved = {p.name: group_of_index[p.source_index] for p in report.params
             if p.target_index is not None and p.source_index is not None and p.source_index in group_of_index}
    assign = dict(saved)
    notes = [f"the target has no optimizer: assuming the saved grouping ({n_groups} groups, with their "
             "hyperparameters); give a target that returns (model, optimizer) to check the new code's own"]
    # parameters whose saved index is uncertain: the groups of the indices they could be
    could_be: dict[str, set[int]] = {}
    for p in report.params:
        if p.status == "ambiguous" and p.source_index in group_of_index:
            for c in p.candidates:
                could_be.setdefault(c, set()).add(group_of_index[p.source_index])
    room = list(mapping.group_sizes)
    for g in assign.values():
        room[g] -= 1
    hp = [hparams_key(h) for h in mapping.group_hparams]
    for name in target.names:
        if name in assign or name not in could_be:
            continue
        options = sorted(could_be[name])
        if len(options) > 1 and len({hp[g] for g in options}) > 1 and strict:
            raise MappingError(f"{name}: its saved index is uncertain and could be in saved groups {options}, whose "
                               "hyperparameters differ; pass --source (the old code), or give --target as "
                               "(model, optimizer)")
        pick = next((g for g in options if room[g] > 0), options[0])
        room[pick] -= 1
        assign[name] = pick
    rules = _Rules(saved, target)
    for name in target.names:
        if name in assign:
            continue
        placed, why = rules.place(name)
        if placed is None:
            if strict:
                raise MappingError(f"new parameter {name}: {why}; give --target as a callable returning "
                                   "(model, optimizer) so that its param group is known")
            notes.append(f"new parameter {name}: {why} (counted in group 0 here)")
            placed = 0
        else:
            notes.append(f"new parameter {name} joins saved group {placed} ({why})")
        assign[name] = placed
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    for n in target.names:  # one pass: 300k one-parameter groups stay linear
        groups[assign[n]].append(n)
    hparams = [{k: copy.deepcopy(v) for k, v in h.items() if k not in ("params", "param_names")}
               for h in mapping.group_hparams]
    return replace(target, groups=groups, group_hparams=hparams), notes


def _features(name: str, target: Target) -> list[tuple[str, Any]]:
    """What a grouping rule can look at, in the order rules are tried."""
    shape = target.shapes.get(name)
    out: list[tuple[str, Any]] = []
    if shape is not None:
        out.append(("ndim >= 2", len(shape) >= 2))
    out.append(("name ends in 'bias'", name.endswith("bias")))
    if target.module is not None and "." in name:
        try:
            out.append(("module type", type(target.module.get_submodule(name.rpartition(".")[0])).__name__))
        except AttributeError:
            pass
    if shape is not None:
        out.append(("number of dimensions", len(shape)))
    return out


class _Rules:
    """Where a new parameter goes, learned from the saved grouping (``saved``: name -> saved group): a
    sibling of the same name pattern and shape (``blocks.3.attn.weight`` like ``blocks.0.attn.weight``);
    else the first feature whose values separate the saved groups perfectly (every value seen in one
    group only): ``ndim >= 2`` (the decay / no-decay split), a ``bias`` suffix, the module type
    (``LayerNorm``, ``Embedding``...), the number of dimensions. Tables built once: linear in the
    saved parameters, whatever the number of new ones."""

    def __init__(self, saved: Mapping[str, int], target: Target):
        self.target = target
        self.used = sorted(set(saved.values()))
        self.siblings: dict[tuple[str, tuple[int, ...] | None], set[int]] = {}
        self.example: dict[tuple[str, tuple[int, ...] | None], str] = {}
        seen: dict[str, dict[Any, set[int]]] = {}
        for n, g in saved.items():
            key = (re.sub(r"\d+", "#", n), target.shapes.get(n))
            self.siblings.setdefault(key, set()).add(g)
            self.example.setdefault(key, n)
            for label, value in _features(n, target):
                seen.setdefault(label, {}).setdefault(value, set()).add(g)
        # the features that separate the saved groups: value -> its one group
        self.separating = {label: {v: next(iter(gs)) for v, gs in by_value.items()}
                           for label, by_value in seen.items() if all(len(gs) == 1 for gs in by_value.values())}

    def place(self, name: str) -> tuple[int | None, str]:
        if len(self.used) <= 1:
            return (self.used[0] if self.used else 0), ("the only saved group holding parameters" if self.used else
                                                        "no saved group holds parameters")
        key = (re.sub(r"\d+", "#", name), self.target.shapes.get(name))
        if len(self.siblings.get(key, ())) == 1:
            return next(iter(self.siblings[key])), f"like {self.example[key]}"
        for label, value in _features(name, self.target):
            table = self.separating.get(label)
            if table is not None and value in table:
                return table[value], f"rule: {label} = {value} separates the saved groups"
        return None, (f"no rule learned from the saved grouping places it (its siblings are split over groups, and "
                      f"neither ndim, a bias suffix nor its module type separates the {len(self.used)} saved groups)")


def _compare(mapping: OptimizerMapping, target: Target, renames: Sequence[RenameRule],
             rename_notes: Sequence[str] = ()) -> CheckReport:
    """:func:`check_mapping` for a settled mapping and a target whose grouping is known; ``renames``
    are the ones in effect (given or detected: :func:`effective_renames`).

    State-aware: an index without state cannot receive the wrong state, so it is at risk only when
    plain loading would put it in a group with other hyperparameters than its own."""
    notes: list[str] = list(rename_notes)
    tgt_names = target.names
    tgt_pos = {n: i for i, n in enumerate(tgt_names)}
    to_target = target_namer(target, renames)
    notes[:0] = mapping.notes
    src = mapping.entries  # flattened in group order: the position torch pairs by
    if mapping.group_sizes:
        source_groups = list(mapping.group_sizes)
    else:
        src_groups = Counter(e.group for e in src)
        source_groups = [src_groups[g] for g in sorted(src_groups)] if src else []
    target_groups = [len(g) for g in target.groups]
    hp_keys = [hparams_key(h) for h in mapping.group_hparams]

    def same_hparams(g: int, paired: IndexName | None) -> bool:
        """Does the index at this position get its own group's hyperparameters when loaded plainly?"""
        if paired is None or not hp_keys:
            return True
        return paired.group == g or hp_keys[paired.group] == hp_keys[g]

    renamed: list[str | None] = [to_target(e.name) if e.name is not None else None for e in src]
    src_pos = {n: i for i, n in enumerate(renamed) if n is not None}
    ambiguous_cands: set[str] = set()
    for e in src:
        if e.name is None:
            ambiguous_cands.update(to_target(c) for c in e.candidates)

    # DCP / get_state_dict optimizer state is keyed by name and loaded by name
    # (set_optimizer_state_dict): positions do not matter, only names and shapes
    by_name = mapping.evidence == "fqn"
    params: list[ParamStatus] = []
    for t, name in enumerate(tgt_names):
        tshape = target.shapes.get(name)
        paired: IndexName | None = src[t] if t < len(src) else None
        received = paired is not None and paired.has_state
        crash = not by_name and (
            paired is not None and paired.shape is not None and tshape is not None and paired.shape != tshape
        )
        # a row claims that plain loading misapplies silently only where the target's shape is known (a names
        # file gives none): its state may as well crash the first step
        shapes_known = tshape is not None
        s = src_pos.get(name)
        if s is None:
            if name in ambiguous_cands:
                continue  # reported once, from the source side, as ambiguous
            risk = "misapplied" if by_name or received else "none"
            params.append(_status(name, "missing", None, t, tshape, silent=received and not crash and shapes_known,
                                  crash=crash, has_state=False, risk=risk))
            continue
        e = src[s]
        sshape = e.shape
        shape = tshape if tshape is not None else sshape
        if sshape is not None and tshape is not None and sshape != tshape:
            params.append(_status(name, "shape_mismatch", e.index, t, shape, silent=False, crash=crash,
                                      has_state=e.has_state, risk="misapplied", evidence=e.evidence))
        elif s == t or by_name:
            params.append(_status(name, "ok", e.index, t, shape, silent=False, crash=False,
                                      has_state=e.has_state, evidence=e.evidence))
        elif not e.has_state and not received:
            # nothing to misapply: only the group it lands in can be wrong
            risk = "none" if same_hparams(e.group, paired) else "misapplied"
            params.append(_status(name, "moved", e.index, t, shape, silent=False, crash=False,
                                      has_state=False, risk=risk, evidence=e.evidence))
        else:
            params.append(_status(name, "moved", e.index, t, shape, silent=shapes_known and not crash, crash=crash,
                                      has_state=e.has_state, risk="misapplied", evidence=e.evidence))
    for s, e in enumerate(src):
        if e.name is None:
            cands = tuple(to_target(c) for c in e.candidates)
            if e.has_state:
                risk = "uncertain"
            else:  # each candidate's position would receive what sits there: no state, the right group?
                fine = [c not in tgt_pos or (
                    not (tgt_pos[c] < len(src) and src[tgt_pos[c]].has_state)
                    and same_hparams(e.group, src[tgt_pos[c]] if tgt_pos[c] < len(src) else None)) for c in cands]
                risk = "none" if all(fine) else ("uncertain" if any(fine) else "misapplied")
            params.append(_status(f"<index {e.index}>", "ambiguous", e.index, None, e.shape, silent=False,
                                      candidates=cands, has_state=e.has_state, risk=risk, evidence=e.evidence))
        elif renamed[s] not in tgt_pos:
            params.append(_status(renamed[s] or "", "unexpected", e.index, None, e.shape, silent=False,
                                      has_state=e.has_state, risk="misapplied" if by_name or e.has_state else "none",
                                      evidence=e.evidence))
    if by_name:
        notes.append("state keyed by parameter name (DCP): it loads by name with set_optimizer_state_dict, "
                     "so only missing / unexpected / reshaped parameters matter")
        source_groups = target_groups if len(source_groups) == len(target_groups) else source_groups
    report = CheckReport(mapping.optimizer, mapping.evidence, params, source_groups, target_groups, notes, mapping)
    before = len(report.notes)  # the notes below predict the plain load: stale once a repair is written
    if mapping.evidence == "deepspeed" and not report.safe:
        report.notes.append("DeepSpeed restores its ZeRO partitions by position, not by name: `optckpt convert "
                            "--to torch` this step directory, then `optckpt remap` the result for the new code")
    if not report.groups_match:
        report.notes.append(
            f"param groups differ (checkpoint {source_groups} vs target {target_groups}): "
            "plain optimizer.load_state_dict raises ValueError"
        )
    stateless = [p for p in params if p.status in ("moved", "ambiguous") and not p.has_state]
    if stateless:
        differ = len(set(hp_keys)) > 1
        report.notes.append(
            f"{len(stateless)} moved or uncertain indices keep no optimizer state: nothing can be misapplied to "
            "them but their param group" + ("; the saved groups differ in hyperparameters, so where they land "
                                            "matters" if differ else " (all groups have the same hyperparameters)"))
    uncertain = [p for p in params if p.risk == "uncertain"]
    if uncertain:
        report.notes.append(
            f"{len(uncertain)} indices have uncertain names: pass --source module:callable (the old code) or a "
            "names file" + ("" if target.group_hparams is not None else
                            ", or give --target as (model, optimizer) so the new grouping can settle them"))
    report.predictions = report.notes[before:]
    if not renames:
        report.hints = rename_hints([(p.name, p.shape) for p in params if p.status == "missing"],
                                    [(p.name, p.shape) for p in params if p.status == "unexpected"])
        for o, n in report.hints:
            report.notes.append(f"missing and unexpected parameters differ only by a prefix: --rename {o}={n} would "
                                "match them")
    return report
