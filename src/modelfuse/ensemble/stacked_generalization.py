"""Stacking: a meta-learner on the members' predictions (Wolpert 1992, "Stacked generalization").

The members are trained already; ``Stacking`` learns how to combine their validation
predictions. Its features are the members' log-probabilities side by side (N, K * classes),
as scikit-learn's ``StackingClassifier`` uses ``predict_proba``. The meta-learner is judged
out of fold: the validation set is cut into ``folds`` stratified folds, each predicted by a
meta-learner fitted on the others, so ``oof_nll_`` is an honest estimate of the stacker's
NLL that can be set against the plain mean's (``mean_nll_``). The final meta-learner is fitted
on the whole validation set.

Meta-learners: ``"logistic"`` (scikit-learn's multinomial ``LogisticRegression``; its inverse
regularisation ``C`` is chosen among ``cs`` by out-of-fold NLL) or ``"mlp"`` (a small torch
MLP trained by the shared training loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.ensemble.fitted import member_log_probs
from modelfuse.ensemble.module import MemberSet
from modelfuse.errors import ConfigError
from modelfuse.zoo.metrics import nll
from modelfuse.zoo.train import predict, train

META_LEARNERS = ("logistic", "mlp")
#: log-probabilities are clipped from below here, so that a member's certainty cannot make
#: a feature unbounded
LOG_PROB_FLOOR = -30.0


def stacking_features(log_probs: torch.Tensor) -> torch.Tensor:
    """(K, N, classes) log-probabilities -> (N, K * classes) features, member by member."""
    k, n, c = log_probs.shape
    return log_probs.clamp_min(LOG_PROB_FLOOR).permute(1, 0, 2).reshape(n, k * c)


class Stacking:
    """A meta-learner fitted on cached member logits (K, N, classes) with out-of-fold validation.

    Fitted state: ``meta_`` (an ``nn.Module`` from features to logits), ``oof_log_probs_``
    (N, classes), ``oof_nll_``, ``mean_nll_`` (the plain mean of probabilities on the same
    samples), ``nll_`` (the final meta-learner on the validation set it was fitted on),
    ``c_`` and ``cv_nll_`` (out-of-fold NLL per candidate ``C``, logistic only).
    """

    def __init__(
        self,
        meta: str = "logistic",
        *,
        folds: int = 5,
        seed: int = 0,
        cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
        hidden: int = 64,
        epochs: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        self.meta = meta
        self.folds = folds
        self.seed = seed
        self.cs = cs
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay

    def _check(self, classes: int, labels: torch.Tensor) -> None:
        if self.meta not in META_LEARNERS:
            raise ConfigError(
                f"unknown meta-learner {self.meta!r}; expected one of {', '.join(META_LEARNERS)}"
            )
        if int(self.folds) < 2:
            raise ConfigError(f"out-of-fold stacking needs folds >= 2, found folds={self.folds}")
        if self.meta == "logistic" and (not self.cs or any(not (float(c) > 0) for c in self.cs)):
            raise ConfigError(f"cs must be positive inverse regularisation strengths, found {list(self.cs)}")
        counts = torch.bincount(labels, minlength=classes)
        present = counts[counts > 0]
        if len(present) < 2:
            raise ConfigError("stacking needs validation samples of at least two classes")
        if int(present.min()) < int(self.folds):
            rare = int(torch.nonzero(counts == present.min())[0])
            raise ConfigError(
                f"class {rare} has {int(present.min())} validation samples, fewer than folds={self.folds}: "
                "lower folds or use a larger validation set"
            )

    def fit(self, outputs: torch.Tensor, labels: torch.Tensor) -> Stacking:
        log_probs, labels = member_log_probs(outputs, labels)
        k, n, classes = log_probs.shape
        self._check(classes, labels)
        x = stacking_features(log_probs)
        from sklearn.model_selection import StratifiedKFold

        splits = list(
            StratifiedKFold(n_splits=int(self.folds), shuffle=True, random_state=int(self.seed)).split(
                np.zeros(n), labels.numpy()
            )
        )
        candidates = [float(c) for c in self.cs] if self.meta == "logistic" else [math.nan]
        self.cv_nll_ = {}
        best: tuple[float, float, torch.Tensor] | None = None
        for c in candidates:
            oof = torch.empty(n, classes, dtype=torch.float64)
            for fold, (fit_idx, held_idx) in enumerate(splits):
                meta = self._fit_meta(x[fit_idx], labels[fit_idx], classes, c, fold)
                oof[held_idx] = torch.log_softmax(_apply(meta, x[held_idx]), dim=-1)
            oof_nll = nll(oof, labels)
            self.cv_nll_[c] = oof_nll
            if best is None or oof_nll < best[1]:
                best = (c, oof_nll, oof)
        assert best is not None
        self.c_, self.oof_nll_, self.oof_log_probs_ = best
        if self.meta != "logistic":
            self.c_, self.cv_nll_ = None, {}
        self.meta_ = self._fit_meta(x, labels, classes, best[0], len(splits))
        self.nll_ = nll(_apply(self.meta_, x), labels)
        mean = torch.logsumexp(log_probs, dim=0) - math.log(k)
        self.mean_nll_ = nll(mean, labels)
        self.members_, self.classes_ = k, classes
        return self

    def _fit_meta(self, x: torch.Tensor, y: torch.Tensor, classes: int, c: float, fold: int) -> nn.Module:
        if self.meta == "logistic":
            return _logistic(x, y, classes, c)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed) * 1000 + fold)
            mlp = nn.Sequential(
                nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, classes)
            )
        train(
            mlp,
            TensorDataset(x.float(), y),
            epochs=self.epochs,
            seed=int(self.seed) * 1000 + fold,
            batch_size=128,
            lr=self.lr,
            optimizer="adamw",
            weight_decay=self.weight_decay,
            progress=False,
        )
        return mlp.double().eval()

    def predict_log_proba(self, outputs: torch.Tensor) -> torch.Tensor:
        """The fitted stacker's log-probabilities (N, classes) for member logits (K, N, classes)."""
        if not hasattr(self, "meta_"):
            raise ConfigError("this Stacking is not fitted yet: call fit(outputs, labels) first")
        if outputs.dim() != 3 or outputs.shape[0] != self.members_ or outputs.shape[2] != self.classes_:
            raise ConfigError(
                f"expected logits of {self.members_} members over {self.classes_} classes stacked as "
                f"(K, N, classes), found shape {tuple(outputs.shape)}"
            )
        log_probs = torch.log_softmax(outputs.detach().cpu().double(), dim=-1)
        return torch.log_softmax(_apply(self.meta_, stacking_features(log_probs)), dim=-1)

    def ensemble(self, members: Sequence[nn.Module]) -> StackedEnsemble:
        """A module that runs ``members`` and the fitted meta-learner on their outputs."""
        if not hasattr(self, "meta_"):
            raise ConfigError("this Stacking is not fitted yet: call fit(outputs, labels) first")
        if len(members) != self.members_:
            raise ConfigError(f"the stacker was fitted on {self.members_} members, given {len(members)}")
        return StackedEnsemble(members, self.meta_)


