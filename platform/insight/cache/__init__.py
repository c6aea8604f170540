"""Activation cache: content-addressed Parquet shards of patch grids + a manifest."""

from insight.cache.format import CacheError, CacheReader, Manifest, ShardError, cache_error_in, is_validation

__all__ = ["CacheError", "CacheReader", "Manifest", "ShardError", "cache_error_in", "is_validation"]
