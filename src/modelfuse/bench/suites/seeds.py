"""The ``seeds`` suite: K zoo models of one architecture trained from different seeds on digits.

Pool builder ``digits_seeds`` (members ``seed * 100 + k``, cached by :func:`modelfuse.zoo.build_pool`)
and the bench methods run on it: each member alone and the best one on validation (baseline),
an ensemble per classification combiner, fitted weights, stacking, greedy selection, the packed
ensemble and distillation (output), weight averaging naive / after weight matching / with REPAIR
and OT fusion with loss-barrier curves (parameter), and stitching two members (structure).

Every method is glue around the package's public API: it runs the fusion, evaluates the result
on ``pool.data.test`` with :func:`modelfuse.zoo.evaluate` and returns an :class:`Outcome`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelfuse.bench._api import BenchPool, Outcome, info_of, register_bench_method, register_pool_builder
from modelfuse.errors import ConfigError

#: the architectures the pool builder trains (the zoo names) and their default options
ARCHS: dict[str, dict[str, Any]] = {"cnn": {"batch_norm": True}, "mlp": {}}
#: the datasets the pool builder trains on (modelfuse.data names)
DATASETS = ("digits", "digits_hard")
#: where stitching cuts each architecture by default (a middle layer)
STITCH_AT = {"cnn": "features.conv2", "mlp": "features.relu1"}
#: interpolation points of the loss-barrier curves
BARRIER_POINTS = 11
#: samples in the batch the runner times fused models on
INFERENCE_BATCH = 256


def member_seeds(seed: int, members: int) -> list[int]:
    """The training seeds of the pool for ``seed``: ``seed * 100 + k`` for k < ``members``."""
    return [int(seed) * 100 + k for k in range(int(members))]


@register_pool_builder("digits_seeds")
def digits_seeds(
    seed: int = 0,
    *,
    members: int = 4,
    arch: str = "cnn",
    epochs: int = 10,
    model_kwargs: dict[str, Any] | None = None,
    dataset: str = "digits",
    data_kwargs: dict[str, Any] | None = None,
    cache: bool = True,
) -> BenchPool:
    """``members`` models of ``arch`` (``cnn`` with BatchNorm, or ``mlp``) trained on ``dataset`` (one of
    :data:`DATASETS`: clean digits, or digits with noise and occlusions, which leaves fusion room to
    help) from seeds ``seed * 100 + k``; ``extra`` holds every member's validation and test logits
    (K, N, C)."""
    from modelfuse.data import labels_of
    from modelfuse.zoo import build_pool, predict

    if arch not in ARCHS:
        raise ConfigError(f"digits_seeds: arch must be one of {', '.join(ARCHS)}; found {arch!r}")
    if dataset not in DATASETS:
        raise ConfigError(f"digits_seeds: dataset must be one of {', '.join(DATASETS)}; found {dataset!r}")
    if int(members) < 2:
        raise ConfigError(
            f"digits_seeds: members must be at least 2 (there is nothing to fuse); found {members}"
        )
    if int(epochs) < 1:
        raise ConfigError(f"digits_seeds: epochs must be at least 1; found {epochs}")
    kwargs = {**ARCHS[arch], **(model_kwargs or {})}
    seeds = member_seeds(seed, members)
    pool = build_pool(
        arch,
        dataset,
        seeds=seeds,
        epochs=int(epochs),
        model_kwargs=kwargs,
        data_kwargs=data_kwargs,
        cache=cache,
        progress=False,
    )
    data = pool.data
    models = {f"seed{s}": m.eval() for s, m in zip(seeds, pool.members)}
    x_test = torch.stack([data.test[i][0] for i in range(min(INFERENCE_BATCH, len(data.test)))])
    extra = {
        "arch": arch,
        "model_kwargs": kwargs,
        "epochs": int(epochs),
        "member_metrics": pool.metrics,
        "val_logits": torch.stack([predict(m, data.val).double() for m in pool.members]),
        "val_labels": labels_of(data.val).long(),
        "test_logits": torch.stack([predict(m, data.test).double() for m in pool.members]),
        "test_labels": labels_of(data.test).long(),
    }
    info = info_of(
        {
            "dataset": dataset,
            "data_kwargs": dict(data_kwargs or {}),
            "arch": arch,
            "members": int(members),
            "epochs": int(epochs),
            "seeds": seeds,
            "model_kwargs": kwargs,
            "member_test_accuracy": [round(m["test_accuracy"], 4) for m in pool.metrics],
        }
    )
    return BenchPool(
        name="digits_seeds",
        seed=int(seed),
        models=models,
        data=data,
        inference_input=x_test,
        info=info,
        extra=extra,
    )


# ----------------------------------------------------------------------------- helpers


def scores(model: nn.Module, pool: BenchPool) -> dict[str, float]:
    """Test accuracy and NLL of ``model`` on the pool's test split (:func:`modelfuse.zoo.evaluate`)."""
    from modelfuse.zoo import evaluate

    out = evaluate(model, pool.data.test)
    return {"accuracy": float(out["accuracy"]), "nll": float(out["nll"])}


