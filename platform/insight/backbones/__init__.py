"""Backbones: dense language-aligned patch features behind one protocol."""

from __future__ import annotations

import logging
import os

from insight.backbones.base import Backbone, embed_classnames

__all__ = ["Backbone", "build_backbone", "embed_classnames", "openclip_weights_local", "resolve_auto"]

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def hf_offline() -> bool:
    """True when Hugging Face downloads are switched off (HF_HUB_OFFLINE set truthy)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def openclip_weights_local(model: str, tag: str) -> tuple[bool, str]:
    """Whether open_clip would find the weights of ``model``/``tag`` without a download, and where.

    Mirrors open_clip's own lookup: the Hugging Face cache when the tag names a hub
    repo (open_clip prefers the hub, a .safetensors twin first), else its URL
    cache in ~/.cache/clip.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    pcfg = open_clip.get_pretrained_cfg(model, tag)
    if not pcfg:
        return False, f"open_clip has no pretrained tag {tag!r} for model {model!r}"
    if pcfg.get("file"):
        found = os.path.isfile(pcfg["file"])
        return found, f"file {pcfg['file']} {'exists' if found else 'is missing'}"
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            hub = ""
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return True, f"found in the Hugging Face cache: {hit}"
        return False, f"hf-hub:{repo} ({' or '.join(names)}) is not in the local Hugging Face cache"
    url = pcfg.get("url", "")
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        found = os.path.isfile(target)
        return found, f"{target} {'exists' if found else 'is not in the open_clip cache'}"
    return False, f"open_clip's config for {model}/{tag} names no weights"


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Can a TCP connection reach the Hugging Face endpoint? One quick try, so a machine without
    network falls back at once instead of sitting through the hub client's download retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port} reachable"
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc.strerror or exc})"


def resolve_auto(cfg) -> tuple[str, str]:
    """``backbone.kind: auto`` -> ("openclip" | "offline" | "download", why), without building anything."""
    pretrained = cfg.pretrained
    if pretrained is None or pretrained.strip().lower() in ("", "none", "null", "random"):
        return "openclip", f"backbone.pretrained is null: random-init {cfg.model} as configured"
    if os.path.isfile(pretrained):
        return "openclip", f"checkpoint file {pretrained} exists"
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        return "offline", f"checkpoint file {pretrained} does not exist"
    found, where = openclip_weights_local(cfg.model, pretrained)
    if found:
        return "openclip", f"{cfg.model}/{pretrained} weights {where}"
    if hf_offline():
        return "offline", f"{cfg.model}/{pretrained}: {where}, and HF_HUB_OFFLINE is set, so no download is tried"
    online, how = hub_reachable()
    if not online:
        return "offline", f"{cfg.model}/{pretrained}: {where}, and {how}, so no download is tried"
    return "download", f"{cfg.model}/{pretrained}: {where}; {how}, trying a download"


def build_backbone(cfg, device: str | None = None) -> Backbone:
    """Build the configured backbone (``cfg`` is a BackboneConfig)."""
    if cfg.kind == "openclip":
        from insight.backbones.openclip import OpenCLIPBackbone

        return OpenCLIPBackbone(cfg, device=device)
    if cfg.kind == "offline":
        from insight.backbones.offline import OfflineBackbone

        return OfflineBackbone(cfg, device=device)
    if cfg.kind == "auto":
        choice, why = resolve_auto(cfg)
        if choice == "download":
            from insight.backbones.openclip import OpenCLIPBackbone

            try:
                backbone = OpenCLIPBackbone(cfg, device=device)
            except (RuntimeError, OSError, ValueError) as exc:
                choice, why = "offline", f"{why}, which failed: {exc}"
            else:
                log.warning(
                    "backbone.kind=auto: running openclip %s/%s (%s; downloaded)", cfg.model, cfg.pretrained, why
                )
                return backbone
        if choice == "openclip":
            log.warning("backbone.kind=auto: running openclip %s (%s)", cfg.model, why)
            from insight.backbones.openclip import OpenCLIPBackbone

            return OpenCLIPBackbone(cfg, device=device)
        log.warning(
            "backbone.kind=auto: running the OFFLINE backbone (EfficientNet-Lite0 + MiniLM,"
            " route %s) instead of openclip: %s",
            cfg.offline_route,
            why,
        )
        from insight.backbones.offline import OfflineBackbone

        return OfflineBackbone(cfg, device=device)
    raise ValueError(f"unknown backbone.kind {cfg.kind!r}")
