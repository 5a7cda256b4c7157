"""Detection metrics: PASCAL VOC average precision per class and its mean (mAP).

Predictions are one ``(boxes (N, 4), scores (N,), labels (N,))`` per image, ground truths one
``(boxes (G, 4), labels (G,))`` per image, boxes as x1, y1, x2, y2 in any one coordinate frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modelfuse.errors import ConfigError


def _as_array(x: torch.Tensor | np.ndarray | Sequence, what: str, width: int | None) -> np.ndarray:
    """``x`` as a float64 array of shape (N, width), or (N,) when ``width`` is None; errors name ``what``."""
    a = torch.as_tensor(x).detach().to("cpu", torch.float64).numpy()
    if width is not None:
        if a.size == 0:
            a = a.reshape(0, width)
        if a.ndim != 2 or a.shape[1] != width:
            raise ConfigError(f"{what} must have shape (N, {width}), found {a.shape}")
    elif a.ndim != 1:
        raise ConfigError(f"{what} must have shape (N,), found {a.shape}")
    return a


def _box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of ``box`` with each row of ``others`` (0 where the union is empty)."""
    w = np.maximum(np.minimum(others[:, 2], box[2]) - np.maximum(others[:, 0], box[0]), 0.0)
    h = np.maximum(np.minimum(others[:, 3], box[3]) - np.maximum(others[:, 1], box[1]), 0.0)
    inter = w * h
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (
        others[:, 3] - others[:, 1]
    )
    union = union - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope p_interp(r) = max_{r' >= r} p(r') over all recall points."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def average_precision_per_class(
    predictions: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truths: Sequence[tuple[torch.Tensor, torch.Tensor]],
    iou_threshold: float = 0.5,
) -> dict[int, float]:
    """VOC average precision of every class that has ground-truth boxes (Everingham et al. 2010,
    "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 88, Eq. (2) interpolated precision
    p_interp(r) = max_{r' >= r} p(r'), integrated over all recall points as in the VOC2010+ devkit).

    Per class, predictions of all images are taken by falling score (ties in input order); each
    is a true positive if its best-overlapping ground truth of that class in its image has IoU
    >= ``iou_threshold`` and is not matched yet, else a false positive (a duplicate of a matched
    box included). Predictions of classes without ground truth do not count.
    """
    if len(predictions) != len(ground_truths):
        raise ConfigError(
            f"{len(predictions)} images of predictions but {len(ground_truths)} of ground truths: give one "
            "entry per image in both, an empty one for an image without boxes"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ConfigError(f"iou_threshold must lie in [0, 1], found {iou_threshold}")
    gt: dict[int, dict[int, np.ndarray]] = {}  # class -> image -> boxes
    preds: dict[int, list[tuple[float, int, np.ndarray]]] = {}
    for i, ((pb, ps, pl), (gb, gl)) in enumerate(zip(predictions, ground_truths)):
        pb = _as_array(pb, f"image {i}: predicted boxes", 4)
        ps = _as_array(ps, f"image {i}: predicted scores", None)
        pl = _as_array(pl, f"image {i}: predicted labels", None)
        gb = _as_array(gb, f"image {i}: ground-truth boxes", 4)
        gl = _as_array(gl, f"image {i}: ground-truth labels", None)
        if not len(pb) == len(ps) == len(pl):
            raise ConfigError(
                f"image {i}: {len(pb)} predicted boxes, {len(ps)} scores and {len(pl)} labels; "
                "give one of each per box"
            )
        if len(gb) != len(gl):
            raise ConfigError(
                f"image {i}: {len(gb)} ground-truth boxes but {len(gl)} labels; give one label per box"
            )
        for c in np.unique(gl).astype(np.int64):
            gt.setdefault(int(c), {})[i] = gb[gl == c]
        for box, score, c in zip(pb, ps, pl.astype(np.int64)):
            preds.setdefault(int(c), []).append((float(score), i, box))
    result = {}
    for c in sorted(gt):
        n_gt = sum(len(b) for b in gt[c].values())
        dets = preds.get(c, [])
        order = np.argsort([-d[0] for d in dets], kind="stable")
        matched = {i: np.zeros(len(b), dtype=bool) for i, b in gt[c].items()}
        tp = np.zeros(len(dets))
        for rank, d in enumerate(order):
            _, i, box = dets[d]
            if i not in gt[c]:
                continue
            iou = _box_iou(box, gt[c][i])
            best = int(np.argmax(iou))
            if iou[best] >= iou_threshold and not matched[i][best]:
                matched[i][best] = True
                tp[rank] = 1.0
        tp_cum = np.cumsum(tp)
        recall = tp_cum / n_gt
        precision = tp_cum / np.arange(1, len(dets) + 1)
        result[c] = _voc_ap(recall, precision)
    return result


def mean_average_precision(
    predictions: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truths: Sequence[tuple[torch.Tensor, torch.Tensor]],
    iou_threshold: float = 0.5,
) -> float:
    """Mean over classes with ground truth of the VOC all-point average precision
    (Everingham et al. 2010, Eq. (2), see ``average_precision_per_class``); mAP@0.5 by default."""
    ap = average_precision_per_class(predictions, ground_truths, iou_threshold)
    if not ap:
        raise ConfigError("no ground-truth boxes in any image: mean average precision is undefined")
    return float(np.mean(list(ap.values())))
