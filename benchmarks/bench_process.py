"""``optckpt`` timed the way a user meets it: the whole process, the output already there.

    python benchmarks/bench_process.py [--cases small,issue,many] [--repeats 3] [--tmpdir DIR]

Every figure is the wall time of a whole process (interpreter start-up, imports, work, exit) minus
the wall time of a ``python -c "import torch"`` process run just before it; medians of --repeats rounds, the commands
interleaved round by round, page cache warm (inputs read once first), every output path already
existing (a re-run overwrites it, as ``cp`` over an existing file does). Baselines, timed the same way:

* ``cp A OUT && sync``          (OUT pre-existing) for ``remap`` (whose figure includes a ``sync`` too)
* ``cat A B > /dev/null``       for ``diff`` (kept for comparison with earlier runs; GNU ``cat`` may splice
                                into /dev/null without reading), and ``cmp A A2`` (two identical files,
                                every byte read and compared) for ``diff A A2``
* ``torch.load(A, weights_only=True)`` (whole process minus ``import torch``) for ``inspect``
* the naive script: ``torch.load`` → re-key the optimizer state → ``torch.save`` (+ ``sync``)

The optckpt and naive processes also record the time after their imports (``optckpt.cli``;
the naive script's ``import torch``): printed as the *after-import* figures. optckpt imports torch
only when a command needs tensor values (``inspect`` / ``check`` / ``set`` / ``remap`` with a names
file do not). The *whole-process* figures (nothing subtracted: what the user waits for) are printed
too. Peak private memory (``RssAnon``, sampled every 5 ms) is reported per process.

Checkpoints (synthetic, float32, Adam state built directly: ``step`` / ``exp_avg`` / ``exp_avg_sq``
per parameter, one storage each): a pre-LN transformer of ``blocks`` blocks of width ``d`` (two
LayerNorms, fused qkv, output projection, 4x MLP: 12 parameters a block) plus an 8192 x d embedding.
B for ``diff`` is A with one tensor perturbed. The remap target reverses the parameter order."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CASES = {  # name: (d, blocks); storages = 4 * (12 * blocks + 1)
    "small": (512, 12),   # 580 storages, 0.49 GB
    "issue": (512, 39),   # 1,876 storages, 1.53 GB: the bundle of issue #20 (469 parameters)
    "many": (128, 208),   # 9,988 storages, 0.43 GB of small tensors
    "huge": (8, 12_500),  # 600,004 storages (150k parameters with Adam state), 0.04 GB: per-storage costs only
}

WRAP = r"""
import os, sys, time
if sys.argv[1] == "naive":
    import torch
import optckpt.cli  # (torch comes in only when a command needs tensor values)
t0 = time.perf_counter()


def stamp():
    with open(os.environ["BENCH_TIME"], "w") as f:
        f.write(str(time.perf_counter() - t0))


if sys.argv[1] == "naive":
    sys.argv = sys.argv[1:]
    exec(compile(NAIVE, "naive", "exec"))
    stamp()
else:  # the program as the console script runs it (optckpt.cli.entry: its exit included), timed to its end
    command = optckpt.cli.main

    def timed():
        try:
            command()
        finally:
            stamp()

    optckpt.cli.main = timed
    sys.argv = ["optckpt", *sys.argv[1:]]
    optckpt.cli.entry()
"""

NAIVE = r"""
import sys, torch
src, dst = sys.argv[1], sys.argv[2]
ck = torch.load(src, weights_only=True, map_location="cpu")
st = ck["optimizer"]["state"]
n = len(ck["optimizer"]["param_groups"][0]["params"])
ck["optimizer"]["state"] = {n - 1 - i: v for i, v in st.items()}
torch.save(ck, dst)
"""


def layout(d: int, blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (8192, d))]
    for b in range(blocks):
        p = f"blocks.{b}."
        out += [(p + "ln1.weight", (d,)), (p + "ln1.bias", (d,)),
                (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                (p + "ln2.weight", (d,)), (p + "ln2.bias", (d,)),
                (p + "mlp.fc1.weight", (4 * d, d)), (p + "mlp.fc1.bias", (4 * d,)),
                (p + "mlp.fc2.weight", (d, 4 * d)), (p + "mlp.fc2.bias", (d,))]
    return out


def build(path: str, d: int, blocks: int) -> tuple[list[str], int]:
    import torch

    g = torch.Generator().manual_seed(0)
    lay = layout(d, blocks)
    model = {n: torch.randn(s, generator=g) for n, s in lay}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(s, generator=g) * 1e-3,
                 "exp_avg_sq": torch.rand(s, generator=g) * 1e-6} for i, (_, s) in enumerate(lay)}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
               "fused": None, "decoupled_weight_decay": False, "params": list(range(len(lay)))}]
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": groups}, "epoch": 1}, path)
    return [n for n, _ in lay], max(4 * _numel(s) for _, s in lay)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def run(cmd: list[str] | str, *, env: dict[str, str] | None = None, shell: bool = False,
        ok: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Wall seconds and peak RssAnon (KiB) of one process."""
    peak = 0
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, shell=shell, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode not in ok:
        raise SystemExit(f"{cmd}: exit {p.returncode}: {err.decode()[-2000:]}")
    return wall, peak


