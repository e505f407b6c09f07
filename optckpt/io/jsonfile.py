"""JSON read from a checkpoint (safetensors headers, HF configs, trainer state) or a names file.

Python's parser recurses once a nesting level and reports nesting past the recursion limit as a
``RecursionError``, which no handler of malformed JSON catches: a 200 KB ``[[[[…]]]]`` became an
"unexpected" error. Here it is a ``ValueError`` like every other malformed document."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["loads", "load"]


def loads(data: str | bytes) -> Any:
    """``json.loads``; nesting deeper than the parser can follow raises ``ValueError``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def load(path: str | os.PathLike[str]) -> Any:
    """The JSON document in the file ``path`` (UTF-8), as :func:`loads` reads it."""
    with open(path, encoding="utf-8") as f:
        return loads(f.read())
