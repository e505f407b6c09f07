"""Benchmark: optimizer-index -> parameter-name inference on a 100k-parameter model.

Builds, from shapes only (no tensor data), a transformer-like model of many identical blocks in
registration order, a ``Checkpoint`` holding its state dict as ``meta`` tensors (through
``optckpt.io.discover.model_state_from_dict``, the path a pickled state dict takes) and an AdamW
state dict whose ``exp_avg`` / ``exp_avg_sq`` are ``meta`` tensors too, with nanoGPT-style groups
(decay: parameters with dim >= 2; no-decay: biases and norms). Per block::

    ln_1.{weight,bias} attn.{q,k,v,o}_proj.{weight,bias} attn.rotary.inv_freq (known buffer)
    attn.rel_bias (float buffer, not a parameter) ln_2.{weight,bias} mlp.fc1.{weight,bias}
    mlp.fc2.{weight,bias}

plus ``embed.weight``, ``pos_embed.weight``, ``norm_f.{weight,bias}`` and ``lm_head.weight`` tied to
``embed.weight``. Measured in the same run (median of ``--repeats``):

* ``infer_mapping(ck, opt)`` end to end;
* the same with the cyclic garbage collector disabled (a diagnostic: how much of the end-to-end time is
  collections triggered by the allocations around ``align_groups``, which disables it only for itself);
* ``align_groups(slots, groups)`` alone, on prebuilt ``Slot`` / ``Item`` lists;
* the baseline: one plain pass reading what any mapping must read (``slots_of`` over the model and
  ``param_shape`` of every optimizer state entry), so the ratio says how much the inference adds;
* for context, ``model_state_from_dict`` (load side) and ``inspect_checkpoint`` on the same checkpoint.

The result is checked against the truth: every index named, none ambiguous, every name right.
Timings are reported, never asserted. Run from the repository root::

    python benchmarks/bench_mapping.py                 # 100k parameters
    python benchmarks/bench_mapping.py --params 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from optckpt.align import Item, Slot, align_groups
from optckpt.checkpoint import Checkpoint, OptimizerState, Part
from optckpt.io.discover import model_state_from_dict
from optckpt.mapping import infer_mapping, param_shape, slots_of

PER_BLOCK = 16  # parameters per block
T = TypeVar("T")


def layout(n_params: int, d: int) -> tuple[list[tuple[str, tuple[int, ...], bool]], dict[str, str]]:
    """(name, shape, is_parameter) in registration order, and the tied names (later -> first)."""
    n_blocks = max(1, round((n_params - 4) / PER_BLOCK))
    heads = max(1, d // 64)
    out: list[tuple[str, tuple[int, ...], bool]] = [
        ("embed.weight", (32000, d), True), ("pos_embed.weight", (2048, d), True)]
    for i in range(n_blocks):
        p = f"blocks.{i}."
        out += [
            (p + "ln_1.weight", (d,), True), (p + "ln_1.bias", (d,), True),
            (p + "attn.q_proj.weight", (d, d), True), (p + "attn.q_proj.bias", (d,), True),
            (p + "attn.k_proj.weight", (d, d), True), (p + "attn.k_proj.bias", (d,), True),
            (p + "attn.v_proj.weight", (d, d), True), (p + "attn.v_proj.bias", (d,), True),
            (p + "attn.rotary.inv_freq", (d // heads // 2,), False),  # a buffer torch/transformers name
            (p + "attn.rel_bias", (heads, 32), False),  # a float buffer with an unknown name
            (p + "attn.o_proj.weight", (d, d), True), (p + "attn.o_proj.bias", (d,), True),
            (p + "ln_2.weight", (d,), True), (p + "ln_2.bias", (d,), True),
            (p + "mlp.fc1.weight", (4 * d, d), True), (p + "mlp.fc1.bias", (4 * d,), True),
            (p + "mlp.fc2.weight", (d, 4 * d), True), (p + "mlp.fc2.bias", (d,), True),
        ]
    out += [("norm_f.weight", (d,), True), ("norm_f.bias", (d,), True), ("lm_head.weight", (32000, d), True)]
    return out, {"lm_head.weight": "embed.weight"}


def adamw_hparams() -> dict:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4, weight_decay=0.1)
    return {k: v for k, v in opt.state_dict()["param_groups"][0].items() if k != "params"}


def build(n_params: int, d: int) -> dict[str, Any]:
    entries, tied = layout(n_params, d)
    sd: dict[str, torch.Tensor] = {}
    for name, shape, _ in entries:
        sd[name] = sd[tied[name]] if name in tied else torch.empty(shape, device="meta")
    params = [(n, s) for n, s, is_param in entries if is_param and n not in tied]  # named_parameters()
    decay = [n for n, s in params if len(s) >= 2]
    nodecay = [n for n, s in params if len(s) < 2]
    order = decay + nodecay
    shape_of = {n: s for n, s in params}
    step = torch.tensor(1000.0)
    state = {
        i: {"step": step, "exp_avg": torch.empty(shape_of[n], device="meta"),
            "exp_avg_sq": torch.empty(shape_of[n], device="meta")}
        for i, n in enumerate(order)
    }
    hp = adamw_hparams()
    opt_sd = {"state": state, "param_groups": [
        {**hp, "weight_decay": 0.1, "params": list(range(len(decay)))},
        {**hp, "weight_decay": 0.0, "params": list(range(len(decay), len(order)))},
    ]}
    # The prebuilt inputs of align_groups, straight from the truth (no torch objects).
    slots = [Slot(n, s) for n, s, is_param in entries
             if n not in tied and not n.endswith(".inv_freq")]  # what slots_of keeps
    n_decay = len(decay)
    items = [[Item(i, shape_of[n]) for i, n in enumerate(decay)],
             [Item(n_decay + i, shape_of[n]) for i, n in enumerate(nodecay)]]
    return {"sd": sd, "opt_sd": opt_sd, "truth": dict(enumerate(order)), "tied": tied, "slots": slots,
            "items": items, "n_entries": len(entries), "n_params": len(order)}


def timed(fn: Callable[[], T], repeats: int) -> tuple[list[float], T]:
    """Times of ``repeats`` calls (a full collection before each, none inside), and the last result."""
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if len(times) < repeats:
            del out
    return times, out


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=100_000, help="number of optimizer parameters (about)")
    ap.add_argument("--d-model", type=int, default=1024, help="hidden size (shapes only; nothing is allocated)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement (median reported; >= 3)")
    ap.add_argument("--no-inspect", action="store_true", help="skip the inspect_checkpoint context row")
    ap.add_argument("--verbose", action="store_true", help="print every individual run")
    args = ap.parse_args()
    if args.repeats < 1 or args.params < PER_BLOCK:
        ap.error("--repeats must be >= 1 and --params >= 16")

    t0 = time.perf_counter()
    data = build(args.params, args.d_model)
    print(f"built {data['n_params']} parameters ({data['n_entries']} state-dict entries, "
          f"{len(data['slots'])} slots, groups {[len(g) for g in data['items']]}) in {time.perf_counter() - t0:.1f} s; "
          f"python {sys.version.split()[0]}, torch {torch.__version__}", flush=True)

    # model_state_from_dict: the path a pickled state dict takes through optckpt.load
    t_msd, model = timed(lambda: model_state_from_dict(data["sd"], "model", "synthetic.pt", ("model",)),
                         args.repeats)
    notes = []
    if model.tied != data["tied"]:
        false_ties = {k: v for k, v in model.tied.items() if data["tied"].get(k) != v}
        notes.append(f"model_state_from_dict reported {len(model.tied)} tied entries on meta tensors "
                     f"({len(false_ties)} false, e.g. {next(iter(false_ties.items()), None)}): meta tensors all have "
                     "data_ptr() == 0; replaced by the true ties for the rest of the benchmark")
        model.tied = dict(data["tied"])
    ck = Checkpoint(path="<synthetic>", layout="torch-bundle")
    ck.parts.append(Part("synthetic.pt", "torch", 0))
    ck.models.append(model)
    opt = OptimizerState("optimizer", "synthetic.pt", ("optimizer",), data["opt_sd"])
    ck.optimizers.append(opt)
    ck.extras["epoch"] = 1

    def walk() -> object:  # baseline: read every model entry and every optimizer entry's shape once
        slots = slots_of([model])
        state = opt.state
        return slots, [[param_shape(state.get(i, {})) for i in g["params"]] for g in data["opt_sd"]["param_groups"]]

    t_walk, _ = timed(walk, args.repeats)
    t_align, aligned = timed(lambda: align_groups(data["slots"], data["items"]), args.repeats)
    t_infer, mapping = timed(lambda: infer_mapping(ck, opt), args.repeats)
    # Diagnostic: the same call with the cyclic GC off (align_groups switches it off only for itself),
    # to show how much of the end-to-end time is collections triggered by the allocations around it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t_infer_nogc, _ = timed(lambda: infer_mapping(ck, opt), args.repeats)
    finally:
        if gc_was_enabled:
            gc.enable()
    t_insp = None
    if not args.no_inspect:
        from optckpt.inspect import inspect_checkpoint

        t_insp, _ = timed(lambda: inspect_checkpoint(ck), args.repeats)

    # correctness against the truth
    truth = data["truth"]
    problems = []
    if mapping.evidence != "model-order":
        problems.append(f"infer_mapping evidence {mapping.evidence!r}")
    if mapping.ambiguous:
        problems.append(f"infer_mapping left {len(mapping.ambiguous)} ambiguous")
    got = mapping.name_of()
    wrong = [i for i, n in truth.items() if got.get(i) != n]
    if wrong:
        problems.append(f"infer_mapping named {len(wrong)} indices wrongly, e.g. {wrong[:3]}")
    flat = [a for g in aligned for a in g]
    if any(a.name is None for a in flat) or any(truth[a.index] != a.name for a in flat) or len(flat) != len(truth):
        problems.append("align_groups result is not exactly the truth")

    rows = [("baseline: walk model + optimizer entries", t_walk),
            ("infer_mapping (end to end)", t_infer),
            ("  diagnostic: infer_mapping with gc disabled", t_infer_nogc),
            ("align_groups alone (prebuilt Slot/Item)", t_align),
            ("context: model_state_from_dict (load side)", t_msd)]
    if t_insp is not None:
        rows.append(("context: inspect_checkpoint (report)", t_insp))
    w = max(len(r[0]) for r in rows)
    print()
    print(f"medians of {args.repeats} runs, {data['n_params']} parameters")
    print(f"{'measurement':<{w}}  {'median':>9}  {'min':>9}  {'max':>9}")
    print(f"{'-' * w}  {'-' * 9}  {'-' * 9}  {'-' * 9}")
    for label, ts in rows:
        print(f"{label:<{w}}  {fmt_s(statistics.median(ts)):>9}  {fmt_s(min(ts)):>9}  {fmt_s(max(ts)):>9}")
        if args.verbose:
            print("    runs: " + ", ".join(fmt_s(x) for x in ts))
    med_walk = statistics.median(t_walk)
    print()
    print("ratios (same run, medians):")
    print(f"  infer_mapping / walk baseline = {statistics.median(t_infer) / med_walk:.2f}")
    print(f"  align_groups  / walk baseline = {statistics.median(t_align) / med_walk:.2f}")
    print(f"  infer_mapping = {statistics.median(t_infer):.3f} s   (target: well under 1 s)")
    for n in notes:
        print(f"note: {n}")
    print()
    print("correctness: " + ("PROBLEMS: " + "; ".join(problems) if problems else
                             f"OK ({len(truth)} indices, all exact, all equal to the truth; align_groups too)"))


if __name__ == "__main__":
    main()
