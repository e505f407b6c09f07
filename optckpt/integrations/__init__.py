"""Resume by name inside training libraries: one line added to Lightning, accelerate or the
transformers ``Trainer``.

Each library module is imported only when asked for (``optckpt.integrations.lightning``,
``.accelerate``, ``.transformers``); none of those libraries is a dependency of optckpt, and
``import optckpt`` imports none of them.

Every integration works at the same point: the library's own ``optimizer.load_state_dict(sd)``.
A load pre-hook on each optimizer first loads ``sd`` by name through
:func:`optckpt.load_optimizer_state_dict` (order evidence: the saved ``param_names``, else what the
library's checkpoint holds), then hands the library the result in the live optimizer's order, so
the library's own load restores exactly that. From then on the optimizer saves ``param_names``
(:func:`optckpt.enable_load_by_name`), so the next resume is exact by saved names."""

from __future__ import annotations

__all__: list[str] = []
