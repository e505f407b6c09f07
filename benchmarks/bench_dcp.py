"""DCP checkpoints at bounded memory: inspect / diff / remap of a synthetic multi-GB DCP checkpoint.

    python benchmarks/bench_dcp.py [--gib 2.0] [--shards 4] [--tmpdir DIR]

Writes a DCP checkpoint (model + AdamW-like state, ``--shards`` shard files, written by
``torch.distributed.checkpoint.save`` itself, one process) and measures, each in a fresh process
timing its work after the imports, with peak RssAnon sampled from outside:
  inspect   vs  torch's ``dcp_to_torch_save`` (what people do to look inside: materialise it all);
  diff A A  peak private memory vs the checkpoint size and the largest shard;
  remap     (a rename of every FQN) peak private memory and time vs ``cp -r`` of the directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_remap_diff import peak_rss_anon  # noqa: E402

WRITE = r"""
import sys, warnings, torch, torch.distributed.checkpoint as dcp
warnings.simplefilter("ignore")
out, gib, shards = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
n_params = int(gib * 2**30 / 4 / 3)            # weights + exp_avg + exp_avg_sq, float32
per = n_params // 48
model = {f"layers.{i}.weight": torch.randn(per) for i in range(48)}
state = {k: {"step": torch.tensor(10.0), "exp_avg": torch.randn(per), "exp_avg_sq": torch.rand(per)} for k in model}
opt = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
       "amsgrad": False, "params": list(model)}]}
writer = dcp.FileSystemWriter(out, thread_count=shards)
dcp.save({"model": model, "optimizer": opt}, storage_writer=writer, no_dist=True)
"""

TIMED = r"""
import os, sys, time, warnings
warnings.simplefilter("ignore")
import torch, optckpt.cli
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
t0 = time.perf_counter()
code = 0
try:
    if sys.argv[1] == "dcp_to_torch_save":
        dcp_to_torch_save(sys.argv[2], sys.argv[3])
    else:
        sys.argv = ["optckpt", *sys.argv[1:]]
        optckpt.cli.main()
except SystemExit as e:
    code = e.code or 0
open(os.environ["BENCH_TIME"], "w").write(str(time.perf_counter() - t0))
sys.exit(code)
"""


def run(args: list[str], tmp: str) -> tuple[float, int]:
    stamp = os.path.join(tmp, "t.txt")
    _, peak, res = peak_rss_anon([sys.executable, "-c", TIMED, *args], env=dict(os.environ, BENCH_TIME=stamp))
    if res.returncode not in (0, 1):
        raise SystemExit(res.stderr.decode()[-2000:])
    with open(stamp) as f:
        return float(f.read()), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="optckpt-bench-dcp-", dir=args.tmpdir)
    try:
        ck = os.path.join(tmp, "ckpt")
        subprocess.run([sys.executable, "-c", WRITE, ck, str(args.gib), str(args.shards)], check=True)
        files = [os.path.join(ck, n) for n in os.listdir(ck)]
        size = sum(os.path.getsize(f) for f in files)
        largest_shard = max(os.path.getsize(f) for f in files if f.endswith(".distcp"))
        names = os.path.join(tmp, "names.txt")
        with open(names, "w") as f:
            f.write("\n".join(f"net.layers.{i}.weight" for i in range(48)))
        _, floor, _ = peak_rss_anon([sys.executable, "-c", "import torch, optckpt.cli"])
        subprocess.run(f"cat {ck}/* > /dev/null", shell=True, check=True)
        t_ins, m_ins = run(["inspect", ck, "--format", "json"], tmp)
        t_full, m_full = run(["dcp_to_torch_save", ck, os.path.join(tmp, "full.pt")], tmp)
        os.unlink(os.path.join(tmp, "full.pt"))
        t_diff, m_diff = run(["diff", ck, ck, "--format", "json"], tmp)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", ck, os.path.join(tmp, "copy")], check=True)
        subprocess.run(["sync"], check=True)
        t_cp = time.perf_counter() - t0
        t_remap, m_remap = run(["remap", ck, "--target", names, "-o", os.path.join(tmp, "renamed")], tmp)
        t1 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        t_remap += time.perf_counter() - t1
        mib = 1 / 1024
        print(f"DCP checkpoint {size / 2**30:.2f} GiB in {args.shards} shards "
              f"(largest {largest_shard / 2**20:.0f} MiB); private-memory floor (python + torch + optckpt) "
              f"{floor * mib:.0f} MiB; times after imports")
        print(f"  inspect            {t_ins:7.2f} s  +{(m_ins - floor) * mib:6.0f} MiB")
        print(f"  dcp_to_torch_save  {t_full:7.2f} s  +{(m_full - floor) * mib:6.0f} MiB   inspect / it = "
              f"{t_ins / t_full:.3f}")
        print(f"  diff A A           {t_diff:7.2f} s  +{(m_diff - floor) * mib:6.0f} MiB   = "
              f"{(m_diff - floor) * 1024 / largest_shard:.2f}x the largest shard")
        print(f"  remap (rename all) {t_remap:7.2f} s  +{(m_remap - floor) * mib:6.0f} MiB   = "
              f"{(m_remap - floor) * 1024 / largest_shard:.2f}x the largest shard; {t_remap / t_cp:.2f}x cp -r + sync")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
