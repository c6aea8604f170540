"""Label space and ground truth: the classes evaluated, dataset masks and folders as labels, the images.

COCO categories are mapped by name (unannotated pixels are background when the label space has
one, else ignored), PNG values through ``tasks.label_transform``. Image-level labels for
classification: the dominant foreground class by area (masks), or the first folder of the
image's path (class folders).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from insight.data.classes import BackgroundOffset
from insight.tasks.metrics import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSpace(BackgroundOffset):
    """Label i = names[i]; with background, label 0 is background (no prompt)."""

    names: list[str]
    background: bool


def _folder_class(image_id: str) -> str | None:
    parts = image_id.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else None


def resolve_classes(tasks, dataset, records=None) -> LabelSpace:
    """The label space from ``tasks.classes``/``tasks.background`` and the dataset's own classes.

    ``annotated`` needs ``records`` (the images being evaluated): a small dataset's COCO file often
    lists every category of its source (the bundled photo lists all 20 VOC ones) while its images
    show a few, and prompting absent classes only measures how often they are confused.
    """
    from insight.data.classes import BENCHMARKS

    spec = tasks.classes
    if spec == "annotated":
        from insight.data.coco import annotated_categories

        if dataset.kind != "coco":
            raise ValueError(f"tasks.classes=annotated reads COCO category annotations; data.kind={dataset.kind} has "
                             "none: give the classes as a list or a built-in name")
        ids = [r.coco_id for r in (records if records is not None else dataset.records)]
        names, bg_default = annotated_categories(dataset.annotations, ids), True
        if not names:
            raise ValueError(f"tasks.classes=annotated: the {len(ids)} evaluated images of {dataset.annotations} "
                             "carry no annotation")
        spec = None  # the dataset's own names, narrowed; background is added below
    elif isinstance(spec, str):
        names, bg_default = list(BENCHMARKS[spec][0]), BENCHMARKS[spec][1]
    elif isinstance(spec, list):
        names, bg_default = list(spec), False
    elif dataset.kind == "folder":
        names = sorted({c for r in dataset.records if (c := _folder_class(r.image_id))})
        bg_default = False
        if not names:
            raise ValueError(f"data.root {dataset.root}: images are not in class folders (root/<class>/<image>) and "
                             "tasks.classes is not set, so there are no classes to evaluate")
    else:
        names = list(dataset.class_names)
        bg_default = bool(names) and names[0].lower() == "background"
    rule = tasks.background if isinstance(tasks.background, str) else None  # threshold|prompted: how, not whether
    if tasks.background is None or rule:
        has_bg = bg_default or (rule is not None and names[:1] == ["background"])
    else:
        has_bg = tasks.background
    background = (rule or True) if has_bg else False  # truthy = label 0 is background; ClassBank reads the rule
    if background and spec is None and dataset.kind == "coco" and names[:1] != ["background"]:
        names = ["background", *names]
    if len(names) - (1 if background else 0) < 1:
        raise ValueError(f"the label space {names} (background={background}) has no class to prompt")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{len(names)} classes: at most {IGNORE_INDEX} fit beside the ignore index {IGNORE_INDEX}")
    return LabelSpace(names, background)


def _png_lut(transform: str, n_classes: int) -> np.ndarray | None:
    """Raw mask value -> label for the fixed transforms; None for the plain ones (checked per mask)."""
    from insight.data.classes import CITYSCAPES_ID_TO_TRAINID, COCO_STUFF_171_IDS

    if transform == "cocostuff171":
        lut = np.full(256, IGNORE_INDEX, np.int64)
        for label, cat_id in enumerate(COCO_STUFF_171_IDS):
            lut[cat_id - 1] = label
    elif transform == "cityscapes19":
        lut = np.full(256, IGNORE_INDEX, np.int64)
        for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
            lut[label_id] = train_id
    else:
        return None
    if int(lut[lut != IGNORE_INDEX].max()) >= n_classes:
        raise ValueError(f"tasks.label_transform={transform} gives labels up to {int(lut[lut != IGNORE_INDEX].max())} "
                         f"but the label space has {n_classes} classes")
    return lut


class GroundTruth:
    """Dataset masks and folders -> labels of a `LabelSpace`."""

    def __init__(self, dataset, space: LabelSpace, label_transform: str = "none") -> None:
        self.dataset, self.space, self.transform = dataset, space, label_transform
        n = len(space.names)
        self.coco_lut: np.ndarray | None = None
        if dataset.kind == "coco":
            if label_transform != "none":
                raise ValueError(f"tasks.label_transform={label_transform} applies to PNG masks; COCO annotations are "
                                 "mapped by category name")
            if len(dataset.class_names) >= IGNORE_INDEX:
                raise ValueError(f"{len(dataset.class_names)} COCO categories do not fit beside the ignore index")
            index = {name.lower(): i for i, name in enumerate(space.names) if i >= space.offset}
            lut = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, np.int64)
            for pos, name in enumerate(dataset.class_names):
                lut[pos] = index.get(name.lower(), IGNORE_INDEX)
            if not (lut[: len(dataset.class_names)] != IGNORE_INDEX).any():
                raise ValueError(f"no COCO category of {dataset.annotations} is in the label space {space.names[:8]}...: "
                                 "check tasks.classes")
            lut[IGNORE_INDEX] = 0 if space.background else IGNORE_INDEX  # unannotated pixels
            self.coco_lut = lut
        self.png_lut = _png_lut(label_transform, n) if dataset.kind != "coco" else None
        self.fg_index = {name.lower(): i for i, name in enumerate(space.fg_names)}

    def labels(self, record) -> np.ndarray | None:
        """(H, W) labels, IGNORE_INDEX where unlabelled; None when the record has no mask."""
        raw = self.dataset.semantic_mask(record)
        if raw is None:
            return None
        raw = np.asarray(raw, dtype=np.int64)
        if self.coco_lut is not None:
            return self.coco_lut[raw]
        if self.png_lut is not None:
            if raw.max(initial=0) >= len(self.png_lut):
                raise ValueError(f"mask {record.mask_path} has value {int(raw.max())}, outside the "
                                 f"{self.transform} mapping")
            return self.png_lut[raw]
        if self.transform == "reduce_zero":
            raw = np.where(raw == 0, IGNORE_INDEX, np.where(raw == IGNORE_INDEX, IGNORE_INDEX, raw - 1))
        n = len(self.space.names)
        bad = (raw != IGNORE_INDEX) & ((raw < 0) | (raw >= n))
        if bad.any():
            raise ValueError(f"mask {record.mask_path} has label {int(raw[bad][0])}, but the label space has {n} "
                             f"classes (0..{n - 1}, {IGNORE_INDEX} ignored): check tasks.classes / tasks.label_transform")
        return raw

    def class_label(self, record, gt_hw: np.ndarray | None) -> int | None:
        """Image-level foreground class index: dominant foreground label by area, or the class folder."""
        if gt_hw is not None:
            valid = gt_hw[(gt_hw != IGNORE_INDEX) & (gt_hw >= self.space.offset)]
            if valid.size == 0:
                return None
            return int(np.bincount(valid).argmax()) - self.space.offset
        name = _folder_class(record.image_id)
        return self.fg_index.get(name.lower()) if name else None


def select_records(dataset, split: str | None) -> list:
    """The dataset's records, restricted to the ids listed in ``split`` when given."""
    records = list(dataset.records)
    if not split:
        return records
    path = Path(split)
    if not path.is_absolute() and dataset.root and not path.is_file():
        path = Path(dataset.root) / split
    if not path.is_file():
        raise FileNotFoundError(f"tasks.split: no id list at {path}")
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    by_id = {r.image_id: r for r in records}
    by_stem = {Path(r.image_id).name: r for r in records}
    picked, missing = [], []
    for w in wanted:
        r = by_id.get(w) or by_stem.get(Path(w).name)
        (picked if r is not None else missing).append(r if r is not None else w)
    if missing:
        log.warning("tasks.split: %d of %d ids have no image/mask in the dataset (e.g. %s)", len(missing), len(wanted),
                    ", ".join(missing[:3]))
    if not picked:
        raise ValueError(f"tasks.split {path}: none of its {len(wanted)} ids is in the dataset")
    return picked
