"""COCO-format annotation files through pycocotools: images, category names, semantic masks.

Plain data only (ids, paths, names, arrays): `insight.data.datasets` turns them into an
`ImageDataset`, so the import goes one way.
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=8)
def _coco(annotations: str):
    from pycocotools.coco import COCO

    p = Path(annotations)
    if not p.is_file():
        raise FileNotFoundError(f"data.annotations: no COCO json at {p}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            return COCO(str(p))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"data.annotations: {p} is not a COCO annotation file: {exc}") from exc


def coco_images(annotations: str, root: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """((image id, path under ``root``, COCO image id) in COCO id order, category names in id order)."""
    coco = _coco(str(Path(annotations).resolve()))
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    base = Path(root)
    images = [(str(Path(img["file_name"]).with_suffix("")), str(base / img["file_name"]), img["id"])
              for img in sorted(coco.loadImgs(coco.getImgIds()), key=lambda i: i["id"])]
    if not images:
        raise ValueError(f"data.annotations: {annotations} lists no images")
    return images, [c["name"] for c in cats]


def annotated_categories(annotations: str, image_ids: list[int]) -> list[str]:
    """Names of the categories annotated in these images, in category-id order (the dataset's order)."""
    coco = _coco(annotations)
    used = {ann["category_id"] for ann in coco.loadAnns(coco.getAnnIds(imgIds=list(image_ids), iscrowd=None))}
    return [c["name"] for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"]) if c["id"] in used]


def coco_semantic_mask(annotations: str, image_id: int, class_names: list[str], ignore_index: int) -> np.ndarray:
    """Index map (H, W): category position in ``class_names``; unlabelled pixels ``ignore_index``.

    Larger annotations are painted first so small objects on top of them stay visible.
    """
    coco = _coco(annotations)
    info = coco.loadImgs([image_id])[0]
    mask = np.full((info["height"], info["width"]), ignore_index, dtype=np.int64)
    cat_pos = {c["id"]: i for i, c in enumerate(sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"]))}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    for ann in sorted(anns, key=lambda a: -a.get("area", 0)):
        mask[coco.annToMask(ann) > 0] = cat_pos[ann["category_id"]]
    return mask
