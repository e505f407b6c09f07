"""``optckpt check``: what would a plain ``optimizer.load_state_dict`` do with this checkpoint under
the new code? Per-parameter statuses plus a group-level verdict."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .mapping import IndexName, OptimizerMapping
from .target import RenameRule, Target

__all__ = ["STATUSES", "ParamStatus", "CheckReport", "check_mapping", "apply_renames", "guess_prefix_rename"]

STATUSES = ("ok", "moved", "missing", "unexpected", "shape_mismatch", "ambiguous")


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

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "status": self.status,
            "source_index": self.source_index,
            "target_index": self.target_index,
            "shape": list(self.shape) if self.shape is not None else None,
            "silent": self.silent,
            "crash": self.crash,
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

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(p.status for p in self.params)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def groups_match(self) -> bool:
        return self.source_groups == self.target_groups

    @property
    def safe(self) -> bool:
        """True only when plain ``optimizer.load_state_dict`` would be exactly right."""
        return self.groups_match and all(p.status == "ok" for p in self.params)

    def as_json(self) -> dict[str, Any]:
        return {
            "safe": self.safe,
            "counts": self.counts,
            "params": [p.as_json() for p in _ordered(self.params)],
            "optimizer": self.optimizer,
            "evidence": self.evidence,
            "groups": {
                "source": self.source_groups,
                "target": self.target_groups,
                "load_would_fail": not self.groups_match,
            },
            "notes": list(self.notes),
        }


def _severity(p: ParamStatus) -> tuple[int, int]:
    """Crashes first, then silent corruption, then uncertainty, then merely new / gone, then ok."""
    if p.crash or p.status == "shape_mismatch":
        rank = 0
    elif p.status == "moved":
        rank = 1
    elif p.status == "ambiguous":
        rank = 2
    elif p.status in ("missing", "unexpected"):
        rank = 3
    else:
        rank = 4
    pos = p.target_index if p.target_index is not None else (p.source_index or 0)
    return rank, pos


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


def check_mapping(mapping: OptimizerMapping, target: Target, renames: Sequence[RenameRule] = ()) -> CheckReport:
    """Compare the checkpoint's named optimizer state with the target's parameter order.

    Without explicit ``renames``, a single wrapper-prefix difference is detected and applied (and
    said in the notes)."""
    notes = list(mapping.notes)
    if not renames:
        named = [c for e in mapping.entries for c in e.candidates]
        auto = guess_prefix_rename(named, target.names)
        if auto is not None:
            renames = [auto]
            spec = f"{auto.pattern}={auto.repl}"
            notes.append(f"checkpoint and target names differ by a prefix: applied --rename {spec}")
    src = mapping.entries  # flattened in group order: the position torch pairs by
    src_groups = Counter(e.group for e in src)
    source_groups = [src_groups[g] for g in sorted(src_groups)] if src else []
    target_groups = [len(g) for g in target.groups]
    tgt_names = target.names
    tgt_pos = {n: i for i, n in enumerate(tgt_names)}

    def to_target(name: str) -> str:
        n = apply_renames(name, renames)
        return n if n in tgt_pos else target.aliases.get(n, n)  # a tied parameter's other name

    renamed: list[str | None] = [to_target(e.name) if e.name is not None else None for e in src]
    src_pos = {n: i for i, n in enumerate(renamed) if n is not None}
    ambiguous_cands: set[str] = set()
    for e in src:
        if e.name is None:
            ambiguous_cands.update(apply_renames(c, renames) for c in e.candidates)

    # DCP / get_state_dict optimizer state is keyed by name and loaded by name
    # (set_optimizer_state_dict): positions do not matter, only names and shapes
    by_name = mapping.evidence == "fqn"
    params: list[ParamStatus] = []
    for t, name in enumerate(tgt_names):
        tshape = target.shapes.get(name)
        paired: IndexName | None = src[t] if t < len(src) else None
        crash = not by_name and (
            paired is not None and paired.shape is not None and tshape is not None and paired.shape != tshape
        )
        s = src_pos.get(name)
        if s is None:
            if name in ambiguous_cands:
                continue  # reported once, from the source side, as ambiguous
            params.append(ParamStatus(name, "missing", None, t, tshape, silent=not crash, crash=crash))
            continue
        sshape = src[s].shape
        shape = tshape if tshape is not None else sshape
        if sshape is not None and tshape is not None and sshape != tshape:
            params.append(ParamStatus(name, "shape_mismatch", src[s].index, t, shape, silent=False, crash=crash))
        elif s == t or by_name:
            params.append(ParamStatus(name, "ok", src[s].index, t, shape, silent=False, crash=False))
        else:
            params.append(ParamStatus(name, "moved", src[s].index, t, shape, silent=not crash, crash=crash))
    for s, e in enumerate(src):
        if e.name is None:
            params.append(ParamStatus(f"<index {e.index}>", "ambiguous", e.index, None, e.shape, silent=False,
                                      candidates=tuple(apply_renames(c, renames) for c in e.candidates)))
        elif renamed[s] not in tgt_pos:
            params.append(ParamStatus(renamed[s] or "", "unexpected", e.index, None, e.shape, silent=False))
    if by_name:
        notes.append("state keyed by parameter name (DCP): it loads by name with set_optimizer_state_dict, "
                     "so only missing / unexpected / reshaped parameters matter")
        source_groups = target_groups if len(source_groups) == len(target_groups) else source_groups
    report = CheckReport(mapping.optimizer, mapping.evidence, params, source_groups, target_groups, notes)
    if not report.groups_match:
        report.notes.append(
            f"param groups differ (checkpoint {source_groups} vs target {target_groups}): "
            "plain optimizer.load_state_dict raises ValueError"
        )
    if any(p.status == "ambiguous" for p in params):
        report.notes.append("some names are uncertain: pass --source module:callable (the old code) or a names file")
    return report
