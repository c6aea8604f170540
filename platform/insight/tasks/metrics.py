"""Segmentation and classification metrics as plain functions of arrays.

mIoU follows the convention of the published benchmark numbers (mmsegmentation):
one confusion matrix accumulated over the whole dataset, IoU per class =
TP / (TP + FP + FN), classes whose union is empty (absent from the ground truth
and never predicted) are NaN and left out of the mean. Pixels labelled
``ignore_index`` (255) count nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(gt_hw: np.ndarray, pred_hw: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction."""
    gt = np.asarray(gt_hw)
    pred = np.asarray(pred_hw)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        bad = int(g.max() if g.max() >= num_classes else g.min())
        raise ValueError(f"ground-truth label {bad} is outside 0..{num_classes - 1} (and is not {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted label outside 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf_kk: np.ndarray) -> np.ndarray:
    """IoU of every class (NaN where the class is neither in the ground truth nor predicted)."""
    conf = np.asarray(conf_kk, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(conf_kk: np.ndarray) -> float:
    """Mean over classes with a non-empty union; NaN when there is none."""
    iou = iou_per_class(conf_kk)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def pixel_accuracy(conf_kk: np.ndarray) -> float:
    conf = np.asarray(conf_kk)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else math.nan


def topk_accuracy(logits_nc: np.ndarray, labels_n: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of rows whose label is among the k highest logits, for each k (k capped at C)."""
    logits = np.asarray(logits_nc)
    labels = np.asarray(labels_n)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not pair up")
    out: dict[int, float] = {}
    if len(labels) == 0:
        return {k: math.nan for k in ks}
    order = np.argsort(-logits, axis=1, kind="stable")
    for k in ks:
        hit = (order[:, : min(k, logits.shape[1])] == labels[:, None]).any(1)
        out[k] = float(hit.mean())
    return out


def majority_confusion(conf_kk: np.ndarray) -> np.ndarray:
    """The confusion matrix of the majority-class baseline: every pixel gets the most frequent true class.

    The floor a segmentation's mIoU is read against: on one photo that is mostly background it is
    already 1 / (classes present), with no model at all.
    """
    conf = np.asarray(conf_kk)
    gt = conf.sum(1)
    out = np.zeros_like(conf)
    if gt.sum():
        out[:, int(gt.argmax())] = gt
    return out


def reconstruction_fidelity(x_pd, x_hat_pd, groups: int = 1) -> dict[str, float]:
    """How well reconstructions x^ match features x (rows = patches), as training reports it, per group.

    ``fvu``/``cosine`` pool all rows (FVU against the rows' own mean, as ``insight.sae.fvu``); the
    rows also split into ``groups`` equal consecutive blocks (the windows of an image), whose FVU
    and mean cosine are averaged (``fvu_window_mean``, ``cosine_window_mean``) and bounded
    (``fvu_window_max``, ``cosine_window_min``).
    """
    from insight.sae.metrics import cosine, fvu

    n = len(x_pd)
    if n == 0 or groups < 1 or n % groups:
        raise ValueError(f"{n} rows do not split into {groups} equal windows")
    per = n // groups
    w_fvu = [fvu(x_pd[i : i + per], x_hat_pd[i : i + per]) for i in range(0, n, per)]
    w_cos = [cosine(x_pd[i : i + per], x_hat_pd[i : i + per]) for i in range(0, n, per)]
    return {"fvu": fvu(x_pd, x_hat_pd), "cosine": cosine(x_pd, x_hat_pd),
            "fvu_window_mean": float(np.mean(w_fvu)), "fvu_window_max": float(np.max(w_fvu)),
            "cosine_window_mean": float(np.mean(w_cos)), "cosine_window_min": float(np.min(w_cos))}


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when undefined (JSON has no NaN)."""
    if denominator is None or numerator is None or not math.isfinite(denominator) or denominator == 0:
        return None
    if not math.isfinite(numerator):
        return None
    return float(numerator / denominator)


def finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
