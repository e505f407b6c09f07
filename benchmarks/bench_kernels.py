"""Batched remap kernel vs the per-tensor Python loop, and vs memcpy bandwidth.

    python benchmarks/bench_kernels.py [--repeats 5] [--scale 1.0] [--device cpu|cuda]

Cases (each a median of --repeats, all ratios measured in this run):
  tiny   2,000 segments of 64-256 elements permuted inside a flat buffer: one precomputed-index
         gather (optckpt.kernels.gather_segments) vs a loop of per-segment copies;
  large  the 296 Adam moments of a GPT-2-small model (2 x 148 tensors, 124M elements each side)
         permuted inside a flat buffer: gather_segments (bulk path) vs the loop vs one memcpy of
         the same bytes (the physical limit);
  place  296 moments cast to bfloat16 (or moved to --device): place_tensors vs per-tensor .to().
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from optckpt.kernels import SegmentTable, gather_segments, place_tensors


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def gpt2_small_shapes(scale: float) -> list[tuple[int, ...]]:
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(int(v * scale), d), (int(ctx * scale), d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def table_for(lengths: list[int], seed: int = 0) -> SegmentTable:
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    dst, pos = [], 0
    for k in perm:
        dst.append(pos)
        pos += lengths[k]
    return SegmentTable.of([starts[k] for k in perm], dst, [lengths[k] for k in perm])


def loop_copy(src: torch.Tensor, table: SegmentTable, out: torch.Tensor) -> None:
    for s, d, n in zip(table.src.tolist(), table.dst.tolist(), table.length.tolist()):
        out[d:d + n].copy_(src[s:s + n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="scale of the embedding tables (large case)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []

    # tiny: 2,000 segments of 64-256 elements
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 257, (2000,), generator=g).tolist()
    table = table_for(lengths)
    src = torch.randn(sum(lengths), device=dev)
    out = torch.empty_like(src)
    t_loop = timed(lambda: loop_copy(src, table, out), args.repeats, sync)
    t0 = time.perf_counter()
    _ = table.source_index  # built once per plan, reused by every call
    t_index = time.perf_counter() - t0
    t_kernel = timed(lambda: gather_segments(src, table, out), args.repeats, sync)
    rows.append(("tiny: 2,000 segments, loop", t_loop, 1.0))
    rows.append(("tiny: gather_segments (index cached)", t_kernel, t_loop / t_kernel))
    rows.append(("tiny: building the index once", t_index, t_loop / t_index))

    # large: the 296 Adam moments of GPT-2 small, permuted
    shapes = gpt2_small_shapes(args.scale)
    sizes = [int(torch.tensor(s).prod()) for s in shapes] * 2  # exp_avg + exp_avg_sq
    table = table_for(sizes, seed=1)
    src = torch.randn(sum(sizes), device=dev)
    out = torch.empty_like(src)
    t_memcpy = timed(lambda: out.copy_(src), args.repeats, sync)
    t_loop = timed(lambda: loop_copy(src, table, out), args.repeats, sync)
    t_kernel = timed(lambda: gather_segments(src, table, out), args.repeats, sync)
    gbytes = src.numel() * 4 / 1e9
    rows.append((f"large: memcpy of {gbytes:.2f} GB (the limit)", t_memcpy, 1.0))
    rows.append(("large: 296 moments, loop", t_loop, t_memcpy / t_loop))
    rows.append(("large: gather_segments", t_kernel, t_memcpy / t_kernel))

    # place: move the 296 moments to --device (host-to-device batching; on CPU both are per-tensor)
    if dev.type != "cpu":
        moments = [torch.randn(s) for s in shapes] * 2
        t_to = timed(lambda: [m.to(device=dev) for m in moments], args.repeats, sync)
        t_place = timed(lambda: place_tensors(moments, [dev] * len(moments), [None] * len(moments)),
                        args.repeats, sync)
        rows.append((f"place: per-tensor .to({dev})", t_to, 1.0))
        rows.append(("place: place_tensors (one pinned batch)", t_place, t_to / t_place))

    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'case':50s} {'time':>10s} {'ratio':>8s}")
    for name, t, r in rows:
        print(f"{name:50s} {t * 1e3:8.2f}ms {r:8.2f}x")
    print("ratios: loop/kernel for speed-ups; memcpy/kernel for the bandwidth fraction (1.0 = memcpy speed)")


if __name__ == "__main__":
    main()
