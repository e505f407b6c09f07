"""Never a wrong name, whatever evidence is given: the consistency gate over random models, groupings
and evidence kinds, right and *wrong*.

Each case: a random model (Linear / LayerNorm / Embedding / BatchNorm layers over a few repeated
widths, so shapes collide; sometimes an output Linear tied to the Embedding), a random grouping
(one group; decay / no-decay; one group per parameter; policy groups by module type; a few parameters
picked by ``id()`` with their own lr), a real torch optimizer (Adam, SGD with momentum, SGD without:
no per-parameter state) trained one step, saved as a bundle with its model (registration order),
beside a safetensors-ordered model (order not trusted) or alone. The new code is the same layers
registered in another order, given as a model only or as (model, optimizer). Evidence offered: none,
the old module, the old (module, optimizer), a names file in optimizer order, and wrong evidence:
another model, a shuffled names file, the old module grouped another way, a source with other shapes.

Property: every name the mapping gives is the truth, and the remap plan built from it either moves
every state entry to its own parameter with its own group's hyperparameters, or refuses
(``MappingError``). Counts are printed; the default run takes ``N_CASES`` cases, ``-m slow`` 30,000 more
(other seeds).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from optckpt import Checkpoint, OptimizerState
from optckpt.checkpoint import ModelState, TensorMeta
from optckpt.errors import MappingError
from optckpt.io.discover import tied_keys
from optckpt.mapping import SourceNames, infer_mapping
from optckpt.remap import Policy, build_plan
from optckpt.target import from_live

N_CASES = 1000
WIDTHS = (3, 4)
GROUPINGS = ("single", "decay", "per_param", "policy", "special")
OPTIMIZERS = ("adam", "sgdm", "sgd")
LAYOUTS = ("bundle", "unordered", "alone")
EVIDENCE = ("none", "module", "module_opt", "names", "wrong_model", "shuffled", "wrong_grouping", "wrong_shapes")
STATS: Counter[str] = Counter()


@dataclass
class Arch:
    layers: list[tuple[str, str, tuple[int, ...]]]  # (attribute, kind, dims) in registration order
    tie: bool


def _arch(rng: random.Random) -> Arch:
    layers: list[tuple[str, str, tuple[int, ...]]] = []
    if rng.random() < 0.3:
        layers.append(("emb", "embedding", (5, rng.choice(WIDTHS))))
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(("linear", "linear", "norm", "bn"))
        if kind == "linear":
            layers.append((f"l{i}", kind, (rng.choice(WIDTHS), rng.choice(WIDTHS))))
        else:
            layers.append((f"l{i}", kind, (rng.choice(WIDTHS),)))
    tie = layers[0][1] == "embedding" and rng.random() < 0.5
    if tie:
        layers.append(("out", "linear_nobias", (layers[0][2][1], 5)))
    return Arch(layers, tie)


def _build(arch: Arch, order: list[int] | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    made = {}
    for name, kind, dims in arch.layers:
        if kind == "linear":
            made[name] = nn.Linear(*dims)
        elif kind == "linear_nobias":
            made[name] = nn.Linear(*dims, bias=False)
        elif kind == "embedding":
            made[name] = nn.Embedding(*dims)
        elif kind == "norm":
            made[name] = nn.LayerNorm(dims[0])
        else:
            made[name] = nn.BatchNorm1d(dims[0])
    m = nn.Module()
    for i in order if order is not None else range(len(arch.layers)):
        setattr(m, arch.layers[i][0], made[arch.layers[i][0]])
    if arch.tie:
        m.out.weight = m.emb.weight
    return m


def _groups(model: nn.Module, grouping: str, rng_seed: int) -> list[dict]:
    """The grouping rule, as code would write it: by what a parameter is (its name, its module type, its
    ndim), never by where it happens to be registered; a tied weight counts as the Embedding's."""
    tied = hasattr(model, "emb") and hasattr(model, "out") and model.out.weight is model.emb.weight
    named = [("emb.weight" if tied and n == "out.weight" else n, p)  # tied: first name only
             for n, p in model.named_parameters()]
    rng = random.Random(rng_seed)
    if grouping == "single":
        return [{"params": [p for _, p in named]}]
    if grouping == "decay":
        out = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
               {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    elif grouping == "per_param":  # layer-wise lr: each parameter's lr follows its name, not its position
        rank = {n: i for i, n in enumerate(sorted(n for n, _ in named))}
        out = [{"params": [p], "lr": 1e-3 * (rank[n] + 1)} for n, p in named]
    elif grouping == "policy":  # one group per module type, in the order the model first uses it
        by_type: dict[str, list] = {}
        for n, p in named:
            owner = type(model.get_submodule(n.rpartition(".")[0])).__name__
            by_type.setdefault(owner, []).append(p)
        lr = {"Linear": 1e-3, "LayerNorm": 2e-3, "BatchNorm1d": 3e-3, "Embedding": 4e-3}
        out = [{"params": ps, "lr": lr[t]} for t, ps in by_type.items()]
    else:  # a few parameters picked by id() get their own lr
        picked = {id(p) for _, p in rng.sample(sorted(named, key=lambda x: x[0]), k=max(1, len(named) // 3))}
        out = [{"params": [p for _, p in named if id(p) not in picked]},
               {"params": [p for _, p in named if id(p) in picked], "lr": 0.05}]
    return [g for g in out if g["params"]]


def _optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(groups, lr=1e-3)
    return torch.optim.SGD(groups, lr=1e-3, momentum=0.9 if kind == "sgdm" else 0.0)


def _train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in model.parameters())
    loss.backward()  # type: ignore[union-attr]
    opt.step()


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, layout: str) -> Checkpoint:
    ck = Checkpoint(path="<memory>", layout="torch-bundle")
    ck.optimizers.append(OptimizerState("optimizer", "<memory>", ("optimizer",), opt.state_dict()))
    if layout != "alone":
        sd = model.state_dict()
        if layout == "unordered":  # safetensors keeps keys sorted by name
            sd = dict(sorted(sd.items()))
        ck.models.append(ModelState("model", "<memory>", ("model",), sd, {k: TensorMeta.of(v) for k, v in sd.items()},
                                    order_trusted=layout == "bundle", tied=tied_keys(sd)))
    return ck


def _source(kind: str, arch: Arch, grouping: str, opt_kind: str, seed: int, rng: random.Random,
            truth: list[list[str]], other: Arch, fallback: dict[str, tuple[int, ...]]) -> SourceNames | None:
    if kind == "none":
        return None
    if kind in ("module", "wrong_model", "wrong_shapes"):
        a = arch if kind == "module" else Arch([("m" + n, k, d) for n, k, d in other.layers], False)
        m = _build(a, seed=seed)
        if kind == "wrong_shapes":  # the same names, other widths
            m = _build(Arch([(n, k, tuple(d + 1 for d in dims)) for n, k, dims in arch.layers], arch.tie), seed=seed)
        t = from_live(m)
        return SourceNames(kind, [list(g) for g in t.groups], dict(t.shapes), ordered=False)
    if kind in ("module_opt", "wrong_grouping"):
        m = _build(arch, seed=seed)
        g = grouping if kind == "module_opt" else rng.choice([x for x in GROUPINGS if x != grouping])
        t = from_live(m, _optimizer(opt_kind, _groups(m, g, seed)))
        return SourceNames(kind, [list(x) for x in t.groups], dict(t.shapes), ordered=True)
    names = [n for g in truth for n in g]
    if kind == "shuffled":
        rng.shuffle(names)
    return SourceNames(kind, [names], {}, ordered=True, fallback_shapes=fallback)


def _case(seed: int) -> None:
    rng = random.Random(seed)
    arch = _arch(rng)
    grouping, opt_kind, layout, evidence = (rng.choice(GROUPINGS), rng.choice(OPTIMIZERS), rng.choice(LAYOUTS),
                                            rng.choice(EVIDENCE))
    old = _build(arch, seed=seed)
    opt = _optimizer(opt_kind, _groups(old, grouping, seed))
    _train(old, opt, seed)
    name_of = {id(p): n for n, p in old.named_parameters()}
    truth = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    true_name = dict(enumerate(n for g in truth for n in g))
    true_group = {n: gi for gi, g in enumerate(truth) for n in g}
    saved_lr = [g["lr"] for g in opt.param_groups]
    ck = _checkpoint(old, opt, layout)
    order = list(range(len(arch.layers)))
    rng.shuffle(order)
    new = _build(arch, order, seed=seed)
    new_shapes = {n: tuple(p.shape) for n, p in new.named_parameters()}
    source = _source(evidence, arch, grouping, opt_kind, seed, rng, truth, _arch(random.Random(seed + 10**6)),
                     new_shapes)
    STATS[f"evidence:{evidence}"] += 1
    try:
        mapping = infer_mapping(ck, source=source)
    except MappingError:
        STATS["refused at mapping"] += 1
        return
    alone = infer_mapping(ck)  # what the checkpoint says without the claim
    wrong = [e for e in mapping.entries if e.name is not None and e.name != true_name[e.index]]
    if wrong:
        # A wrong claim that agrees with every recorded fact cannot be told from the truth by any tool:
        # each wrong name has the state's shape (or there is no state) and is one the checkpoint's own
        # evidence allows for that index. Counted, never excused otherwise.
        allowed = {e.index: e.candidates for e in alone.entries}
        undetectable = evidence in ("shuffled", "wrong_grouping", "wrong_model", "wrong_shapes") and all(
            (e.shape is None or new_shapes.get(e.name) in (None, e.shape))
            and (not allowed[e.index] or e.name in allowed[e.index]) for e in wrong)
        assert undetectable, (seed, evidence, wrong[0], true_name[wrong[0].index])
        STATS["wrong claims no recorded fact contradicts"] += 1
        return
    for e in mapping.entries:
        STATS["names given"] += e.name is not None
        STATS["uncertain with state"] += e.name is None and e.has_state
    STATS["rejected evidence"] += bool(mapping.rejected)

    tgt_opt = _optimizer(opt_kind, _groups(new, grouping, seed)) if rng.random() < 0.5 else None
    target = from_live(new, tgt_opt)
    alias = dict(target.aliases)  # a tied weight's other name -> its first name in the new model

    def same_param(a: str, b: str) -> bool:
        return alias.get(a, a) == alias.get(b, b)

    try:
        plan, _ = build_plan(mapping, opt.state_dict()["param_groups"], target, Policy())
    except MappingError:
        STATS["refused at plan"] += 1
        return
    STATS["plans"] += 1
    for s in plan.slots:
        if s.source_index is not None:
            assert same_param(true_name[s.source_index], s.name), (seed, evidence, s, true_name[s.source_index])
            STATS["entries moved"] += 1
    def canon(names: list[str] | tuple[str, ...]) -> frozenset[str]:
        return frozenset(next((o for o in true_group if same_param(o, n)), n) for n in names)

    saved_sets = [canon(g) for g in truth]
    for g in plan.groups:
        members = canon(g.param_names)
        if members not in saved_sets or "lr" not in g.hparams:
            continue  # the new code regrouped these parameters: the group's hyperparameters are its choice
        assert g.hparams["lr"] == saved_lr[saved_sets.index(members)], (seed, evidence, g.group, sorted(members))
        STATS["groups checked"] += 1


def _run(n: int, first: int) -> None:
    STATS.clear()
    for seed in range(first, first + n):
        _case(seed)
    print(f"\nevidence property: {n} cases; " + ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())))
    assert STATS["names given"] > 0 and STATS["plans"] > 0 and STATS["rejected evidence"] > 0


def test_every_name_given_is_right_or_the_command_refuses():
    _run(N_CASES, 0)


@pytest.mark.slow
def test_every_name_given_is_right_many_more_cases():
    _run(30_000, 10**5)
