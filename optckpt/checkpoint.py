"""The in-memory picture of a checkpoint: plain dataclasses, no I/O.

A :class:`Checkpoint` is what :func:`optckpt.load` returns. It keeps the loaded objects of every
file (``parts``) so that a writer can put edited state back in the same layout, plus *views* into
them: the model state dicts, optimizer state dicts and scheduler state dicts found inside, each
with its location (the file it came from and the key path inside that file's object).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


__all__ = [
    "KeyPath",
    "path_str",
    "TensorMeta",
    "ModelState",
    "ParamGroup",
    "OptimizerState",
    "SchedulerState",
    "OpaquePart",
    "Part",
    "Checkpoint",
]

KeyPath = tuple[Any, ...]
"""Location of an object inside a loaded file: dict keys and list/tuple indices, outermost first."""


def path_str(path: KeyPath) -> str:
    """Render a key path the way users write it: ``optimizer_states[0]``, ``[0][10]``, ``a.b``."""
    out = ""
    for k in path:
        if isinstance(k, int):
            out += f"[{k}]"
        else:
            out += ("." if out else "") + str(k)
    return out


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and size of a tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())

    @property
    def is_floating(self) -> bool:
        return self.dtype in _FLOATING




_FLOATING = frozenset({"float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128",
                       "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"})


def _short(items: object, limit: int = 3) -> str:
    """The first few names of a collection, then how many more."""
    names = list(items)  # type: ignore[call-overload]
    head = ", ".join(map(str, names[:limit]))
    return head + (f", ... +{len(names) - limit}" if len(names) > limit else "")


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass(repr=False)
class ModelState:
    """A model state dict found in the checkpoint.

    ``tensors`` may be lazy (safetensors): index it only when data is needed; ``meta`` has every
    entry's shape/dtype in file order. ``order_trusted`` says whether that order is the model's
    registration order (pickled ``state_dict()``: yes; safetensors, sharded index: no — sorted by name),
    which is what name inference by order needs. ``tied`` maps a later name to the first name that
    shares its storage (tied weights appear once in ``named_parameters()``)."""

    name: str
    part: str
    path: KeyPath
    tensors: Mapping[str, torch.Tensor]
    meta: dict[str, TensorMeta]
    order_trusted: bool
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.meta.values())

    def __repr__(self) -> str:
        order = "" if self.order_trusted else ", order not trusted"
        return f"<ModelState {self.name!r}: {_n(len(self.meta), 'tensor')} [{_short(self.meta)}]{order}>"


@dataclass(frozen=True)
class ParamGroup:
    """One entry of ``param_groups``: its optimizer indices and every other key (hyperparameters)."""

    position: int
    params: tuple[int, ...]
    hparams: dict[str, Any]
    param_names: tuple[str, ...] | None


@dataclass(repr=False)
class OptimizerState:
    """An optimizer state dict (``{"state": {index: {...}}, "param_groups": [...]}``) as torch wrote it."""

    name: str
    part: str
    path: KeyPath
    state_dict: dict[str, Any]
    # set when the optimizer's own state_dict() wraps torch's layout with per-parameter data beside
    # it (pytorch-optimizer's Magma: {"base": {...}, "magma_state": {(group, position): ...}}): why
    overridden: str | None = None

    @property
    def state(self) -> dict[Any, dict[str, Any]]:
        st = self.state_dict.get("state", {})
        return st if isinstance(st, dict) else {}

    @property
    def groups(self) -> list[ParamGroup]:
        """The param groups as values (rebuilt when ``state_dict`` is replaced)."""
        cached = self.__dict__.get("_groups")
        if cached is not None and cached[0] is self.state_dict.get("param_groups"):
            return cached[1]
        out = []
        for i, g in enumerate(self.state_dict.get("param_groups", [])):
            names = g.get("param_names")
            out.append(
                ParamGroup(
                    position=i,
                    params=tuple(g.get("params", ())),
                    hparams={k: v for k, v in g.items() if k not in ("params", "param_names")},
                    param_names=tuple(names) if names is not None else None,
                )
            )
        self.__dict__["_groups"] = (self.state_dict.get("param_groups"), out)
        return out

    @property
    def num_params(self) -> int:
        return sum(len(g.params) for g in self.groups)

    def __repr__(self) -> str:
        groups = self.state_dict.get("param_groups", [])
        n = sum(len(g.get("params", ())) for g in groups if isinstance(g, Mapping))
        return (f"<OptimizerState {self.name!r}: {_n(n, 'param')} in {_n(len(groups), 'group')}, "
                f"{len(self.state)} with state>")


@dataclass(repr=False)
class SchedulerState:
    """An LR scheduler state dict."""

    name: str
    part: str
    path: KeyPath
    state_dict: dict[str, Any]

    def __repr__(self) -> str:
        return f"<SchedulerState {self.name!r}: last_epoch {self.state_dict.get('last_epoch')!r}>"


@dataclass(frozen=True)
class OpaquePart:
    """A file (or object) optckpt keeps but does not interpret: never executed, copied byte-for-byte."""

    part: str
    nbytes: int
    reason: str
    unsafe_globals: tuple[str, ...] = ()


@dataclass(repr=False)
class Part:
    """One file of the checkpoint (a single-file checkpoint has one part, named by its file name)."""

    relpath: str
    kind: str  # "torch" | "safetensors" | "json" | "opaque" | "other"
    nbytes: int
    obj: Any = None
    saved_locations: tuple[str, ...] = ()
    zip_format: bool = True

    def __repr__(self) -> str:
        return f"<Part {self.relpath!r}: {self.kind}, {self.nbytes} bytes>"


@dataclass(repr=False)
class Checkpoint:
    """Everything optckpt knows about a checkpoint, file or directory."""

    path: str
    layout: str
    parts: list[Part] = field(default_factory=list)
    models: list[ModelState] = field(default_factory=list)
    optimizers: list[OptimizerState] = field(default_factory=list)
    schedulers: list[SchedulerState] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    opaque: list[OpaquePart] = field(default_factory=list)
    other_keys: dict[str, str] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    """Pickled objects at the top level (``args``: an ``argparse.Namespace``), read as inert
    placeholders (:class:`optckpt.io.safepickle.PickledObject`), by key."""
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        found = [_n(len(v), k) for k, v in (("model", self.models), ("optimizer", self.optimizers),
                                             ("scheduler", self.schedulers), ("opaque part", self.opaque)) if v]
        return (f"<Checkpoint {self.path!r}: {self.layout}, {', '.join(found) or 'nothing found'}"
                + (f"; extras {_short(self.extras)}" if self.extras else "") + ">")

    @property
    def saved_locations(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for p in self.parts:
            for loc in p.saved_locations:
                seen[loc] = None
        return tuple(seen)

    def optimizer(self, key: str | None = None) -> OptimizerState:
        """The optimizer named ``key`` (its name/path), or the only one."""
        from .errors import FormatError

        if key is None:
            if len(self.optimizers) == 1:
                return self.optimizers[0]
            if not self.optimizers:
                raise FormatError(f"{self.path}: no optimizer state found in this checkpoint")
            names = ", ".join(o.name for o in self.optimizers)
            raise FormatError(f"{self.path}: several optimizers ({names}); pick one with --optimizer NAME")
        for o in self.optimizers:
            if o.name == key or path_str(o.path) == key:
                return o
        names = ", ".join(o.name for o in self.optimizers) or "none"
        raise FormatError(f"{self.path}: no optimizer named {key!r} (found: {names})")
