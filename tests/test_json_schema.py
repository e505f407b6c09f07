"""Every ``--format json`` output carries ``schema_version`` and matches its documented schema
(``docs/json-schema.md``), on real outputs of every command, across layouts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import FIXTURES, ROOT, invoke

DOC = (ROOT / "docs" / "json-schema.md").read_text(encoding="utf-8")


def _schemas() -> dict[str, dict]:
    out = {}
    for m in re.finditer(r"^## `optckpt (\w+)[^`]*`\n+```json\n(.*?)^```", DOC, re.S | re.M):
        out[m.group(1)] = json.loads(m.group(2))
    return out


SCHEMAS = _schemas()
SEED = ["fixtures/seed/optimizer_0.pth", "--model", "fixtures/seed/model_0.pth"]

RUNS = {
    "inspect": [
        ["inspect", "fixtures/bundle.pt", "--stats"],
        ["inspect", "fixtures/hf_trainer/checkpoint-3"],
        ["inspect", "fixtures/accelerate/state"],
        ["inspect", "fixtures/gaussians/chkpnt3.pth"],
        ["inspect", "fixtures/nerf/000003.tar", "--stats"],
    ],
    "check": [
        ["check", *SEED, "--target", "fixtures/models.py:build_model2"],
        ["check", "fixtures/seed/optimizer_0.pth", "--target", "fixtures/models.py:build_model2"],
        ["check", "fixtures/bundle.pt", "--target", "fixtures/models.py:build_cnn"],
        ["check", "fixtures/hf_trainer/checkpoint-3", "--target", "fixtures/hf_trainer/checkpoint-3"],
    ],
    "remap": [["remap", "fixtures/bundle.pt", "--target", "fixtures/models.py:build_cnn_head_first", "--dry-run"]],
    "reset": [["reset", "fixtures/bundle.pt", "--params", "classifier.*", "--dry-run"]],
    "set": [["set", "fixtures/bundle.pt", "--scale-lr", "0.5", "--dry-run"],
            ["set", "fixtures/tsm_sgd.pth.tar", "--group", "normal_bias", "--set", "lr_mult=3", "--dry-run"]],
    "diff": [["diff", "fixtures/bundle.pt", "fixtures/named_optimizer.pt", "--stats"],
             ["diff", "fixtures/bundle.pt", "fixtures/cuda_saved.pt"]],
}


def test_every_json_command_has_a_schema():
    from optckpt.cli import cli

    with_json = {name for name, c in cli.commands.items() if any(p.name == "fmt" for p in c.params)}
    assert with_json == set(SCHEMAS) == set(RUNS)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("args", [a for runs in RUNS.values() for a in runs], ids=lambda a: " ".join(a[:2]))
def test_real_output_matches_its_schema(args, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (FIXTURES / "bundle.pt").exists()
    r = invoke(*args, "--format", "json")
    assert r.exit_code in (0, 1), r.stderr
    out = json.loads(r.stdout)
    schema = SCHEMAS[args[0]]
    assert next(iter(out)) == "schema_version" and out["schema_version"] == schema["properties"]["schema_version"][
        "const"] == (2 if args[0] == "check" else 1)
    jsonschema.validate(out, schema, cls=jsonschema.Draft202012Validator)
    undocumented = set(out) - set(schema["properties"])
    assert not undocumented, f"document these fields of optckpt {args[0]} in docs/json-schema.md: {undocumented}"


def _error_schema() -> dict:
    m = re.search(r"^## Errors, with `--format json`\n.*?```json\n(.*?)^```", DOC, re.S | re.M)
    assert m is not None
    return json.loads(m.group(1))


@pytest.mark.parametrize("args", [
    ["check", "no/such/file.pt", "--target", "fixtures/models.py:build_cnn"],  # a load error
    ["check", "fixtures/bundle.pt"],  # a usage error (missing --target)
    ["remap", "fixtures/bundle.pt", "--target", "fixtures/models.py:nothing_here", "--dry-run"],  # a target error
], ids=["load", "usage", "target"])
def test_errors_with_format_json_are_one_json_object(args, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert invoke(*args, "--format=json").exit_code == 2 and json.loads(invoke(*args, "--format=json").stdout)
    r = invoke(*args, "--format", "json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    jsonschema.validate(out, _error_schema())
    assert out["error"]["message"] in r.stderr and r.stderr.startswith("optckpt: error: ")
    # without --format json stdout stays empty
    assert invoke(*args).stdout == ""
