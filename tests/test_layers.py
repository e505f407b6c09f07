"""The shape of the package: import cycles among optckpt modules, imports running up a layer, and the
old all-in-one ``ops.py`` staying gone (one module per editing command instead).

Imports are read with ``ast`` from the source (module-level and function-level alike), so a cycle
hidden behind a lazy import is found too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = Path(ROOT) / "optckpt"

# Known cycle, allowed for now: the torch-zip reader / record copier / appender import each other
# (issue #30 item 2 rewrites optckpt/io into a one-way package). Remove this entry once that lands;
# any other cycle fails the test.
ALLOWED_CYCLES: list[frozenset[str]] = [
    frozenset({"optckpt.io.append", "optckpt.io.records", "optckpt.io.torchfile"}),
]

# The top of the package: the CLI and the public verbs render and call the commands; the editing
# commands call everything below them. Nothing below a layer imports it.
TOP = {"optckpt.__main__", "optckpt.cli", "optckpt.verbs"}
COMMANDS = {"optckpt.cmd_remap", "optckpt.cmd_reset", "optckpt.cmd_set", "optckpt.cmd_convert"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The optckpt modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                if f"{base}.{a.name}" in mods:
                    found.add(f"{base}.{a.name}")  # `from . import x`: the submodule x
                elif base in mods:
                    found.add(base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]


def test_the_import_reader_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "optckpt.cmd_set" in graph["optckpt.cli"]  # imported inside a function
    assert {"optckpt.io.torchfile", "optckpt.io.safetensors_io"} <= graph["optckpt.verify"]  # lazy, two levels


def test_no_import_cycle_outside_the_known_io_trio():
    cycles = _cycles(_graph())
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles among optckpt modules: {unexpected}"


def test_no_import_runs_up_to_the_commands_or_the_cli():
    graph = _graph()
    for name, deps in graph.items():
        if name in TOP or name == "optckpt":  # the package re-exports the verbs
            continue
        assert not deps & TOP, f"{name} imports {sorted(deps & TOP)}: the CLI / verbs are the top layer"
        if name not in COMMANDS:
            assert not deps & COMMANDS, f"{name} imports {sorted(deps & COMMANDS)}: only the CLI / verbs call commands"
    for name in COMMANDS:
        assert not graph[name] & COMMANDS, f"{name} imports another command: share code through optckpt.edit"


def test_ops_is_gone_and_each_command_has_its_module():
    assert not (PKG / "ops.py").exists(), "optckpt/ops.py is back: one module per editing command"
    for name in COMMANDS | {"optckpt.edit", "optckpt.verify"}:
        assert (PKG / (name.split(".", 1)[1] + ".py")).is_file(), name


def test_fresh_state_values_are_defined_once():
    """The value a re-initialised state key starts at lives in optckpt.kinds only."""
    defining = [p.name for p in PKG.rglob("*.py")
                if any(isinstance(n, ast.FunctionDef) and "fresh" in n.name and "value" in n.name
                       for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))]
    assert defining == ["kinds.py"]


def test_optimizer_kind_tables_live_in_kinds_only():
    """Which state keys are parameter-shaped, which optimizers cannot be sliced / fused, what state
    starts at: tables of optckpt.kinds, not repeated elsewhere (their tell-tale entries as literals)."""
    tell_tales = {"max_exp_avg_sq", "mu_product", "Muon"}
    holders = sorted({p.name for p in PKG.rglob("*.py")
                      for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                      if isinstance(n, ast.Constant) and n.value in tell_tales})
    assert holders == ["kinds.py"]
