"""Detection box fusion: hand-computed cases written as formulas, parity with ensemble-boxes,
errors on bad input, a mAP implementation checked by hand, and a synthetic K-model benchmark
where weighted boxes fusion beats NMS."""

from __future__ import annotations

import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from modelfuse.ensemble.boxes import (
    CONF_TYPES,
    fuse_boxes_batch,
    get_box_fusion,
    list_box_fusions,
    nms,
    soft_nms,
    weighted_boxes_fusion,
)
from modelfuse.ensemble.detection_metrics import average_precision_per_class, mean_average_precision
from modelfuse.errors import ConfigError, MissingExtraError, RegistryError

# ---------------------------------------------------------------------------------------------
# helpers


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def tensors(arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(a)) for a in arrays]


def iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, from the definition."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def weighted_mean(boxes, weights) -> torch.Tensor:
    return sum(w * torch.as_tensor(b, dtype=torch.float64) for b, w in zip(boxes, weights)) / sum(weights)


@pytest.fixture(scope="module")
def eb():
    """ensemble-boxes' weighted_boxes_fusion, nms and soft_nms (a dev dependency)."""
    import ensemble_boxes

    return types.SimpleNamespace(
        wbf=ensemble_boxes.weighted_boxes_fusion, nms=ensemble_boxes.nms, soft_nms=ensemble_boxes.soft_nms
    )


def random_detections(seed: int):
    """K models' noisy detections of a few shared objects (so boxes overlap and clusters form),
    some relabelled, some clipped to zero area at the border, continuous scores, random weights."""
    rng = np.random.default_rng(seed)
    k = 2 + seed % 3
    n_obj = int(rng.integers(3, 10))
    centre = rng.uniform(0, 0.8, (n_obj, 2))
    size = rng.uniform(0.05, 0.3, (n_obj, 2))
    obj_label = rng.integers(0, 3, n_obj)
    boxes, scores, labels = [], [], []
    for _ in range(k):
        n = int(rng.integers(0, 20))
        which = rng.integers(0, n_obj, n)
        xy = centre[which] + rng.normal(0, 0.03, (n, 2))
        wh = size[which] * rng.uniform(0.7, 1.3, (n, 2))
        boxes.append(np.clip(np.concatenate([xy, xy + wh], 1), 0, 1))
        scores.append(rng.uniform(0, 1, n))
        labels.append(np.where(rng.uniform(size=n) < 0.8, obj_label[which], rng.integers(0, 3, n)))
    weights = rng.uniform(0.2, 3.0, k) if seed % 2 else None
    return boxes, scores, labels, weights


