"""Benchmark: `optckpt inspect` on a GPT-2-small-sized training checkpoint vs plain ``torch.load``.

Builds a synthetic checkpoint laid out like HF GPT-2 small (124M float32 parameters, ``lm_head.weight``
tied to ``transformer.wte.weight``) plus an AdamW state dict with ``step`` / ``exp_avg`` / ``exp_avg_sq``
per parameter and nanoGPT-style decay / no-decay param groups, saved as
``torch.save({"model": sd, "optimizer": opt_sd, "epoch": 1}, path)`` (~1.4 GiB at ``--scale 1``), in a
temporary directory that is deleted at exit.

Then, with the file in the page cache (read once before every measurement), measures in the same run:

* **fresh process** (one worker process per run, methods interleaved round by round, ``--repeats``
  rounds): ``optckpt.load(path)`` + ``inspect_checkpoint(ck)``; the baseline
  ``torch.load(path, weights_only=True, map_location="cpu")`` (reads every tensor); and, for reference,
  ``torch.load(..., mmap=True)`` (what optckpt does underneath). The timed region starts after
  ``import torch``/``import optckpt``. Each worker then reads its own ``/proc/self/status`` with the
  result still alive: ``RssAnon`` (private memory; the pages of a memory-mapped file are page cache, not
  counted) and ``VmHWM`` (peak resident set, file pages included; Linux has no peak-RssAnon counter,
  ``VmHWM`` bounds it from above). An ``import torch``-only worker gives the memory floor.
* **warm process** (one worker per method, one discarded warm-up run then ``--repeats`` runs in a row,
  median): the same calls once one-time costs (lazy imports, caches) are paid.
* **CLI**: ``python -m optckpt inspect PATH --format json > /dev/null`` as a subprocess against the
  subprocess baseline ``python -c "import torch"`` (interpreter + torch start-up), interleaved in
  ``--cli-repeats`` pairs, reported apart and subtracted pairwise; plus the CLI entry point run via
  ``runpy`` in a worker for its memory.

Speed is reported against the baseline measured in the same run (medians); nothing is asserted.
Run from the repository root::

    python benchmarks/bench_inspect.py                            # full size, ~1.4 GiB temp file
    python benchmarks/bench_inspect.py --scale 0.05 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STATUS_FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


# --------------------------------------------------------------------------------------------- helpers


def read_status() -> dict[str, int]:
    """Selected /proc/self/status fields, in KiB (empty where /proc is unavailable)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


def warm_cache(path: str) -> float:
    """Read the whole file once so the next measurement sees it in the page cache (`cat > /dev/null`)."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------- the checkpoint


def gpt2_layout(scale: float) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(name, shape) of the parameters in HF GPT2LMHeadModel registration order, plus tied names
    (later -> first). ``scale`` shrinks the byte size about linearly; the tensor count stays 148."""
    f = math.sqrt(scale)
    d = max(8, round(768 * f))
    vocab = max(16, round(50257 * f))
    ctx = max(8, round(1024 * f))
    out: list[tuple[str, tuple[int, ...]]] = [("transformer.wte.weight", (vocab, d)),
                                              ("transformer.wpe.weight", (ctx, d))]
    for i in range(12):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out, {"lm_head.weight": "transformer.wte.weight"}


def adamw_hparams() -> dict:
    """The param-group keys the installed torch's AdamW writes (read off a real one, 1 element)."""
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return {k: v for k, v in opt.state_dict()["param_groups"][0].items() if k != "params"}


def build_checkpoint(path: str, scale: float) -> tuple[dict[int, str], int]:
    """Write the synthetic checkpoint; return the true index -> name mapping and the parameter count.

    The optimizer state dict is built directly with the structure of ``AdamW(...).state_dict()`` (no
    optimizer step on 124M parameters): groups as nanoGPT's ``configure_optimizers`` makes them
    (decay = parameters with dim >= 2, no-decay = the rest, each in ``named_parameters()`` order)."""
    import torch

    torch.manual_seed(0)
    layout, tied = gpt2_layout(scale)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in layout:
        sd[name] = torch.randn(shape) * 0.02
    for later, first in tied.items():
        sd[later] = sd[first]  # the same tensor: torch.save keeps the tie (one storage)
    decay = [n for n, s in layout if len(s) >= 2]
    nodecay = [n for n, s in layout if len(s) < 2]
    order = decay + nodecay
    state = {
        i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(sd[n]), "exp_avg_sq": torch.zeros_like(sd[n])}
        for i, n in enumerate(order)
    }
    hp = adamw_hparams()
    groups = [
        {**hp, "weight_decay": 0.1, "params": list(range(len(decay)))},
        {**hp, "weight_decay": 0.0, "params": list(range(len(decay), len(order)))},
    ]
    torch.save({"model": sd, "optimizer": {"state": state, "param_groups": groups}, "epoch": 1}, path)
    return dict(enumerate(order)), sum(math.prod(s) for _, s in layout)


