"""Model definitions shared by the mapping / check / remap tests (real nn.Modules)."""

from __future__ import annotations

import torch
from torch import nn

D, V = 8, 11


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D)
        self.attn = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln_2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.attn(self.ln_1(x))[..., :D]
        x = x + self.proj(torch.tanh(q))
        return x + self.out(torch.relu(self.fc(self.ln_2(x))))


class BlockReordered(Block):
    """Same parameters, submodules registered in another order."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)
        self.ln_2 = nn.LayerNorm(D)
        self.proj = nn.Linear(D, D)
        self.attn = nn.Linear(D, 3 * D)
        self.ln_1 = nn.LayerNorm(D)


class TinyGPT(nn.Module):
    """Identical blocks, a final norm and a head tied to the embedding."""

    def __init__(self, n_layer: int = 4, block: type[nn.Module] = Block, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.ln_f = nn.LayerNorm(D)
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(6, D)
        self.h = nn.ModuleList([block() for _ in range(n_layer)])
        if not head_first:
            self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[-1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def decay_groups(model: nn.Module, wd: float = 0.1) -> list[dict]:
    """transformers-style grouping: weights decay; biases and LayerNorm weights do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def gpt_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (3, 5), generator=g)


def gpt_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    idx = gpt_batch(seed)
    return nn.functional.cross_entropy(model(idx).reshape(-1, V), idx.reshape(-1))


def copy_by_name(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` exactly ``src``'s weights, matched by name (state dicts are name-keyed)."""
    dst.load_state_dict(src.state_dict())


class TwoSame(nn.Module):
    """Two same-shaped layers; ``swap=True`` registers them in the other order (a silent swap)."""

    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        if swap:
            self.b = nn.Linear(4, 4)
            self.a = nn.Linear(4, 4)
        else:
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


# --- entry points for --target (module:callable) ------------------------------------------------

def gpt_reordered_blocks() -> nn.Module:
    return TinyGPT(n_layer=3, block=BlockReordered)


def gpt_head_first() -> nn.Module:
    return TinyGPT(n_layer=3, head_first=True)


def gpt_reordered_with_decay_groups():
    m = TinyGPT(n_layer=3, block=BlockReordered)
    return m, torch.optim.AdamW(decay_groups(m), lr=1e-3)


def gpt_plain() -> nn.Module:
    return TinyGPT(n_layer=3)
