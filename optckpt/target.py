"""Resolve ``--target`` / ``--source`` specs: what parameters, in what optimizer order, the code has.

A spec is one of:

* ``module:callable`` or ``path/to/file.py:callable`` — imported with the current directory on
  ``sys.path``; the callable returns an ``nn.Module``, ``(module, optimizer)`` or
  ``(module, optimizer, scheduler)``. Without an optimizer the order is one group over
  ``module.parameters()``, exactly what ``torch.optim.X(model.parameters())`` would see;
* a ``.json`` file (a list of names, or a list of lists: one per param group) or a ``.txt`` file
  (one name per line) — names only, shapes unknown;
* a checkpoint written by the new code — names from its optimizer mapping, shapes from its model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import OptckptError, TargetError
from .io.jsonfile import loads as loads_json
from .mapping import SourceNames

if TYPE_CHECKING:
    import torch

__all__ = ["Target", "resolve_target", "resolve_source", "from_live", "RenameRule", "parse_rename", "renames_of"]


@dataclass
class Target:
    """Parameter names per param group, in optimizer order, with shapes where known."""

    spec: str
    groups: list[list[str]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # other names of a tied parameter -> its name here
    module: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    group_hparams: list[dict[str, Any]] | None = None

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g]


def _optimizer_only(optimizer: torch.optim.Optimizer, scheduler: Any, spec: str) -> Target:
    """Bare parameters (no module): names from ``param_names`` or single-parameter groups' ``name``."""
    groups: list[list[str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for gi, g in enumerate(optimizer.param_groups):
        names = g.get("param_names")
        if names is None and len(g["params"]) == 1 and isinstance(g.get("name"), str):
            names = [g["name"]]
        if names is None:
            raise TargetError(f"{spec}: param group {gi} has no parameter names: return the module too, "
                              "build the optimizer from named_parameters(), or give single-parameter groups a 'name'")
        groups.append(list(names))
        shapes.update({n: tuple(p.shape) for n, p in zip(names, g["params"])})
    hparams = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
    return Target(spec, groups, shapes, {}, None, optimizer, scheduler, hparams)


def from_live(module: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
              spec: str = "<live>") -> Target:
    """A target from live objects: names by parameter identity (tied parameters: first name).

    Without a module (3D Gaussian Splatting keeps bare tensors) the names come from the optimizer."""
    if module is None:
        if optimizer is None:
            raise TargetError(f"{spec}: needs a module, an optimizer, or both")
        return _optimizer_only(optimizer, scheduler, spec)
    names_by_id: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        first = names_by_id.setdefault(id(p), name)
        if first != name:
            aliases[name] = first
        shapes[name] = tuple(p.shape)
    if optimizer is None:
        groups = [[names_by_id[id(p)] for p in module.parameters()]]
        return Target(spec, groups, shapes, aliases, module, None, scheduler)
    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        row = []
        for pi, p in enumerate(g["params"]):
            if id(p) not in names_by_id:
                saved = g.get("param_names")
                if saved is not None:
                    row.append(saved[pi])
                    shapes[saved[pi]] = tuple(p.shape)
                    continue
                raise TargetError(
                    f"{spec}: param group {gi} holds a parameter of shape {tuple(p.shape)} that is not in the "
                    "module's named_parameters(); return the module that owns every optimized parameter"
                )
            row.append(names_by_id[id(p)])
        groups.append(row)
    hparams = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
    return Target(spec, groups, shapes, aliases, module, optimizer, scheduler, hparams)


def is_code(spec: str) -> bool:
    """Whether ``spec`` names the user's code (``module:callable``, ``file.py:callable``: imported and
    run, with torch), not a names file or a checkpoint (read as data)."""
    return not os.path.exists(spec) or spec.endswith(".py")


def resolve_target(spec: str, *, trust_pickle: bool = False) -> Target:
    """Turn a ``--target`` / ``--source`` string into a :class:`Target`."""
    if os.path.isfile(spec) and spec.endswith((".json", ".txt")):
        return _names_file(spec)
    if not is_code(spec):
        return _from_checkpoint(spec, trust_pickle)
    if ":" in spec:
        return _from_callable(spec)
    raise TargetError(
        f"{spec!r}: not a names file (.json/.txt), a checkpoint, or module:callable / file.py:callable"
    )


def resolve_source(spec: str, *, trust_pickle: bool = False, fallback: Target | None = None) -> SourceNames:
    """Turn ``--source`` (the OLD code) into the claim :func:`optckpt.mapping.infer_mapping` checks.

    A module without its optimizer gives its parameter order only (``ordered=False``): how the old
    optimizer grouped those parameters is then learned from the checkpoint, never assumed.
    ``fallback`` (the target) supplies shapes for names the source gives none (a names file)."""
    t = resolve_target(spec, trust_pickle=trust_pickle)
    model_only = t.optimizer is None and t.group_hparams is None and t.module is not None
    return SourceNames(spec, [list(g) for g in t.groups], dict(t.shapes), ordered=not model_only,
                       fallback_shapes=dict(fallback.shapes) if fallback is not None else {})


def _names_file(path: str) -> Target:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TargetError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.endswith(".txt"):
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        return Target(path, _checked_names(path, [names]))
    try:
        data = loads_json(text)
    except ValueError as e:
        raise TargetError(f"{path}: invalid JSON ({e})") from None
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return Target(path, _checked_names(path, [list(data)]))
    if isinstance(data, list) and all(isinstance(g, list) and all(isinstance(x, str) for x in g) for g in data):
        return Target(path, _checked_names(path, [list(g) for g in data]))
    raise TargetError(f"{path}: expected a JSON list of parameter names, or a list of lists (one per param group)")


# what named_parameters() yields: dot-separated, non-empty parts without whitespace (conv.weight, blocks.0.w)
_PARAM_NAME = re.compile(r"[^\s.]+(\.[^\s.]+)*")


def _checked_names(path: str, groups: list[list[str]]) -> list[list[str]]:
    """A names file must hold parameter names, each once: free text is refused, not read as names."""
    names = [n for g in groups for n in g]
    if not names:
        raise TargetError(f"{path}: no parameter names in this names file")
    bad = next((n for n in names if not _PARAM_NAME.fullmatch(n)), None)
    if bad is not None:
        raise TargetError(f"{path}: {bad[:60]!r} is not a parameter name: a names file holds names like "
                          "'conv.weight' (one per line in .txt, a JSON list in .json), in optimizer order")
    seen: set[str] = set()
    dupe = next((n for n in names if n in seen or seen.add(n)), None)  # type: ignore[func-returns-value]
    if dupe is not None:
        raise TargetError(f"{path}: {dupe!r} appears twice: each parameter has one optimizer index")
    return groups


def _from_checkpoint(path: str, trust_pickle: bool) -> Target:
    from .io import load
    from .mapping import infer_mapping

    ck = load(path, trust_pickle=trust_pickle, lazy=True)  # names, shapes and groups: no tensor values
    shapes: dict[str, tuple[int, ...]] = {}
    for m in ck.models:
        for name, meta in m.meta.items():
            shapes.setdefault(name, meta.shape)
    if not ck.optimizers:
        if not ck.models or not ck.models[0].order_trusted:
            raise TargetError(f"{path}: a target checkpoint needs an optimizer, or a model saved in registration order")
        m = ck.models[0]
        names = [n for n, meta in m.meta.items() if n not in m.tied and meta.is_floating]
        return Target(path, [names], shapes)
    mapping = infer_mapping(ck)
    if mapping.ambiguous:
        bad = mapping.ambiguous[0]
        raise TargetError(
            f"{path}: the target checkpoint's own names are uncertain (index {bad.index}: "
            f"{', '.join(bad.candidates[:4]) or 'no candidate'}); give the target as code or a names file"
        )
    groups: list[list[str]] = [[] for _ in ck.optimizer().groups]
    for e in mapping.entries:
        groups[e.group].append(e.name or "")
        if e.shape is not None and e.name:
            shapes.setdefault(e.name, e.shape)
    return Target(path, groups, shapes)


def _run_user_code(spec: str) -> Any:
    """Import the module a spec names and call its callable; what it returns."""
    mod_part, _, attr = spec.rpartition(":")
    if not mod_part or not attr:
        raise TargetError(f"{spec!r}: expected module:callable or path/to/file.py:callable")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if mod_part.endswith(".py") or os.sep in mod_part:
            if not os.path.isfile(mod_part):
                raise TargetError(f"{spec}: no such file {mod_part!r}")
            folder = os.path.dirname(os.path.abspath(mod_part))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            name = "_optckpt_target_" + re.sub(r"\W", "_", os.path.abspath(mod_part))
            loader_spec = importlib.util.spec_from_file_location(name, mod_part)
            if loader_spec is None or loader_spec.loader is None:
                raise TargetError(f"{spec}: cannot import {mod_part!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_part)
    except OptckptError:
        raise
    except Exception as e:
        raise TargetError(f"{spec}: importing {mod_part!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise TargetError(f"{spec}: {mod_part!r} has no callable {attr!r}")
    try:
        out = fn()
    except Exception as e:
        raise TargetError(f"{spec}: calling {attr}() failed: {type(e).__name__}: {e}") from None
    return out


def _from_callable(spec: str) -> Target:
    # User code runs with stdout pointed at stderr: whatever it prints or logs at import or call
    # time must never mix with a report (``--format json`` prints only JSON on stdout).
    import torch

    with contextlib.redirect_stdout(sys.stderr):
        out = _run_user_code(spec)
    attr = spec.rpartition(":")[2]
    parts = out if isinstance(out, tuple) else (out,)
    if parts and isinstance(parts[0], torch.optim.Optimizer):
        parts = (None, *parts)
    if not parts or not (parts[0] is None or isinstance(parts[0], torch.nn.Module)):
        raise TargetError(f"{spec}: {attr}() must return an nn.Module, (module, optimizer[, scheduler]) "
                          "or an optimizer whose groups carry names")
    module_obj = parts[0]
    opt = parts[1] if len(parts) > 1 else None
    if opt is not None and not isinstance(opt, torch.optim.Optimizer):
        raise TargetError(f"{spec}: the second value {attr}() returns must be a torch.optim.Optimizer")
    sched = parts[2] if len(parts) > 2 else None
    with contextlib.redirect_stdout(sys.stderr):
        return from_live(module_obj, opt, sched, spec=spec)


@dataclass(frozen=True)
class RenameRule:
    """``OLD=NEW``: replace the prefix OLD; ``re:PATTERN=REPL``: a regex substitution."""

    pattern: str
    repl: str
    regex: bool

    def apply(self, name: str) -> str:
        if self.regex:
            return re.sub(self.pattern, self.repl, name)
        return self.repl + name[len(self.pattern):] if name.startswith(self.pattern) else name


def renames_of(rename: Sequence[str] | Mapping[str, str] | None) -> list[RenameRule]:
    """The API's ``rename=``: ``--rename`` strings (``"head.=classifier."``, ``"re:PATTERN=REPL"``), or a
    mapping of old prefixes to new ones."""
    if not rename:
        return []
    if isinstance(rename, Mapping):
        return [RenameRule(str(old), str(new), False) for old, new in rename.items()]
    if isinstance(rename, str):
        raise TargetError(f"rename={rename!r}: give a list of 'OLD=NEW' strings or a mapping, not one string")
    return parse_rename(list(rename))


def parse_rename(rules: Sequence[str]) -> list[RenameRule]:
    out = []
    for r in rules:
        if "=" not in r:
            raise TargetError(f"--rename {r!r}: expected OLD=NEW (prefix) or re:PATTERN=REPL")
        old, new = r.split("=", 1)
        if old.startswith("re:"):
            try:
                re.compile(old[3:])
            except re.error as e:
                raise TargetError(f"--rename {r!r}: bad regex ({e})") from None
            out.append(RenameRule(old[3:], new, True))
        else:
            out.append(RenameRule(old, new, False))
    return out
