"""Detection output fusion: NMS, soft-NMS and weighted boxes fusion over several models' boxes.

Each method takes one image's detections from K models as three lists of K tensors (boxes
(N_k, 4) as x1, y1, x2, y2; scores (N_k,); integer labels (N_k,)) with optional per-model
weights, and returns fused ``(boxes, scores, labels)``. ``fuse_boxes_batch`` runs a method over
a batch of images. The semantics follow the ``ensemble-boxes`` package (Solovyev et al. 2021),
so results match it to rounding, with one deliberate difference: where ensemble-boxes swaps
corners, clips to [0, 1] and warns, these functions raise ``ConfigError`` naming the model and
box. Boxes of zero area are skipped, as there. Ties in score go to the later detection (higher
model index, then box index) first, deterministically; ensemble-boxes leaves them to NumPy's
unstable, CPU-dependent sort, which gives the same order only on some inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from modelfuse._optional import require
from modelfuse.ensemble.module import check_weights
from modelfuse.errors import ConfigError
from modelfuse.registry import Registry, check_options

ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
CONF_TYPES: tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
Fused = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: the single-image box fusion methods by name, for ``fuse_boxes_batch`` and configuration files
_BOX_FUSIONS: Registry[Callable[..., Fused]] = Registry("box fusion method")


@dataclass
class _Detections:
    """All models' detections of one image, validated and concatenated, as float64 NumPy arrays."""

    boxes: np.ndarray  # (n, 4)
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) int64
    model: np.ndarray  # (n,) int64: which model each row came from
    weights: np.ndarray | None  # (K,) as given (not normalised), None when not given
    n_models: int
    box_dtype: torch.dtype
    score_dtype: torch.dtype
    device: torch.device

    def take(self, rows: np.ndarray) -> _Detections:
        """The detections in ``rows`` (a filter or a reordering), same models and weights."""
        return _Detections(
            self.boxes[rows],
            self.scores[rows],
            self.labels[rows],
            self.model[rows],
            self.weights,
            self.n_models,
            self.box_dtype,
            self.score_dtype,
            self.device,
        )

    def output(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> Fused:
        """Results as tensors on the input's device, in the input's floating dtypes, labels int64."""
        return (
            torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)).to(
                self.device, self.box_dtype
            ),
            torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float64)).to(
                self.device, self.score_dtype
            ),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(self.device),
        )


def _float_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The promoted dtype of ``tensors`` if floating point, else torch's default float dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _first_bad(mask: np.ndarray) -> int:
    """Index of the first True in ``mask``, for error messages."""
    return int(np.flatnonzero(mask)[0])


def _check_weights(weights: Sequence[float] | torch.Tensor | None, n_models: int) -> np.ndarray | None:
    """Model weights as given (not normalised), checked: one per model, finite, >= 0, not all 0."""
    if weights is None:
        return None
    return check_weights(weights, n_models, what="model", normalize=False).numpy()