# ------------------------------------------------------------------------------------------ workers


def worker(mode: str, path: str, repeats: int) -> None:
    """Runs in a fresh process: ``repeats`` timed runs of one method, then times + memory as JSON."""
    import gc

    import torch

    times: list[dict[str, float]] = []
    keep: object = None
    extra: dict = {}
    if mode == "baseline":
        pass
    elif mode == "optckpt":
        import optckpt
        from optckpt.inspect import inspect_checkpoint

        for _ in range(repeats):
            keep = None
            gc.collect()
            t0 = time.perf_counter()
            ck = optckpt.load(path)
            t1 = time.perf_counter()
            report = inspect_checkpoint(ck)
            t2 = time.perf_counter()
            keep = (ck, report)
            times.append({"total": t2 - t0, "load": t1 - t0, "inspect": t2 - t1})
        extra["optimizers"] = [
            {"evidence": o["name_evidence"], "ambiguous": o["ambiguous"], "num_params": o["num_params"],
             "names": {str(e["index"]): e["inferred_name"] for e in o["entries"]}}
            for o in report["optimizers"]
        ]
        extra["models"] = [{"name": m["name"], "num_tensors": m["num_tensors"],
                            "tied": {t["name"]: t["tied_to"] for t in m["tensors"] if "tied_to" in t}}
                           for m in report["models"]]
    elif mode in ("torch.load", "torch.load-mmap"):
        mmap = mode.endswith("mmap")
        for _ in range(repeats):
            keep = None
            gc.collect()
            t0 = time.perf_counter()
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
            t1 = time.perf_counter()
            keep = obj
            times.append({"total": t1 - t0})
    elif mode == "cli":
        # The CLI's own entry point (what `python -m optckpt` runs) in this process, stdout to
        # /dev/null at the fd level, so its memory can be read afterwards.
        import runpy

        saved_argv, saved_fd = sys.argv, os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        os.dup2(devnull, 1)
        code = 0
        t0 = time.perf_counter()
        try:
            sys.argv = ["optckpt", "inspect", path, "--format", "json"]
            runpy.run_module("optckpt", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            t1 = time.perf_counter()
            sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(devnull)
            sys.argv = saved_argv
        if code:
            raise SystemExit(f"CLI exited with {code}")
        times.append({"total": t1 - t0})
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    status = read_status()  # with the last result still alive
    print(json.dumps({"mode": mode, "times": times, "status": status, **extra}))
    del keep


def run_worker(mode: str, path: str, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--checkpoint", path, "--repeats", str(repeats)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker {mode} failed (exit {res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def time_subprocess(cmd: list[str]) -> float:
    """Wall time of one subprocess, stdout to /dev/null.

    (No memory from here: the peak RSS ``wait4`` reports for a child includes the high-water mark of the
    forked parent, which Linux carries across exec; the ``cli`` worker measures the CLI's memory.)"""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr.decode()}")
    return dt


# --------------------------------------------------------------------------------------------- main


def check_report(opt: dict, cli_report: dict, truth: dict[int, str] | None) -> list[str]:
    """Correctness of what was inspected (not timing): every index named, and named right."""
    problems: list[str] = []
    o = opt["optimizers"][0] if opt.get("optimizers") else None
    if o is None:
        return ["no optimizer found"]
    if truth is None:  # an external file: nothing to compare with, just say how it was named
        print(f"external file: name evidence {o['evidence']}, {o['ambiguous']} ambiguous of {o['num_params']}")
        return problems
    if o["evidence"] != "model-order" or o["ambiguous"]:
        problems.append(f"evidence {o['evidence']}, {o['ambiguous']} ambiguous")
    wrong = [i for i, n in truth.items() if o["names"].get(str(i)) != n]
    if wrong:
        problems.append(f"{len(wrong)} indices named wrongly, e.g. {wrong[:3]}")
    if opt["models"][0]["tied"] != {"lm_head.weight": "transformer.wte.weight"}:
        problems.append(f"tied weights reported as {opt['models'][0]['tied']}")
    cli_opt = cli_report["optimizers"][0] if cli_report.get("optimizers") else {}
    if cli_opt.get("ambiguous", 1) or cli_opt.get("name_evidence") != "model-order":
        problems.append("CLI report differs: " + str({k: cli_opt.get(k) for k in ("name_evidence", "ambiguous")}))
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of GPT-2-small bytes (1.0: 124M params, ~1.4 GiB file); tensor count unchanged")
    ap.add_argument("--repeats", type=int, default=5,
                    help="fresh-process rounds, and runs per warm-process worker (median reported; >= 3)")
    ap.add_argument("--cli-repeats", type=int, default=5, help="CLI / start-up subprocess pairs (median reported)")
    ap.add_argument("--checkpoint", default=None,
                    help="benchmark this existing file instead of building one (truth check skipped)")
    ap.add_argument("--tmpdir", default=None, help="where to write the synthetic checkpoint (default: system temp)")
    ap.add_argument("--verbose", action="store_true", help="print every individual run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.repeats)
        return
    if args.repeats < 1 or args.cli_repeats < 1:
        ap.error("--repeats and --cli-repeats must be >= 1")

    import torch

    tmp = None
    try:
        truth: dict[int, str] | None = None
        n_params = None
        if args.checkpoint:
            path = os.path.abspath(args.checkpoint)
        else:
            tmp = tempfile.mkdtemp(prefix="optckpt-bench-inspect-", dir=args.tmpdir)
            path = os.path.join(tmp, "ckpt.pt")
            print(f"building synthetic GPT-2 checkpoint (scale {args.scale}) in {path} ...", flush=True)
            t0 = time.perf_counter()
            truth, n_params = build_checkpoint(path, args.scale)
            print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        size = os.path.getsize(path)
        t_cat = warm_cache(path)
        print(f"file: {size / 2**30:.2f} GiB" + (f", {n_params / 1e6:.1f}M params" if n_params else "")
              + f"; warm-up read {t_cat:.2f} s; python {sys.version.split()[0]}, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs", flush=True)

        methods = ("optckpt", "torch.load", "torch.load-mmap")
        print(f"fresh-process runs ({args.repeats} rounds x {len(methods) + 1} workers) ...", flush=True)
        fresh: dict[str, list[dict]] = {m: [] for m in ("baseline", *methods)}
        for _ in range(args.repeats):
            for m in ("baseline", *methods):
                warm_cache(path)
                fresh[m].append(run_worker(m, path, 1))
        print(f"warm-process runs ({len(methods)} workers x (1 warm-up + {args.repeats}) runs) ...", flush=True)
        warm: dict[str, dict] = {}
        for m in methods:
            warm_cache(path)
            warm[m] = run_worker(m, path, args.repeats + 1)
            warm[m]["times"] = warm[m]["times"][1:]  # the first run pays the one-time costs: dropped

        print(f"CLI subprocess vs `python -c 'import torch'` ({args.cli_repeats} pairs) ...", flush=True)
        cli_cmd = [sys.executable, "-m", "optckpt", "inspect", path, "--format", "json"]
        base_cmd = [sys.executable, "-c", "import torch"]
        check = subprocess.run(cli_cmd, check=False, capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"CLI failed (exit {check.returncode}):\n{check.stderr}")
        cli_report = json.loads(check.stdout)
        cli_t, base_t = [], []
        for _ in range(args.cli_repeats):
            warm_cache(path)
            base_t.append(time_subprocess(base_cmd))
            cli_t.append(time_subprocess(cli_cmd))
        print(f"CLI entry point in a worker, for memory ({args.cli_repeats} runs) ...", flush=True)
        cli_w = []
        for _ in range(args.cli_repeats):
            warm_cache(path)
            cli_w.append(run_worker("cli", path, 1))

        problems = check_report(fresh["optckpt"][-1], cli_report, truth)

        # ------------------------------------------------------------------------------- report
        def med(xs: list[float]) -> float:
            return statistics.median(xs)

        def field(runs: list[dict], key: str) -> list[float]:
            return [t[key] for r in runs for t in r["times"]]

        def mem(runs: list[dict], key: str) -> float | None:
            vals = [r["status"][key] for r in runs if key in r["status"]]
            return statistics.median(vals) if vals else None

        rows: list[list[str]] = []

        def row(label: str, xs: list[float], runs: list[dict] | None = None, note: str = "") -> None:
            mem_cols = [mib(mem(runs, "RssAnon")), mib(mem(runs, "VmHWM"))] if runs else ["", ""]
            rows.append([label, fmt_s(med(xs)), fmt_s(min(xs)), fmt_s(max(xs)), *mem_cols, note])
            if args.verbose:
                rows.append(["    runs: " + ", ".join(fmt_s(x) for x in xs), "", "", "", "", "", ""])

        fo, ft, fm, fb = fresh["optckpt"], fresh["torch.load"], fresh["torch.load-mmap"], fresh["baseline"]
        cli_net = [c - b for c, b in zip(cli_t, base_t)]
        row("fresh: optckpt.load + inspect_checkpoint", field(fo, "total"), fo)
        row("  of which optckpt.load", field(fo, "load"))
        row("  of which inspect_checkpoint", field(fo, "inspect"))
        row("fresh: torch.load (baseline, reads all)", field(ft, "total"), ft)
        row("fresh: torch.load mmap=True (reference)", field(fm, "total"), fm)
        rows.append(["fresh: import torch only (memory floor)", "", "", "", mib(mem(fb, "RssAnon")),
                     mib(mem(fb, "VmHWM")), ""])
        row("warm: optckpt.load + inspect_checkpoint", field([warm["optckpt"]], "total"))
        row("  of which optckpt.load", field([warm["optckpt"]], "load"))
        row("  of which inspect_checkpoint", field([warm["optckpt"]], "inspect"))
        row("warm: torch.load (baseline, reads all)", field([warm["torch.load"]], "total"))
        row("warm: torch.load mmap=True (reference)", field([warm["torch.load-mmap"]], "total"))
        row("subprocess: python -c 'import torch'", base_t)
        row("subprocess: optckpt inspect --format json", cli_t)
        row("  CLI minus start-up (pairwise)", cli_net)
        row("  CLI entry point after import torch", field(cli_w, "total"), cli_w, "runpy worker")

        headers = ["measurement", "median", "min", "max", "RssAnon MiB", "VmHWM MiB", "note"]
        widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
        print()
        print(f"medians of {args.repeats} runs ({args.cli_repeats} for the CLI); memory: medians, read at the end "
              "of each worker with the result alive")
        for r in [headers, ["-" * w for w in widths]] + rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())

        print()
        print("ratios (same run, medians):")
        print(f"  fresh: (optckpt.load + inspect) / torch.load      = "
              f"{med(field(fo, 'total')) / med(field(ft, 'total')):.4f}   (target <= 0.05)")
        print(f"  warm:  (optckpt.load + inspect) / torch.load      = "
              f"{med(field([warm['optckpt']], 'total')) / med(field([warm['torch.load']], 'total')):.4f}   "
              "(target <= 0.05)")
        ratio = med(field(fo, 'total')) / med(field(fm, 'total'))
        print(f"  fresh: (optckpt.load + inspect) / torch.load mmap = {ratio:.2f}")
        print(f"  (CLI - start-up) / fresh torch.load               = {med(cli_net) / med(field(ft, 'total')):.4f}")
        print(f"  CLI / python -c 'import torch'                    = {med(cli_t) / med(base_t):.2f}")
        base_anon = mem(fb, "RssAnon")
        if base_anon is not None:
            for label, runs in (("optckpt", fo), ("CLI", cli_w), ("torch.load", ft), ("torch.load mmap", fm)):
                anon = mem(runs, "RssAnon")
                if anon is not None:
                    print(f"  RssAnon {label:<16} {mib(anon):>6} MiB = {mib(anon - base_anon):>6} MiB above "
                          f"`import torch` ({mib(base_anon)} MiB); file {size / 2**20:.0f} MiB")
        print()
        if problems:
            print("correctness: PROBLEMS: " + "; ".join(problems))
        elif truth is not None:
            print(f"correctness: OK ({len(truth)} optimizer indices named exactly as the truth, "
                  "lm_head tie reported, CLI agrees)")
        else:
            print("correctness: not checked (external file, no truth)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
