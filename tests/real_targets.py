"""The "new code" of the real-library continuity tests: reordered variants of the fixtures' models."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))

import real_models  # noqa: E402


def tinylit_reordered_class():
    base = real_models.TinyLit

    class TinyLitReordered(base):  # type: ignore[misc, valid-type]
        def __init__(self, lr: float = 1e-3):
            super().__init__(lr)
            self.net = real_models.build_tinynet_reordered()

    return TinyLitReordered


def tinylit_reordered():
    return tinylit_reordered_class()()


def gpt2_reordered_class():
    from transformers import GPT2LMHeadModel

    class GPT2Reordered(GPT2LMHeadModel):
        """GPT-2 with ``ln_f`` and ``wpe`` registered before ``wte`` and the blocks."""

        def __init__(self, config):
            super().__init__(config)
            t = self.transformer
            first = [k for k in ("ln_f", "wpe") if k in t._modules]
            t._modules = OrderedDict([(k, t._modules[k]) for k in first] +
                                     [(k, v) for k, v in t._modules.items() if k not in first])

    return GPT2Reordered


def hf_config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(Path(real_models.__file__).parent / "hf_trainer" / "checkpoint-3"))


def trainer_groups(model, weight_decay: float = 0.01):
    """The param groups transformers.Trainer builds (decay / no-decay), via its own helper."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    return [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay and p.requires_grad],
         "weight_decay": 0.0},
    ]


def gpt2_reordered_with_trainer_optimizer():
    model = gpt2_reordered_class()(hf_config())
    return model, torch.optim.AdamW(trainer_groups(model), lr=1e-3)
