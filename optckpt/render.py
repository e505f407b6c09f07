"""Turning reports into text: JSON for scripts, ``tabulate`` tables for people."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from itertools import chain
from typing import Any

from .gcpause import gc_paused
from .tensors import is_tensor

__all__ = ["SCHEMA_VERSION", "PlainRows", "plain_rows", "jsonable", "to_json",
           "table", "plural", "human_bytes", "first_rows", "render_inspect", "render_check",
           "render_plan", "render_set", "render_diff"]

SCHEMA_VERSION = 1
"""The version of every ``--format json`` output (schemas: ``docs/json-schema.md``). Bumped when a field
is removed or changes meaning; adding a field does not bump it."""


_PLAIN = frozenset({str, int, bool, type(None)})


class PlainRows(list):  # type: ignore[type-arg]
    """A report's long list of rows that its producer expects to be plain JSON data already (str
    keys; str / int / bool / None / finite float values; lists and dicts of them): :func:`jsonable`
    checks that (a few C-level passes, :func:`_plain`) and then hands the list on as it is instead of
    copying it value by value (a 300k-parameter report's rows); otherwise it converts it as any list.
    Nothing is checked until JSON is asked for (a table shows 40 rows)."""

    __slots__ = ()


_LEAVES = _PLAIN | {float}
_NESTED = _LEAVES | {list, dict}


def _plain(values: list[Any], depth: int) -> bool:
    """Whether ``values`` (one level of a report) are plain JSON data all the way down: a few C-level
    passes per level (by exact type: subclasses, tuples, tensors... are not plain)."""
    types = set(map(type, values))
    if not types <= _NESTED:
        return False
    if float in types and not all(map(math.isfinite, [v for v in values if type(v) is float])):
        return False  # (jsonable writes a non-finite float as a string)
    below: list[Any] = []
    if dict in types:
        dicts = list({id(v): v for v in values if type(v) is dict}.values())  # (a shared one once)
        if not {str}.issuperset(map(type, chain.from_iterable(dicts))):
            return False
        below.extend(chain.from_iterable(map(dict.values, dicts)))
    if list in types:
        below.extend(chain.from_iterable([v for v in values if type(v) is list]))
    if not below:
        return True
    return depth > 0 and _plain(below, depth - 1)


def plain_rows(rows: list[Any]) -> list[Any]:
    """``rows`` marked as :class:`PlainRows` (checked by :func:`jsonable` when JSON is made)."""
    return PlainRows(rows) if type(rows) is list else rows


def jsonable(v: Any, _seen: dict[int, Any] | None = None) -> Any:
    """Plain JSON data from checkpoint values (tuples → lists, 1-element tensors → numbers,
    non-finite floats → strings, anything else → its repr). ``_seen`` (id → converted): a dict met
    again is converted once (a report's rows share their state summaries)."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t is PlainRows:
        if _plain(v, 4):
            return v
        t = list  # (converted as any list)
    if t is dict:  # the common containers by exact type first: a 300k-parameter report is millions of values
        if _seen is not None:
            done = _seen.get(id(v))
            if done is not None:
                return done
            out = _seen[id(v)] = {k if type(k) is str else str(k): x if type(x) in _PLAIN else jsonable(x, _seen)
                                  for k, x in v.items()}
            return out
        return {k if type(k) is str else str(k): x if type(x) in _PLAIN else jsonable(x) for k, x in v.items()}
    if t is list or t is tuple:
        return [x if type(x) in _PLAIN else jsonable(x, _seen) for x in v] if v else []
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if is_tensor(v):
        if v.numel() == 1:
            return jsonable(v.item())
        return f"tensor{tuple(v.shape)}"
    if isinstance(v, Mapping):
        return {str(k): jsonable(x, _seen) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [jsonable(x, _seen) for x in v]
    return repr(v)


_INDENT_LIMIT = 1 << 20


def to_json(report: Mapping[str, Any], *, indent: bool | None = None) -> str:
    """A command's report as JSON, ``schema_version`` first: indented for reading, except past 1 MiB,
    where it stays compact (Python's C encoder only writes compact JSON: indenting a 300k-parameter
    report would take longer than reading the checkpoint); ``indent=False``: compact whatever the size
    (the CLI's output to a pipe or file, which a script parses), ``True``: indented whatever the size."""
    with gc_paused():  # a copy of a big report is ~1M small objects and makes no cycles: no collection rescans them
        seen: dict[int, Any] = {}
        data = jsonable(report, seen)
        del seen
        data = {"schema_version": data.pop("schema_version", SCHEMA_VERSION), **data}
        if indent is False:
            return json.dumps(data)
        if indent:
            return json.dumps(data, indent=2)
        text = json.dumps(data)
        return json.dumps(data, indent=2) if len(text) <= _INDENT_LIMIT else text


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ALL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: str, *, newlines: bool = True) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes, carriage returns; newlines
    too unless ``newlines=False``) shown as ``\\xNN``, so a name from a file can neither move the
    cursor nor split a one-line message."""
    pat = _CONTROL_ALL if newlines else _CONTROL
    return pat.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[escape(c) if isinstance(c, str) else c for c in row] for row in rows]
    from tabulate import tabulate  # (tables only: JSON output does without it)

    return tabulate(cells, headers=headers, tablefmt="simple", disable_numparse=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 group``, ``2 groups``, ``0 entries`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _shape(s: list[int] | None) -> str:
    return "(" + ", ".join(map(str, s)) + ")" if s is not None else "-"


_MAX_ROWS = 40


def render_inspect(r: dict[str, Any], *, stats: bool = False) -> str:
    out: list[str] = []
    saved = f"  (saved on: {', '.join(r['saved_on'])})" if r["saved_on"] else ""
    out.append(f"{r['path']}: layout {r['layout']}{saved}")
    if r.get("earlier_versions"):
        n = r["earlier_versions"]
        out.append(f"{plural(n, 'earlier version')} kept inside by in-place edits "
                   f"(`optckpt restore {r['path']}` goes back one)")
    if len(r["parts"]) > 1:
        out.append("")
        out.append(table([[p["file"], p["kind"], human_bytes(p["bytes"])] for p in r["parts"]],
                         ["file", "kind", "size"]))
    for m in r["models"]:
        out.append("")
        dt = ", ".join(f"{k}×{v}" for k, v in m["dtypes"].items())
        order = "registration order" if m["order_trusted"] else "sorted by name: not the registration order"
        size = human_bytes(m["bytes"])
        out.append(f"model {m['name']}: {plural(m['num_tensors'], 'tensor')}, {size} ({dt}); {order}")
        rows = []
        for t in m["tensors"][:_MAX_ROWS]:
            row = [t["name"], _shape(t["shape"]), t["dtype"], human_bytes(t["bytes"])]
            if "tied_to" in t:
                row[0] += f"  (tied to {t['tied_to']})"
            if stats:
                s = t["stats"]
                row += [_fmt(s["min"]), _fmt(s["max"]), _fmt(s["mean"]), _fmt(s["norm"]), s["nan"], s["inf"]]
            rows.append(row)
        headers = ["tensor", "shape", "dtype", "size"] + (["min", "max", "mean", "norm", "nan", "inf"] if stats else [])
        out.append(table(rows, headers))
        if len(m["tensors"]) > _MAX_ROWS:
            out.append(f"... {len(m['tensors']) - _MAX_ROWS} more (use --format json for all)")
    for o in r["optimizers"]:
        out.append("")
        step = f", step {_fmt(o['step'][0])}..{_fmt(o['step'][1])}" if o["step"] else ""
        names = "param_names saved" if o["has_param_names"] else (
            "keyed by parameter name (DCP)" if o["name_evidence"] == "fqn" else
            "named by DeepSpeed's param_shapes (ZeRO partitions cut back per parameter)"
            if o["name_evidence"] == "deepspeed" else "no param_names (index-based)")
        names += f"; names from: {o['name_evidence']}"
        if o["name_source_model"]:
            names += f" of {o['name_source_model']}"
        if o["ambiguous"]:
            names += f", {o['ambiguous']} ambiguous"
        out.append(
            f"optimizer {o['name']}: {o['class']}, {plural(o['num_params'], 'param')} in "
            f"{plural(len(o['groups']), 'group')}, {o['num_with_state']} with state{step}; {names}"
        )
        keys = ", ".join(f"{k}×{v}" for k, v in o["state_keys"].items()) or "none"
        out.append(f"  state keys: {keys}")
        grows = []
        for g in o["groups"][:_MAX_ROWS]:
            hp = ", ".join(f"{k}={_fmt(v)}" for k, v in g["hparams"].items() if k not in _QUIET_KEYS)
            grows.append([g["group"], g["size"], _fmt(g["next_lr"]), hp])
        out.append(table(grows, ["group", "params", "next-step lr", "hyperparameters"]))
        if len(o["groups"]) > _MAX_ROWS:
            out.append(f"... {len(o['groups']) - _MAX_ROWS} more groups (use --format json for all)")
        erows = []
        for e in o["entries"][:_MAX_ROWS]:
            st = ", ".join(f"{k}={_shape(v) if isinstance(v, list) else _fmt(v)}" for k, v in e["state"].items())
            label = e["inferred_name"] or e["param_name"]
            if label is None:
                c = e["candidates"]
                label = "? " + ("|".join(c[:3]) + ("|..." if len(c) > 3 else "") if c else "(unknown)")
            erows.append([e["index"], e["group"], label, st or "(no state)"])
        out.append(table(erows, ["index", "group", "parameter", "state"]))
        if len(o["entries"]) > _MAX_ROWS:
            out.append(f"... {len(o['entries']) - _MAX_ROWS} more (use --format json for all)")
        if stats:
            out.append(_state_stats_table(o["entries"]))
        for n in o["notes"]:
            out.append(f"  note: {n}")
        if o["orphan_state_indices"]:
            out.append(f"  warning: state for indices in no param group: {o['orphan_state_indices']}")
        if o.get("nonfinite_state_values"):
            out.append(f"  warning: {o['nonfinite_state_values']} NaN/Inf values in optimizer state")
    for s in r["schedulers"]:
        out.append("")
        out.append(
            f"scheduler {s['name']}: {s['type']}, last_epoch {s['last_epoch']}, "
            f"base_lrs {_fmt(s['base_lrs'])}, last lr {_fmt(s['last_lr'])}"
        )
        for c in s.get("children", []):
            out.append(f"  child {c['type']}, last_epoch {c['last_epoch']}")
    if r["extras"]:
        out.append("")
        out.append("extras: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["extras"].items()))
    if r["other_keys"]:
        out.append("other keys: " + ", ".join(f"{k} ({v})" for k, v in r["other_keys"].items()))
    for obj in r.get("objects", []):
        out.append("")
        what = {"model": "pickled model object", "call": "pickled call", "object": "pickled object"}[obj["kind"]]
        n = f", {len(obj['fields'])} fields" if obj["fields"] is not None else ""
        out.append(f"{obj['key']}: {what} {obj['type']}{n} (read as data; nothing imported or run)")
        if obj["fields"]:
            frows = [[k, _fmt(v)] for k, v in list(obj["fields"].items())[:_MAX_ROWS]]
            out.append(table(frows, ["field", "value"]))
            if len(obj["fields"]) > _MAX_ROWS:
                out.append(f"... {len(obj['fields']) - _MAX_ROWS} more (use --format json for all)")
        elif obj["kind"] == "call":
            out.append(f"  {obj['summary']}")
    for o in r["opaque"]:
        glob = f"; needs {', '.join(o['unsafe_globals'])}" if o["unsafe_globals"] else ""
        out.append(f"opaque part {o['file']} ({human_bytes(o['bytes'])}): {o['reason']}{glob}; kept byte-for-byte")
    return "\n".join(out)


def _state_stats_table(entries: list[dict[str, Any]]) -> str:
    """``--stats`` for optimizer state: one row per state tensor (exp_avg, momentum_buffer, ...)."""
    rows = []
    for e in entries:
        label = e["inferred_name"] or e["param_name"] or f"<index {e['index']}>"
        for key, s in e.get("stats", {}).items():
            rows.append([e["index"], label, key, _fmt(s["min"]), _fmt(s["max"]), _fmt(s["mean"]), _fmt(s["norm"]),
                         s["nan"], s["inf"]])
    if not rows:
        return "  (no optimizer state tensors)"
    shown = table(rows[:_MAX_ROWS], ["index", "parameter", "state", "min", "max", "mean", "norm", "nan", "inf"])
    more = f"\n... {len(rows) - _MAX_ROWS} more (use --format json for all)" if len(rows) > _MAX_ROWS else ""
    return shown + more


# group keys that are torch implementation switches, not hyperparameters: hidden from the table
_QUIET_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable", "maximize"})


# what each status means for a plain optimizer.load_state_dict (the prediction `check` makes)
_STATUS_TEXT = {
    "ok": "ok",
    "moved": "moved",
    "missing": "missing (new: no saved state)",
    "unexpected": "unexpected (gone: its saved state has no parameter)",
    "shape_mismatch": "shape mismatch",
    "ambiguous": "ambiguous",
}


_VERDICT_TEXT = {
    "safe": "SAFE: plain optimizer.load_state_dict is exactly right",
    "load_fails": "NOT SAFE: plain optimizer.load_state_dict raises (the param groups differ)",
    "would_misapply": "NOT SAFE: plain optimizer.load_state_dict would misapply optimizer state",
    "cannot_prove_safe": "CANNOT PROVE SAFE: some names are uncertain (nothing proven wrong)",
}


def render_check(r: dict[str, Any]) -> str:
    out = []
    if r["evidence"] == "fqn":
        verdict = "SAFE: loading by name restores every parameter's state" if r["safe"] else (
            "NOT SAFE: some parameters are new, gone or reshaped")
    else:
        verdict = _VERDICT_TEXT[r["verdict"]]
    evidence = "target shapes: named by shape only" if r["evidence"] == "target-shapes" else r["evidence"]
    out.append(f"optimizer {r['optimizer']} (names from: {evidence}): {verdict}")
    counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items() if v)
    out.append(f"  {counts}")
    by = r.get("evidence_counts", {})
    if len(by) > 1:
        out.append("  named by: " + ", ".join(f"{k} {v}" for k, v in by.items()))
    g = r["groups"]
    if g["load_would_fail"]:
        out.append(f"  param groups: checkpoint {g['source']} vs target {g['target']}: "
                   "load_state_dict raises ValueError")
    rows = []
    raises = r["verdict"] == "load_fails" and r["evidence"] != "fqn"  # nothing lands: no row can crash or misapply
    for p in r["params"]:
        if p["status"] == "ok":
            continue
        what = _STATUS_TEXT[p["status"]]
        if raises:
            pass
        elif p["crash"]:
            what += ": CRASH (plain load pairs it with state of another shape)"
        elif p["status"] in ("moved", "missing") and p["silent"]:
            what += ": SILENT (plain load gives it another parameter's state; shapes coincide)"
        elif p.get("risk") == "misapplied" and (p["status"] == "missing" or (
                p["status"] == "moved" and p.get("has_state", True))):  # (a missing one receives another's)
            what += (": plain load gives it another parameter's state" if p["status"] == "missing" else
                     ": plain load misapplies its state") + " (shapes unknown: at the first step or silently)"
        elif p["status"] in ("moved", "ambiguous") and not p.get("has_state", True):
            what += ": no state" + (", harmless" if p.get("risk") == "none" else (
                ", lands in a group with other hyperparameters" if p.get("risk") == "misapplied" else
                ", its group's hyperparameters may differ"))
        if p["status"] == "ambiguous":
            what += ": " + ", ".join(p.get("candidates", [])[:4]) + (" ..." if len(p.get("candidates", [])) > 4 else "")
        src = "-" if p["source_index"] is None else str(p["source_index"])
        tgt = "-" if p["target_index"] is None else str(p["target_index"])
        rows.append([p["name"], f"{src} -> {tgt}", _shape(p["shape"]), p.get("evidence") or "-", what])
    if rows:
        out.append(table(rows[:_MAX_ROWS], ["parameter", "index: checkpoint -> target", "shape", "named by", "status"]))
        if len(rows) > _MAX_ROWS:
            out.append(f"... {len(rows) - _MAX_ROWS} more (use --format json for all)")
    ok = r["counts"].get("ok", 0)
    if ok:
        out.append(f"({plural(ok, 'parameter')} ok)")
    if raises and rows:
        out.append("(plain load_state_dict raises before any state lands; the rows say what changed by name)")
    for n in r["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)


def first_rows(rows: list[Any], verbose: bool) -> tuple[list[Any], str | None]:
    """All rows with ``verbose``, else the first ``_MAX_ROWS`` and a line naming how many are left."""
    if verbose or len(rows) <= _MAX_ROWS:
        return rows, None
    return rows[:_MAX_ROWS], f"... {len(rows) - _MAX_ROWS} more (use --verbose or --format json for all)"


def render_plan(r: dict[str, Any], *, verbose: bool = False) -> str:
    """The plan's counts, then its changed rows (the first ``_MAX_ROWS`` unless ``verbose``)."""
    s = r["summary"]
    out = [f"optimizer {r['optimizer']} (names from: {r['evidence']}): keep {s['keep']}, move {s['move']}, "
           f"reset {s['reset']}, drop {s['drop']}"]
    by = r.get("evidence_counts", {})
    if len(by) > 1:
        out.append("named by: " + ", ".join(f"{k} {v}" for k, v in by.items()))
    rows = [[x["target_index"], x["group"], x["name"],
             "-" if x["source_index"] is None else x["source_index"], x["action"]]
            for x in r["slots"] if x["action"] != "keep"]
    rows += [["-", "-", d["name"], d["source_index"], "drop"] for d in r["dropped"]]
    if rows:
        shown, more = first_rows(rows, verbose)
        out.append(table(shown, ["new index", "group", "parameter", "old index", "action"]))
        if more:
            out.append(more)
    groups, more = first_rows(r["groups"], verbose)
    for g in groups:
        origin = f"old group {g['hparams_from_group']}" if g["hparams_from_group"] is not None else "new"
        out.append(f"group {g['group']}: {plural(g['size'], 'param')}, hyperparameters from {origin}")
    if more:
        out.append(more.replace(" more ", " more groups ", 1))
    for n in r["notes"]:
        out.append(f"note: {n}")
    out.append(f"written: {r['written']}" if r.get("written") else "dry run: nothing written")
    return "\n".join(out)


def render_set(r: dict[str, Any]) -> str:
    """Old -> new for every group value and every scheduler value ``set`` changed."""
    groups = r["groups"]
    out = [f"optimizer {r['optimizer']}: {'group' if len(groups) == 1 else 'groups'} {', '.join(map(str, groups))}"]
    rows = [[gi, k, _fmt(b[k]), _fmt(a[k])] for gi, b, a in zip(groups, r["before"], r["after"])
            for k in a if repr(a[k]) != repr(b.get(k))]
    out.append(table(rows, ["group", "key", "before", "after"]) if rows else "(no group value changes)")
    srows = [[c["scheduler"], c["key"], _fmt(c["before"]), _fmt(c["after"])] for c in r["schedulers"]]
    if srows:
        out.append("")
        out.append(table(srows, ["scheduler", "key", "before", "after"]))
    for n in r["notes"]:
        out.append(f"note: {n}")
    out.append(f"written: {r['written']}" if r["written"] else "dry run: nothing written")
    return "\n".join(out)


def render_diff(r: dict[str, Any], *, fmt: str = "table", limit: int | None = None) -> str:
    """Summary first (counts per section and status, the biggest changes), then the details sorted
    by magnitude; ``limit`` caps the detail rows."""
    from tabulate import tabulate

    tablefmt = "github" if fmt == "markdown" else "simple"
    entries = r["entries"]
    out = [f"{r['a']}  vs  {r['b']}: " + ("IDENTICAL" if r["identical"] else plural(len(entries), "difference"))]
    compared = ", ".join(f"{k} {v}" for k, v in r["compared"].items())
    if compared:
        out.append(f"compared: {compared}")
    if entries:
        counts: dict[tuple[str, str], int] = {}
        for e in entries:
            counts[(e["section"], e["status"])] = counts.get((e["section"], e["status"]), 0) + 1
        out.append("")
        out.append(tabulate([[s, st, n] for (s, st), n in counts.items()], headers=["section", "status", "count"],
                            tablefmt=tablefmt, disable_numparse=True))

        def mag(e: dict[str, Any]) -> float:
            if e["status"] in ("added", "removed", "shape_changed", "dtype_changed", "renamed"):
                return float("inf")
            return e["max_abs_diff"] if isinstance(e["max_abs_diff"], (int, float)) else 0.0

        rows = []
        shown = sorted(entries, key=mag, reverse=True)
        for e in shown[: limit if limit else None]:
            detail = ""
            if e["status"] == "renamed":
                detail = f"from {e['renamed_from']}"
            elif e["a"] is not None or e["b"] is not None:
                detail = f"{_fmt(e['a'])} -> {_fmt(e['b'])}"
            if e["max_abs_diff"] is not None and e["rel_l2"] is not None:
                detail = (detail + " " if detail else "") + \
                    f"max|d| {_fmt(e['max_abs_diff'])}, rel_l2 {_fmt(e['rel_l2'])}"
            if e.get("stats"):
                s = e["stats"]
                detail += f", cos {_fmt(s['cosine'])}, {s['changed_elements']}/{s['numel']} changed"
            rows.append([e["section"], e["name"], e["key"] or "", e["status"], detail])
        out.append("")
        out.append(tabulate(rows, headers=["section", "name", "key", "status", "detail"], tablefmt=tablefmt,
                            disable_numparse=True))
        if limit and len(entries) > limit:
            out.append(f"... {len(entries) - limit} more (--limit)")
    for n in r.get("notes", []):
        out.append(f"note: {n}")
    return "\n".join(out)
