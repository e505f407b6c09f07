"""The bad-input corpus beyond raw bytes: broken directories and inconsistent optimizer state."""

from __future__ import annotations

import json
import shutil

import torch
from conftest import FIXTURES, invoke

TARGET = str(FIXTURES / "models.py") + ":build_cnn"


def _bundle():
    return torch.load(FIXTURES / "bundle.pt", weights_only=True)


def _err(r, *needles):
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("optckpt: error:") and len(r.stderr.strip().splitlines()) == 1
    for n in needles:
        assert n in r.stderr, r.stderr


def test_index_json_naming_absent_shard(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _err(invoke("inspect", str(d)), "missing")


def test_index_json_malformed(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{not json")
    _err(invoke("inspect", str(d)), "index")


def test_optimizer_without_model_is_reported_honestly(tmp_path):
    d = tmp_path / "checkpoint-3"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    for n in ("model.safetensors", "config.json"):
        (d / n).unlink()
    r = invoke("inspect", str(d), "--format", "json")
    assert r.exit_code == 0
    opt = json.loads(r.stdout)["optimizers"][0]
    assert opt["name_evidence"] == "none" and opt["ambiguous"] == 28
    r = invoke("remap", str(d), "--target", str(FIXTURES / "hf_trainer" / "checkpoint-3"), "-o", str(tmp_path / "o"))
    _err(r, "uncertain")


def test_duplicate_indices(tmp_path):
    b = _bundle()
    b["optimizer"]["param_groups"].append({**b["optimizer"]["param_groups"][0], "params": [0]})
    torch.save(b, tmp_path / "x.pt")
    _err(invoke("check", str(tmp_path / "x.pt"), "--target", TARGET), "more than one place")
    _err(invoke("inspect", str(tmp_path / "x.pt")), "more than one place")


def test_state_for_indices_in_no_group_is_a_warning(tmp_path):
    b = _bundle()
    b["optimizer"]["state"][99] = dict(b["optimizer"]["state"][0])
    torch.save(b, tmp_path / "x.pt")
    r = invoke("check", str(tmp_path / "x.pt"), "--target", TARGET, "--format", "json")
    assert r.exit_code == 0
    assert any("no param group" in n for n in json.loads(r.stdout)["notes"])


def test_group_sizes_disagree_with_model(tmp_path):
    b = _bundle()
    g = b["optimizer"]["param_groups"][0]
    g["params"] = g["params"] + [8, 9, 10, 11]  # more params than the model has
    for i in (8, 9, 10, 11):
        b["optimizer"]["state"][i] = dict(b["optimizer"]["state"][0])
    torch.save(b, tmp_path / "x.pt")
    r = invoke("check", str(tmp_path / "x.pt"), "--target", TARGET, "--format", "json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["counts"]["ambiguous"] == 12
    assert any("ordered subsequences" in n for n in rep["notes"])


def test_non_tensor_junk_in_state(tmp_path):
    b = _bundle()
    b["optimizer"]["state"][3]["exp_avg"] = "junk"
    torch.save(b, tmp_path / "x.pt")
    r = invoke("inspect", str(tmp_path / "x.pt"), "--format", "json")
    assert r.exit_code == 0
    assert any("non-tensor" in n for n in json.loads(r.stdout)["optimizers"][0]["notes"])
    b["optimizer"]["state"][3] = "junk"
    torch.save(b, tmp_path / "y.pt")
    _err(invoke("inspect", str(tmp_path / "y.pt")), "not a dict")


def test_non_integer_ids(tmp_path):
    b = _bundle()
    b["optimizer"]["param_groups"][0]["params"][0] = 1.5
    torch.save(b, tmp_path / "x.pt")
    _err(invoke("check", str(tmp_path / "x.pt"), "--target", TARGET), "non-integer")


def test_nan_inf_moments_are_reported(tmp_path):
    b = _bundle()
    b["optimizer"]["state"][0]["exp_avg_sq"][0, 0, 0, 0] = float("inf")
    b["optimizer"]["state"][1]["exp_avg"][0] = float("nan")
    torch.save(b, tmp_path / "x.pt")
    r = invoke("inspect", str(tmp_path / "x.pt"), "--stats")
    assert r.exit_code == 0 and "2 NaN/Inf values in optimizer state" in r.stdout


class _MethodsReplaced:
    """Pickles as an OrderedDict whose BUILD state sets instance attributes named like its methods;
    torch's weights-only loader accepts it (BUILD on OrderedDict updates ``__dict__``)."""

    def __init__(self, items):
        self._items = items

    def __reduce_ex__(self, protocol):
        from collections import OrderedDict

        return (OrderedDict, (), {"items": None, "keys": None, "values": None, "get": None}, None,
                iter(self._items))


def test_ordered_dict_with_replaced_methods_is_refused_by_every_command(tmp_path):
    from collections import OrderedDict

    sd = _bundle()
    path = tmp_path / "hostile.pt"
    torch.save({**sd, "model": _MethodsReplaced(list(sd["model"].items()))}, path)
    got = torch.load(path, weights_only=True)["model"]  # what torch really accepts
    assert type(got) is OrderedDict and got.items is None and len(dict.items(got)) == len(sd["model"])
    for args in (["inspect", str(path)], ["check", str(path), "--target", TARGET], ["diff", str(path), str(path)],
                 ["set", str(path), "--lr", "0.1", "-o", str(tmp_path / "o.pt")],
                 ["convert", str(path), "--to", "torch", "-o", str(tmp_path / "c.pt")]):
        r = invoke(*args)
        _err(r, "OrderedDict", "'items'", "refused")
        assert "unexpected" not in r.stderr, args
    # a state dict's own attributes that replace nothing (torch's _metadata) stay fine
    od = OrderedDict(sd["model"])
    od._metadata = {"": {"version": 1}}
    torch.save({**sd, "model": od}, tmp_path / "meta.pt")
    assert invoke("inspect", str(tmp_path / "meta.pt")).exit_code == 0


def test_truncated_model_safetensors_in_a_trainer_directory_is_an_error(tmp_path):
    """A truncated / corrupt model.safetensors was listed as "other" and the model silently dropped
    (exit 0): every command that would read the directory now refuses in one line naming the file."""
    for damage in ("truncate", "garble", "empty"):
        d = tmp_path / damage
        shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes({"truncate": data[: len(data) // 2], "garble": b"\x00" * 64 + data[64:], "empty": b""}[damage])
        for args in (["inspect", str(d)], ["check", str(d), "--target", str(FIXTURES / "hf_trainer" / "checkpoint-3")],
                     ["convert", str(d), "--to", "torch", "-o", str(tmp_path / f"{damage}.pt")],
                     ["set", str(d), "--lr", "0.1", "-o", str(tmp_path / f"{damage}-set")]):
            _err(invoke(*args), "model.safetensors")
        assert not (tmp_path / f"{damage}.pt").exists()
    d = tmp_path / "opt"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    (d / "optimizer.pt").write_bytes(b"not a torch file")
    _err(invoke("inspect", str(d)), "optimizer.pt")


_DEEP = "[" * 100_000 + "]" * 100_000  # (200 KB: past Python's JSON parser's recursion)


def test_json_nested_too_deeply_is_malformed_json(tmp_path):
    """Python's parser reports such nesting as a RecursionError, which no malformed-JSON handler caught:
    each was an "unexpected RecursionError". Now the JSON is malformed as any other, where it is read."""
    import struct

    header = ('{"__metadata__": ' + _DEEP + "}").encode()
    st = tmp_path / "deep.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header)
    _err(invoke("inspect", str(st)), "corrupt safetensors header", "nested too deeply")
    names = tmp_path / "names.json"
    names.write_text(_DEEP)
    _err(invoke("check", str(FIXTURES / "bundle.pt"), "--target", str(names)), "invalid JSON", "nested too deeply")
    d = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    (d / "trainer_state.json").write_text('{"a": ' + _DEEP + "}")
    _err(invoke("inspect", str(d)), "trainer_state.json: not valid JSON")


def test_an_odd_config_json_only_takes_away_order_evidence(tmp_path):
    """config.json is order evidence: a list, architectures that are no list of names, or JSON too
    deep to read leave the directory readable (a note says the order is unknown), where each was an
    "unexpected" error (AttributeError, KeyError, RecursionError)."""
    d = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-3", d)
    for text, why in (("[]", "is not a JSON object"), ('{"architectures": {"a": 1}}', "names no architecture"),
                      ('{"a": ' + _DEEP + "}", "is missing or unreadable")):
        (d / "config.json").write_text(text)
        r = invoke("inspect", str(d))
        assert r.exit_code == 0, r.stderr
        assert f"registration order unknown: config.json {why}" in r.stdout, r.stdout
