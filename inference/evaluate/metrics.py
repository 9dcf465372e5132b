"""Metrics shared by training (checkpoint selection) and evaluation (model cards).

Detection matching is one-to-one (Hungarian): a predicted vertebra matches at most one reference
vertebra.  Two criteria: the predicted centroid lies inside the reference box ("centroid-in-box"), or the
predicted box overlaps the reference box with IoU >= a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class DetectionCounts:
    """True positives, false positives, false negatives, summed over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int, fp: int, fn: int) -> None:
        """Accumulate one image."""
        self.tp += tp
        self.fp += fp
        self.fn += fn

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r and np.isfinite(p) and np.isfinite(r) else 0.0

    def as_dict(self) -> dict[str, float | None]:
        """For JSON (a rate that is not defined, e.g. precision with no detections, is None: null)."""
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": _r(self.precision), "recall": _r(self.recall), "f1": _r(self.f1)}


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)


def f1_interval(per_image: Sequence[tuple[int, int, int]], confidence: float = 0.95, resamples: int = 2000,
                seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the pooled F1 over images (the image is the unit: vertebrae of one film
    are not independent); None for fewer than two images."""
    from scipy.stats import bootstrap

    counts = np.asarray(per_image, dtype=float).reshape(-1, 3)
    if len(counts) < 2:
        return None

    def pooled_f1(index: np.ndarray, axis: int = -1) -> np.ndarray:
        tp, fp, fn = np.moveaxis(counts[index.astype(int)].sum(axis=-2), -1, 0)
        return 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    res = bootstrap((np.arange(len(counts)),), pooled_f1, vectorized=True, n_resamples=resamples,
                    confidence_level=confidence, method="percentile", random_state=seed)
    return round(float(res.confidence_interval.low), 3), round(float(res.confidence_interval.high), 3)


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson interval of k successes in n trials; None when n is 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return round(float(ci.low), 3), round(float(ci.high), 3)


def match_centroids_in_boxes(centroids: np.ndarray, boxes: np.ndarray) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(tp, fp, fn, pairs) matching (x, y) centroids to (x0, y0, x1, y1) boxes, one-to-one."""
    centroids = np.asarray(centroids, dtype=float).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if len(centroids) == 0 or len(boxes) == 0:
        return 0, len(centroids), len(boxes), []
    x, y = centroids[:, 0][:, None], centroids[:, 1][:, None]
    inside = (x >= boxes[None, :, 0]) & (x <= boxes[None, :, 2]) & (y >= boxes[None, :, 1]) & (y <= boxes[None, :, 3])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    dist = np.hypot(x - cx[None], y - cy[None])
    cost = np.where(inside, dist, 1e9)
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if inside[r, c]]
    tp = len(pairs)
    return tp, len(centroids) - tp, len(boxes) - tp, pairs


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (n, 4) and (m, 4) boxes (x0, y0, x1, y1)."""
    a = np.asarray(a, dtype=float).reshape(-1, 4)
    b = np.asarray(b, dtype=float).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def match_boxes(pred: np.ndarray, ref: np.ndarray, threshold: float = 0.3) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(tp, fp, fn, pairs) one-to-one box matching with IoU >= `threshold`."""
    pred = np.asarray(pred, dtype=float).reshape(-1, 4)
    ref = np.asarray(ref, dtype=float).reshape(-1, 4)
    if len(pred) == 0 or len(ref) == 0:
        return 0, len(pred), len(ref), []
    iou = box_iou(pred, ref)
    rows, cols = linear_sum_assignment(-iou)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= threshold]
    tp = len(pairs)
    return tp, len(pred) - tp, len(ref) - tp, pairs


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (nan when both are empty)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    denom = pred.sum() + ref.sum()
    return float(2 * (pred & ref).sum() / denom) if denom else float("nan")


def cohen_kappa(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, n_classes: int = 4,
                weights: str | None = None) -> float:
    """Cohen's kappa between two ratings (optionally "linear" or "quadratic" weighted)."""
    rating_a, rating_b = np.asarray(a, int), np.asarray(b, int)
    if len(rating_a) == 0:
        return float("nan")
    conf = np.zeros((n_classes, n_classes))
    for i, j in zip(rating_a, rating_b, strict=True):
        conf[i, j] += 1
    n = conf.sum()
    idx = np.arange(n_classes)
    if weights is None:
        w = (idx[:, None] != idx[None, :]).astype(float)
    elif weights == "linear":
        w = np.abs(idx[:, None] - idx[None, :]) / (n_classes - 1)
    elif weights == "quadratic":
        w = ((idx[:, None] - idx[None, :]) / (n_classes - 1)) ** 2
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    expected = np.outer(conf.sum(1), conf.sum(0)) / n
    denom = (w * expected).sum()
    if denom == 0:
        return 1.0 if (w * conf).sum() == 0 else 0.0
    return float(1 - (w * conf).sum() / denom)


def midline_points(shape: tuple[int, int], count: int = 16, top: float = 0.15, bottom: float = 0.85) -> np.ndarray:
    """Trivial baseline: `count` evenly spaced (x, y) points on the vertical midline."""
    rows, cols = shape
    ys = np.linspace(top * rows, bottom * rows, count)
    return np.stack([np.full(count, cols / 2), ys], axis=1)


def midline_boxes(shape: tuple[int, int], count: int = 16, top: float = 0.15, bottom: float = 0.85, width: float = 0.16) -> np.ndarray:
    """Trivial baseline: `count` touching boxes stacked along the vertical midline."""
    rows, cols = shape
    edges = np.linspace(top * rows, bottom * rows, count + 1)
    half = width * cols / 2
    return np.stack([np.full(count, cols / 2 - half), edges[:-1], np.full(count, cols / 2 + half), edges[1:]], axis=1)
