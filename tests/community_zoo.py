"""The community optimizer matrix: real optimizers from the libraries people train with, a small
model that the new code reorders (and in which it renames a submodule), and the ground truth.

Each case trains three steps with the old code, saves ``{"model", "optimizer"}`` with
``torch.save``, continues two more steps (the uninterrupted run), and then resumes the saved file in
the new code — repaired by ``optckpt remap`` (a real subprocess), by the API, or loaded plainly —
and compares two more steps with the uninterrupted run parameter by parameter. The outcome of a
case is ``exact`` (within :data:`ATOL`), ``refused`` (one line, exit 2 / ``MappingError``) or
``wrong`` (anything else: a difference, a crash at ``step()``, a traceback).

A control reloads the saved state into the unchanged code with plain ``load_state_dict``: where
that does not reproduce the uninterrupted run (the optimizer's own round trip is not exact), cases
are compared with the control instead, and the control's difference is reported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ATOL = 1e-6
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# the new code: the same layers, registered in another order ("reordered"), and also with fc2
# renamed to proj ("renamed"); "same" is the unchanged code, "moved" renames only (order kept)
VARIANTS = ("same", "moved", "reordered", "renamed")
RENAME = "fc2.=proj."


class Net(nn.Module):
    def __init__(self, variant: str = "same"):
        super().__init__()
        torch.manual_seed(0)
        a, b, n = nn.Linear(4, 6), nn.Linear(6, 12), nn.LayerNorm(12)
        if variant == "same":
            self.fc1, self.fc2, self.norm = a, b, n
        elif variant == "moved":
            self.fc1, self.proj, self.norm = a, b, n
        elif variant == "reordered":
            self.norm, self.fc2, self.fc1 = n, b, a
        else:
            self.norm, self.proj, self.fc1 = n, b, a
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.proj if hasattr(self, "proj") else self.fc2
        return self.norm(mid(torch.relu(self.fc1(x))))


def renamed(variant: str) -> bool:
    return variant in ("moved", "renamed")


def old_name(name: str) -> str:
    return "fc2." + name[len("proj."):] if name.startswith("proj.") else name


def new_name(name: str, variant: str) -> str:
    return "proj." + name[len("fc2."):] if renamed(variant) and name.startswith("fc2.") else name


def groups(model: nn.Module, ngroups: int, variant: str, extra: dict[str, Any] | None = None) -> list[dict]:
    """The training code's param groups, built in model order. Two groups: decay (matrices) and
    no-decay (vectors); the new code (reordered variants) lists them the other way round.
    ``extra`` is added to the matrix group (GaLore's projection settings)."""
    named = list(model.named_parameters())
    if ngroups == 1:
        return [{"params": [p for _, p in named], **(extra or {})}]
    g = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1, **(extra or {})},
         {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return g[::-1] if variant in ("reordered", "renamed") else g


@dataclass
class Spec:
    """One optimizer of one library: ``make(model, ngroups, variant)`` builds it as training code does."""

    lib: str  # the import name of the library
    name: str
    make: Callable[[nn.Module, int, str], torch.optim.Optimizer]
    train_mode: bool = False  # schedulefree: optimizer.train() before stepping
    pickled: bool = False  # its state holds Python objects (the resume script loads with full pickle)
    ngroups: tuple[int, ...] = (1, 2)
    slow: bool = False  # first step compiles (minutes on a CPU)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.lib}.{self.name}"

    def build(self, variant: str, ngroups: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = Net(variant)
        opt = self.make(model, ngroups, variant)
        if self.train_mode:
            opt.train()  # type: ignore[attr-defined]
        return model, opt


def _simple(lib: str, name: str, attr: str, **kw: Any) -> Spec:
    def make(model: nn.Module, ngroups: int, variant: str) -> torch.optim.Optimizer:
        mod = importlib.import_module(lib)
        cls = mod
        for part in attr.split("."):
            cls = getattr(cls, part)
        return cls(groups(model, ngroups, variant), **kw)  # type: ignore[operator]

    return Spec(lib, name, make)


def _galore(name: str) -> Spec:
    def make(model: nn.Module, ngroups: int, variant: str) -> torch.optim.Optimizer:
        import galore_torch

        proj = GALORE_GROUP
        cls = getattr(galore_torch, name)
        kw: dict[str, Any] = {"lr": 1e-2}
        if name == "GaLoreAdafactor":
            kw["relative_step"] = False
        # one group: plain (no projection); two: the matrices projected (GaLore's own recipe)
        return cls(groups(model, ngroups, variant, extra=proj if ngroups == 2 else None), **kw)

    return Spec("galore_torch", name, make, pickled=True)


def _heavyball(name: str) -> Spec:
    def make(model: nn.Module, ngroups: int, variant: str) -> torch.optim.Optimizer:
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # heavyball's own switch: eager steps (compiling takes a minute here)
        return getattr(heavyball, name)(groups(model, ngroups, variant), lr=1e-2)

    return Spec("heavyball", name, make)


def _schedulefree(name: str) -> Spec:
    spec = _simple("schedulefree", name, name, lr=1e-2)
    spec.train_mode = True
    return spec


def _adam_mini() -> Spec:
    def make(model: nn.Module, ngroups: int, variant: str) -> torch.optim.Optimizer:
        import adam_mini

        # Adam-mini builds its own groups (one per parameter, with its name) from named_parameters
        return adam_mini.Adam_mini(named_parameters=model.named_parameters(), lr=1e-2, dim=6, n_heads=1,
                                   weight_decay=0.1, verbose=False)

    return Spec("adam_mini", "Adam_mini", make, ngroups=(1,))


def _pytorch_optimizer(name: str) -> Spec:
    def make(model: nn.Module, ngroups: int, variant: str) -> torch.optim.Optimizer:
        import pytorch_optimizer as po

        cls = po.load_optimizer(name)
        kw = dict(PO_KWARGS.get(name, {"lr": 1e-2}))
        return cls(groups(model, ngroups, variant), **kw)

    return Spec("pytorch_optimizer", name, make, pickled=name in PO_PICKLED)


PO_PICKLED = frozenset({"adashift", "conda", "shampoo", "scalableshampoo", "scion", "scionlight"})


def pytorch_optimizer_specs() -> list[Spec]:
    """Every optimizer pytorch-optimizer registers (``get_supported_optimizers``)."""
    import pytorch_optimizer as po

    return [_pytorch_optimizer(n) for n in po.get_supported_optimizers()]


PO_KWARGS: dict[str, dict[str, Any]] = {"a2grad": {}, "prodigy": {"lr": 1.0}, "dadaptadam": {"lr": 1.0},
                                        "dadaptlion": {"lr": 1.0}, "dadaptsgd": {"lr": 1.0},
                                        "dadaptadan": {"lr": 1.0}, "dadaptadagrad": {"lr": 1.0},
                                        "ranger21": {"lr": 1e-2, "num_iterations": 10}}


def library_specs() -> list[Spec]:
    """One or more optimizers of each library of issue #28 but pytorch-optimizer (see
    :func:`pytorch_optimizer_specs`)."""
    specs = [
        _schedulefree("AdamWScheduleFree"), _schedulefree("SGDScheduleFree"), _schedulefree("RAdamScheduleFree"),
        _simple("prodigyopt", "Prodigy", "Prodigy", lr=1.0),
        _simple("lion_pytorch", "Lion", "Lion", lr=1e-3),
        _simple("came_pytorch", "CAME", "CAME", lr=1e-3, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16)),
        _galore("GaLoreAdamW"), _galore("GaLoreAdafactor"),
        _adam_mini(),
        _simple("bitsandbytes", "Adam8bit", "optim.Adam8bit", lr=1e-2, min_8bit_size=16),
        _simple("bitsandbytes", "AdamW8bit", "optim.AdamW8bit", lr=1e-2, min_8bit_size=16),
        _simple("bitsandbytes", "Lion8bit", "optim.Lion8bit", lr=1e-2, min_8bit_size=16),
        _simple("bitsandbytes", "SGD8bit", "optim.SGD8bit", lr=1e-2, momentum=0.9, min_8bit_size=16),
        _simple("torchao", "AdamW8bit", "optim.AdamW8bit", lr=1e-2, block_size=8),
        _simple("torchao", "AdamW4bit", "optim.AdamW4bit", lr=1e-2, block_size=8),
        _simple("torchao", "AdamWFp8", "optim.AdamWFp8", lr=1e-2, block_size=8),
        _heavyball("AdamW"), _heavyball("SGD"),
    ]
    for s in specs:
        if s.lib == "torchao":
            s.slow = True  # torch.compile on the first step (a minute on a CPU)
    return specs


def available(lib: str) -> bool:
    """Installed (a real package, not a folder of that name on the path) and importable here."""
    spec = importlib.util.find_spec(lib)
    if spec is None or spec.origin is None:
        return False
    try:
        importlib.import_module(lib)
    except Exception:  # e.g. a torchao built for another torch
        return False
    return True


def spec_by_id(ident: str) -> Spec:
    for s in library_specs():
        if s.id == ident:
            return s
    lib, name = ident.split(".", 1)
    if lib == "pytorch_optimizer":
        return _pytorch_optimizer(name)
    raise KeyError(ident)


GALORE_GROUP = {"rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}


def plain_target(ngroups: int, variant: str, galore: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The new code's model and grouping, with a torch optimizer standing in for a library that is
    not installed (GaLore's projection settings on the matrix group): enough to name and place."""
    model = Net(variant)
    return model, torch.optim.SGD(groups(model, ngroups, variant, extra=GALORE_GROUP if galore else None), lr=0.1)


def build_target(ident: str, ngroups: int, variant: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The new code, for ``--target``."""
    return spec_by_id(ident).build(variant, ngroups)


# ---------------------------------------------------------------------------------------------- runs

def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(8, 4, generator=g)
    torch.manual_seed(1000 + i)  # optimizers that draw random numbers (Hutchinson probes) draw the same ones
    np.random.seed(1000 + i)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def params_by_old_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return {old_name(n): p.detach().clone() for n, p in model.named_parameters()}


def max_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    d = 0.0
    for n in ref:
        a, b = got[n].double(), ref[n].double()
        if not torch.isfinite(a).all():
            return float("inf")
        d = max(d, float((a - b).abs().max()))
    return d


def index_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by old name, per group, in the order ``state_dict`` indexes them."""
    names = {id(p): old_name(n) for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def by_name(saved: dict[str, Any], old: list[list[str]], new: list[list[str]]) -> dict[str, Any] | None:
    """The ground truth: the saved optimizer state laid out for the new code by name (each new
    group takes the hyperparameters of the saved group holding its parameters). None where the
    state dict is not torch's layout."""
    if set(saved) < {"state", "param_groups"} or not isinstance(saved.get("state"), dict):
        return None
    index = {n: k for k, n in enumerate(x for g in old for x in g)}
    group_of = {n: gi for gi, g in enumerate(old) for n in g}
    groups, k = [], 0
    state = {i: v for i, v in saved["state"].items() if not isinstance(i, int)}  # global entries (MADGRAD's k)
    for g in new:
        src = saved["param_groups"][group_of[g[0]]] if g else saved["param_groups"][0]
        groups.append({**{kk: v for kk, v in src.items() if kk != "params"}, "params": list(range(k, k + len(g)))})
        for n in g:
            if index[n] in saved["state"]:
                state[k] = saved["state"][index[n]]
            k += 1
    return {**saved, "state": state, "param_groups": groups}


@dataclass
class Trained:
    spec: Spec
    ngroups: int
    path: Path
    ref: dict[str, torch.Tensor]  # the uninterrupted run after two more steps, by old name
    control: dict[str, torch.Tensor]  # the saved state reloaded into the unchanged code, two more steps
    control_diff: float
    # per variant: the saved state laid out by name by the test (the ground truth), resumed in the new
    # code, two more steps, and its difference from the uninterrupted run (the optimizer's own
    # dependence on parameter order: random draws per parameter in order, sums over parameters)
    # (None, inf, why) where even that crashes: no resume can be right, only a refusal is
    oracle: dict[str, tuple[dict[str, torch.Tensor] | None, float, str]] = field(default_factory=dict)

    def baseline(self, variant: str) -> dict[str, torch.Tensor] | None:
        """What a resumed run must equal: the uninterrupted run, or the control / the by-name ground
        truth where the optimizer itself does not reproduce it (round trip or parameter order)."""
        if self.control_diff > ATOL:
            return self.control
        got = self.oracle.get(variant)
        return got[0] if got is not None and got[1] > ATOL else self.ref


def load_file(path: Path, pickled: bool) -> dict[str, Any]:
    return torch.load(path, weights_only=not pickled)  # the user's own resume script


def train(spec: Spec, ngroups: int, tmp: Path, variants: tuple[str, ...] = VARIANTS[1:]) -> Trained:
    """Train, save, run on (the uninterrupted run), the control, and the by-name ground truth of
    each of ``variants``."""
    model, opt = spec.build("same", ngroups)
    for i in range(3):
        step(model, opt, i)
    path = tmp / f"{spec.id}-{ngroups}.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    for i in range(3, 5):
        step(model, opt, i)
    ref = params_by_old_name(model)
    sd = load_file(path, spec.pickled)
    m2, o2 = spec.build("same", ngroups)
    m2.load_state_dict(sd["model"])
    o2.load_state_dict(sd["optimizer"])
    if spec.train_mode:
        o2.train()  # type: ignore[attr-defined]
    for i in range(3, 5):
        step(m2, o2, i)
    control = params_by_old_name(m2)
    t = Trained(spec, ngroups, path, ref, control, max_diff(control, ref))
    old = index_names(model, opt)
    for variant in variants:
        sd = load_file(path, spec.pickled)  # afresh: a load shares the saved tensors, which steps change
        m3, o3 = spec.build(variant, ngroups)
        truth = by_name(sd["optimizer"], old, index_names(m3, o3))
        if truth is None:
            continue
        m3.load_state_dict({new_name(k, variant): v for k, v in sd["model"].items()})
        try:
            o3.load_state_dict(truth)
            if spec.train_mode:
                o3.train()  # type: ignore[attr-defined]
            for i in range(3, 5):
                step(m3, o3, i)
        except Exception as e:  # the optimizer cannot run the new grouping even with its state by name
            t.oracle[variant] = (None, float("inf"), f"{type(e).__name__}: {e}")
            continue
        got = params_by_old_name(m3)
        t.oracle[variant] = (got, max_diff(got, ref), "")
    return t


@dataclass
class Outcome:
    kind: str  # exact | refused | wrong
    detail: str = ""
    diff: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}" + (f" ({self.detail})" if self.detail else "")


def _resume(t: Trained, variant: str, sd: dict[str, Any], load: Callable[[nn.Module, Any], None]) -> Outcome:
    """Build the new code, let ``load`` fill the optimizer, step twice, compare."""
    model, opt = t.spec.build(variant, t.ngroups)
    model.load_state_dict({new_name(k, variant): v for k, v in sd["model"].items()})
    try:
        load(model, opt)
    except Exception as e:
        return Outcome("wrong", f"load: {type(e).__name__}: {e}"[:300])
    if t.spec.train_mode:
        opt.train()  # type: ignore[attr-defined]
    try:
        for i in range(3, 5):
            step(model, opt, i)
    except Exception as e:
        return Outcome("wrong", f"step(): {type(e).__name__}: {e}"[:300])
    base = t.baseline(variant)
    if base is None:
        return Outcome("wrong", f"resumed, but even the state laid out by name cannot run: {t.oracle[variant][2]}")
    d = max_diff(params_by_old_name(model), base)
    return Outcome("exact", diff=d) if d <= ATOL else Outcome("wrong", f"max diff {d:.3g}", d)


def target_file(tmp: Path, ident: str, ngroups: int, variant: str) -> str:
    spec = tmp / f"new_code_{abs(hash((ident, ngroups, variant)))}.py"
    spec.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom community_zoo import build_target\n"
                    f"def build():\n    return build_target({ident!r}, {ngroups}, {variant!r})\n")
    return f"{spec}:build"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "optckpt", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def _one_line_refusal(code: int, err: str) -> Outcome | None:
    if code != 2:
        return None
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith(" ")
             and not ln.startswith("optckpt: warning: --trust-pickle")]
    if len(lines) == 1 and lines[0].startswith("optckpt: error: ") and "unexpected" not in lines[0] \
            and "verification failed" not in lines[0]:  # optckpt's own fault, not a refusal
        return Outcome("refused", lines[0][len("optckpt: error: "):])
    return Outcome("wrong", f"exit 2 but not one line: {err.strip()[-300:]!r}")


def via_cli(t: Trained, variant: str, tmp: Path, *, trust: bool = False, in_process: bool = False) -> Outcome:
    out = tmp / f"fixed-{t.spec.id}-{t.ngroups}-{variant}.pt"
    args = ["remap", str(t.path), "--target", target_file(tmp, t.spec.id, t.ngroups, variant), "-o", str(out)]
    if renamed(variant):
        args += ["--rename", RENAME]
    if trust:
        args.append("--trust-pickle")
    if in_process:
        from click.testing import CliRunner

        from optckpt.cli import cli

        r = CliRunner().invoke(cli, args, catch_exceptions=True)
        code = r.exit_code
        err = r.stderr + (repr(r.exception) if r.exception and code != 2 else "")
    else:
        p = run_cli(*args)
        code, err = p.returncode, p.stderr
    if code != 0:
        return _one_line_refusal(code, err) or Outcome("wrong", f"exit {code}: {err.strip()[-300:]!r}")
    sd = load_file(out, t.spec.pickled)
    return _resume(t, variant, sd, lambda m, o: o.load_state_dict(sd["optimizer"]))


def via_api(t: Trained, variant: str, *, trust: bool | None = None) -> Outcome:
    """The API in the new code's resume script; it trusts the file where the resume script does
    (states holding Python objects: the live optimizer needs them built)."""
    import optckpt

    trust = t.spec.pickled if trust is None else trust

    sd = load_file(t.path, t.spec.pickled)
    refusal: list[str] = []

    def load(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        try:
            optckpt.load_optimizer_state_dict(opt, model, t.path, rename=[RENAME] if renamed(variant) else [],
                                              trust_pickle=trust)
        except optckpt.OptckptError as e:
            refusal.append(str(e))
            raise

    o = _resume(t, variant, sd, load)
    if refusal:
        msg = refusal[0]
        return Outcome("refused", msg) if "\n" not in msg else Outcome("wrong", f"refusal of several lines: {msg!r}")
    return o


def via_plain(t: Trained, variant: str) -> Outcome:
    """What the unchanged resume script does: plain ``load_state_dict`` of the saved state."""
    sd = load_file(t.path, t.spec.pickled)
    return _resume(t, variant, sd, lambda m, o: o.load_state_dict(sd["optimizer"]))


def check_verdict(t: Trained, variant: str, tmp: Path, *, trust: bool = False) -> tuple[int, str]:
    """``optckpt check --format json`` against the new code: (exit code, its verdict), the verdict
    being the error message when it refused (exit 2)."""
    import json

    from click.testing import CliRunner

    from optckpt.cli import cli

    args = ["check", str(t.path), "--target", target_file(tmp, t.spec.id, t.ngroups, variant), "--format", "json"]
    if renamed(variant):
        args += ["--rename", RENAME]  # what the new names correspond to (else a rename is missing + unexpected)
    if trust:
        args.append("--trust-pickle")
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return r.exit_code, f"not JSON: {r.stdout[-200:]!r} {r.stderr[-200:]!r} {r.exception!r}"
    if r.exit_code == 2:
        return 2, str(data.get("error", {}).get("message", data))
    return r.exit_code, str(data.get("verdict"))
