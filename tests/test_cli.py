"""The CLI as a newcomer meets it: instant help, checked input, usage errors in the one-line form,
output that explains itself, an optimizer file checked with no model saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FIXTURES, ROOT, invoke, invoke_json, run_cli

SEED_OPT = str(FIXTURES / "seed" / "optimizer_0.pth")
SEED_MODEL = str(FIXTURES / "seed" / "model_0.pth")
BUNDLE = str(FIXTURES / "bundle.pt")


def _one_line_error(r, exit_code: int = 2) -> str:
    assert r.exit_code == exit_code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optckpt: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


# --- instant --help / --version / completion -------------------------------------------------------

_NO_TORCH = textwrap.dedent("""
    import os, sys
    from optckpt.cli import main
    sys.argv = ["optckpt", *sys.argv[1:]]
    try:
        main()
    except SystemExit as e:
        code = e.code
    print("TORCH-IMPORTED" if "torch" in sys.modules else "no-torch", code)
""")


@pytest.mark.parametrize("args,env", [(["--help"], {}), (["--version"], {}), (["set", "--help"], {}),
                                      ([], {"_OPTCKPT_COMPLETE": "bash_complete", "COMP_WORDS": "optckpt diff a b --o",
                                            "COMP_CWORD": "4"})])
def test_help_version_and_completion_do_not_import_torch(args, env):
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **env), timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "no-torch 0", r.stdout + r.stderr
    if env:
        assert "--only" in r.stdout  # the completion really answered


_ENTRY = textwrap.dedent("""
    import atexit, sys, threading, time
    if sys.argv[1] == "handler":
        atexit.register(print, "exit handler ran")
    elif sys.argv[1] == "thread":
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    sys.argv = ["optckpt", *sys.argv[2:]]
    from optckpt.cli import entry
    entry()
""")


@pytest.mark.parametrize("mode", ["plain", "handler", "thread"])
def test_the_program_exit_keeps_output_code_handlers_and_threads(mode, tmp_path):
    """The program ends without the interpreter's teardown only when nothing is left to run: the whole
    output arrives through a pipe, the exit code is the command's, a registered exit handler still
    runs and a running thread still finishes."""
    r = subprocess.run([sys.executable, "-c", _ENTRY, mode, "inspect", BUNDLE, "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)  # (read without torch)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    if mode == "handler":
        assert text.endswith("exit handler ran\n")
        text = text[:-len("exit handler ran\n")]
    if mode == "thread":
        assert text.endswith("thread finished\n")
        text = text[:-len("thread finished\n")]
    assert json.loads(text)["optimizers"], text
    bad = subprocess.run([sys.executable, "-c", _ENTRY, mode, "inspect", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("optckpt: error: "), bad.stderr


_COLLECTOR = textwrap.dedent("""
    import atexit, gc, sys
    sys.argv = ["optckpt", *sys.argv[1:]]
    if sys.argv[1] == "api":
        import optckpt
        optckpt.load(sys.argv[2])
        print("collector", gc.isenabled())
    else:
        atexit.register(lambda: print("collector", gc.isenabled()))  # (the ordinary exit: the handler runs)
        from optckpt.cli import entry
        entry()
""")


def test_the_program_runs_without_the_cyclic_collector_and_the_api_keeps_it():
    """The ``optckpt`` program turns the cyclic collector off (every collection would walk the whole
    checkpoint again); a resume script calling the API keeps it on."""
    prog = subprocess.run([sys.executable, "-c", _COLLECTOR, "inspect", BUNDLE, "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    api = subprocess.run([sys.executable, "-c", _COLLECTOR, "api", BUNDLE], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert prog.returncode == 0 and api.returncode == 0, prog.stderr + api.stderr
    assert prog.stdout.split()[-2:] == ["collector", "False"], prog.stdout[-200:]
    assert api.stdout.split() == ["collector", "True"], api.stdout


_CYCLES = textwrap.dedent("""
    import contextlib, gc, io, shutil, sys
    gc.disable()
    import optckpt.cli
    src, names, tmp = sys.argv[1:4]
    shutil.copyfile(src, tmp + "/edit.pt")
    commands = [["inspect", src, "--format", "json"], ["check", src, "--target", names],
                ["remap", src, "--target", names, "-o", tmp + "/out.pt"], ["set", tmp + "/edit.pt", "--lr", "0.5",
                "--in-place"], ["diff", src, tmp + "/out.pt"], ["reset", src, "--params", "w1*", "-o", tmp + "/r.pt"]]
    gc.collect()
    for argv in commands:
        sys.argv = ["optckpt", *argv]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            optckpt.cli.main()
        print(argv[0], gc.collect())
