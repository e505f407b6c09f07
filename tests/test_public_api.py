"""The public API is small and explicit: ``__all__`` lists exactly what the package exports."""

from __future__ import annotations

import subprocess
import sys

import optckpt

EXPECTED = {
    "Checkpoint", "ModelState", "OptimizerState", "SchedulerState",
    "OptckptError", "LoadError", "UnsafePickleError", "FormatError", "MappingError", "TargetError", "WriteError",
    "load", "load_optimizer_state_dict", "enable_load_by_name", "LoadReport",
    # the commands as functions (optckpt.verbs)
    "Report", "inspect", "check", "remap", "reset", "set_hparams", "diff", "convert",
}


def test_all_is_exactly_the_public_api():
    assert set(optckpt.__all__) == EXPECTED
    for name in optckpt.__all__:
        assert getattr(optckpt, name) is not None
    public = {n for n in vars(optckpt) if not n.startswith("_") and n not in ("warnings",)}
    submodules = {"checkpoint", "errors", "io", "resume", "mapping", "align", "validate", "target",
                  "transforms", "kernels", "render", "kinds", "hparams", "cli", "verbs", "verify", "edit",
                  "cmd_remap", "cmd_reset", "cmd_set", "cmd_convert", "pickled", "zero_edit", "resolve",
                  "integrations", "tensors", "gcpause"}  # imported only on demand; present once a test used it
    assert (public | set(optckpt.__all__)) - submodules == EXPECTED
    # the verbs keep their names even after the same-named modules are imported
    import importlib

    importlib.import_module("optckpt.check")
    importlib.import_module("optckpt.diff")
    assert callable(optckpt.check) and optckpt.check.__module__ == "optckpt.verbs"
    assert optckpt.diff.__module__ == "optckpt.verbs" and optckpt.inspect.__module__ == "optckpt.verbs"


def test_import_without_numpy_prints_nothing():
    """torch's 'Failed to initialize NumPy' warning must not leak into the CLI's stderr."""
    code = "import sys; sys.modules['numpy'] = None; import optckpt.cli"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "NumPy" not in r.stderr, r.stderr
