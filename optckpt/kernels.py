"""Moving many pieces of optimizer state in a few operations instead of a Python loop per tensor.

* :class:`SegmentTable` + :func:`gather_segments`: ``out[dst:dst+len] = src[src:src+len]`` for
  thousands of segments of a flat buffer at once. Tiny segments go through one gather with a
  precomputed index (one kernel launch, whatever the count); large ones through bulk copies (a
  gather index would triple the memory traffic). Used to permute the per-parameter segments of flat
  state (LBFGS's direction / history vectors; FSDP flat parameters and ZeRO partitions store
  optimizer state the same way).
* :func:`place_tensors`: cast/move many state tensors to their parameters' device and dtype in one
  batch per (device, dtype): one concatenation into a (pinned, on CUDA) host buffer, one transfer,
  then views. ``load_optimizer_state_dict`` uses it so that a GPU optimizer receives its state in a
  single host-to-device copy per dtype.
* :func:`fill_tensors`: set many tensors to one value in one foreach call (``reset --mode zero``).

Everything is plain torch: the CUDA path is the same code on CUDA tensors; no GPU is needed to run
or test it."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SegmentTable", "gather_segments", "permute_segments", "place_tensors", "fill_tensors",
           "SMALL_SEGMENT"]

SMALL_SEGMENT = 2048  # elements: below this mean segment length, one gather beats per-segment copies


@dataclass(frozen=True)
class SegmentTable:
    """Segments to move: ``length[k]`` elements from ``src[k]`` to ``dst[k]`` (int64 tensors)."""

    src: torch.Tensor
    dst: torch.Tensor
    length: torch.Tensor

    @classmethod
    def of(cls, src: Sequence[int], dst: Sequence[int], length: Sequence[int]) -> SegmentTable:
        t = [torch.as_tensor(list(x), dtype=torch.int64) for x in (src, dst, length)]
        if not (t[0].numel() == t[1].numel() == t[2].numel()):
            raise ValueError("segment table columns differ in length")
        if t[2].numel() and int(t[2].min()) < 0:
            raise ValueError("negative segment length")
        return cls(*t)

    @functools.cached_property
    def total(self) -> int:
        return int(self.length.sum()) if self.length.numel() else 0

    @functools.cached_property
    def tiles_output(self) -> bool:
        """Destinations are consecutive from 0 in table order (a pure permutation / selection)."""
        starts = torch.cumsum(self.length, 0) - self.length
        return bool(torch.equal(self.dst, starts))

    @functools.cached_property
    def source_index(self) -> torch.Tensor:
        """For output element j (in table order), the source element: built once, reused."""
        starts = torch.cumsum(self.length, 0) - self.length
        return torch.arange(self.total) + torch.repeat_interleave(self.src - starts, self.length)

    def index_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (source, destination) element indices covering every segment."""
        starts = torch.cumsum(self.length, 0) - self.length
        return self.source_index, torch.arange(self.total) + torch.repeat_interleave(self.dst - starts, self.length)


def gather_segments(src: torch.Tensor, table: SegmentTable, out: torch.Tensor) -> torch.Tensor:
    """``out[dst:dst+len] = src[src:src+len]`` for every segment of ``table``; returns ``out``.

    Both buffers are flat (1-D) and may live on any device (the table stays on the CPU until the
    index is built). Overlapping destination segments are an error of the caller."""
    if src.ndim != 1 or out.ndim != 1:
        raise ValueError("gather_segments works on flat (1-D) buffers")
    k = table.length.numel()
    if k == 0:
        return out
    if int((table.src + table.length).max()) > src.numel() or int((table.dst + table.length).max()) > out.numel():
        raise ValueError("a segment runs past the end of its buffer")
    if table.total // k < SMALL_SEGMENT:
        s_idx = table.source_index.to(src.device)
        if table.tiles_output:  # one gather straight into the output
            torch.index_select(src, 0, s_idx, out=out[: table.total])
        else:
            _, d_idx = table.index_pair()
            out.index_copy_(0, d_idx.to(out.device), src.index_select(0, s_idx))
    else:
        for s, d, n in zip(table.src.tolist(), table.dst.tolist(), table.length.tolist()):
            out[d:d + n].copy_(src[s:s + n])
    return out


def permute_segments(flat: torch.Tensor, sizes: Sequence[int], order: Sequence[int]) -> torch.Tensor:
    """``cat([segment[k] for k in order])`` where ``flat`` is cut into consecutive ``sizes``."""
    if sum(sizes) != flat.numel():
        raise ValueError(f"segment sizes sum to {sum(sizes)}, the flat tensor has {flat.numel()} elements")
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    lengths = [sizes[k] for k in order]
    dst = [0]
    for n in lengths[:-1]:
        dst.append(dst[-1] + n)
    table = SegmentTable.of([starts[k] for k in order], dst[: len(lengths)], lengths)
    out = flat.new_empty(sum(lengths))
    return gather_segments(flat.reshape(-1), table, out)


def place_tensors(tensors: Sequence[torch.Tensor], devices: Sequence[torch.device],
                  dtypes: Sequence[torch.dtype | None]) -> list[torch.Tensor]:
    """Each ``tensors[i]`` on ``devices[i]`` with ``dtypes[i]`` (None: keep its dtype), moved in
    one batch per (source dtype, target device, target dtype) instead of one copy per tensor.
    Tensors already in place are returned as they are (no copy), like ``Tensor.to``. Batching pays
    off for host-to-accelerator transfers (one pinned buffer, one copy); CPU targets take the
    per-tensor path, which measured faster there (benchmarks/bench_kernels.py)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    if all(torch.device(d).type in ("cpu", "meta") for d in devices):
        return [t.to(device=d, dtype=dt or t.dtype) for t, d, dt in zip(tensors, devices, dtypes)]
    buckets: dict[tuple[torch.dtype, torch.device, torch.dtype], list[int]] = {}
    for i, (t, dev, dt) in enumerate(zip(tensors, devices, dtypes)):
        want = dt or t.dtype
        if t.device == dev and t.dtype == want:
            out[i] = t
        else:
            buckets.setdefault((t.dtype, torch.device(dev), want), []).append(i)
    for (src_dtype, dev, want), idx in buckets.items():
        if len(idx) == 1:
            i = idx[0]
            out[i] = tensors[i].to(device=dev, dtype=want)
            continue
        parts = [tensors[i].reshape(-1) for i in idx]
        sizes = [p.numel() for p in parts]
        pin = dev.type == "cuda" and all(p.device.type == "cpu" for p in parts)
        staging = torch.empty(sum(sizes), dtype=want, pin_memory=pin) if pin else None
        if staging is not None:
            torch.cat([p.to(want) for p in parts] if want != src_dtype else parts, out=staging)
            flat = staging.to(dev, non_blocking=True)
        else:
            flat = torch.cat(parts).to(device=dev, dtype=want)
        for i, piece in zip(idx, torch.split(flat, sizes)):
            out[i] = piece.view(tensors[i].shape)
    assert all(t is not None for t in out)
    return out  # type: ignore[return-value]


def fill_tensors(tensors: Sequence[torch.Tensor], value: float) -> None:
    """Set every tensor to ``value`` in place, one foreach call per device/dtype group."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        if value == 0:
            torch._foreach_zero_(ts)
        else:
            for t in ts:
                t.fill_(value)
