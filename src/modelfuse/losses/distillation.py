"""Multi-teacher knowledge distillation as one loss: soft targets from several teachers, a hard-label
term, and an optional feature-matching term, usable in any training loop.

The one KD formula of the package (Hinton et al. 2015, sec. 2), averaged over the batch::

    alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, y)

with ``p_teacher^T = sum_k w_kn softmax(z_k / T)`` the mixture of K teachers' tempered
distributions, ``p_student^T = softmax(s / T)``. The ``T^2`` keeps the soft term's gradients
on the scale of the hard term's as ``T`` changes. ``alpha`` is the weight of the distillation
term (the convention of :func:`modelfuse.ensemble.distill.kd_loss`, which is built on this
module): ``alpha = 0`` is plain cross-entropy, ``alpha = 1`` distillation only. The hard term
averages over the samples that carry a label (a negative label, or ``labels=None``, means none).

Teacher weights ``w_kn`` are fixed (a list, normalised; None for equal), per-sample by a
registered weighting (:func:`list_teacher_weightings`), or learned (``weights="learned"`` in
:class:`MultiTeacherDistillation`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.errors import ConfigError, LossFusionError
from modelfuse.registry import Registry

__all__ = [
    "MultiTeacherDistillation",
    "distillation_loss",
    "get_teacher_weighting",
    "list_teacher_weightings",
    "register_teacher_weighting",
    "teacher_log_weights",
    "teacher_mixture",
]

#: a per-sample weighting: (logits (K, N, C), labels (N,) with -1 for none, or None) -> scores (K, N);
#: the weights are the scores normalised over K per sample (a softmax, in log space)
Weighting = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_WEIGHTINGS: Registry[Weighting] = Registry("teacher weighting")
WeightsArg = Sequence[float] | torch.Tensor | str | None


def register_teacher_weighting(name: str):
    """Register ``f(logits, labels) -> scores (K, N)`` as a per-sample teacher weighting ``name``.

    The weights are ``softmax_k(scores)`` per sample; ``labels`` is None or (N,) with -1 where a
    sample has no label (a weighting that needs labels gives equal scores to such samples)."""

    def deco(fn: Weighting) -> Weighting:
        _WEIGHTINGS.register(name, fn)
        return fn

    return deco


def get_teacher_weighting(name: str) -> Weighting:
    """The per-sample teacher weighting registered as ``name`` (unknown names list the registered ones)."""
    return _WEIGHTINGS.get(name)


def list_teacher_weightings(pattern: str = "*") -> list[str]:
    """Registered per-sample teacher weighting names matching a shell-style ``pattern``, sorted."""
    return _WEIGHTINGS.names(pattern)


def _needs_labels(name: str, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ConfigError(f"teacher weighting {name!r} needs the labels of the samples; pass labels=")
    return labels


def _label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each teacher's log probability (T = 1) of each sample's label (K, N) (0 where unlabelled), and the mask."""
    k, n = logits.shape[:2]
    has = labels >= 0
    idx = labels.clamp_min(0).view(1, n, 1).expand(k, n, 1)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, idx).squeeze(-1)
    return torch.where(has, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)), has


