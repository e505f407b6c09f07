"""Old and new model code for the repair tests (``remap --target tests/repair_models.py:...``)."""

from __future__ import annotations

import torch
from torch import nn

D = 8


class Separate(nn.Module):
    """Attention-style projections as three Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out = nn.Linear(3 * D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(torch.cat([self.q(x), self.k(x), self.v(x)], -1)))


class Fused(nn.Module):
    """The same projections fused into one ``qkv`` Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(3 * D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.qkv(x)))


def build_separate() -> nn.Module:
    torch.manual_seed(1)
    return Separate()


def build_fused() -> nn.Module:
    torch.manual_seed(2)
    return Fused()


class Net(nn.Module):
    """An encoder with a norm (a buffer-holding BatchNorm too) and a head; ``enc_name`` renames the encoder."""

    def __init__(self, enc_name: str = "enc", blocks: int = 2) -> None:
        super().__init__()
        setattr(self, enc_name, nn.Linear(D, D))
        self.enc_name = enc_name
        self.bn = nn.BatchNorm1d(D)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(blocks))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(getattr(self, self.enc_name)(x))
        for b in self.blocks:
            h = torch.relu(b(h))
        return self.head(self.norm(h))


def decay_groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    """The usual decay / no-decay split: matrices decay, biases and norms do not."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]


def build_renamed() -> nn.Module:
    torch.manual_seed(3)
    return Net("encoder")


def build_renamed_adamw() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build_renamed()
    return model, torch.optim.AdamW(decay_groups(model), lr=1e-2)


def build_three_blocks() -> nn.Module:
    torch.manual_seed(4)
    return Net("enc", blocks=3)


class Lm(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def build_lm(vocab: int) -> nn.Module:
    torch.manual_seed(5)
    return Lm(vocab)


def build_lm_grown() -> nn.Module:
    return build_lm(13)


def build_lm_shrunk() -> nn.Module:
    return build_lm(7)
