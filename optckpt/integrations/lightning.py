"""Lightning: ``Trainer(callbacks=[LoadOptimizerByName()])`` restores optimizer state by name.

Lightning restores a checkpoint in two steps: model and callbacks first (each callback's
``on_load_checkpoint`` sees the checkpoint), then, after ``configure_optimizers`` ran, the
optimizers and schedulers (``optimizer.load_state_dict`` per optimizer, by position in the list).
The callback keeps the checkpoint's ``state_dict`` (the old module, registration order: the order
evidence for state saved without ``param_names``) and puts the by-name hook on every optimizer the
module configures (several, for manual optimization, included). Reports go to Lightning's logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package
    import lightning.pytorch as pl  # type: ignore[no-redef]

from ..errors import MappingError
from ..resume import LoadReport
from ._core import ByName, Evidence, attach, load_options, rename_model_keys

__all__ = ["LoadOptimizerByName"]

log = logging.getLogger(f"{pl.__name__}.optckpt")

_PER_GROUP = ("base_lrs", "_last_lr")


class LoadOptimizerByName(pl.Callback):
    """Load each optimizer's saved state by parameter name when ``trainer.fit(ckpt_path=...)`` resumes,
    and save ``param_names`` with it from then on.

    ``allow_ambiguous=True`` starts the state of parameters whose saved names are uncertain fresh
    instead of raising :class:`optckpt.MappingError`. ``rename`` / ``fuse`` / ``split`` /
    ``shape_mismatch`` are ``optckpt remap``'s options (``rename=["head.=classifier."]``); ``rename``
    also renames the checkpoint's ``state_dict`` keys when Lightning loads them into the module.
    After the resume, ``report`` (``reports``: one per optimizer) holds what the load did."""

    def __init__(self, allow_ambiguous: bool = False, *, rename: Sequence[str] | Mapping[str, str] = (),
                 fuse: Sequence[str] = (), split: Sequence[str] = (), shape_mismatch: str = "reset"):
        self.allow_ambiguous = allow_ambiguous
        self.options = load_options(rename, fuse, split, shape_mismatch)
        self.hooks: list[ByName] = []  # one per optimizer; each keeps the report of its last load
        self._evidence = Evidence(hint="")
        self._schedulers: list[Mapping[str, Any]] | None = None

    @property
    def reports(self) -> list[LoadReport | None]:
        """What the last load did, per optimizer (None for one not loaded yet)."""
        return [h.report for h in self.hooks]

    @property
    def report(self) -> LoadReport | None:
        """The first optimizer's report (the only one, with automatic optimization)."""
        return self.hooks[0].report if self.hooks else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before Lightning restores the module: the checkpoint's weights under their new names
        rename_model_keys(pl_module, self.options.get("rename", ()))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._evidence = Evidence(where=str(trainer.ckpt_path or "<checkpoint>"),
                                  model_state_dict=checkpoint.get("state_dict") or None,
                                  hint="; the checkpoint's state_dict does not fix the order")
        self._schedulers = checkpoint.get("lr_schedulers")
        if trainer.optimizers:  # strategies that restore after setup: the optimizers exist already
            self._attach(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hooks = [attach(opt, pl_module, lambda: self._evidence, label=f"optimizer {i}", logger=log,
                             allow_ambiguous=self.allow_ambiguous, options=self.options)
                      for i, opt in enumerate(trainer.optimizers)]
        for i, (config, saved) in enumerate(zip(trainer.lr_scheduler_configs, self._schedulers or [])):
            n = len(config.scheduler.optimizer.param_groups)
            for key in _PER_GROUP:
                if isinstance(saved.get(key), list) and len(saved[key]) != n:
                    raise MappingError(f"lr scheduler {i}: saved for {len(saved[key])} param groups, the optimizer "
                                       f"now has {n}; keep the grouping or restore the scheduler yourself")