class StackedEnsemble(MemberSet):
    """Members (frozen, eval mode) followed by a meta-learner on their log-probabilities;
    outputs log-probabilities (N, classes)."""

    def __init__(self, members: Sequence[nn.Module], meta: nn.Module) -> None:
        super().__init__(members)
        self.meta = meta

    def combine_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        self._check_stacked(outputs, "stacking", classes=True)
        features = stacking_features(torch.log_softmax(outputs.float(), dim=-1))
        weight = next(self.meta.parameters())
        return torch.log_softmax(self.meta(features.to(weight.dtype)), dim=-1)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.combine_outputs(self.member_outputs(*args, **kwargs))


def _apply(meta: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return predict(meta, TensorDataset(x.double()), batch_size=4096).double()


def _logistic(x: torch.Tensor, y: torch.Tensor, classes: int, c: float) -> nn.Linear:
    """scikit-learn's multinomial logistic regression, as an ``nn.Linear`` from features to logits
    over all ``classes`` (a class absent from ``y`` gets a logit of -inf)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, tol=1e-8, max_iter=5000)
    with warnings.catch_warnings():
        # a tight tolerance keeps fits reproducible; weakly regularised fits (large C) on
        # log-probability features can stop a hair short of it, which the out-of-fold NLL judges
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x.numpy(), y.numpy())
    coef = torch.from_numpy(np.asarray(model.coef_, dtype=np.float64))
    bias = torch.from_numpy(np.asarray(model.intercept_, dtype=np.float64))
    if coef.shape[0] == 1:  # binary: scikit-learn keeps one row, the logit of classes_[1] over classes_[0]
        coef = torch.cat([torch.zeros_like(coef), coef])
        bias = torch.cat([torch.zeros_like(bias), bias])
    linear = nn.Linear(x.shape[1], classes, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(-math.inf)
        idx = torch.as_tensor(model.classes_, dtype=torch.long)
        linear.weight[idx] = coef
        linear.bias[idx] = bias
    return linear.requires_grad_(False)