def _members(pool: BenchPool) -> list[nn.Module]:
    return list(pool.models.values())


def _pair(pool: BenchPool, a: int, b: int) -> tuple[nn.Module, nn.Module]:
    models = _members(pool)
    for i in (a, b):
        if not 0 <= int(i) < len(models):
            raise ConfigError(
                f"member index {i} is out of range: the pool has {len(models)} members (0..{len(models) - 1})"
            )
    if int(a) == int(b):
        raise ConfigError(f"fusing a member with itself (a = b = {a}); pick two different members")
    return models[int(a)], models[int(b)]


def _logits(pool: BenchPool, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if f"{split}_logits" in pool.extra:
        return pool.extra[f"{split}_logits"], pool.extra[f"{split}_labels"]
    from modelfuse.data import labels_of
    from modelfuse.zoo import predict

    data = getattr(pool.data, split)
    return torch.stack([predict(m, data).double() for m in _members(pool)]), labels_of(data).long()


def members_series(
    pool: BenchPool, combine: str = "mean_prob", weights: Sequence[float] | None = None
) -> list[tuple[float, float]]:
    """Test accuracy of the ensemble of the first k members, k = 1..K (series ``members``)."""
    from modelfuse.ensemble import Ensemble
    from modelfuse.zoo.metrics import accuracy

    logits, labels = _logits(pool, "test")
    models = _members(pool)
    out = []
    for k in range(1, len(models) + 1):
        w = None if weights is None else list(weights)[:k]
        if w is not None and sum(w) <= 0:
            continue
        ens = Ensemble(models[:k], combine, w)
        out.append((float(k), accuracy(ens.combine_outputs(logits[:k]), labels)))
    return out


def _barrier(path: Any) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """A :class:`~modelfuse.align.BarrierResult`'s curve (t, test loss) and its summary figures."""
    curve = [(float(t), float(v)) for t, v in zip(path.ts, path.losses)]
    return curve, {"barrier": float(path.barrier), "accuracy_barrier": float(path.accuracy_barrier)}


def _path(pool: BenchPool, ts: Sequence[float], model_at: Any) -> Any:
    """The :class:`~modelfuse.align.BarrierResult` of ``model_at(t)`` evaluated on the test split at each t."""
    from modelfuse.align import BarrierResult

    points = [scores(model_at(t), pool) for t in ts]
    return BarrierResult(
        ts=list(ts),
        losses=[p["nll"] for p in points],
        accuracies=[p["accuracy"] for p in points],
        split="test",
        n=len(pool.data.test),
    )


def _ts(points: int) -> list[float]:
    if int(points) < 2:
        raise ConfigError(f"barrier_points must be at least 2 (both endpoints); found {points}")
    return torch.linspace(0, 1, int(points), dtype=torch.float64).tolist()


# ----------------------------------------------------------------------------- baseline


@register_bench_method("member", "baseline")
def member(pool: BenchPool, *, index: int = 0) -> Outcome:
    """One member alone (``index`` in the pool's order)."""
    models = _members(pool)
    if not 0 <= int(index) < len(models):
        raise ConfigError(
            f"member: index {index} is out of range; the pool has {len(models)} members (0..{len(models) - 1})"
        )
    name = list(pool.models)[int(index)]
    return Outcome(scores(models[int(index)], pool), model=models[int(index)], notes=f"member {name}")


@register_bench_method("best_member", "baseline")
def best_member(pool: BenchPool, *, select: str = "accuracy") -> Outcome:
    """The member best on validation (``select``: ``accuracy``, ties to the lower NLL, or ``nll``), on test."""
    from modelfuse.zoo.metrics import accuracy, nll

    if select not in ("accuracy", "nll"):
        raise ConfigError(f"best_member: select must be 'accuracy' or 'nll'; found {select!r}")
    logits, labels = _logits(pool, "val")
    val = [(accuracy(z, labels), nll(z, labels)) for z in logits]
    key = (lambda i: (-val[i][0], val[i][1])) if select == "accuracy" else (lambda i: (val[i][1], -val[i][0]))
    best = min(range(len(val)), key=key)
    models = _members(pool)
    each = [scores(m, pool) for m in models]
    metrics = {
        **each[best],
        "mean_member_accuracy": sum(s["accuracy"] for s in each) / len(each),
        "mean_member_nll": sum(s["nll"] for s in each) / len(each),
    }
    name = list(pool.models)[best]
    return Outcome(metrics, model=models[best], notes=f"{name} (best validation {select} of {len(models)})")


# ----------------------------------------------------------------------------- output fusion


@register_bench_method("ensemble", "output")
def ensemble(pool: BenchPool, *, combiner: str = "mean_prob") -> Outcome:
    """All members under one registered classification combiner (``modelfuse.ensemble.list_combiners``)."""
    from modelfuse.ensemble import Ensemble, get_combiner

    if get_combiner(combiner).task != "classification":
        raise ConfigError(
            f"ensemble: the {combiner!r} combiner is for regression; the digits pool classifies"
        )
    ens = Ensemble(_members(pool), combiner)
    return Outcome(scores(ens, pool), model=ens, series={"members": members_series(pool, combiner)})


@register_bench_method("learned_weights", "output")
def learned_weights(pool: BenchPool, *, temperature: bool = False) -> Outcome:
    """Member weights (and a temperature) fitted on validation NLL (``LearnedWeights``)."""
    from modelfuse.ensemble import LearnedWeights

    fit = LearnedWeights(temperature=bool(temperature)).fit(*_logits(pool, "val"))
    ens = fit.ensemble(_members(pool))
    w = ", ".join(f"{x:.3f}" for x in fit.weights_.tolist())
    notes = f"weights [{w}]" + (f", temperature {fit.temperature_:.3f}" if temperature else "")
    return Outcome(scores(ens, pool), model=ens, notes=notes)


@register_bench_method("stacking", "output")
def stacking(
    pool: BenchPool, *, meta: str = "logistic", folds: int = 5, cs: Sequence[float] = (0.1, 1.0)
) -> Outcome:
    """A meta-learner fitted out of fold on the members' validation predictions (``Stacking``);
    ``cs``: the inverse regularisation strengths the logistic meta-learner picks from."""
    from modelfuse.ensemble import Stacking

    fit = Stacking(meta, folds=int(folds), seed=pool.seed, cs=tuple(float(c) for c in cs)).fit(
        *_logits(pool, "val")
    )
    ens = fit.ensemble(_members(pool))
    return Outcome(
        scores(ens, pool), model=ens, notes=f"{meta} meta-learner, out-of-fold val NLL {fit.oof_nll_:.4f}"
    )


@register_bench_method("greedy_selection", "output")
def greedy_selection(pool: BenchPool, *, steps: int = 50) -> Outcome:
    """Ensemble selection with replacement on validation NLL (Caruana et al. 2004, ``GreedySelection``)."""
    from modelfuse.ensemble import GreedySelection

    fit = GreedySelection(steps=int(steps)).fit(*_logits(pool, "val"))
    ens = fit.ensemble(_members(pool))
    picks = ", ".join(list(pool.models)[i] for i in fit.picks_)
    return Outcome(
        scores(ens, pool),
        model=ens,
        series={"members": members_series(pool, "mean_prob", fit.weights_.tolist())},
        notes=f"picks: {picks}",
    )


class PackedMeanProb(nn.Module):
    """A :class:`~modelfuse.ensemble.PackedEnsemble` whose K outputs go through the ``mean_prob``
    combiner: the same predictions as ``Ensemble(members, "mean_prob")`` from one packed pass."""

    def __init__(self, packed: nn.Module, members: int) -> None:
        from modelfuse.ensemble import get_combiner

        super().__init__()
        self.packed = packed
        self._combine = get_combiner("mean_prob").fn
        self.register_buffer("weights", torch.full((int(members),), 1.0 / int(members)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine(self.packed(x), self.weights)


@register_bench_method("packed_ensemble", "output")
def packed_ensemble(pool: BenchPool) -> Outcome:
    """The members packed into one module (grouped convolutions, ``pack``), averaged like ``mean_prob``."""
    from modelfuse.ensemble import pack

    members = _members(pool)
    model = PackedMeanProb(pack(members), len(members)).eval()
    return Outcome(scores(model, pool), model=model, notes=f"{len(members)} members in one pass")


@register_bench_method("distillation", "output")
def distillation(
    pool: BenchPool, *, epochs: int | None = None, temperature: float = 4.0, alpha: float = 0.9
) -> Outcome:
    """The ensemble distilled into one student of the members' architecture (``distill``, KD loss)."""
    from modelfuse.ensemble import distill

    arch = pool.extra.get("arch", pool.info.get("arch"))
    epochs = int(epochs if epochs is not None else pool.extra.get("epochs", pool.info.get("epochs", 10)))
    members = _members(pool)
    out = distill(
        arch,
        members,
        pool.data,
        epochs=epochs,
        seed=pool.seed * 100 + len(members),
        temperature=float(temperature),
        alpha=float(alpha),
        model_kwargs=pool.extra.get("model_kwargs"),
    )
    return Outcome(
        scores(out.student, pool),
        model=out.student,
        notes=f"{arch} student, {epochs} epochs, T={temperature:g}",
    )


# ----------------------------------------------------------------------------- parameter fusion


def _repaired(model: nn.Module, a: nn.Module, b: nn.Module, t: float, pool: BenchPool) -> nn.Module:
    from modelfuse.align import repair

    return repair(model, endpoints=(a, b), data=pool.data.train, t=float(t))


@register_bench_method("weight_average", "parameter")
def weight_average(
    pool: BenchPool,
    *,
    align: str = "none",
    repair: bool = False,
    a: int = 0,
    b: int = 1,
    barrier: bool = True,
    barrier_points: int = BARRIER_POINTS,
) -> Outcome:
    """The midpoint of members ``a`` and ``b``, naive or after aligning b to a (``align``: ``none`` or a
    registered aligner), optionally REPAIRed; series ``barrier``: test loss along the path."""
    from modelfuse.align import align as align_to
    from modelfuse.align import interpolate, list_aligners, loss_barrier

    model_a, model_b = _pair(pool, a, b)
    if align != "none":
        if align not in list_aligners():
            raise ConfigError(
                f"weight_average: align must be 'none' or one of {', '.join(list_aligners())}; found {align!r}"
            )
        options: dict[str, Any] = {"seed": pool.seed} if align == "weight_matching" else {}
        if align == "activation_matching":
            options = {"data": torch.utils.data.DataLoader(pool.data.train, batch_size=256)}
        model_b = align_to(model_b, to=model_a, method=align, **options)
    merged = interpolate(model_a, model_b, 0.5)
    if repair:
        merged = _repaired(merged, model_a, model_b, 0.5, pool)
    metrics = scores(merged, pool)
    series: dict[str, list[tuple[float, float]]] = {}
    if barrier:
        ts = _ts(barrier_points)
        if repair:
            path = _path(
                pool, ts, lambda t: _repaired(interpolate(model_a, model_b, t), model_a, model_b, t, pool)
            )
        else:
            path = loss_barrier(model_a, model_b, pool.data, split="test", ts=ts)
        series["barrier"], figures = _barrier(path)
        metrics.update(figures)
    what = "naive" if align == "none" else align.replace("_", " ")
    return Outcome(
        metrics,
        model=merged,
        series=series,
        notes=f"midpoint of members {a} and {b}, {what}" + (", REPAIR" if repair else ""),
    )


@register_bench_method("ot_fusion", "parameter")
def ot_fusion(
    pool: BenchPool,
    *,
    mode: str = "weights",
    repair: bool = True,
    a: int = 0,
    b: int = 1,
    barrier: bool = True,
    barrier_points: int = BARRIER_POINTS,
) -> Outcome:
    """Member b fused into member a by optimal transport of units (Singh & Jaggi 2020, ``ot_fusion``) at
    t = 1/2; ``repair`` recomputes BatchNorm statistics (or rescales) afterwards; series ``barrier``."""
    from modelfuse.align import ot_fusion as fuse

    model_a, model_b = _pair(pool, a, b)
    data = torch.utils.data.DataLoader(pool.data.train, batch_size=256) if mode == "activations" else None

    def fused(t: float) -> nn.Module:
        out = fuse(model_a, model_b, t=float(t), mode=mode, data=data).model
        return _repaired(out, model_a, model_b, t, pool) if repair else out

    merged = fused(0.5)
    metrics = scores(merged, pool)
    series: dict[str, list[tuple[float, float]]] = {}
    if barrier:
        ts = _ts(barrier_points)
        series["barrier"], figures = _barrier(_path(pool, ts, fused))
        metrics.update(figures)
    return Outcome(
        metrics,
        model=merged,
        series=series,
        notes=f"members {a} and {b}, {mode} ground cost" + (", repaired" if repair else ""),
    )


# ----------------------------------------------------------------------------- structure fusion


@register_bench_method("stitching", "structure")
def stitching(pool: BenchPool, *, at: str | None = None, a: int = 0, b: int = 1, epochs: int = 2) -> Outcome:
    """Member a's front joined to member b's back at layer ``at`` through a trained adapter (``stitch_models``)."""
    from modelfuse.structure import stitch_models

    model_a, model_b = _pair(pool, a, b)
    arch = pool.extra.get("arch", pool.info.get("arch"))
    at = at if at is not None else STITCH_AT.get(arch)
    if at is None:
        raise ConfigError(
            f"stitching: no default layer for arch {arch!r}; give at= (a layer name of the members)"
        )
    stitched, report = stitch_models(
        copy.deepcopy(model_a), copy.deepcopy(model_b), at, pool.data, epochs=int(epochs), seed=pool.seed
    )
    metrics = scores(stitched, pool)
    metrics["accuracy_before_training"] = float(report.stitched_init["accuracy"])
    return Outcome(
        metrics, model=stitched, notes=f"member {a} front, member {b} back at {at}, {report.adapter} adapter"
    )