""")


def test_commands_leave_next_to_no_reference_cycles(tmp_path):
    """What a command built is freed when it ends by reference counting alone: the program runs
    without the cyclic collector, so a cycle holding a checkpoint (a recursive closure over what was
    found, as discovery once had: ~2,000 objects here) would keep all of it until the exit."""
    params = [torch.nn.Parameter(torch.full((3,), float(i))) for i in range(300)]
    opt = torch.optim.Adam(params, lr=0.1)
    sum(q.sum() for q in params).backward()
    opt.step()
    src = tmp_path / "c.pt"
    torch.save({"model": {f"w{i}": q.detach() for i, q in enumerate(params)}, "optimizer": opt.state_dict()}, src)
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"w{i}" for i in reversed(range(300))]))
    r = subprocess.run([sys.executable, "-c", _CYCLES, str(src), str(names), str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    counts = dict(line.split() for line in r.stdout.splitlines())
    assert set(counts) == {"inspect", "check", "remap", "set", "diff", "reset"}, r.stdout + r.stderr
    assert all(int(n) < 300 for n in counts.values()), counts


def test_a_program_around_optckpt_still_runs_after_it():
    """``python -m cProfile -m optckpt`` prints its profile: the program's quick exit is only for optckpt
    run as itself."""
    r = subprocess.run([sys.executable, "-m", "cProfile", "-m", "optckpt", "inspect", BUNDLE, "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "function calls" in r.stdout and '"optimizers"' in r.stdout, r.stdout[-2000:]


def test_completion_offers_every_diff_section():
    env = {"_OPTCKPT_COMPLETE": "bash_complete", "COMP_WORDS": "optckpt diff a b --only ", "COMP_CWORD": "5"}
    r = subprocess.run([sys.executable, "-m", "optckpt"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **env), timeout=120)
    offered = {line.split(",", 1)[1] for line in r.stdout.splitlines()}
    assert offered == {"model", "param_groups", "optimizer", "scheduler", "extra"}


def test_lazy_package_keeps_its_public_names():
    """The public names resolve lazily; reaching the loader imports no torch (the lazy reader reads torch
    zip files without it: torch comes in with the first tensor that needs values)."""
    r = subprocess.run([sys.executable, "-c", "import sys, optckpt; assert 'torch' not in sys.modules; "
                        "print(optckpt.load.__module__, optckpt.MappingError.__module__, 'torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["optckpt.io", "optckpt.errors", "False"], r.stderr


def test_bare_optckpt_prints_help_and_exits_0():
    r = run_cli()
    assert r.returncode == 0 and "Commands:" in r.stdout and r.stderr == ""


# --- usage errors are one line, exit 2 -------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["set", BUNDLE, "--frob"],
    ["check", BUNDLE],  # --target missing
    ["diff", BUNDLE],  # B missing
    ["inspect", BUNDLE, "--format", "yaml"],
    ["nosuchcommand"],
    ["diff", BUNDLE, BUNDLE, "--limit", "0"],
])
def test_usage_errors_are_one_line(args):
    line = _one_line_error(invoke(*args))
    assert "--help" in line  # says where to look


def test_usage_error_in_a_real_process():
    r = run_cli("set", BUNDLE, "--lr")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("optckpt: error: ")


@pytest.mark.parametrize("opt,value", [("--lr", "-1"), ("--lr", "nan"), ("--scale-lr", "inf"), ("--scale-lr", "-0.5"),
                                       ("--weight-decay", "-0.01"), ("--scale-weight-decay", "nan")])
def test_set_refuses_negative_or_non_finite_values(tmp_path, opt, value):
    out = tmp_path / "out.pt"
    before = open(BUNDLE, "rb").read()
    line = _one_line_error(invoke("set", BUNDLE, opt, value, "-o", str(out)))
    assert opt in line and "finite number >= 0" in line
    assert not out.exists() and open(BUNDLE, "rb").read() == before


@pytest.mark.parametrize("opt", ["--atol", "--rtol"])
def test_diff_refuses_negative_tolerances(opt):
    _one_line_error(invoke("diff", BUNDLE, BUNDLE, opt, "-1e-3"))


def test_set_accepts_zero(tmp_path):
    r = invoke("set", BUNDLE, "--weight-decay", "0", "--dry-run")
    assert r.exit_code == 0 and "weight_decay" in r.stdout


# --- names files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text", [
    ("notes.txt", "These are my notes about the run.\nlr 3e-4 was too high\n"),
    ("words.json", json.dumps(["conv weight", "bias"])),
    ("dupes.txt", "linear1.weight\nlinear1.weight\n"),
    ("empty.txt", "# nothing\n"),
    ("dots.txt", "linear1..weight\n"),
])
def test_names_files_must_hold_parameter_names(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    line = _one_line_error(invoke("check", SEED_OPT, "--model", SEED_MODEL, "--target", str(p)))
    assert str(p) in line
    _one_line_error(invoke("check", SEED_OPT, "--source", str(p), "--target", "fixtures/models.py:build_model2"))


def test_source_names_file_must_match_the_optimizer_count(tmp_path):
    p = tmp_path / "old.txt"
    p.write_text("linear1.weight\nlinear1.bias\nlinear2.weight\n")  # the optimizer has 4 indices
    line = _one_line_error(invoke("check", SEED_OPT, "--source", str(p), "--target", "fixtures/models.py:build_model2"))
    assert "[3]" in line and "[4]" in line


def test_a_real_names_file_still_works(tmp_path):
    p = tmp_path / "new.txt"
    p.write_text("linear2.weight\nlinear2.bias\nlinear1.weight\nlinear1.bias\n")
    code, rep = invoke_json("check", SEED_OPT, "--model", SEED_MODEL, "--target", str(p))
    assert code == 1 and rep["counts"]["moved"] == 4


# --- diff --only takes every section it prints -----------------------------------------------------

def test_diff_only_param_groups(tmp_path):
    lowered = tmp_path / "lowered.pt"
    assert invoke("set", BUNDLE, "--scale-lr", "0.5", "-o", str(lowered)).exit_code == 0
    code, rep = invoke_json("diff", BUNDLE, str(lowered), "--only", "param_groups")
    assert code == 1 and rep["entries"]
    assert {e["section"] for e in rep["entries"]} == {"param_groups"}
    from optckpt.cli import DIFF_SECTIONS
    from optckpt.diff import SECTIONS

    assert set(DIFF_SECTIONS) == set(SECTIONS)


# --- output that explains itself -------------------------------------------------------------------

def test_set_shows_scheduler_values_old_and_new():
    r = invoke("set", BUNDLE, "--scale-lr", "0.5", "--dry-run")
    assert r.exit_code == 0
    sched_rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("lr_scheduler")]
    assert ["lr_scheduler", "base_lrs", "(0.001)", "(0.0005)"] in sched_rows
    assert any(row[1] == "_last_lr" for row in sched_rows)
    code, rep = invoke_json("set", BUNDLE, "--scale-lr", "0.5", "--dry-run")
    assert {"scheduler": "lr_scheduler", "key": "base_lrs", "before": [0.001], "after": [0.0005]} in rep["schedulers"]


def test_inspect_stats_shows_optimizer_state_statistics():
    r = invoke("inspect", BUNDLE, "--stats")
    assert r.exit_code == 0
    rows = [ln.split() for ln in r.stdout.splitlines()]
    header = next(i for i, row in enumerate(rows) if row[:3] == ["index", "parameter", "state"])
    assert rows[header][3:] == ["min", "max", "mean", "norm", "nan", "inf"]
    state_rows = [row for row in rows[header + 2:] if len(row) == 9]
    assert {row[2] for row in state_rows} == {"exp_avg", "exp_avg_sq"} and len(state_rows) == 16
    sd = torch.load(BUNDLE, weights_only=True)["optimizer"]["state"]
    exp_avg_0 = next(row for row in state_rows if row[:3] == ["0", "conv.weight", "exp_avg"])
    assert float(exp_avg_0[4]) == pytest.approx(sd[0]["exp_avg"].max().item(), rel=1e-5)


def test_labels_and_plurals():
    r = invoke("check", SEED_OPT, "--model", SEED_MODEL, "--target", "fixtures/models.py:build_model2")
    assert "index: checkpoint -> target" in r.stdout
    r = invoke("inspect", SEED_OPT, "--model", SEED_MODEL)
    assert "4 params in 1 group," in r.stdout and "1 groups" not in r.stdout
    r = invoke("reset", BUNDLE, "--params", "classifier.bias", "--dry-run")
    assert "of 1 parameter:" in r.stdout
    r = invoke("diff", BUNDLE, BUNDLE, "--only", "extra")
    assert "IDENTICAL" in r.stdout


def test_repr_is_short():
    import optckpt

    for path in (BUNDLE, str(FIXTURES / "hf_trainer" / "checkpoint-3"), str(FIXTURES / "gaussians" / "chkpnt3.pth")):
        ck = optckpt.load(path)
        for obj in (ck, *ck.models, *ck.optimizers, *ck.schedulers, *ck.parts):
            text = repr(obj)
            assert len(text) < 300 and "tensor(" not in text, text
    ck = optckpt.load(BUNDLE)
    assert repr(ck) == (f"<Checkpoint {BUNDLE!r}: torch-bundle, 1 model, 1 optimizer, 1 scheduler; "
                        "extras epoch, global_step, best_acc1>")
    assert repr(ck.optimizer()) == "<OptimizerState 'optimizer': 8 params in 1 group, 8 with state>"


# --- an optimizer saved with no model: named by the target's shapes --------------------------------

def test_optimizer_alone_is_named_by_the_target_shapes():
    code, alone = invoke_json("check", SEED_OPT, "--target", "fixtures/models.py:build_model2")
    code_m, with_model = invoke_json("check", SEED_OPT, "--model", SEED_MODEL, "--target",
                                     "fixtures/models.py:build_model2")
    assert alone["evidence"] == "target-shapes" and with_model["evidence"] == "model-order"
    assert code == code_m == 1
    def verdicts(rep):
        return [{k: v for k, v in p.items() if k != "evidence"} for p in rep["params"]]

    assert verdicts(alone) == verdicts(with_model)  # every shape is unique: the same verdict
    assert {p["evidence"] for p in alone["params"]} == {"target-shapes"}
    assert alone["counts"]["moved"] == 4 and all(p["crash"] for p in alone["params"])
    assert any("named by shape only" in n for n in alone["notes"])
    r = invoke("check", SEED_OPT, "--target", "fixtures/models.py:build_model2")
    assert "names from: target shapes: named by shape only" in r.stdout
    code, same = invoke_json("check", SEED_OPT, "--target", "fixtures/models.py:build_model")
    assert code == 0 and same["safe"]  # unchanged model: no false alarm


def test_shared_shapes_stay_ambiguous_with_their_candidates(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 4)
                self.b = nn.Linear(4, 4)
                self.head = nn.Linear(4, 2)

            def forward(self, x):
                return self.head(self.b(torch.relu(self.a(x))))

        def build():
            torch.manual_seed(0)
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import net  # type: ignore[import-not-found]

    model = net.build()
    opt = torch.optim.Adam(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pth")
    code, rep = invoke_json("check", str(tmp_path / "opt.pth"), "--target", f"{tmp_path / 'net.py'}:build")
    assert code == 1 and rep["evidence"] == "target-shapes"
    by_status = {p["name"]: p for p in rep["params"]}
    assert by_status["head.weight"]["status"] == by_status["head.bias"]["status"] == "ok"
    ambiguous = [p for p in rep["params"] if p["status"] == "ambiguous"]
    assert sorted(map(tuple, (p["candidates"] for p in ambiguous))) == [("a.bias", "b.bias")] * 2 + \
        [("a.weight", "b.weight")] * 2
