"""The encoder protocol every backbone implements.

Anything that maps images to a (B, H, W, D) grid of patch vectors and strings to
(N, D) text vectors in the same space can drive the pipeline: the cache, the
SAE and the concept steps only ever see these two tensors.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Backbone(Protocol):
    dim: int  # D of the joint space
    image_size: int  # square input side the preprocessing produces
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def encode_patches(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> patch vectors (B, S/p, S/p, D), float32."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Strings -> unit-norm text vectors (N, D), float32."""
        ...

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features, for the cache address."""
        ...


def finish_patches(feats: torch.Tensor, patch_norm: str) -> torch.Tensor:
    """Apply ``backbone.patch_norm`` to a backbone's (..., D) patch vectors.

    ``unit`` scales every patch to length 1. The SAE's squared error weighs a
    patch by its squared norm; where norms spread widely (the offline
    backbone's class distributions: a factor of ten between a patch the
    classifier has no opinion on and a confident one) it then reconstructs
    the strong patches and leaves the faint half almost unexplained, and
    BatchTopK gives faint patches fewer concepts. Every consumer that
    compares patches with text uses cosine, which the scaling leaves alone.
    """
    if patch_norm == "none":
        return feats
    if patch_norm == "unit":
        return feats / torch.linalg.vector_norm(feats, dim=-1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"backbone.patch_norm must be none or unit, got {patch_norm!r}")


def patch_identity(ident: dict[str, Any], patch_norm: str) -> dict[str, Any]:
    """A backbone's identity with its patch scaling (absent for ``none``: older caches keep their address)."""
    return ident if patch_norm == "none" else {**ident, "patch_norm": patch_norm}


def text_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """What of a backbone's identity determines its text vectors: all of it but the patch scaling."""
    return {k: v for k, v in ident.items() if k != "patch_norm"}


def embed_classnames(
    backbone: Backbone, names: list[str], templates: list[str], batch: int = 256
) -> torch.Tensor:
    """Average each name over prompt templates, renormalised: (N, D) unit vectors."""
    if not names:
        raise ValueError("no class names to embed")
    prompts = [t.format(n) for n in names for t in templates]
    chunks = [backbone.encode_text(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    text_ptd = torch.cat(chunks).reshape(len(names), len(templates), -1)
    text_ptd = torch.nn.functional.normalize(text_ptd, dim=-1)
    return torch.nn.functional.normalize(text_ptd.mean(1), dim=-1)
