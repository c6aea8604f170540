"""HTTP schemas: JSON request bodies (validated strictly) and the documented answers.

Request models forbid unknown fields, so a typo (``imgae_b64``) is a 422 that
names the field instead of a silently ignored option. Answer models exist
for the OpenAPI document (/docs, /openapi.json); handlers build plain dicts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExplainBody(_Body):
    image_b64: str = Field(..., description="The image (PNG, JPEG, WebP, GIF, BMP, TIFF) as base64 or a data: URL.")
    top_k: int | None = Field(None, description="How many concepts (default 8, at most serve.max_top_k).")
    format: Literal["packed", "png", "raw"] | None = Field(
        None, description="packed (default): all heatmaps as one base64 uint8 array (`heatmaps`); png: a base64 "
        "PNG per concept; raw: float arrays per concept.")


class SegmentBody(_Body):
    image_b64: str = Field(..., description="The image as base64 or a data: URL.")
    classes: list[str] = Field(..., description="Class names, 1 to serve.max_classes.")
    top_k: int | None = Field(None, description="Concepts listed per segment (default 5).")
    format: Literal["png", "raw"] | None = Field(None, description="png: label map as base64 PNG; raw: an array.")


class ClassifyBody(_Body):
    image_b64: str = Field(..., description="The image as base64 or a data: URL.")
    classes: list[str] | None = Field(None, description="Class names for zero-shot; omit to use the model's probe.")
    top_k: int | None = Field(None, description="Concepts listed per class (default 5).")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorAnswer(BaseModel):
    error: ErrorDetail


class ConceptRef(BaseModel):
    id: int
    name: str | None = Field(None, description="Null when the model has no concept table.")
    label: str = Field(..., description="What to show: the name, told apart from other concepts with the same name"
                       " ('name (next candidate)' or 'name #id'); '#id' when unnamed.")
    level: int


class ExplainedConcept(ConceptRef):
    path: list[ConceptRef] = Field(..., description="Root .. this concept along the strongest parents.")
    score: float = Field(..., description="Peak activation over the patches.")
    mean: float
    area: float = Field(..., description="Fraction of patches where it fires.")
    heatmap_png: str | None = Field(None, description="format=png: RGBA PNG, base64, one pixel per patch, over `view`.")
    heatmap: list[list[float]] | None = Field(None, description="format=raw: activations on the patch grid.")


class PackedHeatmaps(BaseModel):
    dtype: Literal["uint8"]
    shape: list[int] = Field(..., description="[k, H, W]: one map per listed concept, in the order of `concepts`.")
    scale: list[float] = Field(..., description="Per concept: activation = level * scale (each map's peak / 255).")
    data: str = Field(..., description="base64 of the k*H*W uint8 levels, C order.")


class ExplainAnswer(BaseModel):
    model: dict[str, Any]
    image: dict[str, Any] = Field(..., description="width, height, format of the upload.")
    view: dict[str, float] = Field(..., description="x, y, width, height: the square the model saw, in image pixels.")
    grid: list[int]
    format: str
    concepts: list[ExplainedConcept]
    heatmaps: PackedHeatmaps | None = Field(None, description="format=packed (the default): every concept's heatmap.")
    fidelity: dict[str, float] = Field(..., description="How well the concepts reconstruct this view: mean per-patch "
                                       "cosine(x, x^), FVU and active concepts per patch (l0); val_cosine/val_fvu: "
                                       "the same on images held out from training.")
    timing_ms: dict[str, float]


class ConceptPage(BaseModel):
    total: int
    offset: int
    limit: int
    named: bool
    items: list[dict[str, Any]]


class HealthAnswer(BaseModel):
    status: str = Field(..., description="ok: the server is alive (nothing else: the route needs no key).")