def _validate(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None,
    normalized: bool,
    nonnegative_scores: bool = False,
) -> _Detections:
    """Check one image's per-model detections and concatenate them; every error names model and box."""
    if (
        isinstance(boxes, torch.Tensor)
        or isinstance(scores, torch.Tensor)
        or isinstance(labels, torch.Tensor)
    ):
        raise ConfigError(
            "boxes, scores and labels must be lists with one tensor per model; for a single model "
            "wrap them: [boxes], [scores], [labels]"
        )
    if not (len(boxes) == len(scores) == len(labels)):
        raise ConfigError(
            f"{len(boxes)} box tensors, {len(scores)} score tensors and {len(labels)} label tensors: "
            "give one (boxes, scores, labels) triple per model"
        )
    if len(boxes) == 0:
        raise ConfigError("no models: the box, score and label lists are empty; give one tensor per model")
    n_models = len(boxes)
    w = _check_weights(weights, n_models)
    tb = [torch.as_tensor(b) for b in boxes]
    ts = [torch.as_tensor(s) for s in scores]
    tl = [torch.as_tensor(lab) for lab in labels]
    parts_b, parts_s, parts_l, parts_m = [], [], [], []
    for m, (b, s, lab) in enumerate(zip(tb, ts, tl)):
        if b.dim() == 1 and b.numel() == 0:  # torch.tensor([]) for a model without boxes
            b = b.reshape(0, 4)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ConfigError(
                f"model {m}: boxes must have shape (N, 4), one (x1, y1, x2, y2) row per box, "
                f"found shape {tuple(b.shape)}"
            )
        n = b.shape[0]
        if s.shape != (n,):
            raise ConfigError(
                f"model {m}: {n} boxes but scores of shape {tuple(s.shape)}; "
                f"give one score per box, shape ({n},)"
            )
        if lab.shape != (n,):
            raise ConfigError(
                f"model {m}: {n} boxes but labels of shape {tuple(lab.shape)}; "
                f"give one label per box, shape ({n},)"
            )
        bn = b.detach().to("cpu", torch.float64).numpy()
        sn = s.detach().to("cpu", torch.float64).numpy()
        ln = lab.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(bn).all():
            j = _first_bad(~np.isfinite(bn).all(1))
            raise ConfigError(
                f"model {m}, box {j}: coordinates {bn[j].tolist()} are not all finite; "
                "drop or fix this detection"
            )
        if not np.isfinite(sn).all():
            j = _first_bad(~np.isfinite(sn))
            raise ConfigError(
                f"model {m}, box {j}: score is {sn[j]}; scores must be finite numbers, "
                "drop or fix this detection"
            )
        if nonnegative_scores and (sn < 0).any():
            j = _first_bad(sn < 0)
            raise ConfigError(
                f"model {m}, box {j}: score {sn[j]} is negative; weighted boxes fusion weighs coordinates by "
                "score, so scores must be >= 0 (give probabilities, not logits)"
            )
        if not (np.isfinite(ln).all() and (ln == np.round(ln)).all()):
            j = _first_bad(~(np.isfinite(ln) & (ln == np.round(ln))))
            raise ConfigError(
                f"model {m}, box {j}: label {ln[j]} is not a whole number; labels are class indices"
            )
        for lo, hi, axis in ((0, 2, "x"), (1, 3, "y")):
            if (bn[:, hi] < bn[:, lo]).any():
                j = _first_bad(bn[:, hi] < bn[:, lo])
                raise ConfigError(
                    f"model {m}, box {j}: {axis}2 < {axis}1 in {bn[j].tolist()}; boxes are "
                    "(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2: swap the corners "
                    "(ensemble-boxes would swap them with a warning)"
                )
        if normalized and ((bn < 0) | (bn > 1)).any():
            j = _first_bad(((bn < 0) | (bn > 1)).any(1))
            raise ConfigError(
                f"model {m}, box {j}: coordinates {bn[j].tolist()} lie outside [0, 1]; "
                "normalised coordinates are required: divide x by the image width and y by its height "
                "(ensemble-boxes would clip them with a warning), or pass normalized=False for pixel "
                "coordinates"
            )
        parts_b.append(bn)
        parts_s.append(sn)
        parts_l.append(ln.astype(np.int64))
        parts_m.append(np.full(n, m, dtype=np.int64))
    return _Detections(
        np.concatenate(parts_b),
        np.concatenate(parts_s),
        np.concatenate(parts_l),
        np.concatenate(parts_m),
        w,
        n_models,
        _float_dtype(tb),
        _float_dtype(ts),
        tb[0].device,
    )


def _areas(boxes: np.ndarray) -> np.ndarray:
    """(x2 - x1) (y2 - y1) of each row."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_one_to_many(box: np.ndarray, area: float, others: np.ndarray, other_areas: np.ndarray) -> np.ndarray:
    """IoU of one box with each row of ``others``: inter / (area + other_area - inter)."""
    w = np.maximum(np.minimum(others[:, 2], box[2]) - np.maximum(others[:, 0], box[0]), 0.0)
    h = np.maximum(np.minimum(others[:, 3], box[3]) - np.maximum(others[:, 1], box[1]), 0.0)
    inter = w * h
    return inter / (area + other_areas - inter)


def _descending(values: np.ndarray) -> np.ndarray:
    """Indices sorting ``values`` from high to low, ties later index first (what ensemble-boxes'
    ``argsort()[::-1]`` gives wherever NumPy's sort happens to be stable)."""
    return np.argsort(values, kind="stable")[::-1]


def _apply_nms_weights(det: _Detections) -> np.ndarray:
    """Scores scaled by w_k / sum(w) when weights are given (ensemble-boxes' NMS weighting), else as given."""
    if det.weights is None:
        return det.scores
    return det.scores * det.weights[det.model] / det.weights.sum()


def _check_iou(name: str, value: float) -> None:
    """An IoU threshold must lie in [0, 1]."""
    if not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"{name} must lie in [0, 1], found {value}")


