"""A DeepSpeed ZeRO checkpoint whose ``param_shapes`` declares many zero-size parameters (issue #27,
"bounded DeepSpeed"): whole-process wall time and peak RSS of ``optckpt inspect`` (table and json)
and ``optckpt check`` against it.

    python benchmarks/bench_deepspeed.py [--entries 300000] [--repeats 1] [--tmpdir DIR] [--keep]
                                         [--deepspeed-objects] [--only WORDS]

``check names.json``: against the names the checkpoint holds (a names file per param group: what an
unchanged model expects; no model code, so no torch import for the target).

The checkpoint is the committed stage-2 fixture (``fixtures/zero_ckpts/stage2``, written by DeepSpeed
itself) with ``n`` entries ``empty.i: torch.Size([0, 4])`` added to group 0 of ``param_shapes`` and
matching zero paddings to ``param_alignment_paddings`` (what the tests' ``_zero_size`` does). The
optimizer file pickles DeepSpeed objects; they are read here with inert stand-ins (DeepSpeed is not
needed) and the file is written back without them, or, with ``--deepspeed-objects``, written back as
they were read (as in a real file). Both are read without torch: the first by the lazy reader, the
second by the lazy placeholder reader (inert placeholders). Peak RSS is the child's ``ru_maxrss``
(whole process: interpreter, imports, work), as ``/usr/bin/time -v`` reports it. The checkpoint is
built in a process of its own: Linux carries the parent's high-water mark at ``fork`` into the
child's ``ru_maxrss``, so a parent that had imported torch and built 300k entries (~390 MB) would floor
every measurement at its own size; this parent stays at ~15 MB."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "fixtures" / "zero_ckpts" / "stage2"
MODELS = '''
import torch

def build():
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    groups = [{"params": [m[0].weight, m[2].weight]},
              {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}]
    return m, torch.optim.AdamW(groups, lr=1e-2)
'''


class _Stub:
    def __new__(cls, *a: object, **k: object) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *a: object, **k: object) -> None:
        pass

    def __setstate__(self, s: object) -> None:
        pass


def _plain(o: object) -> object:
    if isinstance(o, _Stub):
        return None
    if isinstance(o, dict):
        return type(o)((k, _plain(v)) for k, v in o.items())
    if isinstance(o, list):
        return [_plain(v) for v in o]
    return o


def build(dst: Path, n: int, keep_objects: bool = False) -> Path:
    """The stage-2 fixture with ``n`` zero-size parameters declared in group 0. ``keep_objects``: the
    optimizer file keeps DeepSpeed's pickled objects (the loss scaler, the stage enum, fragment
    addresses), read as optckpt's inert placeholders and written back as they were read (what a real
    file holds: the lazy reader leaves such a file to the torch-backed reader)."""
    import torch

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            return _Stub if module.startswith("deepspeed") else super().find_class(module, name)

    shutil.copytree(SRC, dst)
    step = dst / "global_step3"
    model = step / "mp_rank_00_model_states.pt"
    optim = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(model, weights_only=True)
    for i in range(n):
        sd["param_shapes"][0][f"empty.{i}"] = torch.Size([0, 4])
    torch.save(sd, model)
    # the names the checkpoint holds, per param group in optimizer order (an unchanged model's names file)
    (dst / "names.json").write_text(json.dumps([list(g) for g in sd["param_shapes"]]))
    if keep_objects:
        sys.path.insert(0, str(ROOT))
        from optckpt.io.safepickle import pickle_module_for
        from optckpt.io.torchfile import load_torch_file

        osd: Any = load_torch_file(str(optim)).obj
        osd["optimizer_state_dict"]["param_alignment_paddings"][0] += [0] * n
        torch.save(osd, optim, pickle_module=pickle_module_for(osd))
    else:
        pm = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
        osd = _plain(torch.load(optim, weights_only=False, pickle_module=pm))
        osd["optimizer_state_dict"]["param_alignment_paddings"][0] += [0] * n
        torch.save(osd, optim)
    (dst / "models.py").write_text(MODELS)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--deepspeed-objects", action="store_true",
                    help="keep DeepSpeed's pickled objects in the optimizer file (as a real file has them)")
    ap.add_argument("--only", default="", help="run only the commands whose label contains one of these "
                    "comma-separated words (e.g. 'table,names')")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)  # (the child that builds)
    a = ap.parse_args()
    if a.build_only:
        build(Path(a.build_only), a.entries, a.deepspeed_objects)
        return
    tmp = Path(tempfile.mkdtemp(dir=a.tmpdir, prefix="bench_ds_"))
    try:
        t0 = time.perf_counter()
        d = tmp / "ckpt"
        subprocess.run([sys.executable, __file__, "--entries", str(a.entries), "--build-only", str(d),
                        *(["--deepspeed-objects"] if a.deepspeed_objects else [])], check=True)
        print(f"built {a.entries:,} zero-size entries in {time.perf_counter() - t0:.1f} s: {d}", file=sys.stderr)
        commands = {
            "inspect (table)": ["inspect", str(d), "--format", "table"],
            "inspect --format json": ["inspect", str(d), "--format", "json"],
            "check --format json": ["check", str(d), "--target", f"{d / 'models.py'}:build", "--format", "json"],
            "check names.json": ["check", str(d), "--target", str(d / "names.json"), "--format", "json"],
        }
        print(f"{'command':<24} {'wall s':>8} {'cpu s':>7} {'peak RSS MB':>12} {'exit':>5} {'stdout MB':>10}")
        words = [w for w in a.only.split(",") if w]
        for label, args in commands.items():
            if words and not any(w in label for w in words):
                continue
            for _ in range(a.repeats):
                wall, cpu, rss, code, nout = run_one(args, tmp)
                print(f"{label:<24} {wall:>8.2f} {cpu:>7.2f} {rss:>12.0f} {code:>5} {nout / 1e6:>10.1f}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run_one(args: list[str], cwd: Path) -> tuple[float, float, float, int, int]:
    """One process: wall time, CPU time (user + system: what a busy machine changes least), its own
    peak RSS (``wait4``: not the children's high-water mark of earlier runs), exit code, stdout bytes."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "optckpt", *args], stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        nout = out.tell()
        if code not in (0, 1):
            err.seek(0)
            sys.stderr.write(err.read().decode()[-2000:])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code, nout


if __name__ == "__main__":
    main()