def warm(*paths: str) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def bench_case(name: str, d: int, blocks: int, repeats: int, tmp: str) -> dict[str, object]:
    py = sys.executable
    a, b, out, cp_out, a2, edit = (os.path.join(tmp, x) for x in ("a.pt", "b.pt", "out.pt", "cp.pt", "a2.pt",
                                                                  "edit.pt"))
    names, largest = build(a, d, blocks)
    target = os.path.join(tmp, "target.json")
    with open(target, "w") as f:
        json.dump(names[::-1], f)
    subprocess.run([py, "-c", "import torch,sys; ck=torch.load(sys.argv[1], weights_only=True, mmap=True);"
                    "w='blocks.3.mlp.fc1.weight'; ck['model'][w] = ck['model'][w] + 1e-3;"
                    "torch.save(ck, sys.argv[2])", a, b], check=True)
    stamp = os.path.join(tmp, "t.txt")
    env = dict(os.environ, BENCH_TIME=stamp)
    wrap = [py, "-c", f"NAIVE = {NAIVE!r}\n" + WRAP]
    remap = [*wrap, "remap", a, "--target", target, "-o", out, "--format", "json"]
    # the output paths exist before every timed run (a re-run), as for cp
    subprocess.run(remap, env=env, check=True, stdout=subprocess.DEVNULL)
    shutil.copyfile(a, cp_out)
    shutil.copyfile(a, a2)
    shutil.copyfile(a, edit)
    warm(a, b, a2)
    subprocess.run(["sync"], check=True)
    walls: dict[str, list[float]] = {}
    whole: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    mem: dict[str, int] = {}

    def rec(label: str, wall: float, peak: int, inner: bool = False) -> None:
        walls.setdefault(label, []).append(wall)
        mem[label] = max(mem.get(label, 0), peak)
        if inner:
            with open(stamp) as f:
                after.setdefault(label, []).append(float(f.read()))

    def py_rec(label: str, cmd: list[str], inner: bool = False, sync: bool = False, **kw: object) -> None:
        """A Python process, net of an ``import torch`` process run just before it (paired: on a
        shared machine start-up time drifts by seconds between rounds)."""
        base, base_mem = run([py, "-c", "import torch"])
        walls.setdefault("import torch", []).append(base)
        mem["import torch"] = max(mem.get("import torch", 0), base_mem)
        wall, peak = synced(cmd, **kw) if sync else run(cmd, **kw)  # type: ignore[arg-type]
        whole.setdefault(label, []).append(wall)
        rec(label, wall - base, peak, inner)

    def synced(cmd: list[str], **kw: object) -> tuple[float, int]:
        t, m = run(cmd, **kw)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        return t + time.perf_counter() - t0, m

    for _ in range(repeats):
        rec("cp A OUT && sync", *synced(["cp", a, cp_out]))
        py_rec("remap", remap, inner=True, sync=True, env=env)
        py_rec("naive load/re-key/save", [*wrap, "naive", a, cp_out], inner=True, sync=True, env=env)
        py_rec("torch.load", [py, "-c", "import torch,sys; torch.load(sys.argv[1], weights_only=True)", a])
        py_rec("inspect", [*wrap, "inspect", a, "--format", "json"], inner=True, env=env)
        py_rec("check", [*wrap, "check", a, "--target", target, "--format", "json"], inner=True, env=env, ok=(1,))
        rec("cat A B", *run(f"cat {a} {b} > /dev/null", shell=True))
        py_rec("diff", [*wrap, "diff", a, b, "--format", "json"], inner=True, env=env, ok=(1,))
        rec("cmp A A2", *run(["cmp", a, a2]))
        py_rec("diff identical", [*wrap, "diff", a, a2, "--format", "json"], inner=True, env=env)
        py_rec("set --in-place", [*wrap, "set", edit, "--scale-lr", "1.0", "--in-place"], inner=True, sync=True,
               env=env)
    base = statistics.median(walls["import torch"])
    net = {k: statistics.median(v) for k, v in walls.items() if k != "import torch"}
    aft = {k: statistics.median(v) for k, v in after.items()}
    tot = {k: statistics.median(v) for k, v in whole.items()}
    for k in ("cp A OUT && sync", "cat A B", "cmp A A2"):
        tot[k] = net[k]
    res: dict[str, object] = {
        "case": name, "d": d, "blocks": blocks, "params": len(names), "storages": 4 * len(names),
        "bytes": os.path.getsize(a), "largest": largest, "import_torch_s": base, "net_s": net,
        "whole_s": tot, "after_import_s": aft,
        "peak_private_mib": {k: mem[k] / 1024 for k in mem if k not in ("cp A OUT && sync", "cat A B")},
        "ratios": {
            "inspect / torch.load": net["inspect"] / net["torch.load"],
            "remap / (cp && sync)": net["remap"] / net["cp A OUT && sync"],
            "remap / naive": net["remap"] / net["naive load/re-key/save"],
            "diff / cat A B": net["diff"] / net["cat A B"],
            "diff identical / cmp": net["diff identical"] / net["cmp A A2"],
            "set --in-place / (cp && sync)": net["set --in-place"] / net["cp A OUT && sync"],
        },
        "whole_process_ratios": {
            "inspect / torch.load": tot["inspect"] / tot["torch.load"],
            "check / torch.load": tot["check"] / tot["torch.load"],
            "remap / (cp && sync)": tot["remap"] / tot["cp A OUT && sync"],
            "remap / naive": tot["remap"] / tot["naive load/re-key/save"],
            "diff identical / cmp": tot["diff identical"] / tot["cmp A A2"],
            "set --in-place / (cp && sync)": tot["set --in-place"] / tot["cp A OUT && sync"],
        },
        "after_import_ratios": {
            "remap / (cp && sync)": aft["remap"] / net["cp A OUT && sync"],
            "diff / cat A B": aft["diff"] / net["cat A B"],
        },
    }
    for p in (a, b, out, cp_out, a2, edit):
        os.unlink(p)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="small,issue,many")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="optckpt-bench-process-", dir=args.tmpdir)
    results = []
    try:
        for name in args.cases.split(","):
            d, blocks = CASES[name]
            r = bench_case(name, d, blocks, args.repeats, tmp)
            results.append(r)
            if not args.json:
                show(r, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))


