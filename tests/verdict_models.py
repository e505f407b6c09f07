"""Models and groupings for the verdict tests: a transformer-like net with same-shaped layers, a
float buffer and BatchNorm; the groupings real code uses (one group, decay / no-decay, one group per
parameter with layer-wise lr, TSM-style policy groups with an empty one). The ``*_new`` callables
are ``--target`` specs (``tests/verdict_models.py:adam_policy_new``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

D = 8


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)


class Net(nn.Module):
    """Several identical layers, a float buffer shaped like a LayerNorm weight, a BatchNorm."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, D))
        self.layers = nn.ModuleList([Layer() for _ in range(n)])
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.pos_scale
        for layer in self.layers:
            h = h + layer.fc2(torch.tanh(layer.fc1(layer.ln(h))))
        return self.head(self.bn(h))


class NetReordered(Net):
    """The same parameters under the same names, registered in another order (new code)."""

    def __init__(self, n: int = 3) -> None:
        nn.Module.__init__(self)
        self.head = nn.Linear(D, 2)
        self.bn = nn.BatchNorm1d(D)
        self.layers = nn.ModuleList([Layer() for _ in range(n)])
        for layer in self.layers:  # inside each layer too
            fc2 = layer.fc2
            del layer.fc2, layer.ln
            layer.fc2 = fc2
            layer.ln = nn.LayerNorm(D)
        self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, D))
        self.embed = nn.Linear(4, D)


def single(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": list(model.parameters())}]


def decay(model: nn.Module) -> list[dict[str, Any]]:
    """transformers-style: weights decay; biases and norms do not."""
    dec = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    nod = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    return [{"params": dec, "weight_decay": 0.05}, {"params": nod, "weight_decay": 0.0}]


def _layer_scale(name: str) -> float:
    """Layer-wise lr decay (BEiT / ConvNeXt recipes): deeper layers learn faster."""
    if name.startswith("layers."):
        return 0.8 ** (3 - int(name.split(".")[1]))
    return 0.8 ** 4 if name.startswith("embed.") else 1.0


def per_param(model: nn.Module) -> list[dict[str, Any]]:
    """One group per parameter, walking the model (mmengine paramwise_cfg / layer-wise lr decay)."""
    return [{"params": [p], "lr_scale": _layer_scale(n)} for n, p in model.named_parameters()]


def policy(model: nn.Module) -> list[dict[str, Any]]:
    """TSM's get_optim_policies: by module type, interleaved in model order, one policy empty."""
    w, b, norm = [], [], []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w.append(m.weight)
            b.append(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            norm.extend([m.weight, m.bias])
    return [
        {"params": w, "lr_mult": 1, "decay_mult": 1, "name": "normal_weight"},
        {"params": b, "lr_mult": 2, "decay_mult": 0, "name": "normal_bias"},
        {"params": norm, "lr_mult": 1, "decay_mult": 0, "name": "BN scale/shift"},
        {"params": [], "lr_mult": 5, "decay_mult": 1, "name": "custom_ops"},
    ]


GROUPINGS: dict[str, Callable[[nn.Module], list[dict[str, Any]]]] = {
    "single": single, "decay": decay, "per_param": per_param, "policy": policy,
}


def _lr(groups: list[dict[str, Any]], base: float) -> list[dict[str, Any]]:
    for g in groups:
        g["lr"] = base * g.get("lr_scale", 1.0) * g.get("lr_mult", 1)
    return groups


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "SGD": lambda g: torch.optim.SGD(_lr(g, 0.05)),
    "SGD-momentum": lambda g: torch.optim.SGD(_lr(g, 0.05), momentum=0.9),
    "Adam": lambda g: torch.optim.Adam(_lr(g, 1e-2)),
    "AdamW-amsgrad": lambda g: torch.optim.AdamW(_lr(g, 1e-2), amsgrad=True),
    "Adagrad": lambda g: torch.optim.Adagrad(_lr(g, 1e-2)),
    "Adadelta": lambda g: torch.optim.Adadelta(_lr(g, 1.0)),
    "Adamax": lambda g: torch.optim.Adamax(_lr(g, 1e-2)),
    "ASGD": lambda g: torch.optim.ASGD(_lr(g, 1e-2), t0=1),
    "NAdam": lambda g: torch.optim.NAdam(_lr(g, 1e-2)),
    "RAdam": lambda g: torch.optim.RAdam(_lr(g, 1e-2)),
    "RMSprop": lambda g: torch.optim.RMSprop(_lr(g, 1e-3), momentum=0.9),
    "Rprop": lambda g: torch.optim.Rprop(_lr(g, 1e-2)),
    "Adafactor": lambda g: torch.optim.Adafactor(_lr(g, 1e-2)),
    "LBFGS": lambda g: torch.optim.LBFGS(_lr(g, 0.5), max_iter=3, history_size=4),
}


def build(model_cls: type[nn.Module], grouping: str, optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = model_cls()
    return model, OPTIMIZERS[optimizer](GROUPINGS[grouping](model))


def loss(model: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
    return (model(x) - 1).square().mean()


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(model, seed)
        value.backward()
        return value

    opt.step(closure)


# --- targets for the CLI (the new code) ---------------------------------------------------------

def sgd_momentum_policy_new() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(NetReordered, "policy", "SGD-momentum")


def sgd_momentum_policy_old() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(Net, "policy", "SGD-momentum")


def adam_per_param_new() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(NetReordered, "per_param", "Adam")


def adam_per_param_old() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(Net, "per_param", "Adam")


def sgd_decay_new() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(NetReordered, "decay", "SGD")


def sgd_decay_old() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(Net, "decay", "SGD")


def sgd_single_new() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(NetReordered, "single", "SGD")


def sgd_single_old() -> tuple[nn.Module, torch.optim.Optimizer]:
    return build(Net, "single", "SGD")


# --- LBFGS: one global state over every parameter -------------------------------------------------

class Small(nn.Module):
    def __init__(self, head: str = "head") -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        setattr(self, head, nn.Linear(3, 2))
        self.head_name = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.tanh(self.body(x)))


def named_lbfgs(model: nn.Module) -> torch.optim.LBFGS:
    """Built from named_parameters(): the state dict records param_names."""
    return torch.optim.LBFGS(model.named_parameters(), lr=0.5, max_iter=3, history_size=4)


def lbfgs_renamed_head() -> tuple[nn.Module, torch.optim.Optimizer]:
    m = Small("classifier")
    return m, named_lbfgs(m)
