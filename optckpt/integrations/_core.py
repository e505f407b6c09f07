"""The mechanism every integration shares: a by-name load behind the library's own
``optimizer.load_state_dict(sd)``, and ``param_names`` in every state dict saved from then on."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..check import apply_renames
from ..checkpoint import Checkpoint, ModelState, OptimizerState
from ..errors import MappingError, TargetError
from ..resume import LoadReport, enable_load_by_name, load_optimizer_state_dict
from ..target import from_live, renames_of

__all__ = ["Evidence", "ByName", "attach", "load_by_name", "load_options", "owner_of", "log_report",
           "rename_model_keys"]


@dataclass
class Evidence:
    """What a library's checkpoint tells about the order its optimizer saw, for state dicts saved
    without ``param_names``: the old model's state dict (registration order) and/or model states
    such as the ``config.json`` rebuild of a Hugging Face directory."""

    where: str = "<state dict>"
    model_state_dict: Mapping[str, torch.Tensor] | None = None
    models: list[ModelState] = field(default_factory=list)
    hint: str = ""  # how the user can give the missing evidence (ends the ambiguity error)


class Logger(Protocol):
    """The library's logger (a ``logging.Logger`` or one of the libraries' adapters)."""

    def log(self, level: int, msg: str) -> Any: ...


def load_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None, source: Any, *,
                 allow_ambiguous: bool, hint: str = "", **kwargs: Any) -> LoadReport:
    """:func:`optckpt.load_optimizer_state_dict` under its ambiguity contract (MappingError, nothing
    loaded, unless ``allow_ambiguous``), with the library-specific ``hint`` on how to give the
    missing evidence appended to the error."""
    try:
        return load_optimizer_state_dict(optimizer, model, source, allow_ambiguous=allow_ambiguous, **kwargs)
    except MappingError as e:
        if not hint:
            raise
        raise MappingError(f"{e}{hint}") from None


def log_report(logger: Logger, label: str, report: LoadReport) -> None:
    """One line per load, as ``load_state_dict`` reports its keys: INFO when clean, WARNING otherwise."""
    parts = [f"{len(report.moved)} moved"]
    for key in ("missing", "unexpected", "shape_mismatch", "ambiguous"):
        names: list[str] = getattr(report, key)
        if names:
            parts.append(f"{key} {names[:10]}" + (f" (+{len(names) - 10} more)" if len(names) > 10 else ""))
    logger.log(logging.INFO if report.clean else logging.WARNING,
               f"optckpt: {label} loaded by name (evidence: {report.evidence}): {', '.join(parts)}")


class ByName:
    """A load pre-hook: the state dict the library is loading goes in by name, and the library's own
    load then restores exactly that (the hook hands it the result in the live optimizer's order)."""

    def __init__(self, model: torch.nn.Module, evidence: Callable[[], Evidence], label: str,
                 logger: Logger, allow_ambiguous: bool, options: Mapping[str, Any] | None = None):
        self.model = model
        self.evidence = evidence
        self.label = label
        self.logger = logger
        self.allow_ambiguous = allow_ambiguous
        self.options = dict(options or {})  # rename / fuse / split / shape_mismatch, as the API takes them
        self.report: LoadReport | None = None  # of the last load
        self._inner = False

    def __call__(self, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        if self._inner:
            # load_optimizer_state_dict's own load_state_dict: sd is in this optimizer's order already;
            # name it so that enable_load_by_name's hook (which refuses unnamed state) passes it through
            live = from_live(self.model, optimizer).groups
            sd["param_groups"] = [g if "param_names" in g else {**g, "param_names": names}
                                  for g, names in zip(sd["param_groups"], live)]
            return sd
        named = all("param_names" in g for g in sd.get("param_groups", []))
        if named and not self.options and \
                [list(g["param_names"]) for g in sd["param_groups"]] == from_live(self.model, optimizer).groups:
            # saved in exactly this order (a library reloading the optimizer's own state, as
            # accelerate's prepare does): torch's positional load is the by-name load
            self.report = LoadReport(evidence="param_names")
            self.logger.log(logging.DEBUG, f"optckpt: {self.label}: saved in the live order (param_names); plain load")
            return sd
        ev = Evidence() if named else self.evidence()
        source: Any = sd
        if ev.models:
            source = Checkpoint(path=ev.where, layout="torch-optimizer", models=list(ev.models),
                                optimizers=[OptimizerState("optimizer", ev.where, (), sd)])
        self._inner = True
        try:
            report = load_by_name(optimizer, self.model, source, allow_ambiguous=self.allow_ambiguous, hint=ev.hint,
                                  model_state_dict=None if named else ev.model_state_dict, **self.options)
        finally:
            self._inner = False
        self.report = report
        log_report(self.logger, self.label, report)
        return optimizer.state_dict()


_ATTACHED: weakref.WeakKeyDictionary[torch.optim.Optimizer, ByName] = weakref.WeakKeyDictionary()


def attach(optimizer: torch.optim.Optimizer, model: torch.nn.Module, evidence: Callable[[], Evidence], *,
           label: str, logger: Logger, allow_ambiguous: bool, options: Mapping[str, Any] | None = None) -> ByName:
    """Make ``optimizer`` save ``param_names`` and load by name; once per optimizer (a second call
    updates the settings). ``options``: ``rename`` / ``fuse`` / ``split`` / ``shape_mismatch``, as
    :func:`optckpt.load_optimizer_state_dict` takes them."""
    hook = _ATTACHED.get(optimizer)
    if hook is None:
        enable_load_by_name(optimizer, model)
        hook = ByName(model, evidence, label, logger, allow_ambiguous, options)
        optimizer.register_load_state_dict_pre_hook(hook, prepend=True)  # before enable_load_by_name's
        _ATTACHED[optimizer] = hook
    hook.evidence, hook.label, hook.logger, hook.allow_ambiguous = evidence, label, logger, allow_ambiguous
    hook.options = dict(options or {})
    return hook


def load_options(rename: Sequence[str] | Mapping[str, str] = (), fuse: Sequence[str] = (), split: Sequence[str] = (),
                 shape_mismatch: str = "reset") -> dict[str, Any]:
    """The options every integration takes, checked now (a bad ``--rename`` string fails at setup,
    not at the resume), as keywords of :func:`optckpt.load_optimizer_state_dict`."""
    from ..transforms import parse_transforms

    renames_of(rename)
    parse_transforms(fuse, split)
    if shape_mismatch not in ("reset", "error", "slice"):
        raise TargetError(f"shape_mismatch={shape_mismatch!r}: expected 'reset', 'error' or 'slice'")
    out: dict[str, Any] = {}
    if rename:
        out["rename"] = rename
    if fuse:
        out["fuse"] = list(fuse)
    if split:
        out["split"] = list(split)
    if shape_mismatch != "reset":
        out["shape_mismatch"] = shape_mismatch
    return out


def rename_model_keys(model: torch.nn.Module, rename: Sequence[str] | Mapping[str, str]) -> None:
    """Rename the keys of any state dict loaded into ``model`` (the library's own model load) with the
    same rules as the optimizer state: a renamed submodule's weights reach it. Once per model."""
    rules = renames_of(rename)
    if not rules and not hasattr(model, "_optckpt_renames"):
        return
    first = not hasattr(model, "_optckpt_renames")
    model._optckpt_renames = rules  # type: ignore[assignment]  # the latest rules (a second call updates them)
    if not first:
        return

    def hook(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix:
            return
        current = getattr(module, "_optckpt_renames", [])
        for key in list(state_dict):
            new = apply_renames(key, current)
            if new != key and new not in state_dict:
                state_dict[new] = state_dict.pop(key)

    model.register_load_state_dict_pre_hook(hook)


def owner_of(optimizer: torch.optim.Optimizer, models: list[torch.nn.Module], label: str) -> torch.nn.Module:
    """The model that holds every parameter ``optimizer`` updates (its names are the ones saved)."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for m in models:
        if ids <= {id(p) for p in m.parameters()}:
            return m
    raise TargetError(f"{label}: no model holds all the parameters it updates; prepare the model that owns them")
