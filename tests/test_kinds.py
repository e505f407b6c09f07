"""The optimizer / scheduler key tables agree with real instances of the installed torch."""

from __future__ import annotations

import torch

from optckpt.kinds import (
    OPTIMIZER_DEFAULTS,
    SCHEDULER_KEYS,
    guess_optimizer,
    guess_scheduler,
    optimizer_defaults_of_installed_torch,
)

L = torch.optim.lr_scheduler


def test_optimizer_keys_match_real_instances():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    table = OPTIMIZER_DEFAULTS
    assert table == optimizer_defaults_of_installed_torch()  # names, keys and default values
    for name, defaults in table.items():
        real = {k for k in getattr(torch.optim, name)([p]).param_groups[0] if k != "params"}
        assert set(defaults) == real, name
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Rprop", "NAdam", "RAdam", "Adamax", "ASGD",
                 "Adadelta", "Adafactor", "LBFGS"):
        groups = getattr(torch.optim, name)([p]).state_dict()["param_groups"]
        assert guess_optimizer(groups) == name


def test_scheduler_keys_match_real_instances():
    makers = {
        "StepLR": lambda o: L.StepLR(o, 2), "MultiStepLR": lambda o: L.MultiStepLR(o, [1]),
        "ExponentialLR": lambda o: L.ExponentialLR(o, 0.9), "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, 10),
        "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, 5),
        "LinearLR": lambda o: L.LinearLR(o), "ConstantLR": lambda o: L.ConstantLR(o),
        "PolynomialLR": lambda o: L.PolynomialLR(o), "LambdaLR": lambda o: L.LambdaLR(o, lambda e: 1.0),
        "OneCycleLR": lambda o: L.OneCycleLR(o, 1.0, total_steps=10), "CyclicLR": lambda o: L.CyclicLR(o, 0.01, 0.1),
        "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o),
        "SequentialLR": lambda o: L.SequentialLR(o, [L.ConstantLR(o), L.ConstantLR(o)], [1]),
        "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o)]),
    }
    assert set(makers) == set(SCHEDULER_KEYS)
    for name, make in makers.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sd = make(opt).state_dict()
        assert set(sd) == SCHEDULER_KEYS[name], name
        assert guess_scheduler(sd) == ("LambdaLR|MultiplicativeLR" if name == "LambdaLR" else name)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert guess_scheduler(L.MultiplicativeLR(opt, lambda e: 0.9).state_dict()) == "LambdaLR|MultiplicativeLR"
