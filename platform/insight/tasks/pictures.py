"""Explanation pictures (matplotlib, Agg): rendered to PNG bytes, written atomically.

Rendering returns bytes so the evaluation replicas (which may run on other
machines) can ship the pictures back to the driver, which writes them with
`write_atomic` and logs them to MLflow.

- `overlay_png`: the image, the ground truth (when known) and the predicted
  labels through concepts and through the opaque backbone, side by side.
- `segment_heatmaps_png`: for each predicted segment (largest first), the
  top concepts' contribution maps to that segment's class, with their names.
- `contributions_png`: per class, a bar chart of the top concepts' mean
  contributions to the segment's logit, the decoder-bias term and the rest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


from insight.atomic import write_atomic  # noqa: E402,F401  (re-exported for callers)


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, the PASCAL VOC colour map (label 0 black), extended bitwise."""
    cmap = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(max(n, 1)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(labels_hw: np.ndarray, n_classes: int, ignore_index: int = 255) -> np.ndarray:
    cmap = palette(n_classes)
    lab = np.asarray(labels_hw)
    out = np.full((*lab.shape, 3), 255, np.uint8)  # ignored pixels white
    valid = (lab >= 0) & (lab < n_classes)
    out[valid] = cmap[lab[valid]]
    return out


def _blend(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (rgb.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)


def overlay_png(image_rgb: np.ndarray, predictions: dict[str, np.ndarray], class_names: Sequence[str],
                gt_hw: np.ndarray | None = None, title: str = "", scores: dict[str, str] | None = None) -> bytes:
    """Image | ground truth | one panel per prediction, with a legend of the labels that occur."""
    plt = _plt()
    panels: list[tuple[str, np.ndarray | None]] = [("image", None)]
    if gt_hw is not None:
        panels.append(("ground truth", gt_hw))
    panels += [(f"via {k}" + (f" ({scores[k]})" if scores and k in scores else ""), v) for k, v in predictions.items()]
    n = len(class_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), dpi=110, squeeze=False)
    seen: set[int] = set()
    for ax, (name, lab) in zip(axes[0], panels, strict=True):
        if lab is None:
            ax.imshow(image_rgb)
        else:
            ax.imshow(_blend(image_rgb, colorize(lab, n)))
            seen.update(int(v) for v in np.unique(lab) if 0 <= v < n)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    cmap = palette(n)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap[i] / 255.0) for i in sorted(seen)]
    fig.legend(handles, [class_names[i] for i in sorted(seen)], loc="lower center", ncol=min(6, max(1, len(handles))),
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return _png(fig)


def segment_heatmaps_png(image_rgb: np.ndarray, rows: Sequence[dict], title: str = "") -> bytes:
    """One row per segment: its mask, then each top concept's contribution map over the image.

    ``rows``: dicts with ``class`` (name), ``mask_hw`` (bool), ``maps`` ((K, H, W)
    contribution maps) and ``concepts`` (K labels "name (value)").
    """
    plt = _plt()
    if not rows:
        rows = [{"class": "no segment", "mask_hw": np.zeros(image_rgb.shape[:2], bool),
                 "maps": np.zeros((0, *image_rgb.shape[:2])), "concepts": []}]
    cols = 1 + max(len(r["concepts"]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), dpi=110, squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r][0]
        ax.imshow(image_rgb)
        ax.imshow(np.ma.masked_where(~row["mask_hw"], row["mask_hw"]), alpha=0.5, cmap="autumn")
        ax.set_title(f"segment: {row['class']}", fontsize=8)
        for c in range(1, cols):
            ax = axes[r][c]
            ax.axis("off")
            if c - 1 >= len(row["concepts"]):
                continue
            m = np.asarray(row["maps"][c - 1], dtype=np.float32)
            lim = float(np.abs(m).max()) or 1.0
            ax.imshow(image_rgb, alpha=0.45)
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.65)
            ax.set_title(row["concepts"][c - 1], fontsize=7)
        axes[r][0].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def contributions_png(explanations: Sequence[dict], title: str = "") -> bytes:
    """Per class (one panel each): top concepts' mean contributions, the rest, and the bias term.

    ``explanations``: `SegmentExplanation.as_dict()`-like dicts (``class``,
    ``top``, ``bias``, ``concepts_total``, ``mean_logit``).
    """
    plt = _plt()
    n = max(1, len(explanations))
    fig, axes = plt.subplots(n, 1, figsize=(6.4, 1.2 + 0.32 * 8 * n), dpi=110, squeeze=False)
    for ax, ex in zip(axes[:, 0], explanations, strict=False):
        labels = [f"{c['name']}" for c in ex["top"]]
        values = [c["contribution"] for c in ex["top"]]
        rest = ex["concepts_total"] - sum(values)
        labels += ["other concepts", "decoder bias"]
        values += [rest, ex["bias"]]
        colors = ["tab:blue"] * len(ex["top"]) + ["tab:gray", "tab:orange"]
        y = np.arange(len(values))[::-1]
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_title(f"{ex['class']}: mean logit {ex['mean_logit']:.4f} = concepts {ex['concepts_total']:.4f} "
                     f"+ bias {ex['bias']:.4f}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    if not explanations:
        axes[0, 0].text(0.5, 0.5, "nothing to explain (no foreground segment)", ha="center", va="center")
        axes[0, 0].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def class_heatmaps_png(view_rgb: np.ndarray, explanation: dict, maps_khw: np.ndarray, title: str = "") -> bytes:
    """Classification: the classified view, then the top concepts' activation maps for one class."""
    import cv2

    plt = _plt()
    k = len(explanation["top"])
    fig, axes = plt.subplots(1, k + 1, figsize=(2.6 * (k + 1), 2.9), dpi=110, squeeze=False)
    axes[0][0].imshow(view_rgb)
    axes[0][0].set_title(f"class: {explanation['class']}", fontsize=8)
    for i in range(k):
        m = cv2.resize(np.asarray(maps_khw[i], np.float32), view_rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        axes[0][i + 1].imshow(view_rgb, alpha=0.45)
        axes[0][i + 1].imshow(m, cmap="magma", alpha=0.65)
        c = explanation["top"][i]
        axes[0][i + 1].set_title(f"{c['name']} ({c['contribution']:+.3f})", fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
