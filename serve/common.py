"""Plain data shared by the ingress and the model replicas, free of torch.

The ingress replica imports this (and never torch, ~10 s of start-up on a
busy machine); the model replica and the benchmark import it through
``serve.engine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelLoader:
    """Where the model comes from; handed to every replica, which loads it itself.

    ``ref`` is any form `insight.models.parse_ref` reads (``models:/name@alias``,
    ``name@alias``, ``models:/name/version``, a run id, a checkpoint folder). Tests
    pass a tiny model's folder or their own tracking store.
    """

    ref: str
    tracking_uri: str | None = None
    dst: str | None = None

    def __call__(self) -> Any:
        from insight.models import load_model

        # Replicas may share ``dst``: each downloads into its own subfolder.
        dst = str(Path(self.dst) / f"replica-{os.getpid()}") if self.dst else None
        return load_model(self.ref, tracking_uri=self.tracking_uri, dst=dst)


@dataclass
class ExplainRaw:
    """Top concepts of one view: ids, scores and their activation maps on the patch grid."""

    ids: np.ndarray  # (k,) int64
    scores: np.ndarray  # (k,) max activation over patches
    means: np.ndarray  # (k,) mean activation over patches
    areas: np.ndarray  # (k,) fraction of patches where the concept fires
    maps: np.ndarray  # (k, H, W) float32 activations z_i(p)
    cosine: float  # mean cos(x, x^) over patches: how much of the feature the concepts explain
    l0: float  # mean active concepts per patch
    compute_ms: float
    concepts: list[dict[str, Any]]  # per id: name, label, level and the root..concept path
    fvu: float = float("nan")  # sum |x - x^|^2 / sum |x - mean x|^2 over the view's patches
    replica_ms: float = float("nan")  # the model replica's time on this request (queue, batching, compute)
