"""The classes and functions a C unpickler hands a pickle, kept as they were.

Python's C ``pickle.Unpickler`` runs ``BUILD`` on whatever object the pickle puts under it, a
global it named included: ``GLOBAL collections Counter`` then ``BUILD`` with the slot state
``(None, {"most_common": ...})`` sets that attribute on the class itself, for the whole process;
on a function it can set ``__defaults__``. torch's weights-only loader builds only tensors,
parameters and ordered dicts, and ``torch.save`` writes no such thing. A reader that hands out
classes and functions (:mod:`optckpt.io.reader`'s fast and lazy readers, the DCP metadata reader)
notes each as it is when it hands it out (:meth:`Globals.note`), and after the load, whether it
ended or failed, puts back whatever changed and names it (:meth:`Globals.put_back`): the caller
then refuses the file."""

from __future__ import annotations

from collections.abc import Callable
from types import FunctionType
from typing import Any

__all__ = ["Globals", "load_keeping"]


class Globals:
    """Classes and functions handed out during one load, each with its state at that moment."""

    __slots__ = ("_named",)

    def __init__(self) -> None:
        self._named: dict[int, tuple[Any, str, tuple[Any, ...]]] = {}  # id -> (object, name, state)

    def note(self, obj: Any, name: str) -> None:
        if id(obj) not in self._named and isinstance(obj, (type, FunctionType)):
            self._named[id(obj)] = (obj, name, _state_of(obj))

    def put_back(self) -> list[str]:
        """The names of those the load changed, each put back as it was; the notes are dropped."""
        changed = [name for obj, name, state in self._named.values() if _put_back(obj, state)]
        self._named.clear()
        return changed


def load_keeping(unpickler: Any, named: Globals, refusal: Callable[[str], Exception]) -> Any:
    """``unpickler.load()``; then (also when it failed) every class and function ``named`` noted as it
    was: else put back, and ``refusal(name of the first changed)`` raised."""
    try:
        return unpickler.load()
    finally:
        changed = named.put_back()
        if changed:
            raise refusal(changed[0])


def _state_of(obj: Any) -> tuple[Any, ...]:
    """What ``BUILD`` can change: a class's attributes; a function's attributes, defaults and code."""
    if isinstance(obj, type):
        return (dict(vars(obj)),)
    return dict(vars(obj)), obj.__defaults__, obj.__kwdefaults__, obj.__code__


def _put_back(obj: Any, state: tuple[Any, ...]) -> bool:
    """Whether ``obj`` differs from ``state`` (compared by identity); if so, it is put back."""
    attrs = state[0]
    now = vars(obj)
    changed = now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items())
    if isinstance(obj, type):
        if changed:
            for k in [k for k in now if k not in attrs]:
                delattr(obj, k)
            for k, v in attrs.items():
                if now.get(k) is not v:
                    setattr(obj, k, v)
        return changed
    fields = (obj.__defaults__, obj.__kwdefaults__, obj.__code__)
    changed = changed or any(a is not b for a, b in zip(fields, state[1:]))
    if changed:
        obj.__defaults__, obj.__kwdefaults__, obj.__code__ = state[1:]
        now.clear()
        now.update(attrs)
    return changed
