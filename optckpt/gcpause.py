"""Python's cyclic garbage collector paused for a pass over a whole checkpoint's objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection while the block runs (restored as it was after). A pass over a loaded
    checkpoint allocates millions of small acyclic objects (tuples, rows, opcodes), and every
    collection they trigger walks every object alive: at 600k stored tensors, more than the pass."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
