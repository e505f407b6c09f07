"""New code for a TinyGPT(n_layer=2) DCP checkpoint: a renamed module, an added layer, a removed block."""

from __future__ import annotations

from models_zoo import TinyGPT
from torch import nn


class Renamed(TinyGPT):
    def __init__(self) -> None:
        super().__init__(n_layer=2)
        self.final_norm = self.ln_f
        del self.ln_f


class Added(TinyGPT):
    def __init__(self) -> None:
        super().__init__(n_layer=2)
        self.extra = nn.Linear(4, 4)


def renamed() -> nn.Module:
    return Renamed()


def added() -> nn.Module:
    return Added()


def removed() -> nn.Module:
    return TinyGPT(n_layer=1)


def same() -> nn.Module:
    return TinyGPT(n_layer=2)