def nms(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    iou_thr: float = 0.5,
    class_aware: bool = True,
    normalized: bool = True,
) -> Fused:
    """Greedy non-maximum suppression over all models' boxes of one image (torchvision.ops.nms).

    Hard NMS is the rescoring function of Bodla et al. 2017, "Soft-NMS: Improving Object
    Detection With One Line of Code", Eq. (1): a box whose IoU with a higher-scoring kept box
    exceeds ``iou_thr`` is dropped. As in ensemble-boxes: with ``weights`` each model's scores
    are first scaled by w_k / sum(w) (so weights=[1, 1] halves them; weights=None leaves them
    as given), boxes of zero area are skipped, and with ``class_aware`` (batched NMS) boxes only
    suppress boxes of their own label and the result is ordered by label, then by falling score.
    With ``class_aware=False`` all labels suppress each other and the result is by falling score.
    ``normalized=False`` accepts pixel coordinates instead of [0, 1] ones. Returns kept
    ``(boxes, scores, labels)``; bad input raises ConfigError.
    """
    _check_iou("iou_thr", iou_thr)
    det = _validate(boxes, scores, labels, weights, normalized)
    ops = require("torchvision.ops", "modelfuse.ensemble.boxes.nms")
    det = det.take(np.flatnonzero(_areas(det.boxes) > 0))
    weighted = _apply_nms_weights(det)
    # torchvision sorts stably from high to low; feeding rows reversed puts the later of tied rows first
    rev = np.arange(len(weighted))[::-1].copy()
    b = torch.from_numpy(det.boxes[rev])
    s = torch.from_numpy(weighted[rev])
    if class_aware:
        kept = []
        labels_rev = det.labels[rev]
        for label in np.unique(labels_rev):
            rows = np.flatnonzero(labels_rev == label)
            kept.append(rows[ops.nms(b[rows], s[rows], float(iou_thr)).numpy()])
        keep = rev[np.concatenate(kept)] if kept else np.zeros(0, dtype=np.int64)
    else:
        keep = rev[ops.nms(b, s, float(iou_thr)).numpy()]
    return det.output(det.boxes[keep], weighted[keep], det.labels[keep])


