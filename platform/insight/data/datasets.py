"""One dataset interface over COCO, plain folders, VOC pairs and bundled samples.

A dataset is a list of `ImageRecord`s (id, path, optional mask source) plus class
names; pixels are read lazily by `load_image`, which reports failures instead of
raising, so one unreadable file never takes a whole job down.

A folder may also be object storage: ``data.root: s3://bucket/images`` (or any
pyarrow URI, gs://, file://) is listed once by the driver and every image is read
by its URI on whichever node decodes it, so a cluster needs no copy of the images
on a shared volume.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from insight.data.coco import coco_images, coco_semantic_mask

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
    listing: dict[str, tuple[int, int]] = field(default_factory=dict)  # URI -> (size, mtime) of object storage

    def __len__(self) -> int:
        return len(self.records)

    def identity(self) -> dict:
        """What determines the images: kind, root and the listing (ids, sizes, mtimes)."""
        import hashlib

        from insight.cache.format import file_sha256

        h = hashlib.sha256()
        for r in self.records:
            try:
                if self.bundled:  # rewritten per workdir: hash content, not mtimes
                    h.update(f"{r.image_id}|{file_sha256(r.path)}\n".encode())
                    continue
                if r.path in self.listing:  # object storage: size and mtime from the one listing
                    size, mtime = self.listing[r.path]
                    h.update(f"{r.image_id}|{size}|{mtime}\n".encode())
                    continue
                st = Path(r.path).stat()
                h.update(f"{r.image_id}|{st.st_size}|{int(st.st_mtime)}\n".encode())
            except OSError:
                h.update(f"{r.image_id}|missing\n".encode())
        root = "<bundled samples>" if self.bundled else self.root if _is_uri(self.root) else str(Path(self.root).resolve())
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
            return coco_semantic_mask(self.annotations, record.coco_id, self.class_names, self.ignore_index)
        return None


def _is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, host: str):
    """One pyarrow filesystem per scheme://host (an S3 client is costly to create per image)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{host}/")[0]


def _open(path: str):
    """A local path as is; a URI (s3://bucket/key, file:///abs) as its bytes, read through pyarrow."""
    if not _is_uri(path):
        return path
    import io

    scheme, rest = path.split("://", 1)
    host, _, key = rest.partition("/")
    with _filesystem(scheme, host).open_input_stream(f"{host}/{key}" if host else f"/{key}") as f:
        return io.BytesIO(f.read())


def load_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """RGB uint8 (H, W, 3), or (None, reason) for a missing/unreadable/truncated file (or URI)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_open(path)) as im:
                im.load()  # forces a full decode: truncated files fail here
                return np.asarray(im.convert("RGB")), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return None, f"unreadable: {exc}"


def folder_dataset(root: str) -> ImageDataset:
    if _is_uri(root):
        return _object_folder_dataset(root)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data.root: no folder at {base}")
    paths = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {base}")
    records = [ImageRecord(str(p.relative_to(base).with_suffix("")), str(p)) for p in paths]
    return ImageDataset("folder", str(base), records)


def _object_folder_dataset(root: str) -> ImageDataset:
    """Every image under a URI prefix (s3://bucket/images), listed once; ids are the relative paths."""
    import pyarrow.fs as pafs

    scheme = root.split("://", 1)[0]
    try:
        fs, base = pafs.FileSystem.from_uri(root.rstrip("/"))
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"data.root: cannot list {root}: {exc}") from None
    listing, records = {}, []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or Path(info.path).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        uri = f"{scheme}://{info.path}"
        rel = info.path[len(base):].lstrip("/")
        records.append(ImageRecord(str(Path(rel).with_suffix("")), uri))
        listing[uri] = (int(info.size or 0), int(info.mtime_ns or 0) // 10**9)
    if not records:
        raise ValueError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return ImageDataset("folder", root, records, listing=listing)


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


def coco_dataset(annotations: str, root: str) -> ImageDataset:
    """A COCO-format dataset: images of the annotation file under ``root``, masks from its annotations."""
    images, class_names = coco_images(annotations, root)
    records = [ImageRecord(image_id, path, coco_id=coco_id) for image_id, path, coco_id in images]
    return ImageDataset("coco", str(Path(root)), records, class_names=class_names,
                        annotations=str(Path(annotations).resolve()))


def build_dataset(cfg, workdir: str) -> ImageDataset:
    """Build the configured dataset (``cfg`` is a DataConfig)."""
    if cfg.kind == "folder":
        ds = folder_dataset(cfg.root)
    elif cfg.kind == "voc":
        ds = voc_dataset(cfg.root, cfg.masks)
    elif cfg.kind == "coco":
        ds = coco_dataset(cfg.annotations, cfg.root)
    elif cfg.kind == "samples":
        from insight.data.samples import write_samples

        ann, images = write_samples(Path(workdir) / "data" / "samples")
        ds = coco_dataset(str(ann), str(images))
        ds.bundled = True  # a COCO dataset like any other, with a content-based identity
    else:  # pragma: no cover - the schema forbids it
        raise ValueError(f"unknown data.kind {cfg.kind!r}")
    if cfg.max_images is not None:
        ds.records = ds.records[: cfg.max_images]
    return ds
