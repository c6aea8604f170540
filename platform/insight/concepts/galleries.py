"""Concept galleries: top-activating image crops with the concept's heatmap, and contact sheets.

For each selected concept (the ``gallery_per_group`` most frequent of every
Matryoshka group: big models have too many concepts to draw them all), one PNG
shows its top patches: the image crop the backbone saw, the concept's
activation map over the patch grid overlaid as a heatmap (upsampled
bilinearly), and a box on the top patch. Contact sheets show the single best
crop of the most frequent concepts, one row per hierarchy level
(``contact_levels.png``) and one row per Matryoshka group
(``contact_groups.png``).

Heatmaps come from the statistics pass, which keeps each concept's map over
the image of its first top patches, so drawing needs no second pass over the
cache. Pixels are re-read by image id from the dataset of the model's config and cut
the way extraction cuts them for view 0 (shortest side resized, centre crop),
so the grid lines up with the features. Augmented views (ids ending in
``#vN``) came from random crops, flips and colour jitter: their panels show the
plain image of the base id with the view's heatmap, which is only approximately
aligned; the caption marks them "(plain)". When images are unavailable (an imported cache,
a dataset that is gone, an unreadable file) the heatmap is drawn on the bare
patch grid instead.

Rendering uses PIL directly (one composed image per PNG): matplotlib figures
cost ~10x more per gallery and a big model has hundreds of them.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from insight.atomic import write_atomic
from insight.concepts.table import Concept, ConceptTable

if TYPE_CHECKING:
    from insight.cache.format import CacheReader

log = logging.getLogger(__name__)

PANEL = 160  # pixels per crop
CAPTION = 30  # pixels of text under a crop
TITLE = 40


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def gallery_name(concept_id: int) -> str:
    """The file name of a concept's gallery inside ``galleries/``: the one place that knows it
    (the concepts step writes it, the server reads it)."""
    return f"concept-{int(concept_id):05d}.png"


def base_id(image_id: str) -> tuple[str, int]:
    """('img', 0) for a plain id, ('img', 3) for an augmented view 'img#v3'."""
    if "#v" in image_id:
        base, _, view = image_id.rpartition("#v")
        if view.isdigit():
            return base, int(view)
    return image_id, 0


def plain_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """View-0 geometry of extraction: shortest side to ``size`` (bicubic), centre square crop."""
    h, w = rgb.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    im = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


class ImageSource:
    """Image crops by cache image id, from the dataset of the model's config (None when unavailable)."""

    def __init__(self, model_cfg: Any, reader: CacheReader) -> None:
        self.paths: dict[str, str] = {}
        self.reason = ""
        self._crops: dict[str, np.ndarray | None] = {}
        identity = reader.manifest.identity if isinstance(reader.manifest.identity, dict) else {}
        if identity.get("kind") == "import":
            self.reason = "imported cache: no source images"
            return
        try:
            from insight.data.datasets import build_dataset

            ds = build_dataset(model_cfg.data, model_cfg.workdir)
            self.paths = {r.image_id: r.path for r in ds.records}
        except (OSError, ValueError) as exc:
            self.reason = f"dataset unavailable: {exc}"
            log.warning("galleries: %s; drawing heatmaps on the patch grid", self.reason)

    def crop(self, image_id: str, size: int = PANEL) -> np.ndarray | None:
        base, _ = base_id(image_id)
        if base not in self.paths:
            return None
        if base not in self._crops:
            from insight.data.datasets import load_image

            rgb, _why = load_image(self.paths[base])
            self._crops[base] = None if rgb is None else plain_crop(rgb, size)
        return self._crops[base]


