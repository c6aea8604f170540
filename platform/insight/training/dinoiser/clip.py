"""The frozen student side: raw CLIP features at the block the heads read."""

from __future__ import annotations

import torch


def plain_backbone_config(cfg):
    """The configured backbone without heads: training must see raw CLIP features."""
    dn = cfg.backbone.dinoiser.model_copy(update={"heads": None})
    return cfg.backbone.model_copy(update={"dinoiser": dn})


def clip_mid_features(backbone, images_bchw: torch.Tensor, block: int) -> torch.Tensor:
    """Output of block ``block``'s second layer norm, patches only: (B, width, H, W).

    Mirrors the mid-feature branch of `OpenCLIPBackbone.encode_patches` (a test
    checks they agree) but stops there, since training needs nothing later.
    """
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    idx = len(blocks) + block
    if not 0 <= idx < len(blocks) - 1:
        raise ValueError(f"backbone.dinoiser.block={block} is out of range for {len(blocks)} blocks")
    batch_first = getattr(visual.transformer, "batch_first", True)
    with torch.no_grad(), backbone._autocast():
        x, gh, gw = backbone._embed(images_bchw.to(backbone.device_name))
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:idx]:
            x = blk(x)
        xt = x if batch_first else x.transpose(0, 1)
        blk = blocks[idx]
        xt = xt + blk.ls_1(blk.attention(blk.ln_1(xt)))
        mid = blk.ln_2(xt)
    return mid[:, 1:].float().transpose(1, 2).reshape(images_bchw.shape[0], -1, gh, gw)
