"""``optckpt check``: what would a plain ``optimizer.load_state_dict`` do with this checkpoint under
the new code? Per-parameter statuses plus a group-level verdict."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .mapping import IndexName, OptimizerMapping, settle_by_grouping
from .target import RenameRule, Target

__all__ = ["STATUSES", "RISKS", "VERDICTS", "ParamStatus", "CheckReport", "check_mapping", "apply_renames",
           "guess_prefix_rename", "rename_hints"]

STATUSES = ("ok", "moved", "missing", "unexpected", "shape_mismatch", "ambiguous")


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


@dataclass
class CheckReport:
    optimizer: str
    evidence: str
    params: list[ParamStatus]
    source_groups: list[int]
    target_groups: list[int]
    notes: list[str] = field(default_factory=list)
    mapping: OptimizerMapping | None = field(default=None, repr=False)  # as settled (group-structure applied)
    hints: list[str] = field(default_factory=list)  # --rename options that would explain missing + unexpected

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
            "safe": self.safe,
            "verdict": self.verdict,
            "counts": self.counts,
            "params": [p.as_json() for p in _ordered(self.params)],
            "optimizer": self.optimizer,
            "evidence": self.evidence,
            "evidence_counts": dict(Counter(p.evidence if p.status != "ambiguous" else "uncertain"
                                            for p in self.params if p.source_index is not None)),
            "groups": {
                "source": self.source_groups,
                "target": self.target_groups,
                "load_would_fail": not self.groups_match,
            },
            "rename_hints": list(self.hints),
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


def _hp_key(hp: Mapping[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in hp.items() if k not in ("params", "param_names")))


def rename_hints(missing: Sequence[tuple[str, tuple[int, ...] | None]],
                 unexpected: Sequence[tuple[str, tuple[int, ...] | None]]) -> list[str]:
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
    return [f"--rename {o}={r}" for o, r in kept]


def check_mapping(mapping: OptimizerMapping, target: Target, renames: Sequence[RenameRule] = (), *,
                  group_evidence: bool = True) -> CheckReport:
    """Compare the checkpoint's named optimizer state with the target's parameter order.

    Without explicit ``renames``, a single wrapper-prefix difference is detected and applied (and
    said in the notes). With ``group_evidence`` (and a target optimizer), the new code's param groups
    settle what the checkpoint leaves ambiguous (:func:`optckpt.mapping.settle_by_grouping`).

    State-aware: an index without state cannot receive the wrong state, so it is at risk only when
    plain loading would put it in a group with other hyperparameters than its own."""
    notes: list[str] = []
    if not renames:
        named = [c for e in mapping.entries for c in e.candidates]
        auto = guess_prefix_rename(named, target.names)
        if auto is not None:
            renames = [auto]
            spec = f"{auto.pattern}={auto.repl}"
            notes.append(f"checkpoint and target names differ by a prefix: applied --rename {spec}")
    tgt_names = target.names
    tgt_pos = {n: i for i, n in enumerate(tgt_names)}

    def to_target(name: str) -> str:
        n = apply_renames(name, renames)
        return n if n in tgt_pos else target.aliases.get(n, n)  # a tied parameter's other name

    if group_evidence and target.group_hparams is not None:
        order = [n for n, _ in target.module.named_parameters()] if target.module is not None else None
        mapping = settle_by_grouping(mapping, target.groups, target.shapes, target.group_hparams, to_target, order)
    notes[:0] = mapping.notes
    src = mapping.entries  # flattened in group order: the position torch pairs by
    if mapping.group_sizes:
        source_groups = list(mapping.group_sizes)
    else:
        src_groups = Counter(e.group for e in src)
        source_groups = [src_groups[g] for g in sorted(src_groups)] if src else []
    target_groups = [len(g) for g in target.groups]
    hp_keys = [_hp_key(h) for h in mapping.group_hparams]

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
        s = src_pos.get(name)
        if s is None:
            if name in ambiguous_cands:
                continue  # reported once, from the source side, as ambiguous
            risk = "misapplied" if by_name or received else "none"
            params.append(ParamStatus(name, "missing", None, t, tshape, silent=received and not crash, crash=crash,
                                      has_state=False, risk=risk))
            continue
        e = src[s]
        sshape = e.shape
        shape = tshape if tshape is not None else sshape
        if sshape is not None and tshape is not None and sshape != tshape:
            params.append(ParamStatus(name, "shape_mismatch", e.index, t, shape, silent=False, crash=crash,
                                      has_state=e.has_state, risk="misapplied", evidence=e.evidence))
        elif s == t or by_name:
            params.append(ParamStatus(name, "ok", e.index, t, shape, silent=False, crash=False,
                                      has_state=e.has_state, evidence=e.evidence))
        elif not e.has_state and not received:
            # nothing to misapply: only the group it lands in can be wrong
            risk = "none" if same_hparams(e.group, paired) else "misapplied"
            params.append(ParamStatus(name, "moved", e.index, t, shape, silent=False, crash=False,
                                      has_state=False, risk=risk, evidence=e.evidence))
        else:
            params.append(ParamStatus(name, "moved", e.index, t, shape, silent=not crash, crash=crash,
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
            params.append(ParamStatus(f"<index {e.index}>", "ambiguous", e.index, None, e.shape, silent=False,
                                      candidates=cands, has_state=e.has_state, risk=risk, evidence=e.evidence))
        elif renamed[s] not in tgt_pos:
            params.append(ParamStatus(renamed[s] or "", "unexpected", e.index, None, e.shape, silent=False,
                                      has_state=e.has_state, risk="misapplied" if by_name or e.has_state else "none",
                                      evidence=e.evidence))
    if by_name:
        notes.append("state keyed by parameter name (DCP): it loads by name with set_optimizer_state_dict, "
                     "so only missing / unexpected / reshaped parameters matter")
        source_groups = target_groups if len(source_groups) == len(target_groups) else source_groups
    report = CheckReport(mapping.optimizer, mapping.evidence, params, source_groups, target_groups, notes, mapping)
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
    if not renames:
        report.hints = rename_hints([(p.name, p.shape) for p in params if p.status == "missing"],
                                    [(p.name, p.shape) for p in params if p.status == "unexpected"])
        for h in report.hints:
            report.notes.append(f"missing and unexpected parameters differ only by a prefix: {h} would match them")
    return report
