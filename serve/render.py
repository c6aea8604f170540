"""Model outputs -> JSON-ready answers: heatmaps packed into one array, as PNGs, or raw; label maps.

Heatmaps are one pixel per patch (the model's own resolution); a client
scales them over the answer's ``view`` box (the page lets the browser smooth
them). By default all of an answer's heatmaps travel as one packed array:
each map divided by its own peak and quantised to uint8, base64 of the
(k, H, W) bytes, with the per-concept scale back to activations. That is
what the PNGs show, without eight PNG encodes per answer (milliseconds on a
busy CPU, more than a small model's whole forward pass). On request each is
an RGBA PNG coloured by the same 8-bit level, with alpha rising with
activation, so it can be laid straight over the image.
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


def levels(maps_khw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 levels (k, H, W), peaks (k,)): each map over its own peak, 0..255; an all-zero map is all 0."""
    maps = np.asarray(maps_khw, dtype=np.float32)
    peaks = maps.max(axis=(1, 2)) if maps.size else np.zeros(maps.shape[0], np.float32)
    safe = np.where(peaks > 0, peaks, 1.0).astype(np.float32)
    v = np.clip(maps / safe[:, None, None], 0.0, 1.0)
    return np.rint(v * 255.0).astype(np.uint8), np.maximum(peaks, 0.0)


def packed_heatmaps(maps_khw: np.ndarray) -> dict[str, Any]:
    """All heatmaps of an answer as one array: activation ~= level * scale[j] (within scale[j] / 2).

    ``data`` is base64 of the (k, H, W) uint8 levels in C order, ``heatmaps[j]`` belongs to
    ``concepts[j]``; its size is exactly k * H * W bytes (k <= serve.max_top_k, H x W the grid).
    """
    q, peaks = levels(maps_khw)
    return {"dtype": "uint8", "shape": list(q.shape), "scale": [float(p) / 255.0 for p in peaks],
            "data": base64.b64encode(q.tobytes()).decode("ascii")}


def unpack_heatmaps(packed: dict[str, Any]) -> np.ndarray:
    """float32 (k, H, W) activations from :func:`packed_heatmaps`' dict (what a Python client does)."""
    q = np.frombuffer(base64.b64decode(packed["data"]), dtype=np.uint8).reshape(packed["shape"])
    return q.astype(np.float32) * np.asarray(packed["scale"], dtype=np.float32)[:, None, None]


def heatmap_png(map_hw: np.ndarray) -> str:
    """An RGBA PNG (base64) of one activation map, coloured by its level over its own peak (:func:`levels`)."""
    idx = levels(map_hw[None])[0][0]
    rgba = np.empty(map_hw.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = _lut()[idx]
    rgba[..., 3] = (np.sqrt(idx / 255.0) * 210).round().astype(np.uint8)
    return png_b64(Image.fromarray(rgba))


def explain_answer(raw: ExplainRaw, fmt: str) -> list[dict[str, Any]]:
    """The ``concepts`` list of a /v1/explain answer (``packed``: the maps go in :func:`packed_heatmaps`)."""
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
        elif fmt == "png":
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
