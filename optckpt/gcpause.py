"""Python's cyclic garbage collector paused for a pass over a whole checkpoint's objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused", "freeze_after_passes"]

_freeze = False


def freeze_after_passes() -> None:
    """For the ``optckpt`` program (one command, then the process ends): what each pass allocated is
    moved to the collector's permanent generation when the pass ends (``gc.freeze``), not collected.
    A checkpoint's objects live until the exit anyway, and the first collection after a pass would
    walk every one of them (1-2 s a pass at 600k stored tensors, several passes a command). Library
    callers (a resume script) keep the ordinary collection: nothing of theirs is frozen."""
    global _freeze
    _freeze = True


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
        if _freeze:
            gc.freeze()
        if was:
            gc.enable()
