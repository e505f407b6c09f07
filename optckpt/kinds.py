"""Guess which optimizer / LR scheduler class wrote a state dict, from its keys and values.

The reference key sets are read off the installed torch (each class instantiated once on a dummy
parameter), so the guesses follow torch versions instead of a hand-kept table."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["guess_optimizer", "guess_scheduler"]


@functools.lru_cache(maxsize=1)
def _optimizer_defaults() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    p = torch.nn.Parameter(torch.zeros(2, 2))
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        try:
            opt = cls([p])
        except Exception:  # an optimizer that needs arguments we cannot guess: skip it
            continue
        out[name] = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return out


def guess_optimizer(groups: list[Mapping[str, Any]]) -> str:
    """The torch.optim class whose param-group keys match ``groups`` best (``?`` when none fits).

    Key sets decide; ties (Adam vs AdamW) are broken by how many values equal that class's defaults
    (``decoupled_weight_decay`` above all)."""
    if not groups:
        return "?"
    keys = {k for k in groups[0] if k not in ("params", "param_names")}
    best: list[tuple[int, int, str]] = []
    for name, defaults in _optimizer_defaults().items():
        ref = set(defaults)
        if not ref <= keys:
            continue
        same = sum(1 for k, v in defaults.items() if _eq(groups[0].get(k), v))
        decoupled = int(_eq(groups[0].get("decoupled_weight_decay"), defaults.get("decoupled_weight_decay")))
        best.append((len(ref), decoupled * 100 + same, name))
    if not best:
        return "?"
    best.sort(reverse=True)
    return best[0][2]


def _eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


@functools.lru_cache(maxsize=1)
def _scheduler_keys() -> dict[str, frozenset[str]]:
    L = torch.optim.lr_scheduler
    makers: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
        "StepLR": lambda o: L.StepLR(o, 2),
        "MultiStepLR": lambda o: L.MultiStepLR(o, [1]),
        "ExponentialLR": lambda o: L.ExponentialLR(o, 0.9),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, 10),
        "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, 5),
        "LinearLR": lambda o: L.LinearLR(o),
        "ConstantLR": lambda o: L.ConstantLR(o),
        "PolynomialLR": lambda o: L.PolynomialLR(o),
        "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 1.0),
        "OneCycleLR": lambda o: L.OneCycleLR(o, 1.0, total_steps=10),
        "CyclicLR": lambda o: L.CyclicLR(o, 0.01, 0.1),
        "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o),
        "SequentialLR": lambda o: L.SequentialLR(o, [L.ConstantLR(o), L.ConstantLR(o)], [1]),
        "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o)]),
    }
    out: dict[str, frozenset[str]] = {}
    for name, make in makers.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        try:
            out[name] = frozenset(make(opt).state_dict())
        except Exception:
            continue
    return out


# LambdaLR and MultiplicativeLR write identical keys; the transformers schedules are LambdaLRs.
_SAME_KEYS = {"LambdaLR": "LambdaLR|MultiplicativeLR"}
_INTERNAL = {"_get_lr_called_within_step", "_is_initial", "_step_count", "verbose"}


def guess_scheduler(sd: Mapping[str, Any]) -> str:
    """The lr_scheduler class whose state-dict keys match ``sd`` best (``?`` when none fits)."""
    keys = set(sd) - _INTERNAL
    best: tuple[int, int, str] | None = None
    for name, ref_all in _scheduler_keys().items():
        ref = set(ref_all) - _INTERNAL
        if not ref <= keys:
            continue
        score = (len(ref), -len(keys - ref), name)
        if best is None or score > best:
            best = score
    return _SAME_KEYS.get(best[2], best[2]) if best else "?"
