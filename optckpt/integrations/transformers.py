"""transformers: ``ResumeByNameTrainer`` (or ``ResumeByNameMixin`` in front of your own ``Trainer``
subclass) resumes ``train(resume_from_checkpoint=...)`` by parameter name.

The Trainer creates its optimizer (``create_optimizer``), then loads ``optimizer.pt`` into it in
``_load_optimizer_and_scheduler``, before any callback runs (``on_train_begin`` comes after), so
the glue is a mixin of those two methods: the first puts the by-name hook on the optimizer, the
second tells it which checkpoint directory is being restored. A ``checkpoint-N/`` directory stores
the model as name-sorted safetensors; for an ``optimizer.pt`` saved without ``param_names`` the
order comes from the architecture its ``config.json`` names, rebuilt on the meta device
(custom ``auto_map`` code is never run). Reports go to the transformers logger."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from transformers.utils import logging

from ..io.hf_order import hf_model_order
from ._core import ByName, Evidence, attach, load_options, rename_model_keys

__all__ = ["ResumeByNameMixin", "ResumeByNameTrainer"]

log = logging.get_logger("transformers.trainer.optckpt")


class ResumeByNameMixin:
    """Put it before ``transformers.Trainer`` (or your subclass of it) in the bases.

    ``allow_ambiguous=True`` (a keyword of the constructor) starts the state of parameters whose
    saved names are uncertain fresh instead of raising :class:`optckpt.MappingError`; ``rename`` /
    ``fuse`` / ``split`` / ``shape_mismatch`` (keywords too) are ``optckpt remap``'s options, and
    ``rename`` also renames the checkpoint's model weights as the Trainer loads them. After a resume,
    ``optckpt_hook.report`` holds what the load did."""

    optckpt_hook: ByName | None = None

    def __init__(self, *args: Any, allow_ambiguous: bool = False, rename: Sequence[str] | Mapping[str, str] = (),
                 fuse: Sequence[str] = (), split: Sequence[str] = (), shape_mismatch: str = "reset", **kwargs: Any):
        self._optckpt_allow_ambiguous = allow_ambiguous
        self._optckpt_options = load_options(rename, fuse, split, shape_mismatch)
        self._optckpt_dir = ""
        super().__init__(*args, **kwargs)
        rename_model_keys(self.model, rename)  # type: ignore[attr-defined]

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        inner = getattr(optimizer, "optimizer", None)
        inner = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self.optckpt_hook = attach(inner, self.model, self._optckpt_evidence,  # type: ignore[attr-defined]
                                   label="optimizer", logger=log, allow_ambiguous=self._optckpt_allow_ambiguous,
                                   options=self._optckpt_options)
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        self._optckpt_dir = checkpoint or ""
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]

    def _optckpt_evidence(self) -> Evidence:
        order, why = hf_model_order(self._optckpt_dir)
        return Evidence(where=self._optckpt_dir, models=[order] if order is not None else [],
                        hint=f" ({why})" if why else "")


class ResumeByNameTrainer(ResumeByNameMixin, transformers.Trainer):
    """``transformers.Trainer`` that resumes optimizer state by parameter name."""