def _soft_nms_one_label(
    boxes: np.ndarray, scores: np.ndarray, linear: bool, iou_thr: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rows in the order soft-NMS picks them and their decayed scores (ensemble-boxes' in-place
    selection: position i takes the highest remaining score only if it is strictly higher)."""
    n = len(scores)
    order = np.arange(n)
    s = scores.copy()
    b = boxes.copy()
    area = _areas(b)
    for i in range(n - 1):
        m = i + 1 + int(np.argmax(s[i + 1 :]))
        if s[i] < s[m]:
            order[[i, m]] = order[[m, i]]
            s[[i, m]] = s[[m, i]]
            b[[i, m]] = b[[m, i]]
            area[[i, m]] = area[[m, i]]
        iou = _iou_one_to_many(b[i], area[i], b[i + 1 :], area[i + 1 :])
        if linear:
            s[i + 1 :] *= np.where(iou > iou_thr, 1.0 - iou, 1.0)
        else:
            s[i + 1 :] *= np.exp(-(iou * iou) / sigma)
    return order, s


def soft_nms(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    method: Literal["linear", "gaussian"] = "gaussian",
    iou_thr: float = 0.5,
    sigma: float = 0.5,
    thresh: float = 0.001,
    normalized: bool = True,
    decayed_scores: bool = False,
) -> Fused:
    """Soft-NMS (Bodla et al. 2017, "Soft-NMS: Improving Object Detection With One Line of Code")
    over all models' boxes of one image, label by label.

    Repeatedly take the highest remaining (decayed) score and decay every later box by its IoU
    with it: linear, Eq. (2), s <- s (1 - IoU) where IoU > ``iou_thr``; gaussian, Eq. (3),
    s <- s exp(-IoU^2 / ``sigma``) for all. Boxes whose decayed score ends above ``thresh`` are
    kept. As in ensemble-boxes: scores are first scaled by w_k / sum(w) when ``weights`` are
    given, boxes below ``thresh`` still decay others until the end, zero-area boxes are skipped,
    the result is ordered by label and then by pick order, and the returned scores are the
    (weighted) input scores, not the decayed ones; ``decayed_scores=True`` returns the decayed
    scores as in the paper. ``normalized=False`` accepts pixel coordinates.
    """
    if method not in ("linear", "gaussian"):
        raise ConfigError(f"soft_nms method must be 'linear' or 'gaussian', found {method!r}")
    _check_iou("iou_thr", iou_thr)
    if method == "gaussian" and not sigma > 0:
        raise ConfigError(f"gaussian soft-NMS needs sigma > 0, found sigma={sigma}")
    det = _validate(boxes, scores, labels, weights, normalized)
    det = det.take(np.flatnonzero(_areas(det.boxes) > 0))
    weighted = _apply_nms_weights(det)
    keep_rows, keep_scores = [], []
    for label in np.unique(det.labels):
        rows = np.flatnonzero(det.labels == label)
        order, decayed = _soft_nms_one_label(
            det.boxes[rows], weighted[rows], method == "linear", float(iou_thr), float(sigma)
        )
        mask = decayed > thresh
        keep_rows.append(rows[order[mask]])
        keep_scores.append(decayed[mask])
    keep = np.concatenate(keep_rows) if keep_rows else np.zeros(0, dtype=np.int64)
    out_scores = (
        (np.concatenate(keep_scores) if keep_scores else np.zeros(0)) if decayed_scores else weighted[keep]
    )
    return det.output(det.boxes[keep], out_scores, det.labels[keep])


def _cluster(boxes: np.ndarray, scores: np.ndarray, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """WBF's clustering of one label's boxes, taken in the given order (falling score).

    Each box joins the cluster whose current fused box it overlaps most, if that IoU exceeds
    ``iou_thr`` (first such cluster on ties), else starts a cluster; the joined cluster's fused
    box is then recomputed as the score-weighted mean of its members. Returns each box's cluster
    and the fused boxes, clusters numbered in order of creation.
    """
    n = len(boxes)
    fused = np.empty((n, 4))
    fused_area = np.empty(n)
    sum_sc = np.empty((n, 4))  # sum of score * coordinates
    sum_s = np.empty(n)
    sum_c = np.empty((n, 4))  # plain sums, for a cluster whose scores are all 0
    count = np.empty(n)
    member = np.empty(n, dtype=np.int64)
    area = _areas(boxes)
    k = 0
    for j in range(n):
        box, s = boxes[j], scores[j]
        if k:
            iou = _iou_one_to_many(box, area[j], fused[:k], fused_area[:k])
            best = int(np.argmax(iou))
            if iou[best] > iou_thr:
                member[j] = best
                sum_sc[best] += s * box
                sum_s[best] += s
                sum_c[best] += box
                count[best] += 1
                fused[best] = sum_sc[best] / sum_s[best] if sum_s[best] > 0 else sum_c[best] / count[best]
                fused_area[best] = (fused[best, 2] - fused[best, 0]) * (fused[best, 3] - fused[best, 1])
                continue
        member[j] = k
        fused[k] = box
        fused_area[k] = area[j]
        sum_sc[k] = s * box
        sum_s[k] = s
        sum_c[k] = box
        count[k] = 1
        k += 1
    return member, fused[:k]


def weighted_boxes_fusion(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: ConfType = "avg",
    allows_overflow: bool = False,
    normalized: bool = True,
) -> Fused:
    """Weighted boxes fusion (Solovyev, Wang and Gabruseva 2021, "Weighted boxes fusion:
    Ensembling boxes from different object detection models", Image and Vision Computing 107).

    Per label, boxes with score >= ``skip_box_thr`` (score s_i scaled to c_i = w_k s_i by their
    model's weight) are taken by falling c_i and clustered: a box joins the cluster whose fused
    box it overlaps with IoU > ``iou_thr``, else opens one. A cluster of T boxes fuses to the
    c-weighted mean box, Eqs. (2)-(3): x = sum c_i x_i / sum c_i, and to the mean confidence
    C = sum c_i / T, Eq. (1), rescaled (Algorithm, step 8) with N models of weights w, W = sum w:

    - ``avg``: C min(T, N) / W (``allows_overflow``: C T / W, which may exceed 1);
    - ``max``: max_i c_i / max(w);
    - ``box_and_model_avg``: (sum c_i / sum_i w_i) (sum of the distinct models' w) / W;
    - ``absent_model_aware_avg``: sum c_i / (sum_i w_i + sum of the absent models' w).

    Returns fused ``(boxes, scores, labels)`` by falling score, matching ensemble-boxes (which
    rounds fused boxes to float32 on the way; these are float64 inside). Unlike ensemble-boxes,
    bad boxes and negative scores raise ConfigError; a cluster whose scores are all 0 fuses to
    the plain mean box instead of NaN. ``normalized=False`` accepts pixel coordinates (WBF is
    scale-invariant).
    """
    if conf_type not in CONF_TYPES:
        raise ConfigError(f"conf_type must be one of {', '.join(map(repr, CONF_TYPES))}, found {conf_type!r}")
    _check_iou("iou_thr", iou_thr)
    det = _validate(boxes, scores, labels, weights, normalized, nonnegative_scores=True)
    w = det.weights if det.weights is not None else np.ones(det.n_models)
    det = det.take(np.flatnonzero((det.scores >= skip_box_thr) & (_areas(det.boxes) > 0)))
    c = det.scores * w[det.model]
    total_w, n_models = w.sum(), det.n_models
    out_boxes, out_scores, out_labels = [], [], []
    # labels in order of first appearance, as ensemble-boxes' dict of labels (only ties in the
    # final sort can depend on it)
    _, first = np.unique(det.labels, return_index=True)
    for label in det.labels[np.sort(first)]:
        rows = np.flatnonzero(det.labels == label)
        rows = rows[_descending(c[rows])]
        member, fused = _cluster(det.boxes[rows], c[rows], float(iou_thr))
        k = len(fused)
        ci, wi, mi = c[rows], w[det.model[rows]], det.model[rows]
        t = np.bincount(member, minlength=k).astype(np.float64)
        sum_c = np.bincount(member, weights=ci, minlength=k)
        sum_w = np.bincount(member, weights=wi, minlength=k)
        pairs = np.unique(member * n_models + mi)  # distinct (cluster, model) pairs
        present_w = np.bincount(pairs // n_models, weights=w[pairs % n_models], minlength=k)
        if conf_type == "avg":
            conf = sum_c / t * (t if allows_overflow else np.minimum(t, n_models)) / total_w
        elif conf_type == "max":
            top = np.full(k, -np.inf)
            np.maximum.at(top, member, ci)
            conf = top / w.max()
        elif conf_type == "box_and_model_avg":
            safe = np.where(sum_w > 0, sum_w, 1.0)
            conf = np.where(sum_w > 0, sum_c / safe, 0.0) * present_w / total_w
        else:
            conf = sum_c / (sum_w + (total_w - present_w))
        out_boxes.append(fused)
        out_scores.append(conf)
        out_labels.append(np.full(k, label, dtype=np.int64))
    if not out_boxes:
        return det.output(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    all_scores = np.concatenate(out_scores)
    order = _descending(all_scores)
    return det.output(np.concatenate(out_boxes)[order], all_scores[order], np.concatenate(out_labels)[order])


def register_box_fusion(name: str) -> Callable[[Callable[..., Fused]], Callable[..., Fused]]:
    """Register ``fn(boxes, scores, labels, **options) -> (boxes, scores, labels)``, a single-image
    box fusion method taking the K models' detections as lists (see :func:`nms`), under ``name``."""

    def decorator(fn: Callable[..., Fused]) -> Callable[..., Fused]:
        _BOX_FUSIONS.register(name, fn)
        return fn

    return decorator


def get_box_fusion(name: str) -> Callable[..., Fused]:
    """The box fusion method registered as ``name``; an unknown name raises RegistryError listing close names."""
    return _BOX_FUSIONS.get(name)


def list_box_fusions(pattern: str = "*") -> list[str]:
    """Registered box fusion method names matching a shell-style ``pattern``, sorted."""
    return _BOX_FUSIONS.names(pattern)


for _name, _fn in (("nms", nms), ("soft_nms", soft_nms), ("weighted_boxes_fusion", weighted_boxes_fusion)):
    register_box_fusion(_name)(_fn)


def fuse_boxes_batch(
    boxes: Sequence[Sequence[torch.Tensor]],
    scores: Sequence[Sequence[torch.Tensor]],
    labels: Sequence[Sequence[torch.Tensor]],
    method: str = "weighted_boxes_fusion",
    **options: Any,
) -> list[Fused]:
    """Fuse a batch of images: ``boxes[i][k]`` are model k's boxes on image i (likewise scores
    and labels); returns one fused ``(boxes, scores, labels)`` per image.

    ``method`` names a method of ``list_box_fusions()`` (``nms``, ``soft_nms``: Bodla et al. 2017,
    Eqs. (1)-(3); ``weighted_boxes_fusion``: Solovyev et al. 2021, Eqs. (1)-(3)) and ``options``
    are its keyword arguments (``weights``, ``iou_thr``, ...), the same for every image. Errors
    name the image as well as the model and box.
    """
    fn = get_box_fusion(method)
    check_options(f"box fusion method {method!r}", fn, options, fixed=("boxes", "scores", "labels"))
    if not (len(boxes) == len(scores) == len(labels)):
        raise ConfigError(
            f"{len(boxes)} images of boxes, {len(scores)} of scores and {len(labels)} of labels: give "
            "one per-model list of each per image"
        )
    results = []
    for i, (b, s, lab) in enumerate(zip(boxes, scores, labels)):
        try:
            results.append(fn(b, s, lab, **options))
        except ConfigError as exc:
            raise ConfigError(f"image {i}: {exc}") from exc
    return results
