"""Nothing in a checkpoint is ever executed without --trust-pickle: every command, every layout,
payloads nested anywhere. Each payload would create a marker file if it ran."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import FIXTURES, invoke


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _hostile_files(tmp_path):
    m = str(tmp_path / "PWNED")
    good = torch.load(FIXTURES / "bundle.pt", weights_only=True)
    files = {}
    files["top.pt"] = Payload(m)
    files["in_extras.pt"] = {**good, "extra": [{"x": Payload(m)}]}
    files["in_optimizer_state.pt"] = {**good, "optimizer": {**good["optimizer"], "state": {
        **good["optimizer"]["state"], 0: {**good["optimizer"]["state"][0], "exp_avg": ExecPayload(m)}}}}
    files["in_param_group.pt"] = {**good, "optimizer": {**good["optimizer"], "param_groups": [
        {**good["optimizer"]["param_groups"][0], "lr": Payload(m)}]}}
    files["in_tuple.pt"] = ((1, Payload(m)), 7)
    files["model_file.pth"] = {"w": torch.ones(2), "junk": ExecPayload(m)}
    out = {}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        out[name] = tmp_path / name
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload(m)}, legacy, _use_new_zipfile_serialization=False)
    out["legacy.pt"] = legacy
    hf = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", hf)
    torch.save({"state": {}, "param_groups": [], "evil": Payload(m)}, hf / "optimizer.pt")
    out["hf/optimizer.pt"] = hf
    acc = tmp_path / "acc"
    shutil.copytree(FIXTURES / "accelerate" / "state", acc)
    torch.save({"last_epoch": 1, "base_lrs": [Payload(m)]}, acc / "scheduler.bin")
    out["accelerate/scheduler.bin"] = acc
    return out


def _commands(path, tmp_path):
    p = str(path)
    target = str(FIXTURES / "models.py") + ":build_cnn"
    o = str(tmp_path / "out.pt")
    return [
        ["inspect", p], ["inspect", p, "--stats"],
        ["check", p, "--target", target], ["remap", p, "--target", target, "-o", o],
        ["reset", p, "--params", "*", "-o", o], ["set", p, "--scale-lr", "0.5", "-o", o],
        ["diff", p, str(FIXTURES / "bundle.pt")], ["diff", str(FIXTURES / "bundle.pt"), p],
        ["check", str(FIXTURES / "bundle.pt"), "--target", p],
        ["check", str(FIXTURES / "seed" / "optimizer_0.pth"), "--model", p, "--target", target],
    ]


def test_no_payload_ever_runs(tmp_path):
    """The payloads are read as inert placeholders: a command either works around them or fails
    with one clear line; what it writes carries them unrun, and reading that back runs nothing."""
    marker = tmp_path / "PWNED"
    tried = 0
    for name, path in _hostile_files(tmp_path).items():
        for cmd in _commands(path, tmp_path):
            r = invoke(*cmd)
            tried += 1
            assert not marker.exists(), (name, cmd)
            assert r.exit_code in (0, 1, 2), (name, cmd, r.stdout, r.stderr)
            if r.exit_code == 2:
                assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1
                assert "unexpected" not in r.stderr, (name, cmd, r.stderr)
                assert not (tmp_path / "out.pt").exists()
            out = tmp_path / "out.pt"
            if out.exists():
                assert invoke("inspect", str(out)).exit_code in (0, 2) and not marker.exists()
                out.unlink()
    assert tried == 90


def test_refusal_names_the_globals(tmp_path):
    files = _hostile_files(tmp_path)
    r = invoke("inspect", str(files["in_optimizer_state.pt"]))
    assert "builtins.exec" in r.stderr and "--trust-pickle" in r.stderr
    r = invoke("inspect", str(files["legacy.pt"]))  # a call beside the state: shown, not run
    assert r.exit_code == 0 and "posix.system('touch " in r.stdout and "nothing imported or run" in r.stdout


def test_trust_pickle_is_the_only_way_and_is_loud(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "x.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload(str(marker))}, path)
    r = invoke("inspect", str(path), "--trust-pickle")
    assert r.exit_code == 0
    assert "warning: --trust-pickle" in r.stderr and "execute code" in r.stderr
    assert marker.exists()  # proves the payloads above were real


def test_auxiliary_files_are_opaque_not_executed(tmp_path):
    """rng_state.pth / training_args.bin need non-tensor globals: listed, carried, never run."""
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    marker = tmp_path / "PWNED"
    torch.save({"python": Payload(str(marker))}, d / "rng_state.pth")
    r = invoke("inspect", str(d), "--format", "json")
    assert r.exit_code == 0 and not marker.exists()
    out = tmp_path / "out"
    r = invoke("set", str(d), "--scale-lr", "0.5", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    assert (out / "rng_state.pth").read_bytes() == (d / "rng_state.pth").read_bytes()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rng_state.pth", "training_args.bin"])
def test_real_library_opaque_parts_list_their_globals(name):
    import json

    rep = json.loads(invoke("inspect", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "--format", "json").stdout)
    part = next(o for o in rep["opaque"] if o["file"] == name)
    assert part["unsafe_globals"]


def test_config_architecture_outside_transformers_model_classes_is_never_called(tmp_path, monkeypatch):
    """config.json's ``architectures`` names what optckpt instantiates to rebuild the order: only one
    of transformers' registered model classes, by exact name; ``pipeline`` (or any other callable) is
    refused, never called."""
    import json

    transformers = pytest.importorskip("transformers")
    d = tmp_path / "ck"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["pipeline"]
    (d / "config.json").write_text(json.dumps(cfg))
    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a))
    r = invoke("inspect", str(d))
    assert r.exit_code == 0 and called == []
    assert "registration order unknown" in r.stdout and "refused" in r.stdout, r.stdout
