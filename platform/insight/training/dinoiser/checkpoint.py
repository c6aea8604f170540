"""The heads file (published key layout, safetensors with metadata) and the checkpoint's file names."""

from __future__ import annotations

import json
from typing import Any

import torch

from insight.backbones.dinoiser import HEAD_KEYS, DinoiserHeads

HEADS_FILE = "heads.safetensors"
STATE_FILE = "train_state.pt"


def heads_state(heads: DinoiserHeads) -> dict[str, torch.Tensor]:
    """The published key layout, contiguous CPU tensors."""
    sd = heads.state_dict()
    return {k: sd[k].detach().cpu().contiguous() for k in HEAD_KEYS}


def heads_bytes(heads: DinoiserHeads, metadata: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    meta = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return save(heads_state(heads), metadata=meta)