def show(r: dict[str, object], repeats: int) -> None:
    net, aft, mem = r["net_s"], r["after_import_s"], r["peak_private_mib"]
    assert isinstance(net, dict) and isinstance(aft, dict) and isinstance(mem, dict)
    print(f"\n== {r['case']}: {r['params']} parameters, {r['storages']} storages, {r['bytes'] / 1e9:.2f} GB, "
          f"largest tensor {r['largest'] / 2**20:.0f} MiB; median of {repeats}; "
          f"python -c 'import torch' (median {r['import_torch_s']:.2f} s) subtracted pairwise")
    tot = r["whole_s"]
    assert isinstance(tot, dict)
    print(f"{'command':30s} {'whole s':>8s} {'net of import s':>16s} {'after-import s':>15s} {'peak RssAnon':>14s}")
    for k, v in net.items():
        a = f"{aft[k]:.2f}" if k in aft else ""
        m = f"{mem[k]:.0f} MiB" if k in mem else ""
        print(f"{k:30s} {tot[k]:8.2f} {v:16.2f} {a:>15s} {m:>14s}")
    for k, v in dict(r["whole_process_ratios"]).items():  # type: ignore[call-overload]
        print(f"  whole process {k:30s} = {v:.2f}")
    for k, v in dict(r["ratios"]).items():  # type: ignore[call-overload]
        print(f"  {k:24s} = {v:.2f}")
    for k, v in dict(r["after_import_ratios"]).items():  # type: ignore[call-overload]
        print(f"  after-import {k:11s} = {v:.2f}")


if __name__ == "__main__":
    main()
