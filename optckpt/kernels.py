"""Moving many pieces of optimizer state at once.

``permute_segments`` reorders the per-parameter segments of a flat vector (LBFGS's direction and
history vectors, FSDP / ZeRO flat buffers): one gather over a precomputed index instead of a Python
loop of slices."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["permute_segments"]


def permute_segments(flat: torch.Tensor, sizes: Sequence[int], order: Sequence[int]) -> torch.Tensor:
    """``cat([segment[k] for k in order])`` where ``flat`` is cut into consecutive ``sizes``."""
    if sum(sizes) != flat.numel():
        raise ValueError(f"segment sizes sum to {sum(sizes)}, the flat tensor has {flat.numel()} elements")
    if not order:
        return flat.new_empty(0)
    starts = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
    sz = torch.tensor(list(sizes), dtype=torch.int64)
    idx_order = torch.tensor(list(order), dtype=torch.int64)
    seg_sizes = sz[idx_order]
    seg_starts = starts[idx_order]
    # position j of the output belongs to output segment k; its source is seg_starts[k] + (j - out_start[k])
    out_starts = torch.cumsum(seg_sizes, 0) - seg_sizes
    seg_id = torch.repeat_interleave(torch.arange(len(order)), seg_sizes)
    src = seg_starts[seg_id] + (torch.arange(int(seg_sizes.sum())) - out_starts[seg_id])
    return flat.reshape(-1)[src.to(flat.device)]