@register_teacher_weighting("confidence")
def confidence(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``w_kn`` proportional to teacher k's maximum probability (T = 1) on sample n: trust the surest."""
    return torch.log_softmax(logits, dim=-1).max(-1).values


@register_teacher_weighting("entropy")
def entropy(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``w_kn = softmax_k(-H(p_kn))``, the negative entropy of teacher k's prediction (T = 1) on sample n
    (entropy-based teacher weighting, as in Kwon et al. 2020, "Adaptive knowledge distillation based
    on entropy"): a sharper prediction counts more; needs no labels."""
    log_p = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(-1)


@register_teacher_weighting("true_label")
def true_label(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``w_kn`` proportional to teacher k's probability (T = 1) of sample n's true label: trust who is right."""
    lp, _ = _label_log_probs(logits, _needs_labels("true_label", labels))
    return lp


@register_teacher_weighting("ca_mkd")
def ca_mkd(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Confidence-aware multi-teacher KD (Zhang, Chen & Wang, ICASSP 2022, eq. 2):
    ``w_kn = (1 - softmax_k(CE_kn)) / (K - 1)`` with ``CE_kn`` teacher k's cross-entropy on
    sample n's label; a teacher closer to the label gets more weight, none gets more than
    ``1 / (K - 1)``. (CA-MKD weights K per-teacher KL terms; here the weights mix the teachers'
    distributions into one soft target, like every other weighting.) One teacher: weight 1.
    With two teachers the weights equal ``true_label``'s (``1 - e^a / (e^a + e^b) = e^-a / (e^-a + e^-b)``);
    they differ from three on."""
    lp, has = _label_log_probs(logits, _needs_labels("ca_mkd", labels))
    k = logits.shape[0]
    if k == 1:
        return torch.zeros_like(lp)
    w = (1 - torch.softmax(-lp, dim=0)) / (k - 1)  # -lp is CE_kn; columns sum to (K - 1) / (K - 1) = 1
    return torch.where(has, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.zeros_like(w))


def fixed_teacher_weights(weights: Sequence[float] | torch.Tensor, count: int) -> torch.Tensor:
    """One non-negative finite weight per teacher, not all zero, normalised to sum to one (float64)."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.numel() != count:
        raise ConfigError(
            f"{w.numel()} weights for {count} teachers: give one weight per teacher, in order "
            "(or none for equal weights)"
        )
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"teacher weights must be finite numbers, found {w.tolist()}")
    bad = [i for i, v in enumerate(w.tolist()) if v < 0]
    if bad:
        raise ConfigError(
            f"teacher weights must be non-negative; teacher(s) {bad} have {[w.tolist()[i] for i in bad]} "
            "(use 0 to leave a teacher out)"
        )
    if float(w.sum()) <= 0:
        raise ConfigError(
            "teacher weights are all 0 (they sum to 0); at least one teacher needs a positive weight"
        )
    return w / w.sum()


def weights_spec(weights: WeightsArg, count: int, *, extra: Sequence[str] = ()) -> torch.Tensor | str | None:
    """None (equal), a registered weighting name (or one of ``extra``), or fixed weights (float64, K, summing to 1)."""
    if weights is None:
        return None
    if isinstance(weights, str):
        names = [*list_teacher_weightings(), *extra]
        if weights not in names:
            raise ConfigError(
                f"unknown teacher weighting {weights!r}; expected one of {', '.join(names)}, "
                "a list of one weight per teacher, or None for equal weights"
            )
        return weights
    return fixed_teacher_weights(weights, count)


def teacher_log_weights(
    logits: torch.Tensor, labels: torch.Tensor | None = None, weights: WeightsArg = None
) -> torch.Tensor:
    """Log mixture weights (K, N) of K teachers' ``logits`` (K, N, C), normalised over K per sample
    (in log space, so they never underflow). ``weights``: None (equal), K fixed weights, or the name
    of a registered per-sample weighting. ``labels`` (N,), negative where a sample has none."""
    spec = weights_spec(weights, logits.shape[0])
    k, n = logits.shape[:2]
    if spec is None:
        return torch.full((k, n), -math.log(k), dtype=logits.dtype, device=logits.device)
    if isinstance(spec, torch.Tensor):
        return spec.to(logits.device, logits.dtype).log().unsqueeze(1).expand(k, n)
    if labels is not None:
        labels = labels.long().to(logits.device)
        if labels.shape != (n,):
            raise ConfigError(
                f"expected {n} labels for the teachers' logits, found shape {tuple(labels.shape)}"
            )
    score = get_teacher_weighting(spec)(logits, labels)
    return score - torch.logsumexp(score, dim=0, keepdim=True)


def _log_mixture(logits: torch.Tensor, log_w: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log sum_k w_kn softmax(z_kn / T)`` (N, C) from log weights (K, N)."""
    return torch.logsumexp(log_w.unsqueeze(-1) + torch.log_softmax(logits / temperature, dim=-1), dim=0)


def teacher_mixture(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    weights: WeightsArg = None,
) -> torch.Tensor:
    """Log of the teachers' mixture at ``temperature``: ``log sum_k w_kn softmax(z_kn / T)``, (N, C)."""
    return _log_mixture(logits, teacher_log_weights(logits, labels, weights), check_temperature(temperature))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weights: WeightsArg = None,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KD loss of the module docstring for ``student_logits`` (N, C), the teachers' (K, N, C)
    and ``labels`` (N,) (negative: no label; None: no hard term). ``log_weights`` (K, N) or (K,)
    replaces ``weights`` with log mixture weights computed elsewhere (learned ones)."""
    t, a = check_temperature(temperature), check_alpha(alpha)
    if student_logits.shape != teacher_logits.shape[1:]:
        raise ConfigError(
            f"student logits of shape {tuple(student_logits.shape)} do not match the teachers' "
            f"{tuple(teacher_logits.shape[1:])} (N, classes)"
        )
    bad = [k for k in range(teacher_logits.shape[0]) if not bool(torch.isfinite(teacher_logits[k]).all())]
    if bad:
        raise LossFusionError(
            f"teacher(s) {bad} have NaN or infinite logits; a non-finite soft target would poison "
            "the student: check those teachers' weights and inputs"
        )
    if labels is not None:
        labels = labels.long().to(student_logits.device)
        classes = student_logits.shape[-1]
        if labels.shape != student_logits.shape[:1] or bool((labels >= classes).any()):
            raise ConfigError(
                f"labels must be {student_logits.shape[0]} class indices below {classes} (negative: no label); "
                f"found shape {tuple(labels.shape)}, largest {int(labels.max()) if labels.numel() else None}"
            )
    ce = _hard_term(student_logits, labels) if a < 1 else None
    if a == 0:  # exactly the plain cross-entropy of train()'s default loss
        return ce if ce is not None else student_logits.sum() * 0.0
    z = teacher_logits.to(student_logits.dtype)
    if log_weights is None:
        log_w = teacher_log_weights(z, labels, weights)
    else:
        log_w = log_weights.to(z.dtype)
        log_w = log_w.unsqueeze(1).expand(z.shape[:2]) if log_w.dim() == 1 else log_w
    log_p = _log_mixture(z, log_w, t)
    log_q = torch.log_softmax(student_logits / t, dim=-1)
    loss = a * t**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return loss + (1 - a) * ce if ce is not None else loss


def _hard_term(student_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-entropy over the labelled samples; None without labels, 0 (in the graph) with none labelled."""
    if labels is None:
        return None
    has = labels >= 0
    if bool(has.all()):
        return F.cross_entropy(student_logits, labels)
    if not bool(has.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits[has], labels[has])


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ConfigError(f"temperature must be a positive finite number, found {temperature!r}")
    return t


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ConfigError(
            f"alpha (the weight of the distillation term) must lie in [0, 1], found {alpha!r}; "
            "0 is plain cross-entropy, 1 distillation only"
        )
    return a


def _teacher_name(i: int, teacher: nn.Module) -> str:
    return f"teacher {i} ({type(teacher).__name__})"


def _find_module(model: nn.Module, name: str, owner: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f"close names: {', '.join(map(repr, close))}" if close else f"its modules: {', '.join(names[:12])}"
    raise ConfigError(f"{owner} has no module named {name!r}; {hint}")


class _Tap:
    """A forward hook that keeps the last output of one module."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise LossFusionError(
                f"the hooked module {type(module).__name__} returns a {type(output).__name__}, not a tensor; "
                "hook a module whose output is one feature tensor"
            )
        self.value = output

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


def _projection(student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> nn.Module:
    """A linear map (2-D features) or 1x1 convolution (1-D, 2-D, 3-D maps) from the student's width to the teacher's."""
    if len(student_shape) != len(teacher_shape) or student_shape[2:] != teacher_shape[2:]:
        raise ConfigError(
            f"{where}: the student's features have shape {tuple(student_shape[1:])} per sample, the teacher's "
            f"{tuple(teacher_shape[1:])}; only the channel width may differ (hook modules whose spatial sizes agree)"
        )
    cs, ct = int(student_shape[1]), int(teacher_shape[1])
    dims = len(student_shape) - 2
    if dims == 0:
        return nn.Linear(cs, ct)
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ConfigError(f"{where}: features of shape {tuple(student_shape)} have no 1x1 projection")
    return convs[dims](cs, ct, kernel_size=1)


class MultiTeacherDistillation(nn.Module):
    """Distil several teachers (any architectures predicting the same classes) into a student.

    ``loss = kd(student_logits, x, labels)`` after ``student_logits = student(x)``: the teachers
    run on ``x`` in eval mode without gradients (their modes are restored), and the result is
    :func:`distillation_loss` plus, when ``features`` are given, ``beta`` times the mean over the
    pairs of ``MSE(proj(student_feature), teacher_feature)`` (FitNets, Romero et al. 2015): each
    pair ``(student_module, teacher_index, teacher_module)`` is read through forward hooks, and
    ``proj`` is a learned linear map (vectors) or 1x1 convolution (maps) from the student's width
    to the teacher's, sized by one probe forward on ``example_input`` and seeded by ``seed``.

    ``weights``: None (equal), K fixed non-negative weights, a per-sample weighting name
    (:func:`list_teacher_weightings`), or ``"learned"``: ``w = softmax(theta)``, one weight per
    teacher shared by all samples, ``theta`` a parameter of this module (put ``kd.parameters()``
    in the optimizer). Learned weights do not collapse onto the teacher the student imitates most
    easily because the KD term sees them detached: ``theta`` is trained only by the hard-label
    loss of the weighted mixture, ``NLL(log sum_k w_k softmax(z_k), y)`` (T = 1), added to the
    returned loss, so weight moves to the teachers whose mixture predicts the labels best (and
    stays where it is on batches without labels). Adam moves ``theta`` by about its learning rate
    per step, so give it a rate of its own (a param group) where the student's is small.

    ``weights_``: the teacher weights of the last call, (K,) when shared by the batch, (K, N)
    for per-sample weightings; ``terms_``: the last call's parts (``kd``, ``feature``,
    ``weights``) as floats. Hooks live until :meth:`close` (or the end of a ``with`` block).
    The teachers are not submodules (``parameters()`` and ``state_dict()`` hold only what
    learns): move them to the device yourself.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        *,
        temperature: float = 4.0,
        alpha: float = 0.9,
        weights: WeightsArg = None,
        features: Iterable[tuple[str, int, str]] = (),
        student: nn.Module | None = None,
        example_input: torch.Tensor | None = None,
        beta: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        teachers = list(teachers) if teachers is not None else []
        if not teachers:
            raise ConfigError(
                "multi-teacher distillation needs at least one teacher; the teacher list is empty"
            )
        for i, t in enumerate(teachers):
            if not isinstance(t, nn.Module):
                raise ConfigError(f"teacher {i} is a {type(t).__name__}, not a torch.nn.Module")
        self._teachers = tuple(teachers)
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.beta = float(beta)
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(
                f"beta (the weight of the feature term) must be a non-negative number, found {beta!r}"
            )
        k = len(teachers)
        spec = weights_spec(weights, k, extra=("learned",))
        self.weighting = spec
        self.learned = isinstance(spec, str) and spec == "learned"
        self.theta = nn.Parameter(torch.zeros(k)) if self.learned else None
        self.weights_: torch.Tensor | None = None
        self.terms_: dict[str, float] = {}
        self.pairs = [(str(s), int(i), str(t)) for s, i, t in features]
        self._student_taps: list[_Tap] = []
        self._teacher_taps: list[_Tap] = []
        self.projections = nn.ModuleList()
        if self.pairs:
            self._hook(student, example_input, seed)

    @property
    def teachers(self) -> tuple[nn.Module, ...]:
        return self._teachers

    def _hook(self, student: nn.Module | None, example_input: torch.Tensor | None, seed: int) -> None:
        if student is None or example_input is None:
            raise ConfigError(
                "feature matching needs the student module (student=) and an example batch (example_input=) "
                "to find the hooked modules and size the projections"
            )
        k = len(self._teachers)
        for s_name, i, t_name in self.pairs:
            if not 0 <= i < k:
                raise ConfigError(
                    f"feature pair ({s_name!r}, {i}, {t_name!r}) names teacher {i}; there are {k}"
                )
        try:
            for s_name, i, t_name in self.pairs:
                s_mod = _find_module(student, s_name, f"the student ({type(student).__name__})")
                t_mod = _find_module(self._teachers[i], t_name, _teacher_name(i, self._teachers[i]))
                self._student_taps.append(_Tap(s_mod))
                self._teacher_taps.append(_Tap(t_mod))
            with torch.no_grad():
                _run_eval(student, example_input)
                for t in self._teachers:
                    _run_eval(t, example_input)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for (s_name, i, t_name), st, tt in zip(self.pairs, self._student_taps, self._teacher_taps):
                    s_feat, t_feat = st.take(), tt.take()
                    where = f"student {s_name!r} -> teacher {i} {t_name!r}"
                    self.projections.append(_projection(s_feat.shape, t_feat.shape, where))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every forward hook this loss placed on the student and the teachers."""
        for tap in (*self._student_taps, *self._teacher_taps):
            tap.handle.remove()
            tap.value = None
        self._student_taps, self._teacher_taps = [], []

    def __enter__(self) -> MultiTeacherDistillation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teachers' logits on ``x``, stacked (K, N, C), checked (same classes, finite); no gradients."""
        outs = []
        for i, t in enumerate(self._teachers):
            out = _run_eval(t, x)
            name = _teacher_name(i, t)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise LossFusionError(
                    f"{name} gives outputs of shape {shape}; distillation needs (N, classes) logits"
                )
            if outs and out.shape != outs[0].shape:
                raise LossFusionError(
                    f"{name} gives {out.shape[1]} class scores, {_teacher_name(0, self._teachers[0])} "
                    f"{outs[0].shape[1]}: teachers must predict the same classes"
                )
            if not bool(torch.isfinite(out).all()):
                raise LossFusionError(
                    f"{name} gives NaN or infinite logits on this batch; check that teacher's weights and inputs"
                )
            outs.append(out)
        return torch.stack(outs)

    def forward(
        self,
        student_logits: torch.Tensor,
        x: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss for one batch: ``student_logits`` (N, C) of ``x``; ``labels`` (N,), negative where
        missing, or None; ``teacher_logits`` (K, N, C) precomputed instead of running the teachers."""
        if teacher_logits is None:
            if x is None:
                raise ConfigError("pass the batch x (the teachers run on it) or precomputed teacher_logits=")
            z = self.teacher_logits(x)
        else:
            z = teacher_logits
            if z.dim() != 3 or z.shape[0] != len(self._teachers):
                raise ConfigError(
                    f"teacher_logits must be ({len(self._teachers)}, N, classes), found {tuple(z.shape)}"
                )
            if not bool(torch.isfinite(z).all()):
                bad = [i for i in range(z.shape[0]) if not bool(torch.isfinite(z[i]).all())]
                raise LossFusionError(
                    f"{_teacher_name(bad[0], self._teachers[bad[0]])} has NaN or infinite logits in teacher_logits"
                )
            if self.pairs and x is not None:
                self.teacher_logits(x)  # the teachers must run for their features
        z = z.to(student_logits.device, student_logits.dtype)
        if z.shape[-1] != student_logits.shape[-1]:
            raise LossFusionError(
                f"the student gives {student_logits.shape[-1]} class scores, the teachers {z.shape[-1]}: "
                "build the student for the teachers' classes"
            )
        y = labels.long().to(student_logits.device) if labels is not None else None
        extra = student_logits.new_zeros(())
        if self.learned:
            log_w = torch.log_softmax(self.theta, 0).to(z.dtype)
            if y is not None and bool((y >= 0).any()):
                has = y >= 0
                mix = _log_mixture(z[:, has], log_w.unsqueeze(1).expand(-1, int(has.sum())), 1.0)
                extra = F.nll_loss(mix, y[has])
            loss = distillation_loss(
                student_logits,
                z,
                y,
                temperature=self.temperature,
                alpha=self.alpha,
                log_weights=log_w.detach(),
            )
            self.weights_ = log_w.detach().exp()
        else:
            log_w = teacher_log_weights(z, y, self.weighting)
            loss = distillation_loss(
                student_logits, z, y, temperature=self.temperature, alpha=self.alpha, log_weights=log_w
            )
            w = log_w.detach().exp()
            self.weights_ = (
                w[:, 0].clone() if self.weighting is None or isinstance(self.weighting, torch.Tensor) else w
            )
        feature = self._feature_term(student_logits) if self.pairs else student_logits.new_zeros(())
        self.terms_ = {
            "kd": float(loss.detach()),
            "feature": float(feature.detach()),
            "weights": float(extra.detach()),
        }
        return loss + self.beta * feature + extra

    def _feature_term(self, like: torch.Tensor) -> torch.Tensor:
        terms = []
        for (s_name, i, t_name), st, tt, proj in zip(
            self.pairs, self._student_taps, self._teacher_taps, self.projections
        ):
            s_feat, t_feat = st.take(), tt.take()
            if s_feat is None:
                raise LossFusionError(
                    f"the student's module {s_name!r} has not run since the last loss (or its hook was removed "
                    "by close()): call the student on the batch before the loss"
                )
            if t_feat is None:
                raise LossFusionError(
                    f"teacher {i}'s module {t_name!r} did not run: pass the batch x to the loss"
                )
            if s_feat.shape[0] != like.shape[0] or t_feat.shape[0] != like.shape[0]:
                raise LossFusionError(
                    f"features of {s_name!r} ({s_feat.shape[0]} samples) and {t_name!r} ({t_feat.shape[0]}) "
                    f"do not belong to this batch of {like.shape[0]}: run the student on the same x just before"
                )
            terms.append(F.mse_loss(proj(s_feat), t_feat.to(s_feat.dtype)))
        return torch.stack(terms).mean()

    def training_loss(self) -> Callable[[nn.Module, tuple[Any, ...]], torch.Tensor]:
        """``loss(model, batch)`` for :func:`modelfuse.zoo.train` over ``(x, y)`` batches (add
        ``self.parameters()`` to its ``param_groups`` when the weights or projections learn)."""

        def loss(model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
            x, y = batch[0], batch[1] if len(batch) > 1 else None
            return self(model(x), x, y)

        return loss


def _run_eval(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` in eval mode, its mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was)
