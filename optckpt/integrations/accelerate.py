"""accelerate: ``load_optimizers_by_name(accelerator)`` makes ``accelerator.load_state(dir)`` load
every prepared optimizer by parameter name.

Two hooks of the accelerator, run before it saves / loads: they put the by-name hook on each
prepared optimizer (paired with the prepared model that holds its parameters), so ``save_state``
writes ``param_names`` and ``load_state`` loads by them. accelerate stores the model as
name-sorted safetensors, which loses the order an old, unnamed optimizer state refers to; that
order then comes from ``old_model`` (the model as the checkpoint's code built it, or its state
dict), or from a ``pytorch_model.bin`` in the directory (``safe_serialization=False`` keeps it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import accelerate
import torch
from accelerate.logging import get_logger

from ..io import load
from ._core import ByName, Evidence, attach, load_options, owner_of, rename_model_keys

__all__ = ["load_optimizers_by_name"]

log = get_logger("accelerate.optckpt")

_HINT = "; pass old_model= (the model as the code that saved the checkpoint built it) to load_optimizers_by_name"


def load_optimizers_by_name(accelerator: accelerate.Accelerator, *,
                            old_model: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
                            allow_ambiguous: bool = False, rename: Sequence[str] | Mapping[str, str] = (),
                            fuse: Sequence[str] = (), split: Sequence[str] = (),
                            shape_mismatch: str = "reset") -> list[ByName]:
    """Register the hooks; returns the list that will hold one hook (with its ``report``) per
    prepared optimizer once the accelerator saves or loads.

    ``allow_ambiguous=True`` starts the state of parameters whose saved names are uncertain fresh
    instead of raising :class:`optckpt.MappingError`. ``rename`` / ``fuse`` / ``split`` /
    ``shape_mismatch`` are ``optckpt remap``'s options; ``rename`` also renames the saved model
    weights' keys as ``load_state`` loads them into the prepared models."""
    options = load_options(rename, fuse, split, shape_mismatch)
    hooks: list[ByName] = []
    old_sd = old_model.state_dict() if isinstance(old_model, torch.nn.Module) else old_model
    where: list[str] = [""]

    def evidence() -> Evidence:
        if old_sd is not None or not where[0]:  # no directory: a load outside load_state
            return Evidence(where=where[0] or "<state dict>", model_state_dict=old_sd, hint=_HINT)
        ordered = [m for m in load(where[0]).models if m.order_trusted]
        return Evidence(where=where[0], models=ordered[:1], hint=_HINT)

    def attach_all() -> None:
        models = [accelerator.unwrap_model(m) for m in accelerator._models]
        hooks[:] = []
        for i, opt in enumerate(accelerator._optimizers):
            inner = opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt
            label = f"optimizer {i}"
            hooks.append(attach(inner, owner_of(inner, models, label), evidence, label=label, logger=log,
                                allow_ambiguous=allow_ambiguous, options=options))

    def before_save(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        attach_all()

    def before_load(models: list[torch.nn.Module], input_dir: str) -> None:
        where[0] = str(input_dir)
        for m in models:
            rename_model_keys(accelerator.unwrap_model(m), options.get("rename", ()))
        attach_all()

    accelerator.register_save_state_pre_hook(before_save)
    accelerator.register_load_state_pre_hook(before_load)
    return hooks
