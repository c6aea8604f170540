"""One dataset interface over COCO, plain folders, VOC pairs and bundled samples.

A dataset is a list of `ImageRecord`s (id, path, optional mask source) plus class
names; pixels are read lazily by `load_image`, which reports failures instead of
raising, so one unreadable file never takes a whole job down.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    path: str
    mask_path: str | None = None  # VOC-style PNG with class indices
    coco_id: int | None = None  # COCO image id (masks come from annotations)


@dataclass
class ImageDataset:
    kind: str
    root: str
    records: list[ImageRecord]
    class_names: list[str] = field(default_factory=list)
    annotations: str | None = None
    ignore_index: int = 255
    bundled: bool = False  # the packaged samples: rewritten per workdir, identified by content

    def __len__(self) -> int:
        return len(self.records)

    def identity(self) -> dict:
        """What determines the images: kind, root and the listing (ids, sizes, mtimes)."""
        import hashlib

        h = hashlib.sha256()
        for r in self.records:
            try:
                if self.bundled:  # rewritten per workdir: hash content, not mtimes
                    h.update(f"{r.image_id}|{hashlib.sha256(Path(r.path).read_bytes()).hexdigest()}\n".encode())
                    continue
                st = Path(r.path).stat()
                h.update(f"{r.image_id}|{st.st_size}|{int(st.st_mtime)}\n".encode())
            except OSError:
                h.update(f"{r.image_id}|missing\n".encode())
        root = "<bundled samples>" if self.bundled else str(Path(self.root).resolve())
        return {"kind": self.kind, "root": root, "listing": h.hexdigest(),
                "count": len(self.records)}

    def semantic_mask(self, record: ImageRecord) -> np.ndarray | None:
        """Per-pixel class index (H, W) int64, ``ignore_index`` where unlabelled."""
        if record.mask_path is not None:
            mask = np.asarray(Image.open(record.mask_path))
            if mask.ndim == 3:
                raise ValueError(f"mask {record.mask_path} must be a palette/grey PNG of indices")
            return mask.astype(np.int64)
        if record.coco_id is not None and self.annotations:
            from insight.data.coco import coco_semantic_mask

            return coco_semantic_mask(self.annotations, record.coco_id, self.class_names, self.ignore_index)
        return None


def load_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """RGB uint8 (H, W, 3), or (None, reason) for a missing/unreadable/truncated file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # forces a full decode: truncated files fail here
                return np.asarray(im.convert("RGB")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return None, f"unreadable: {exc}"


def folder_dataset(root: str) -> ImageDataset:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data.root: no folder at {base}")
    paths = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    records = [ImageRecord(str(p.relative_to(base).with_suffix("")), str(p)) for p in paths]
    return ImageDataset("folder", str(base), records)


def voc_dataset(root: str, masks: str | None = None) -> ImageDataset:
    from insight.data.classes import VOC_CLASSES

    base = Path(root)
    img_dir = base / "JPEGImages" if (base / "JPEGImages").is_dir() else base
    mask_dir = Path(masks) if masks else base / "SegmentationClass"
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"data.masks: no mask folder at {mask_dir}")
    records = []
    for mask in sorted(mask_dir.glob("*.png")):
        img = next((img_dir / f"{mask.stem}{s}" for s in (".jpg", ".jpeg", ".png")
                    if (img_dir / f"{mask.stem}{s}").exists()), img_dir / f"{mask.stem}.jpg")
        records.append(ImageRecord(mask.stem, str(img), mask_path=str(mask)))
    if not records:
        raise ValueError(f"data.masks: no PNG masks in {mask_dir}")
    return ImageDataset("voc", str(base), records, class_names=list(VOC_CLASSES))


def build_dataset(cfg, workdir: str) -> ImageDataset:
    """Build the configured dataset (``cfg`` is a DataConfig)."""
    if cfg.kind == "folder":
        ds = folder_dataset(cfg.root)
    elif cfg.kind == "voc":
        ds = voc_dataset(cfg.root, cfg.masks)
    elif cfg.kind == "coco":
        from insight.data.coco import coco_dataset

        ds = coco_dataset(cfg.annotations, cfg.root)
    elif cfg.kind == "samples":
        from insight.data.coco import coco_dataset
        from insight.data.samples import write_samples

        ann, images = write_samples(Path(workdir) / "data" / "samples")
        ds = coco_dataset(str(ann), str(images))
        ds.bundled = True  # a COCO dataset like any other, with a content-based identity
    else:  # pragma: no cover - the schema forbids it
        raise ValueError(f"unknown data.kind {cfg.kind!r}")
    if cfg.max_images is not None:
        ds.records = ds.records[: cfg.max_images]
    return ds
