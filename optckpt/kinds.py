"""Guess which optimizer / LR scheduler class wrote a state dict, from its keys and values.

Optimizer key sets and defaults and scheduler key sets are tables (no torch import to name a kind),
checked against the installed torch's signatures and real instances by the tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["guess_optimizer", "guess_scheduler", "SCHEDULER_KEYS", "fresh_state_value", "PARAM_SHAPED_KEYS",
           "NOT_ELEMENTWISE"]

# state keys whose tensor has exactly the parameter's shape, across torch.optim
PARAM_SHAPED_KEYS = (
    "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum", "square_avg", "acc_delta",
    "exp_inf", "ax", "grad_avg", "prev", "step_size", "variance",
)

# optimizers whose per-parameter state is not elementwise in the parameter's shape (cannot be sliced,
# fused or split), with the reason
NOT_ELEMENTWISE = {
    "Adafactor": "keeps factored second moments (row_var / col_var) per matrix",
    "LBFGS": "keeps one flat curvature history over all parameters",
    "Muon": "orthogonalises each parameter's whole update matrix",
}

# the value torch gives a state key when it creates state (zero unless listed here)
_FRESH = {"mu": 1.0, "mu_product": 1.0}


def fresh_state_value(key: str, group: Mapping[str, Any]) -> float:
    """The value a torch optimizer starts the state key ``key`` at, for a parameter of ``group``:
    defined once, used by ``reset --mode zero``, DCP resets and sliced state."""
    if key == "sum":  # Adagrad starts its accumulator at initial_accumulator_value
        return float(group.get("initial_accumulator_value", 0.0))
    if key in ("eta", "step_size"):  # ASGD's eta and Rprop's step sizes start at lr
        return float(group.get("lr", 0.0))
    return _FRESH.get(key, 0.0)


# Each torch.optim class's param-group keys and default values, as its constructor's signature gives
# them in torch 2.13 (a table, so that naming an optimizer needs no torch import; instantiating one would
# also import torch._dynamo). ``tests/test_kinds.py`` reads the signatures of the installed torch and
# compares them with this table, and the key sets with real instances: a drift fails CI.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "ASGD": {"lr": 0.01, "lambd": 0.0001, "alpha": 0.75, "t0": 1000000.0, "weight_decay": 0, "foreach": None,
        "maximize": False, "differentiable": False, "capturable": False},
    "Adadelta": {"lr": 1.0, "rho": 0.9, "eps": 1e-06, "weight_decay": 0, "foreach": None, "capturable": False,
        "maximize": False, "differentiable": False},
    "Adafactor": {"lr": 0.01, "beta2_decay": -0.8, "eps": (None, 0.001), "d": 1.0, "weight_decay": 0.0,
        "foreach": None, "maximize": False},
    "Adagrad": {"lr": 0.01, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10,
        "foreach": None, "maximize": False, "differentiable": False, "fused": None},
    "Adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "amsgrad": False, "foreach": None,
        "maximize": False, "capturable": False, "differentiable": False, "fused": None,
        "decoupled_weight_decay": False},
    "AdamW": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
        "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
        "decoupled_weight_decay": True},
    "Adamax": {"lr": 0.002, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "foreach": None,
        "maximize": False, "differentiable": False, "capturable": False},
    "LBFGS": {"lr": 1, "max_iter": 20, "max_eval": None, "tolerance_grad": 1e-07, "tolerance_change": 1e-09,
        "history_size": 100, "line_search_fn": None},
    "Muon": {"lr": 0.001, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True,
        "ns_coefficients": (3.4445, -4.775, 2.0315), "eps": 1e-07, "ns_steps": 5, "adjust_lr_fn": None},
    "NAdam": {"lr": 0.002, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "momentum_decay": 0.004,
        "decoupled_weight_decay": False, "foreach": None, "maximize": False, "capturable": False,
        "differentiable": False},
    "RAdam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "decoupled_weight_decay": False,
        "foreach": None, "maximize": False, "capturable": False, "differentiable": False},
    "RMSprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-08, "weight_decay": 0, "momentum": 0, "centered": False,
        "capturable": False, "foreach": None, "maximize": False, "differentiable": False},
    "Rprop": {"lr": 0.01, "etas": (0.5, 1.2), "step_sizes": (1e-06, 50), "capturable": False, "foreach": None,
        "maximize": False, "differentiable": False},
    "SGD": {"lr": 0.001, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
        "foreach": None, "differentiable": False, "fused": None},
    "SparseAdam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "maximize": False},
}


def optimizer_defaults_of_installed_torch() -> dict[str, dict[str, Any]]:
    """The table above as the installed torch's constructor signatures give it (for the tests)."""
    import inspect

    import torch

    out: dict[str, dict[str, Any]] = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        out[name] = {p.name: p.default for p in params if p.name not in ("self", "params")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "AdamW" in out:  # AdamW fixes decoupled_weight_decay=True instead of taking it as an argument
        out["AdamW"]["decoupled_weight_decay"] = True
    return out


def guess_optimizer(groups: list[Mapping[str, Any]]) -> str:
    """The torch.optim class whose param-group keys match ``groups`` best (``?`` when none fits).

    Key sets decide; ties (Adam vs AdamW) are broken by how many values equal that class's defaults
    (``decoupled_weight_decay`` above all)."""
    if not groups:
        return "?"
    keys = {k for k in groups[0] if k not in ("params", "param_names")}
    best: list[tuple[int, int, str]] = []
    for name, defaults in OPTIMIZER_DEFAULTS.items():
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


_COMMON = ("_get_lr_called_within_step", "_is_initial", "_last_lr", "_step_count", "base_lrs", "last_epoch")
# state_dict() keys of each torch.optim.lr_scheduler class (torch 2.6+); tests/test_kinds.py checks
# them against real instances of the installed torch, so a drift fails CI instead of guessing wrong.
SCHEDULER_KEYS: dict[str, frozenset[str]] = {
    "StepLR": frozenset((*_COMMON, "gamma", "step_size")),
    "MultiStepLR": frozenset((*_COMMON, "gamma", "milestones")),
    "ExponentialLR": frozenset((*_COMMON, "gamma")),
    "CosineAnnealingLR": frozenset((*_COMMON, "T_max", "eta_min")),
    "CosineAnnealingWarmRestarts": frozenset((*_COMMON, "T_0", "T_cur", "T_i", "T_mult", "eta_min")),
    "LinearLR": frozenset((*_COMMON, "end_factor", "start_factor", "total_iters")),
    "ConstantLR": frozenset((*_COMMON, "factor", "total_iters")),
    "PolynomialLR": frozenset((*_COMMON, "power", "total_iters")),
    "LambdaLR": frozenset((*_COMMON, "lr_lambdas")),
    "OneCycleLR": frozenset((*_COMMON, "_anneal_func_type", "_schedule_phases", "cycle_momentum", "total_steps",
                             "use_beta1")),
    "CyclicLR": frozenset((*_COMMON, "_scale_fn_custom", "base_momentums", "cycle_momentum", "gamma", "max_lrs",
                           "max_momentums", "mode", "scale_mode", "step_ratio", "total_size", "use_beta1")),
    "ReduceLROnPlateau": frozenset(("_last_lr", "best", "cooldown", "cooldown_counter", "default_min_lr", "eps",
                                    "factor", "last_epoch", "min_lrs", "mode", "mode_worse", "num_bad_epochs",
                                    "patience", "threshold", "threshold_mode")),
    "SequentialLR": frozenset(("_last_lr", "_milestones", "_schedulers", "last_epoch")),
    "ChainedScheduler": frozenset(("_last_lr", "_schedulers")),
}


def _scheduler_keys() -> dict[str, frozenset[str]]:
    return SCHEDULER_KEYS


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
