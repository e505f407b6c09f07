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
    assert next(iter(out)) == "schema_version" and out["schema_version"] == 1
    schema = SCHEMAS[args[0]]
    jsonschema.validate(out, schema, cls=jsonschema.Draft202012Validator)
    undocumented = set(out) - set(schema["properties"])
    assert not undocumented, f"document these fields of optckpt {args[0]} in docs/json-schema.md: {undocumented}"
