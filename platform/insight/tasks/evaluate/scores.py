"""Dataset-level scores from the replicas' sums, side by side through concepts and opaque, and their tables."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from insight.tasks.evaluate.labels import LabelSpace
from insight.tasks.evaluate.replicas import VIAS
from insight.tasks.metrics import (
    finite_or_none,
    iou_per_class,
    majority_confusion,
    mean_iou,
    pixel_accuracy,
    ratio,
    topk_accuracy,
)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    from insight.tasks.pictures import write_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def rounded(x: float | None, nd: int = 6) -> float | None:
    x = finite_or_none(x)
    return None if x is None else round(x, nd)


def segmentation_scores(conf: dict[str, np.ndarray], space: LabelSpace, images: int, out_dir: Path) -> dict[str, Any]:
    ious = {v: iou_per_class(conf[v]) for v in VIAS}
    miou = {v: mean_iou(conf[v]) for v in VIAS}
    gt_pixels = conf["concepts"].sum(1)
    rows = [[i, name, rounded(ious["concepts"][i]), rounded(ious["opaque"][i]), int(gt_pixels[i]),
             int(conf["concepts"][:, i].sum()), int(conf["opaque"][:, i].sum())]
            for i, name in enumerate(space.names)]
    write_csv(out_dir / "per_class_segmentation.csv",
               ["label", "class", "iou_concepts", "iou_opaque", "gt_pixels", "pred_pixels_concepts",
                "pred_pixels_opaque"], rows)
    import mlflow

    from insight.tasks.pictures import write_atomic

    write_atomic(out_dir / "confusion.json", json.dumps({v: conf[v].tolist() for v in VIAS}).encode())
    columns = ["label", "class", "iou_concepts", "iou_opaque", "gt_pixels"]
    mlflow.log_table({c: [r[j] for r in rows] for j, c in enumerate(columns)}, "tables/per_class_segmentation.json")
    return {
        "segmentation_images": images,
        "miou_concepts": rounded(miou["concepts"]), "miou_opaque": rounded(miou["opaque"]),
        "miou_ratio": rounded(ratio(miou["concepts"], miou["opaque"])),
        "miou_delta": rounded(100 * (miou["concepts"] - miou["opaque"])
                              if math.isfinite(miou["concepts"] - miou["opaque"]) else math.nan),
        "pixel_acc_concepts": rounded(pixel_accuracy(conf["concepts"])),
        "pixel_acc_opaque": rounded(pixel_accuracy(conf["opaque"])),
        "per_class_segmentation": str(out_dir / "per_class_segmentation.csv"),
    }


PER_IMAGE_COLUMNS = ["image", "classes_present", "miou_concepts", "miou_opaque", "miou_ratio", "miou_majority",
                     "miou_fg_concepts", "miou_fg_opaque", "recon_cosine", "recon_fvu", "recon_fvu_window_mean",
                     "recon_cosine_window_min", "l0", "argmax_agreement", "residual_equals_opaque", "windows",
                     "patches"]


def diagnostics(diag: dict[str, np.ndarray], per_image: list[dict[str, Any]], conf: dict[str, np.ndarray],
                 out_dir: Path) -> dict[str, Any]:
    """Dataset-level diagnostics from the replicas' summed statistics, and the per-image table.

    The reconstruction figures are those of the SAE's training metrics (FVU against the mean of all
    evaluated patches, mean per-patch cosine) on the patches the segmenter saw, so they compare with
    the sweep's validation FVU; the window figures average each window's own FVU and cosine.
    """
    n = float(diag["n"])
    sum_x = diag["sum_x"].astype(np.float64)
    total_var = float(diag["sum_sq"]) - float(sum_x @ sum_x) / max(n, 1.0)
    fg = {v: mean_iou(diag[f"conf_fg_{v}"]) for v in VIAS}
    rows = sorted(per_image, key=lambda r: r["image"])
    write_csv(out_dir / "per_image_segmentation.csv", PER_IMAGE_COLUMNS,
               [[rounded(r[c]) if isinstance(r[c], float) else r[c] for c in PER_IMAGE_COLUMNS] for r in rows])
    import mlflow

    mlflow.log_table({c: [r[c] for r in rows] for c in PER_IMAGE_COLUMNS}, "tables/per_image_segmentation.json")
    window_fvu = [r["recon_fvu_window_mean"] for r in rows if r["recon_fvu_window_mean"] is not None]
    return {
        "recon_cosine": rounded(float(diag["cos_sum"]) / n),
        "recon_fvu": rounded(float(diag["err"]) / max(total_var, 1e-30)),
        "recon_fvu_window_mean": rounded(float(np.mean(window_fvu))) if window_fvu else None,
        "l0": rounded(float(diag["nnz"]) / n), "patches": int(n),
        "argmax_agreement": rounded(float(diag["agree"]) / n),
        "residual_equals_opaque": bool(float(diag["residual_mismatch"]) == 0),
        "residual_max_logit_diff": float(diag["max_residual_diff"]),
        "miou_majority": rounded(mean_iou(majority_confusion(conf["opaque"]))),
        "miou_fg_concepts": rounded(fg["concepts"]), "miou_fg_opaque": rounded(fg["opaque"]),
        "miou_fg_ratio": rounded(ratio(fg["concepts"], fg["opaque"])),
        "per_image_segmentation": str(out_dir / "per_image_segmentation.csv"),
    }


def classification_scores(batches, space: LabelSpace, out_dir: Path) -> dict[str, Any]:
    labels = np.concatenate([a["cls_labels"] for a, _ in batches]) if batches else np.zeros(0, np.int64)
    if len(labels) == 0:
        return {"classification_images": 0}
    acc = {}
    for v in VIAS:
        logits = np.concatenate([a[f"cls_{v}"] for a, _ in batches])
        acc[v] = topk_accuracy(logits, labels, (1, 5))
        pred = logits.argmax(1)
        acc[v]["per_class"] = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
                               for c in range(len(space.fg_names))]
    rows = [[c, name, int((labels == c).sum()), rounded(acc["concepts"]["per_class"][c]),
             rounded(acc["opaque"]["per_class"][c])] for c, name in enumerate(space.fg_names)]
    write_csv(out_dir / "per_class_classification.csv",
               ["index", "class", "images", "top1_concepts", "top1_opaque"], rows)
    return {
        "classification_images": int(len(labels)),
        "top1_concepts": rounded(acc["concepts"][1]), "top5_concepts": rounded(acc["concepts"][5]),
        "top1_opaque": rounded(acc["opaque"][1]), "top5_opaque": rounded(acc["opaque"][5]),
        "top1_ratio": rounded(ratio(acc["concepts"][1], acc["opaque"][1])),
        "top5_ratio": rounded(ratio(acc["concepts"][5], acc["opaque"][5])),
    }
