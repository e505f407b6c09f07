"""Whole pickled ``nn.Module`` objects (``torch.save(model)``; torchvision's references'
``{'model': <module>, ...}``, YOLO's ``model`` / ``ema``), rewritten for the new code.

Only reachable under ``--trust-pickle``: the loaded object is the real module, whose structure (its
``_modules`` / ``_parameters`` / ``_buffers``) is the old code's, pickled with it. Renaming keys of a
state dict is not enough here: the object would keep the old names and registration order. The
rewritten object is a copy of the new code's own module (the target's), given the repaired tensors
(in their saved dtype: fp16 in YOLO's files; tied parameters stay tied), the saved ``requires_grad``
flags and train / eval mode, and the old root object's own plain attributes (not tensors or modules:
YOLO's class ``names``, ``yaml``, ``args``...) that are not part of the new structure. Its ``state_dict()`` is then
the repaired state dict, by name and in the new order; what is written is verified that way."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, ModelState
from .errors import WriteError
from .tensors import is_torch_module

if TYPE_CHECKING:
    import torch

__all__ = ["module_at", "rebuild_module"]

_MODULE_MACHINERY = frozenset({"training"})


def module_at(ck: Checkpoint, m: ModelState) -> torch.nn.Module | None:
    """The live ``nn.Module`` object ``m`` was read from (a trusted load), or None."""
    node: Any = next((p.obj for p in ck.parts if p.relpath == m.part), None)
    for key in m.path:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, (list, tuple)) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return None
    return node if is_torch_module(node) else None


def rebuild_module(old: torch.nn.Module, template: torch.nn.Module | None, state: Mapping[str, torch.Tensor],
                   where: str) -> torch.nn.Module:
    """The new code's module (a copy of ``template``) holding ``state`` (the repaired state dict, keys
    as the new code names them), with ``old``'s flags and plain attributes; refused (one line) when
    the state does not fit the new module exactly or the module could not be pickled by its name."""
    import torch

    if template is None:
        raise WriteError(f"{where}: a pickled nn.Module object is rewritten as the new code's module: "
                         "--target must be module:callable returning the module")
    cls = type(template)
    if cls.__module__.startswith("_optckpt_target_") or "<locals>" in cls.__qualname__:
        raise WriteError(f"{where}: the new code's module class {cls.__qualname__} cannot be pickled by name "
                         "(defined in a file given as path.py:callable, or inside a function): give --target as "
                         "module:callable, importable from the current directory")
    new = copy.deepcopy(template)
    expected = list(new.state_dict(keep_vars=True))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in set(expected)]
    if missing or unexpected:
        raise WriteError(f"{where}: the repaired state does not fit the new code's module "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); not written")
    new.load_state_dict({k: state[k] for k in expected}, strict=True)  # copied: tied parameters stay tied
    for k, t in new.state_dict(keep_vars=True).items():
        if t.dtype != state[k].dtype:  # the saved dtype (YOLO's fp16 copies), not the template's
            t.data = t.data.to(state[k].dtype)
    flags = {p.requires_grad for p in old.parameters()}
    if len(flags) == 1:  # YOLO's EMA copy: no parameter requires grad
        new.requires_grad_(flags.pop())
    new.train(old.training)
    structure = set(new._modules) | set(new._parameters) | set(new._buffers)
    for k, v in vars(old).items():
        if not k.startswith("_") and k not in _MODULE_MACHINERY and k not in structure and \
                not isinstance(v, (torch.nn.Module, torch.Tensor)):
            setattr(new, k, copy.deepcopy(v))
    return new