def _heat_rgb(map_hw: np.ndarray, vmax: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour (size, size, 3) and alpha (size, size) of an activation map, upsampled bilinearly."""
    from matplotlib import colormaps

    norm = np.clip(map_hw / max(vmax, 1e-12), 0, 1).astype(np.float32)
    up = np.asarray(Image.fromarray(norm).resize((size, size), Image.Resampling.BILINEAR))
    up = np.clip(up, 0, 1)
    rgb = (colormaps["inferno"](up)[..., :3] * 255).astype(np.float32)
    return rgb, up


def panel(crop: np.ndarray | None, map_hw: np.ndarray, vmax: float, cell: tuple[int, int] | None,
          size: int = PANEL) -> Image.Image:
    """One crop with the heatmap blended in (or the heatmap alone) and a box on ``cell``."""
    heat, alpha = _heat_rgb(map_hw, vmax, size)
    if crop is None:
        out = heat
    else:
        a = (0.15 + 0.6 * alpha)[..., None]
        out = crop.astype(np.float32) * (1 - a) + heat * a
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if cell is not None:
        h, w = map_hw.shape
        r, c = cell
        draw = ImageDraw.Draw(im)
        draw.rectangle([c * size / w, r * size / h, (c + 1) * size / w - 1, (r + 1) * size / h - 1],
                       outline=(0, 230, 255), width=2)
    return im


def _save_png(im: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)  # level 9 (optimize) costs 10x the time for ~15% bytes
    return write_atomic(path, buf.getvalue())


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _card_label(table: ConceptTable, cid: int) -> str:
    """``#id`` then the distinct label (`ConceptTable.label`), so a cut-short card still tells concepts apart."""
    label = table.label(cid)
    return f"#{cid} " + (label[: -len(f" #{cid}")] if label.endswith(f" #{cid}") else label)


@dataclass
class GalleryPlan:
    galleries: list[int]  # concepts with their own PNG
    level_rows: list[tuple[int, list[int]]]  # (level, concepts) of the level contact sheet
    group_rows: list[tuple[int, list[int]]]  # (group, concepts) of the group contact sheet


def plan(table: ConceptTable, per_group: int, per_row: int, max_rows: int = 8) -> GalleryPlan:
    """Which concepts get drawn: the most frequent per group, per level row (alias classes) and per group row."""
    groups = sorted({c.group for c in table})
    galleries = []
    for g in groups:
        galleries += [c.id for c in table.in_group(g) if c.alive][:per_group]
    levels = sorted({c.level for c in table if c.level >= 0})[:max_rows]
    # one card per alias class: its members share the level and fire on the same patches
    level_rows = [(lv, [c.id for c in table.at_level(lv) if c.is_representative][:per_row]) for lv in levels]
    group_rows = [(g, [c.id for c in table.in_group(g) if c.alive][:per_row]) for g in groups[:max_rows]]
    return GalleryPlan(galleries, [r for r in level_rows if r[1]], [r for r in group_rows if r[1]])


def draw_galleries(table: ConceptTable, top_map: Callable[[int, int], np.ndarray | None], reader: CacheReader,
                   model_cfg: Any, out_dir: str | os.PathLike[str], *, per_group: int = 8, images: int = 8,
                   per_row: int = 10, columns: int = 4) -> dict[str, Any]:
    """Write ``concept-<id>.png`` galleries and the two contact sheets into ``out_dir``.

    ``top_map(concept, rank)``: the concept's activation map (H, W) over the
    image of its rank-th top patch, kept by the statistics pass
    (`ConceptStats.top_map`, with ``map_top >= images``).
    """
    out = Path(out_dir)
    p = plan(table, per_group, per_row)
    source = ImageSource(model_cfg, reader)
    font, small = _font(13), _font(10)
    written: list[str] = []
    with_images = 0

    def cell_image(c: Concept, k: int) -> tuple[Image.Image, str]:
        nonlocal with_images
        tp = c.top_patches[k]
        crop = source.crop(tp.image_id)
        with_images += crop is not None
        vmax = c.top_patches[0].activation
        map_hw = top_map(c.id, k)
        if map_hw is None:
            raise ValueError(f"galleries: no activation map kept for concept {c.id}, top patch {k} "
                             "(the pass ran with fewer map_top than gallery images)")
        im = panel(crop, np.asarray(map_hw, np.float32), vmax, (tp.row, tp.col))
        note = "" if base_id(tp.image_id)[1] == 0 or crop is None else " (plain)"
        return im, f"{_short(tp.image_id, 18)} ({tp.row},{tp.col}) {tp.activation:.2f}{note}"

    for cid in p.galleries:
        c = table[cid]
        n = min(images, len(c.top_patches))
        cols = min(columns, n)
        rows = (n + cols - 1) // cols
        sheet = Image.new("RGB", (cols * PANEL + (cols + 1) * 6, TITLE + rows * (PANEL + CAPTION) + 6), "white")
        draw = ImageDraw.Draw(sheet)
        parents = ", ".join(table.label(q) for q in c.parents[:3]) or "none (root)"
        draw.text((6, 4), _short(f"#{c.id} {table.label(c.id)}  (group {c.group}, level {c.level}, "
                                 f"{100 * c.frequency:.3f}% of patches, by {c.naming})", 90), fill="black", font=font)
        draw.text((6, 22), _short(f"parents: {parents};  candidates: "
                                  + ", ".join(f"{x.name} {x.score:.2f}" for x in c.candidates), 110),
                  fill=(70, 70, 70), font=small)
        for k in range(n):
            im, cap = cell_image(c, k)
            x = 6 + (k % cols) * (PANEL + 6)
            y = TITLE + (k // cols) * (PANEL + CAPTION)
            sheet.paste(im, (x, y))
            draw.text((x, y + PANEL + 2), _short(cap, 34), fill="black", font=small)
        written.append(str(_save_png(sheet, out / gallery_name(cid))))

    def contact(rows: list[tuple[int, list[int]]], what: str, path: Path) -> str | None:
        if not rows:
            return None
        width = max(len(r) for _, r in rows)
        label_w = 70
        sheet = Image.new("RGB", (label_w + width * (PANEL + 6) + 6, TITLE + len(rows) * (PANEL + CAPTION + 8)),
                          "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((6, 10), f"Most frequent concepts per {what} (best patch, heatmap of the concept)", fill="black",
                  font=font)
        for r, (key, ids) in enumerate(rows):
            y = TITLE + r * (PANEL + CAPTION + 8)
            draw.text((6, y + PANEL // 2), f"{what} {key}", fill="black", font=font)
            for k, cid in enumerate(ids):
                c = table[cid]
                if not c.top_patches:
                    continue
                im, _ = cell_image(c, 0)
                x = label_w + k * (PANEL + 6)
                sheet.paste(im, (x, y))
                draw.text((x, y + PANEL + 2), _short(_card_label(table, c.id), 26), fill="black", font=small)
                draw.text((x, y + PANEL + 14), f"{100 * c.frequency:.2f}%", fill=(90, 90, 90), font=small)
        return str(_save_png(sheet, path))

    levels_png = contact(p.level_rows, "level", out / "contact_levels.png")
    groups_png = contact(p.group_rows, "group", out / "contact_groups.png")
    return {"galleries": written, "contact_levels": levels_png, "contact_groups": groups_png,
            "panels_with_images": with_images, "images_note": source.reason or None}
