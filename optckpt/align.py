"""Recover which model parameter each optimizer-state index belongs to.

``torch.optim.Optimizer.state_dict()`` keys per-parameter state by integer index (parameters numbered in
the order they were handed to the optimizer, consecutively across param groups) and records no names.
This module reconstructs the index -> name mapping from what a checkpoint alone reveals:

* the model's state-dict entries in registration order (trusted), each with a shape (:class:`Slot`);
* for every param group, its indices in group order, each with the parameter's shape when its state
  reveals one, or ``None`` when it has no state (:class:`Item`).

Model assumption (true for ``model.parameters()`` and filtered ``named_parameters()`` constructions):
each group is an order-preserving subsequence of the model entries, and groups are pairwise disjoint.
Entries that are not optimizer parameters (buffers, frozen params) are extra slots a group may skip.

Algorithm (:func:`align_groups`)
--------------------------------
*Single group (exact).* Let ``E`` be the earliest embedding (greedy left to right: each item takes the
first allowed slot after its predecessor) and ``L`` the latest one (greedy right to left). Slot ``p`` is
feasible for item ``j`` iff ``j`` may use ``p`` (shape match) and ``E[j-1] < p < L[j+1]``: the prefix
embeds before ``p`` (``E`` is componentwise minimal) and the suffix after it (``L`` is componentwise
maximal). Allowed positions inside that open interval are counted / listed with ``bisect`` on sorted
position lists (an item of unknown shape may use every slot). Item ``j`` is forced iff ``E[j] == L[j]``;
these are also exactly the slots that every embedding of the group uses. The same argument holds when
each item has its own allowed set, which the cross-group steps below exploit.

*Several groups (sound, not complete).* Two sound pruning steps alternate until nothing changes:

1. Ownership: a slot forced into one group cannot belong to any other group, so it is removed from the
   slot lists the other groups see, and the affected groups are recomputed.
2. Matching: every valid joint embedding assigns the still-ambiguous items (of all groups) pairwise
   distinct slots among their candidates, i.e. it is an item-saturating matching of the bipartite
   candidate graph. Candidate edges that lie in no item-saturating matching (found with one
   Hopcroft-Karp matching plus alternating-path reachability / strongly connected components, i.e. the
   Dulmage-Mendelsohn argument) are removed; this captures the counting arguments spanning groups (a
   slot that must be used and that only one item can take, k items competing for exactly k slots...).
   It is skipped when the candidate graph has more than :data:`MATCHING_EDGE_BUDGET` edges, which only
   happens when the input is hugely ambiguous anyway.

Each step only discards placements that no valid joint embedding uses, so whatever ends up forced is the
truth and the truth always stays among the candidates. The joint problem is still not solved exactly:
the matching relaxation ignores the order constraints that tie items of one group together, so an item
may keep several candidates although brute-force enumeration of all joint embeddings shows only one
survives. On random small instances (``tests/test_align.py``: <= 9 slots, 2-3 groups) that happens for
0.3-0.9% of the items brute force proves unique (ownership alone: 8-12%). Transformer-style decay /
no-decay splits resolve fully; what stays open in real models is mostly genuine ambiguity that no
algorithm can lift from shapes and order alone (a BatchNorm weight vs. its running_mean, identical
blocks put in different groups as with layer-wise learning rates).

Cost: a group (re)computation is ``O(n + m log n)`` (``n`` slots, ``m`` items of the group); a group is
only recomputed when something it could still use changed, at most :data:`MAX_PASSES_PER_GROUP` times,
and the whole ownership/matching alternation at most :data:`MAX_ROUNDS` times (hitting a cap only costs
completeness, never soundness). Listing candidates costs their number, which is inherently large when
items are genuinely ambiguous among many slots: with decay / no-decay groups on a BatchNorm network, the
running stats give every no-decay item slack across the whole model, so the output alone is
``Theta(n * m)`` names (fine for real model sizes, minutes at 100k entries).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from .gcpause import gc_paused

__all__ = [
    "MATCHING_EDGE_BUDGET",
    "MAX_PASSES_PER_GROUP",
    "MAX_ROUNDS",
    "Assignment",
    "Item",
    "Slot",
    "align_groups",
]

#: Upper bound on how often one group is (re)computed while propagating ownership between groups.
MAX_PASSES_PER_GROUP = 32
#: Upper bound on ownership / matching alternations.
MAX_ROUNDS = 4
#: The matching step is skipped when the ambiguous items have more candidate edges than this in total.
MATCHING_EDGE_BUDGET = 200_000

_ANY = -1  # shape id of an item whose shape is unknown: it matches every slot


class Slot(NamedTuple):
    """One model entry, in trusted registration order."""

    name: str
    shape: tuple[int, ...]


class Item(NamedTuple):
    """One optimizer index inside its group, in group order."""

    index: int  # type: ignore[assignment]  # (a field, shadowing tuple.index)
    shape: tuple[int, ...] | None  # None: no state, shape unknown (matches any slot)


class Assignment(NamedTuple):
    """Where one optimizer index can sit in the model.

    ``name`` is set iff exactly one slot is feasible; ``candidates`` lists every feasible slot name in
    model order (length 1 when certain, 0 when the index's group cannot be embedded at all)."""

    index: int  # type: ignore[assignment]  # (a field, shadowing tuple.index)
    name: str | None  # set iff exactly one feasible slot
    candidates: tuple[str, ...]  # every feasible slot name, in model order


class _Group:
    """Working state of one param group during the fixpoint."""

    __slots__ = ("allow", "ambiguous", "feasible", "first", "gid", "items", "last", "passes", "sids")

    def __init__(self, gid: int, items: Sequence[Item], sids: list[int], allow: list[list[int]]) -> None:
        self.gid = gid
        self.items = items
        self.sids = sids  # shape id per item (_ANY for unknown)
        # Per item: sorted slot positions it may use. Items start out sharing one list per shape (no
        # copies); the matching step gives an item a private, smaller list.
        self.allow = allow
        self.feasible = True
        self.first: list[int] = []  # E: earliest embedding
        self.last: list[int] = []  # L: latest embedding
        self.ambiguous: set[int] = set()  # shape ids of items that are not forced (_ANY included)
        self.passes = 0

    def interval(self, j: int, n: int) -> tuple[list[int], int, int]:
        """Item ``j``'s feasible slots as ``allow[j][start:stop]``: allowed and within
        ``(E[j-1], L[j+1])``."""
        pos = self.allow[j]
        if self.first[j] == self.last[j]:
            k = bisect_left(pos, self.first[j])
            return pos, k, k + 1
        lo = self.first[j - 1] if j > 0 else -1
        hi = self.last[j + 1] if j + 1 < len(self.sids) else n
        return pos, bisect_right(pos, lo), bisect_left(pos, hi)


def _embed(allow: list[list[int]], n: int) -> tuple[list[int], list[int]] | None:
    """Earliest and latest embeddings of the items (allowed positions ``allow``), or None if none exists.

    Greedy is optimal for subsequence embedding: taking the first possible slot for each item never
    hurts the items after it (and symmetrically from the right)."""
    m = len(allow)
    first = [0] * m
    prev = -1
    for j in range(m):
        pos = allow[j]
        k = bisect_right(pos, prev)
        if k == len(pos):
            return None
        prev = first[j] = pos[k]
    last = [0] * m
    nxt = n
    for j in range(m - 1, -1, -1):
        pos = allow[j]
        # Non-empty and >= first[j]: the earliest embedding witnesses a slot for item j before nxt.
        nxt = last[j] = pos[bisect_left(pos, nxt) - 1]
    return first, last


def _compute(group: _Group, owner: list[int], claimed_any: bool, n: int) -> list[int]:
    """(Re)compute one group against the current ownership; return the slots it newly claims.

    Slots owned by other groups are first dropped from the item lists (each distinct list filtered
    once). A forced item (``E[j] == L[j]``) claims its slot. A group that cannot be embedded any more is
    marked infeasible and claims nothing further (only possible for inconsistent input)."""
    group.passes += 1
    gid = group.gid
    if claimed_any:
        filtered: dict[int, list[int]] = {}
        allow = group.allow
        for j in range(len(allow)):
            lst = allow[j]
            new = filtered.get(id(lst))
            if new is None:
                new = [p for p in lst if owner[p] < 0 or owner[p] == gid]
                if len(new) == len(lst):
                    new = lst
                filtered[id(lst)] = new
            allow[j] = new
    emb = _embed(group.allow, n)
    if emb is None:
        group.feasible = False
        group.first, group.last, group.ambiguous = [], [], set()
        return []
    first, last = emb
    group.first, group.last = first, last
    newly: list[int] = []
    ambiguous: set[int] = set()
    sids = group.sids
    for j in range(len(sids)):
        p = first[j]
        if p == last[j]:
            if owner[p] < 0:
                owner[p] = gid
                newly.append(p)
        else:
            ambiguous.add(sids[j])
    group.ambiguous = ambiguous
    return newly


def _propagate(
    work: list[_Group], dirty: set[int], owner: list[int], slot_sid: list[int], claimed_any: bool, n: int
) -> bool:
    """Step 1 (ownership) to a fixpoint, starting from the ``dirty`` groups; return ``claimed_any``.

    A claim only makes another group stale when that group still has an ambiguous item of the claimed
    slot's shape (or of unknown shape): removing a slot no item can use leaves the embeddings unchanged.
    Groups that hit the pass cap get one final computation so their lists exclude foreign slots."""
    queue: deque[int] = deque(sorted(dirty))
    queued = [g in dirty for g in range(len(work))]
    stale = list(queued)
    while queue:
        g = queue.popleft()
        queued[g] = False
        group = work[g]
        if not group.feasible or group.passes >= MAX_PASSES_PER_GROUP:
            continue
        newly = _compute(group, owner, claimed_any, n)
        stale[g] = False
        if not newly:
            continue
        claimed_any = True
        new_sids = {slot_sid[p] for p in newly}
        for h, other in enumerate(work):
            if h == g or not other.feasible or not other.ambiguous:
                continue
            if _ANY in other.ambiguous or not new_sids.isdisjoint(other.ambiguous):
                stale[h] = True
                if not queued[h]:
                    queued[h] = True
                    queue.append(h)
    for g, group in enumerate(work):
        if stale[g] and group.feasible:
            _compute(group, owner, claimed_any, n)
    return claimed_any


def _max_matching(adj: list[list[int]], n_right: int) -> tuple[list[int], list[int]]:
    """Hopcroft-Karp maximum matching of left vertices ``0..len(adj)-1`` to right ``0..n_right-1``.

    Returns ``(match_left, match_right)`` with ``-1`` for unmatched vertices."""
    n_left = len(adj)
    match_l = [-1] * n_left
    match_r = [-1] * n_right
    for i, nb in enumerate(adj):  # greedy start
        for s in nb:
            if match_r[s] < 0:
                match_l[i] = s
                match_r[s] = i
                break
    while True:
        free = [i for i in range(n_left) if match_l[i] < 0]
        if not free:
            break
        dist = [-1] * n_left
        for i in free:
            dist[i] = 0
        queue = list(free)
        found = False
        for i in queue:  # BFS layers (the list grows while iterating)
            d = dist[i] + 1
            for s in adj[i]:
                i2 = match_r[s]
                if i2 < 0:
                    found = True
                elif dist[i2] < 0:
                    dist[i2] = d
                    queue.append(i2)
        if not found:
            break
        cursor = [0] * n_left
        augmented = False
        for root in free:
            stack = [root]
            via: list[int] = []  # via[k]: slot that led from stack[k] to stack[k+1]
            while stack:
                i = stack[-1]
                nb = adj[i]
                step = None
                while cursor[i] < len(nb):
                    s = nb[cursor[i]]
                    cursor[i] += 1
                    i2 = match_r[s]
                    if i2 < 0:
                        via.append(s)  # augment along the stack
                        for k, node in enumerate(stack):
                            match_l[node] = via[k]
                            match_r[via[k]] = node
                        augmented = True
                        stack = []
                        step = -1
                        break
                    if dist[i2] == dist[i] + 1:
                        via.append(s)
                        stack.append(i2)
                        step = i2
                        break
                if step is None:  # dead end: never revisit in this phase
                    dist[i] = -2
                    stack.pop()
                    if via:
                        via.pop()
        if not augmented:
            break
    return match_l, match_r


def _usable_edges(adj: list[list[int]], n_right: int) -> list[list[int]] | None:
    """For each left vertex, the neighbours it has in SOME left-saturating matching; None if there is
    no left-saturating matching at all (inconsistent input).

    Non-matching edge ``(i, s)`` is usable iff from ``s`` an alternating path reaches a free right vertex
    (``s`` can hand its item on until a free slot absorbs it) or comes back to ``i``'s matched slot (an
    alternating cycle), i.e. ``s`` and ``match(i)`` share a strongly connected component of the graph
    "slot -> its matched item -> that item's other slots"."""
    match_l, match_r = _max_matching(adj, n_right)
    if any(s < 0 for s in match_l):
        return None
    # Slots from which a free slot is reachable: reverse BFS from the free slots.
    radj: list[list[int]] = [[] for _ in range(n_right)]
    for i, nb in enumerate(adj):
        for s in nb:
            radj[s].append(i)
    reach = [match_r[s] < 0 for s in range(n_right)]
    queue = [s for s in range(n_right) if reach[s]]
    for u in queue:
        for i in radj[u]:
            t = match_l[i]
            if t != u and not reach[t]:
                reach[t] = True
                queue.append(t)
    # Tarjan SCC (iterative) on matched slots: s -> t for t in adj[match_r[s]].
    index = [-1] * n_right
    low = [0] * n_right
    comp = [-1] * n_right
    on_stack = [False] * n_right
    tstack: list[int] = []
    counter = 0
    n_comp = 0
    for root in range(n_right):
        if index[root] >= 0:
            continue
        call = [(root, 0)]
        index[root] = low[root] = counter
        counter += 1
        tstack.append(root)
        on_stack[root] = True
        while call:
            v, k = call[-1]
            item = match_r[v]
            nb = adj[item] if item >= 0 else []
            if k < len(nb):
                call[-1] = (v, k + 1)
                w = nb[k]
                if index[w] < 0:
                    index[w] = low[w] = counter
                    counter += 1
                    tstack.append(w)
                    on_stack[w] = True
                    call.append((w, 0))
                elif on_stack[w] and index[w] < low[v]:
                    low[v] = index[w]
                continue
            call.pop()
            if call:
                u = call[-1][0]
                low[u] = min(low[u], low[v])
            if low[v] == index[v]:
                while True:
                    w = tstack.pop()
                    on_stack[w] = False
                    comp[w] = n_comp
                    if w == v:
                        break
                n_comp += 1
    return [
        [s for s in nb if s == match_l[i] or reach[s] or comp[s] == comp[match_l[i]]]
        for i, nb in enumerate(adj)
    ]


def _prune_by_matching(work: list[_Group], n: int) -> set[int]:
    """Step 2 (matching): drop candidate edges of ambiguous items that no item-saturating matching uses.

    Affected items get a private allow list (their surviving candidates). Returns the groups changed."""
    if sum(1 for group in work if group.feasible and group.ambiguous) < 2:
        return set()  # one group alone is already exact
    todo: list[tuple[_Group, int, list[int], int, int]] = []
    total = 0
    for group in work:
        if not group.feasible or not group.ambiguous:
            continue
        for j in range(len(group.sids)):
            if group.first[j] != group.last[j]:
                pos, start, stop = group.interval(j, n)
                total += stop - start
                if total > MATCHING_EDGE_BUDGET:
                    return set()
                todo.append((group, j, pos, start, stop))
    if len(todo) < 2:
        return set()
    compact: dict[int, int] = {}
    slot_of: list[int] = []
    adj: list[list[int]] = []
    for _, _, pos, start, stop in todo:
        nb = []
        for k in range(start, stop):
            p = pos[k]
            c = compact.get(p)
            if c is None:
                c = compact[p] = len(slot_of)
                slot_of.append(p)
            nb.append(c)
        adj.append(nb)
    usable = _usable_edges(adj, len(slot_of))
    if usable is None:
        return set()
    changed: set[int] = set()
    for (group, j, _, _, _), nb, keep in zip(todo, adj, usable):
        if len(keep) < len(nb):
            group.allow[j] = [slot_of[c] for c in keep]  # filter keeps nb order = position order
            changed.add(group.gid)
    return changed


def align_groups(slots: Sequence[Slot], groups: Sequence[Sequence[Item]], *,
                 slot_class: Sequence[int] | None = None,
                 group_class: Sequence[int] | None = None) -> list[list[Assignment]]:
    """For each group, for each item, the set of model slots it can occupy in SOME valid joint embedding
    (every group an order-preserving, shape-respecting subsequence of the slots, groups pairwise disjoint).

    ``slot_class`` / ``group_class`` (both or neither) restrict further: a group's items may only use
    slots of the group's class (the group-structure evidence: which new param group a slot's name is in).

    Returns one list of :class:`Assignment` per group, in group and item order.

    Per group the answer is exact; across groups it is sound but may be incomplete: a ``name`` is only
    set when the placement is certain, and the true slot is always among ``candidates``, but an item may
    keep several candidates although only one survives in every valid joint embedding (see the module
    docstring). A group that cannot be embedded (its items are not a shape-compatible ordered
    subsequence of the slots, or, for inconsistent input, not of what the other groups leave) gets
    ``name=None, candidates=()`` for every item."""
    # The work allocates ~10 objects per slot and item but creates no reference cycles; letting the
    # cyclic GC rescan the growing heap meanwhile costs ~40% of the run time on 100k-entry models.
    with gc_paused():
        return _align(slots, groups, slot_class, group_class)


def _align(slots: Sequence[Slot], groups: Sequence[Sequence[Item]], slot_class: Sequence[int] | None,
           group_class: Sequence[int] | None) -> list[list[Assignment]]:
    """:func:`align_groups` proper."""
    n = len(slots)
    classes = slot_class if slot_class is not None and group_class is not None else [0] * n
    gclass = group_class if slot_class is not None and group_class is not None else [0] * len(groups)
    # shape ids are per (class, shape): a slot of another class never fits
    shape_ids: dict[tuple[int, tuple[int, ...]], int] = {}
    positions: dict[int, list[int]] = {}
    any_of_class: dict[int, list[int]] = {}  # what an item of unknown shape may use
    slot_sid: list[int] = []
    for p, slot in enumerate(slots):
        sid = shape_ids.setdefault((classes[p], tuple(slot.shape)), len(shape_ids))
        slot_sid.append(sid)
        positions.setdefault(sid, []).append(p)
        any_of_class.setdefault(classes[p], []).append(p)

    work: list[_Group] = []
    empty: list[int] = []
    for gid, items in enumerate(groups):
        k = gclass[gid]
        sids = [_ANY if it.shape is None else shape_ids.get((k, tuple(it.shape)), -2) for it in items]
        allow = [any_of_class.get(k, empty) if sid == _ANY else positions.get(sid, empty) for sid in sids]
        work.append(_Group(gid, items, sids, allow))

    owner = [-1] * n  # group that certainly owns the slot, -1: unknown
    claimed_any = _propagate(work, set(range(len(work))), owner, slot_sid, False, n)
    for _ in range(MAX_ROUNDS):
        changed = _prune_by_matching(work, n)
        if not changed:
            break
        claimed_any = _propagate(work, changed, owner, slot_sid, claimed_any, n)

    names = [slot.name for slot in slots]
    result: list[list[Assignment]] = []
    for group in work:
        if not group.feasible:
            result.append([Assignment(it.index, None, ()) for it in group.items])
            continue
        out: list[Assignment] = []
        first, last = group.first, group.last
        make = tuple.__new__  # (Assignment(...) without its Python-level __new__: one per index)
        for j, it in enumerate(group.items):
            p = first[j]
            if p == last[j]:  # fast path for the common, forced case
                out.append(make(Assignment, (it.index, names[p], (names[p],))))
                continue
            pos, start, stop = group.interval(j, n)
            cand = tuple([names[p] for p in pos[start:stop]])
            out.append(Assignment(it.index, cand[0] if len(cand) == 1 else None, cand))
        result.append(out)
    return result
