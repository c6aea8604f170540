"""Model outputs -> JSON-ready answers: heatmap and label-map PNGs as base64, or raw arrays.

Heatmaps are one pixel per patch (the model's own resolution); a client
scales them over the answer's ``view`` box (the page lets the browser smooth
them). Each is coloured by its own peak, with alpha rising with activation,
so it can be laid straight over the image.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from serve.common import ExplainRaw


@lru_cache(maxsize=1)
def _lut() -> np.ndarray:
    """(256, 3) uint8 'inferno' colours (matplotlib is a dependency; computed once)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_png(map_hw: np.ndarray) -> str:
    """An RGBA PNG (base64) of one activation map, normalised by its own peak."""
    peak = float(map_hw.max())
    v = np.clip(map_hw / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(map_hw)
    idx = (v * 255).round().astype(np.uint8)
    rgba = np.empty(map_hw.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = _lut()[idx]
    rgba[..., 3] = (np.sqrt(v) * 210).round().astype(np.uint8)
    return png_b64(Image.fromarray(rgba))


def explain_answer(raw: ExplainRaw, fmt: str) -> list[dict[str, Any]]:
    """The ``concepts`` list of a /v1/explain answer."""
    out = []
    for j, ref in enumerate(raw.concepts):
        item: dict[str, Any] = {
            **ref,
            "score": round(float(raw.scores[j]), 6),
            "mean": round(float(raw.means[j]), 6),
            "area": round(float(raw.areas[j]), 6),
        }
        if fmt == "raw":
            item["heatmap"] = np.round(raw.maps[j], 6).tolist()
        else:
            item["heatmap_png"] = heatmap_png(raw.maps[j])
        out.append(item)
    return out


# A palette that stays distinguishable for the first classes; later ones are hashed colours.
_BASE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def palette(n: int) -> list[tuple[int, int, int]]:
    out = list(_BASE[:n])
    rng = np.random.default_rng(12345)
    while len(out) < n:
        out.append(tuple(int(c) for c in rng.integers(40, 256, 3)))
    return out


def label_map_png(labels_hw: np.ndarray, n_classes: int, background: int | None = None) -> str:
    """A palette PNG whose pixel values are class indices (``background`` drawn black).

    More than 256 classes do not fit a palette: the map is then a 16-bit grey PNG of indices.
    """
    if n_classes > 256:
        return png_b64(Image.fromarray(labels_hw.astype(np.uint16)))
    img = Image.fromarray(labels_hw.astype(np.uint8))  # L; putpalette makes it P
    colours = palette(n_classes)
    if background is not None and 0 <= background < 256:
        while len(colours) <= background:
            colours.append((0, 0, 0))
        colours[background] = (0, 0, 0)
    img.putpalette([c for rgb in colours for c in rgb])
    return png_b64(img)
