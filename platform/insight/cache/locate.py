"""Where a cache is: under a config's cache root by its content key, for a config, and for a model.

Training reads the cache its config names or extracts it (`resolve_cache`); later steps read
the cache a trained model was trained on (`resolve_model_cache`), found from the model's
config or its run's tags.
"""

from __future__ import annotations

import os
from typing import Any


def cache_location(cfg: Any, key: str) -> str:
    """The cache of content key ``key`` under the config's ``cache.root`` (a local path or a URI)."""
    from insight.cache.format import join

    return join(cfg.path(cfg.cache.root), key)


def resolve_cache(cfg: Any) -> str:
    """The cache this config trains on: ``train.cache`` or the (idempotent) extraction.

    Every shard is checked against the manifest first (``cache.verify``), so a truncated or altered
    shard fails the step here, naming the shard, before Ray Train or Tune start a worker.
    """
    from insight.cache import CacheReader

    if cfg.train.cache:  # absolute: Tune trials run in their own folders
        location = cfg.train.cache if "://" in cfg.train.cache else os.path.abspath(cfg.train.cache)
    else:
        from insight.cache.extract import extract

        location = extract(cfg, progress=False)["cache"]
    CacheReader(location).check(checksums=cfg.cache.verify == "sha256")
    return location


def resolve_model_cache(model: Any, cache: str | None, client: Any | None) -> str:
    """The cache a trained model (`insight.models.LoadedModel`) was trained on: ``cache`` when given,
    else the model's ``train.cache``, else its run's ``insight.cache`` tag, else the cache named by
    its ``insight.cache_key`` tag under the model config's cache root, else the (idempotent)
    extraction of the model's config."""
    if cache:
        return cache
    mcfg = model.config
    if mcfg.train.cache:
        return mcfg.train.cache
    if model.run_id and client is not None:
        tags = client.get_run(model.run_id).data.tags
        if tags.get("insight.cache"):
            return tags["insight.cache"]
        key = tags.get("insight.cache_key")
        if key:
            from insight.cache.format import exists, join, resolve_fs

            location = cache_location(mcfg, key)
            fs, path = resolve_fs(location)
            if exists(fs, join(path, "manifest.json")):
                return location
    return resolve_cache(mcfg)
