"""Backbones: dense language-aligned patch features behind one protocol."""

from __future__ import annotations

from insight.backbones.base import Backbone, embed_classnames

__all__ = ["Backbone", "build_backbone", "embed_classnames"]


def build_backbone(cfg, device: str | None = None) -> Backbone:
    """Build the configured backbone (``cfg`` is a BackboneConfig)."""
    if cfg.kind == "openclip":
        from insight.backbones.openclip import OpenCLIPBackbone

        return OpenCLIPBackbone(cfg, device=device)
    raise ValueError(f"unknown backbone.kind {cfg.kind!r}")