def assert_same(ours, reference, atol: float = 1e-6) -> None:
    b, s, lab = ours
    rb, rs, rl = reference
    assert b.shape == (len(rs), 4) and s.shape == (len(rs),) and lab.shape == (len(rs),)
    np.testing.assert_allclose(b.numpy(), np.asarray(rb).reshape(-1, 4), rtol=0, atol=atol)
    np.testing.assert_allclose(s.numpy(), rs, rtol=0, atol=atol)
    np.testing.assert_array_equal(lab.numpy(), np.asarray(rl).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# weighted boxes fusion, by hand

A = (0.10, 0.10, 0.50, 0.50)


def test_wbf_two_overlapping_boxes_fuse_to_the_score_weighted_mean():
    b0, b1 = A, (0.12, 0.12, 0.52, 0.52)
    assert iou(b0, b1) > 0.55
    boxes, scores, labels = weighted_boxes_fusion([t(b0), t(b1)], [t(0.9), t(0.6)], [t(0), t(0)])
    assert boxes.shape == (1, 4)
    torch.testing.assert_close(boxes[0], weighted_mean([b0, b1], [0.9, 0.6]))
    # C = (0.9 + 0.6) / T with T = 2 boxes, rescaled by min(T, N) / N with N = 2 models
    assert scores.item() == pytest.approx((0.9 + 0.6) / 2 * min(2, 2) / 2)
    assert labels.tolist() == [0]


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_wbf_confidence_types_by_hand(conf_type):
    # model 0 (weight 2): A 0.9 and A2 0.5; model 1 (weight 1): B 0.6; model 2 (weight 1): nothing
    a2, b = (0.12, 0.10, 0.52, 0.50), (0.10, 0.12, 0.50, 0.52)
    w = (2.0, 1.0, 1.0)
    c = (2 * 0.9, 2 * 0.5, 1 * 0.6)  # score times model weight, in falling order A, A2, B
    assert min(iou(A, a2), iou(A, b)) > 0.55
    out_b, out_s, _ = weighted_boxes_fusion(
        [t(A, a2), t(b), torch.zeros(0, 4)],
        [t(0.9, 0.5), t(0.6), torch.zeros(0)],
        [t(1, 1), t(1), torch.zeros(0)],
        weights=w,
        conf_type=conf_type,
    )
    assert out_b.shape == (1, 4)
    torch.testing.assert_close(out_b[0], weighted_mean([A, a2, b], c))
    n_models, total_w, boxes_w = 3, sum(w), w[0] + w[0] + w[1]
    expected = {
        "avg": sum(c) / 3 * min(3, n_models) / total_w,
        "max": max(c) / max(w),
        "box_and_model_avg": sum(c) / boxes_w * (w[0] + w[1]) / total_w,  # models 0 and 1 present
        "absent_model_aware_avg": sum(c) / (boxes_w + w[2]),  # model 2 absent
    }[conf_type]
    assert out_s.item() == pytest.approx(expected)


def test_wbf_allows_overflow_counts_every_box():
    # one model, two overlapping boxes: T = 2 > N = 1
    b = (0.11, 0.10, 0.51, 0.50)
    args = ([t(A, b)], [t(0.9, 0.8)], [t(0, 0)])
    assert weighted_boxes_fusion(*args)[1].item() == pytest.approx((0.9 + 0.8) / 2 * min(2, 1) / 1)
    assert weighted_boxes_fusion(*args, allows_overflow=True)[1].item() == pytest.approx(
        (0.9 + 0.8) / 2 * 2 / 1
    )


def test_wbf_matches_a_box_against_the_fused_box_not_the_cluster_s_first_box():
    # full-height strips, so IoU is the overlap of the x intervals
    a, b, c = (0.0, 0.0, 0.4, 1.0), (0.2, 0.0, 0.6, 1.0), (0.3, 0.0, 0.7, 1.0)
    thr = 0.3
    fused_ab = weighted_mean([a, b], [0.9, 0.8]).tolist()
    assert iou(a, b) > thr and iou(c, a) <= thr < iou(c, fused_ab)
    boxes, scores, _ = weighted_boxes_fusion(
        [t(a), t(b), t(c)], [t(0.9), t(0.8), t(0.7)], [t(0), t(0), t(0)], iou_thr=thr
    )
    torch.testing.assert_close(boxes, weighted_mean([a, b, c], [0.9, 0.8, 0.7]).unsqueeze(0))
    assert scores.item() == pytest.approx((0.9 + 0.8 + 0.7) / 3 * min(3, 3) / 3)


def test_wbf_skips_low_scores_and_zero_area_boxes_and_never_fuses_labels():
    flat = (0.2, 0.2, 0.2, 0.6)  # zero width
    boxes, scores, labels = weighted_boxes_fusion(
        [t(A, flat, (0.6, 0.6, 0.9, 0.9)), t(A, (0.6, 0.6, 0.8, 0.8))],
        [t(0.9, 0.95, 0.3), t(0.7, 0.29)],
        [t(0, 0, 0), t(1, 0)],
        skip_box_thr=0.3,  # 0.3 is kept (score >= threshold), 0.29 is not
    )
    # three singleton clusters, each C = s * min(1, N) / N with N = 2 models
    torch.testing.assert_close(boxes, t(A, A, (0.6, 0.6, 0.9, 0.9)))
    torch.testing.assert_close(scores, t(0.9 / 2, 0.7 / 2, 0.3 / 2))
    assert labels.tolist() == [0, 1, 0]


def test_wbf_cluster_of_zero_scores_fuses_to_the_plain_mean():
    b = (0.12, 0.12, 0.52, 0.52)
    boxes, scores, _ = weighted_boxes_fusion([t(A), t(b)], [t(0.0), t(0.0)], [t(0), t(0)])
    torch.testing.assert_close(boxes, weighted_mean([A, b], [1, 1]).unsqueeze(0))
    assert scores.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# soft-NMS and NMS, by hand

# B overlaps A with IoU = 0.3 * 0.4 / (0.16 + 0.16 - 0.12) = 0.6; C overlaps neither
SA, SB, SC = (0.0, 0.0, 0.4, 0.4), (0.1, 0.0, 0.5, 0.4), (0.6, 0.6, 0.9, 0.9)
HAND = ([t(SA, SC), t(SB)], [t(0.9, 0.5), t(0.8)], [t(0, 0), t(0)])


def test_soft_nms_linear_by_hand():
    overlap = iou(SA, SB)
    assert overlap == pytest.approx(0.6)
    boxes, scores, _ = soft_nms(*HAND, method="linear", iou_thr=0.5, decayed_scores=True)
    # B decays to 0.8 (1 - IoU) = 0.32 and falls behind C
    torch.testing.assert_close(boxes, t(SA, SC, SB))
    torch.testing.assert_close(scores, t(0.9, 0.5, 0.8 * (1 - overlap)))
    # ensemble-boxes' default: the kept boxes with their input scores
    torch.testing.assert_close(soft_nms(*HAND, method="linear", iou_thr=0.5)[1], t(0.9, 0.5, 0.8))
    # below iou_thr there is no decay
    torch.testing.assert_close(
        soft_nms(*HAND, method="linear", iou_thr=0.7, decayed_scores=True)[1], t(0.9, 0.8, 0.5)
    )
    # a decayed score at or below thresh is dropped
    torch.testing.assert_close(soft_nms(*HAND, method="linear", iou_thr=0.5, thresh=0.35)[0], t(SA, SC))


def test_soft_nms_gaussian_by_hand():
    sigma = 0.5
    decayed = 0.8 * math.exp(-(iou(SA, SB) ** 2) / sigma)
    boxes, scores, _ = soft_nms(*HAND, method="gaussian", sigma=sigma, decayed_scores=True)
    torch.testing.assert_close(boxes, t(SA, SC, SB))
    # C does not overlap A or B: exp(-0 / sigma) = 1 leaves it unchanged
    torch.testing.assert_close(scores, t(0.9, 0.5, decayed))
    assert len(soft_nms(*HAND, method="gaussian", sigma=sigma, thresh=decayed - 1e-9)[0]) == 3
    assert len(soft_nms(*HAND, method="gaussian", sigma=sigma, thresh=decayed + 1e-9)[0]) == 2


def test_nms_by_hand():
    boxes, scores, _ = nms(*HAND, iou_thr=0.5)  # IoU(A, B) = 0.6 > 0.5: B is suppressed
    torch.testing.assert_close(boxes, t(SA, SC))
    torch.testing.assert_close(scores, t(0.9, 0.5))
    assert len(nms(*HAND, iou_thr=0.65)[0]) == 3
    # weights scale model k's scores by w_k / sum(w)
    _, scores, _ = nms(*HAND, iou_thr=0.5, weights=[1.0, 3.0])
    torch.testing.assert_close(scores, t(0.8 * 3 / 4, 0.5 * 1 / 4))  # B (weight 3) now suppresses A


def test_nms_class_aware_and_class_agnostic():
    boxes, scores, labels = [t(SA, SC), t(SB)], [t(0.9, 0.5), t(0.8)], [t(0, 0), t(1)]
    out_b, _, out_l = nms(boxes, scores, labels, iou_thr=0.5)
    # batched NMS: B has another label and survives; ordered by label, then falling score
    torch.testing.assert_close(out_b, t(SA, SC, SB))
    assert out_l.tolist() == [0, 0, 1]
    out_b, _, out_l = nms(boxes, scores, labels, iou_thr=0.5, class_aware=False)
    torch.testing.assert_close(out_b, t(SA, SC))
    assert out_l.tolist() == [0, 0]


def test_pixel_coordinates_with_normalized_false():
    scale = t(640.0, 480.0, 640.0, 480.0)
    pixel = ([b * scale for b in HAND[0]], HAND[1], HAND[2])
    for fn in (nms, soft_nms, weighted_boxes_fusion):
        with pytest.raises(ConfigError, match="outside"):
            fn(*pixel)
        expected = fn(*HAND)
        got = fn(*pixel, normalized=False)
        torch.testing.assert_close(got[0], expected[0] * scale)
        torch.testing.assert_close(got[1], expected[1])


def test_empty_inputs_dtypes_and_devices():
    empty = ([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0), torch.zeros(0)], [torch.zeros(0)] * 2)
    for fn in (nms, soft_nms, weighted_boxes_fusion):
        b, s, lab = fn(*empty)
        assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)
        b, s, lab = fn([t(SA).float()], [t(0.9).float()], [torch.tensor([2])])
        assert b.dtype == s.dtype == torch.float32 and lab.dtype == torch.int64 and lab.tolist() == [2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_stay_on_the_input_device():
    cuda = ([b.cuda() for b in HAND[0]], [s.cuda() for s in HAND[1]], [lab.cuda() for lab in HAND[2]])
    for fn in (nms, soft_nms, weighted_boxes_fusion):
        expected = fn(*HAND)
        for x, y in zip(fn(*cuda), expected):
            assert x.device.type == "cuda"
            torch.testing.assert_close(x.cpu(), y)


def test_nms_needs_torchvision_and_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    with pytest.raises(MissingExtraError, match=r"modelfuse\[vision\]"):
        nms(*HAND)
    assert len(soft_nms(*HAND)[0]) == 3 and len(weighted_boxes_fusion(*HAND)[0]) == 2


# ---------------------------------------------------------------------------------------------
# parity with ensemble-boxes on random detections


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("conf_type", "allows_overflow"), [(c, False) for c in CONF_TYPES] + [("avg", True)], ids=str
)
def test_wbf_matches_ensemble_boxes(eb, seed, conf_type, allows_overflow):
    boxes, scores, labels, weights = random_detections(seed)
    iou_thr, skip = (0.55, 0.0) if seed < 3 else (0.4, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its zero-area warnings
        reference = eb.wbf(
            boxes,
            scores,
            labels,
            weights=weights,
            iou_thr=iou_thr,
            skip_box_thr=skip,
            conf_type=conf_type,
            allows_overflow=allows_overflow,
        )
    ours = weighted_boxes_fusion(
        tensors(boxes),
        tensors(scores),
        tensors(labels),
        weights=weights,
        iou_thr=iou_thr,
        skip_box_thr=skip,
        conf_type=conf_type,
        allows_overflow=allows_overflow,
    )
    assert_same(ours, reference)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_ensemble_boxes(eb, seed, method):
    boxes, scores, labels, weights = random_detections(seed)
    iou_thr, sigma, thresh = (0.5, 0.5, 0.001) if seed < 3 else (0.3, 0.1, 0.05)
    reference = eb.soft_nms(
        boxes,
        [s.copy() for s in scores],  # it rescales the caller's list in place when given weights
        labels,
        method={"linear": 1, "gaussian": 2}[method],
        iou_thr=iou_thr,
        sigma=sigma,
        thresh=thresh,
        weights=weights,
    )
    ours = soft_nms(
        tensors(boxes),
        tensors(scores),
        tensors(labels),
        method=method,
        iou_thr=iou_thr,
        sigma=sigma,
        thresh=thresh,
        weights=weights,
    )
    assert_same(ours, reference)


@pytest.mark.parametrize("seed", range(6))
def test_nms_matches_ensemble_boxes(eb, seed):
    boxes, scores, labels, weights = random_detections(seed)
    iou_thr = 0.5 if seed < 3 else 0.3
    reference = eb.nms(boxes, [s.copy() for s in scores], labels, iou_thr=iou_thr, weights=weights)
    ours = nms(tensors(boxes), tensors(scores), tensors(labels), iou_thr=iou_thr, weights=weights)
    assert_same(ours, reference)
    # class-agnostic NMS is ensemble-boxes' NMS with every label the same
    zeros = [np.zeros_like(lab) for lab in labels]
    ref_b, ref_s, _ = eb.nms(boxes, [s.copy() for s in scores], zeros, iou_thr=iou_thr, weights=weights)
    b, s, _ = nms(
        tensors(boxes), tensors(scores), tensors(labels), iou_thr=iou_thr, weights=weights, class_aware=False
    )
    np.testing.assert_allclose(b.numpy(), ref_b.reshape(-1, 4), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# batches and bad input


def test_batch_gives_the_single_image_results_and_names_the_image():
    images = [random_detections(seed) for seed in range(4)]
    batch = [[tensors(part) for part in image[:3]] for image in images]
    boxes, scores, labels = (list(x) for x in zip(*batch))
    assert list_box_fusions() == ["nms", "soft_nms", "weighted_boxes_fusion"]
    for method in list_box_fusions():
        results = fuse_boxes_batch(boxes, scores, labels, method=method, iou_thr=0.45)
        assert len(results) == len(images)
        for (b, s, lab), got in zip(batch, results):
            for x, y in zip(get_box_fusion(method)(b, s, lab, iou_thr=0.45), got):
                torch.testing.assert_close(x, y)
    bad = [list(x) for x in boxes]
    bad[2] = [b.flip(1) if len(b) else b for b in bad[2]]
    with pytest.raises(ConfigError, match=r"image 2: model \d, box 0: x2 < x1"):
        fuse_boxes_batch(bad, scores, labels)
    with pytest.raises(RegistryError, match="Did you mean 'soft_nms'"):
        fuse_boxes_batch(boxes, scores, labels, method="softnms")
    with pytest.raises(ConfigError, match=r"Valid options: .*conf_type"):
        fuse_boxes_batch(boxes, scores, labels, conf="max")
    with pytest.raises(ConfigError, match="4 images of boxes, 3 of scores"):
        fuse_boxes_batch(boxes, scores[:3], labels)


GOOD = (0.1, 0.1, 0.4, 0.4)
BAD_INPUTS = {
    "x2 < x1": (
        ([t(GOOD), t(GOOD, (0.5, 0.1, 0.3, 0.4))], [t(0.9), t(0.8, 0.7)], [t(0), t(0, 0)], None),
        ["model 1, box 1", "x2 < x1", "swap the corners"],
    ),
    "y2 < y1": (
        ([t(GOOD, (0.1, 0.5, 0.4, 0.2))], [t(0.9, 0.8)], [t(0, 0)], None),
        ["model 0, box 1", "y2 < y1"],
    ),
    "outside [0, 1]": (
        ([t(GOOD), t((0.1, 0.1, 1.2, 0.4))], [t(0.9), t(0.8)], [t(0), t(0)], None),
        ["model 1, box 0", "outside [0, 1]", "image width", "normalized=False"],
    ),
    "NaN score": (
        ([t(GOOD, GOOD)], [t(0.9, float("nan"))], [t(0, 0)], None),
        ["model 0, box 1", "score is nan", "finite"],
    ),
    "NaN coordinate": (
        ([t((0.1, float("nan"), 0.4, 0.4))], [t(0.9)], [t(0)], None),
        ["model 0, box 0", "not all finite"],
    ),
    "scores shorter than boxes": (
        ([t(GOOD, GOOD, GOOD)], [t(0.9, 0.8)], [t(0, 0, 0)], None),
        ["model 0: 3 boxes but scores of shape (2,)", "shape (3,)"],
    ),
    "labels longer than boxes": (
        ([t(GOOD), t(GOOD)], [t(0.9), t(0.8)], [t(0), t(0, 1)], None),
        ["model 1: 1 boxes but labels of shape (2,)"],
    ),
    "lists of different lengths": (
        ([t(GOOD), t(GOOD)], [t(0.9)], [t(0), t(0)], None),
        [
            "2 box tensors, 1 score tensors and 2 label tensors",
            "one (boxes, scores, labels) triple per model",
        ],
    ),
    "weights count": (
        ([t(GOOD), t(GOOD)], [t(0.9), t(0.8)], [t(0), t(0)], [1.0, 2.0, 3.0]),
        ["3 weights for 2 models", "one weight per model"],
    ),
    "negative weight": (
        ([t(GOOD), t(GOOD)], [t(0.9), t(0.8)], [t(0), t(0)], [1.0, -0.5]),
        ["non-negative", "model(s) [1]", "-0.5"],
    ),
    "all weights 0": (
        ([t(GOOD), t(GOOD)], [t(0.9), t(0.8)], [t(0), t(0)], [0.0, 0.0]),
        ["all 0", "positive weight"],
    ),
    "boxes of shape (N, 5)": (
        ([torch.rand(2, 5)], [t(0.9, 0.8)], [t(0, 0)], None),
        ["model 0: boxes must have shape (N, 4)", "found shape (2, 5)"],
    ),
    "fractional label": (
        ([t(GOOD)], [t(0.9)], [t(0.5)], None),
        ["model 0, box 0", "label 0.5 is not a whole number"],
    ),
    "tensors instead of lists": (
        (t(GOOD), t(0.9), t(0), None),
        ["one tensor per model", "[boxes]"],
    ),
    "no models": (([], [], [], None), ["no models"]),
}


@pytest.mark.parametrize("fn", [nms, soft_nms, weighted_boxes_fusion], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_config_error_naming_model_and_box(fn, case):
    (boxes, scores, labels, weights), fragments = BAD_INPUTS[case]
    with pytest.raises(ConfigError) as info:
        fn(boxes, scores, labels, weights=weights)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match=r"negative.*logits"):
        weighted_boxes_fusion([t(GOOD)], [t(-0.1)], [t(0)])
    with pytest.raises(ConfigError, match="conf_type must be one of 'avg'"):
        weighted_boxes_fusion(*HAND, conf_type="mean")
    with pytest.raises(ConfigError, match="'linear' or 'gaussian'"):
        soft_nms(*HAND, method="hard")
    with pytest.raises(ConfigError, match="sigma > 0"):
        soft_nms(*HAND, sigma=0.0)
    for fn in (nms, soft_nms, weighted_boxes_fusion):
        with pytest.raises(ConfigError, match=r"iou_thr must lie in \[0, 1\], found 1.5"):
            fn(*HAND, iou_thr=1.5)


# ---------------------------------------------------------------------------------------------
# mean average precision, by hand


def test_average_precision_by_hand():
    g1, g2, g3, g4, g5 = (
        (0, 0, 0.5, 0.5),
        (0.5, 0.5, 1, 1),
        (0, 0, 0.5, 0.5),
        (0.2, 0.2, 0.6, 0.6),
        (0.6, 0, 1, 0.4),
    )
    near_g2 = (0.5, 0.5, 0.9, 0.9)  # IoU with g2 = 0.4^2 / 0.5^2 = 0.64
    assert iou(near_g2, g2) == pytest.approx(0.64)
    ground_truths = [
        (t(g1, g2, g5), torch.tensor([0, 0, 2])),  # image 0
        (t(g3, g4), torch.tensor([0, 1])),  # image 1
    ]
    # class 0, by falling score: 0.9 hits g1 (TP), 0.8 misses in image 1 (FP), 0.7 hits g2 (TP),
    # 0.6 hits g1 again (FP, a duplicate); class 1: one exact hit; class 2: no prediction;
    # class 3: predictions but no ground truth, so not counted. Inputs are not in score order.
    predictions = [
        (t(g1, near_g2, g1, g5), t(0.6, 0.7, 0.9, 0.5), torch.tensor([0, 0, 0, 3])),
        (t((0.6, 0.6, 0.9, 0.9), g4), t(0.8, 0.4), torch.tensor([0, 1])),
    ]
    # recall 1/3, 1/3, 2/3, 2/3 and precision 1/1, 1/2, 2/3, 2/4; the envelope is 1 up to
    # recall 1/3, then 2/3 up to recall 2/3, then 0
    ap0 = (1 / 3 - 0) * 1 + (2 / 3 - 1 / 3) * (2 / 3)
    ap = average_precision_per_class(predictions, ground_truths)
    assert ap == pytest.approx({0: ap0, 1: 1.0, 2: 0.0})
    assert mean_average_precision(predictions, ground_truths) == pytest.approx((ap0 + 1.0 + 0.0) / 3)
    # at IoU 0.7 the 0.7 box misses g2: class 0 has TP, FP, FP, FP, so AP = 1/3 * 1
    assert mean_average_precision(predictions, ground_truths, iou_threshold=0.7) == pytest.approx(
        (1 / 3 + 1.0 + 0.0) / 3
    )


def test_average_precision_bad_input():
    one = [(t(GOOD), t(0.9), torch.tensor([0]))]
    with pytest.raises(ConfigError, match="1 images of predictions but 2 of ground truths"):
        mean_average_precision(one, [(t(GOOD), torch.tensor([0]))] * 2)
    with pytest.raises(ConfigError, match="no ground-truth boxes"):
        mean_average_precision(one, [(torch.zeros(0, 4), torch.zeros(0))])
    with pytest.raises(ConfigError, match=r"image 0: predicted boxes must have shape \(N, 4\)"):
        mean_average_precision(
            [(torch.rand(1, 3), t(0.9), torch.tensor([0]))], [(t(GOOD), torch.tensor([0]))]
        )


# ---------------------------------------------------------------------------------------------
# a synthetic K-model benchmark


def synthetic_detections(n_models: int, seed: int, n_images: int = 150, n_classes: int = 3):
    """Ground truth of 1-5 boxes per image and n_models noisy detectors: each misses a box with
    probability 0.2, jitters each corner by N(0, 0.15 * box size), scores hits U(0.3, 1), and adds
    Poisson(2) false positives scored U(0, 0.8) with random labels."""
    rng = np.random.default_rng(seed)
    truths, boxes, scores, labels = [], [], [], []
    for _ in range(n_images):
        g = int(rng.integers(1, 6))
        wh = rng.uniform(0.1, 0.3, (g, 2))
        xy = rng.uniform(0, 1 - wh)
        gt_boxes, gt_labels = np.concatenate([xy, xy + wh], 1), rng.integers(0, n_classes, g)
        truths.append((torch.from_numpy(gt_boxes), torch.from_numpy(gt_labels)))
        per_model = ([], [], [])
        for _ in range(n_models):
            hit = rng.uniform(size=g) >= 0.2
            size = np.tile(wh[hit], 2)
            found = gt_boxes[hit] + rng.normal(0, 0.15, size.shape) * size
            n_false = rng.poisson(2)
            fwh = rng.uniform(0.05, 0.3, (n_false, 2))
            fxy = rng.uniform(0, 1 - fwh)
            b = np.clip(np.concatenate([found, np.concatenate([fxy, fxy + fwh], 1)]), 0, 1)
            b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], 1)
            s = np.concatenate([rng.uniform(0.3, 1.0, int(hit.sum())), rng.uniform(0.0, 0.8, n_false)])
            lab = np.concatenate([gt_labels[hit], rng.integers(0, n_classes, n_false)])
            for part, x in zip(per_model, (b, s, lab)):
                part.append(torch.from_numpy(x))
        for whole, part in zip((boxes, scores, labels), per_model):
            whole.append(part)
    return boxes, scores, labels, truths


@pytest.mark.parametrize("n_models", [3, 5])
def test_wbf_beats_nms_on_a_synthetic_ensemble(n_models):
    boxes, scores, labels, truths = synthetic_detections(n_models, seed=n_models)
    m_ap = {
        method: mean_average_precision(
            fuse_boxes_batch(boxes, scores, labels, method=method, **options), truths
        )
        for method, options in [
            ("nms", {"iou_thr": 0.5}),
            ("soft_nms", {"iou_thr": 0.5, "decayed_scores": True}),
            ("weighted_boxes_fusion", {"iou_thr": 0.55}),
        ]
    }
    print(f"\nK={n_models} models, mAP@0.5: " + ", ".join(f"{k} {v:.4f}" for k, v in m_ap.items()))
    assert m_ap["weighted_boxes_fusion"] > m_ap["nms"] + 0.05
    assert m_ap["weighted_boxes_fusion"] > m_ap["soft_nms"]
