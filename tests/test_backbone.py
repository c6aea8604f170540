"""The MaskCLIP value path, checkpoints and DINOiser pooling of the open_clip backbone."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from insight.backbones import build_backbone, embed_classnames
from insight.backbones.dinoiser import DinoiserHeads, pool_features


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import TINY
    from insight.config import load_config

    return load_config(TINY)


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_value_path_matches_hand_computation(tiny):
    bb = build_backbone(tiny.backbone, device="cpu")
    visual = bb.model.visual
    last = visual.transformer.resblocks[-1]
    captured = {}
    hook = last.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    torch.manual_seed(1)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        visual(images)  # open_clip's own forward up to the last block
    hook.remove()
    x = captured["x"]  # (B, 1 + N, width), batch first
    width = x.shape[-1]
    w_in, b_in = last.attn.in_proj_weight, last.attn.in_proj_bias
    with torch.no_grad():
        v = _layer_norm(x, last.ln_1) @ w_in[2 * width :].T + b_in[2 * width :]
        x = x + v @ last.attn.out_proj.weight.T + last.attn.out_proj.bias
        h = _layer_norm(x, last.ln_2) @ last.mlp.c_fc.weight.T + last.mlp.c_fc.bias
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ last.mlp.c_proj.weight.T + last.mlp.c_proj.bias
        ref = _layer_norm(x, visual.ln_post)[:, 1:] @ visual.proj
    got = bb.encode_patches(images)
    assert got.shape == (2, 7, 7, bb.dim)
    torch.testing.assert_close(got.reshape(2, 49, -1), ref, rtol=1e-4, atol=1e-5)


def test_patch_and_text_share_the_joint_space(tiny):
    bb = build_backbone(tiny.backbone, device="cpu")
    text = embed_classnames(bb, ["cat", "rocket", "cup"], tiny.backbone.templates)
    assert text.shape == (3, bb.dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert bb.encode_patches(torch.zeros(1, 3, 112, 112)).shape[-1] == text.shape[-1]


def test_unit_patch_norm_scales_patches_only(tiny):
    """backbone.patch_norm=unit: each patch is the plain one scaled to length 1, text is unchanged, and the
    identity (the cache address) differs, so unit and plain features never share a cache."""
    from insight.config import config_with

    plain = build_backbone(tiny.backbone, device="cpu")
    unit = build_backbone(config_with(tiny, {"backbone.patch_norm": "unit"}).backbone, device="cpu")
    x = torch.randn(2, 3, 112, 112)
    a, b = plain.encode_patches(x), unit.encode_patches(x)
    assert not torch.allclose(a.norm(dim=-1), torch.ones(2, 7, 7), atol=1e-3)  # the plain ones are not unit
    torch.testing.assert_close(b, F.normalize(a, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unit.encode_text(["a dog"]), plain.encode_text(["a dog"]), rtol=0, atol=0)
    assert unit.identity() == {**plain.identity(), "patch_norm": "unit"}


def test_larger_input_interpolates_positions(tiny):
    from insight.config import config_with

    bb = build_backbone(config_with(tiny, {"backbone.image_size": 224}).backbone, device="cpu")
    assert bb.encode_patches(torch.randn(1, 3, 224, 224)).shape == (1, 14, 14, bb.dim)


def test_checkpoint_loads_through_pretrained_path(tiny, tmp_path):
    from insight.config import config_with

    bb = build_backbone(tiny.backbone, device="cpu")
    ckpt = tmp_path / "tiny.pt"
    torch.save(bb.model.state_dict(), ckpt)
    other = config_with(tiny, {"backbone.pretrained": str(ckpt), "backbone.seed": 123})
    bb2 = build_backbone(other.backbone, device="cpu")
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(bb2.encode_patches(x), bb.encode_patches(x), rtol=0, atol=0)
    torch.testing.assert_close(bb2.encode_text(["a dog"]), bb.encode_text(["a dog"]), rtol=0, atol=0)
    assert bb2.identity()["weights"].startswith("file:sha256=")
    # A different seed without the checkpoint really is a different model.
    bb3 = build_backbone(config_with(tiny, {"backbone.seed": 123}).backbone, device="cpu")
    assert not torch.allclose(bb3.encode_patches(x), bb.encode_patches(x))


def test_bad_pretrained_is_a_clear_error(tiny):
    from insight.config import config_with

    with pytest.raises(RuntimeError, match="pretrained="):
        build_backbone(config_with(tiny, {"backbone.pretrained": "/nope/weights.pt"}).backbone, device="cpu")


def test_pooling_matches_hand_computation():
    corr = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    out = pool_features(corr, feats)
    expected = torch.tensor([[[1.0 / 1.5, 0.5 / 1.5], [0.5 / 1.5, 1.0 / 1.5], [2.0, 2.0]]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_correlations_threshold_at_gamma():
    torch.manual_seed(0)
    heads = DinoiserHeads(8, proj_dim=4)
    feats = torch.randn(1, 8, 3, 3)
    corr = heads.correlations(feats, gamma=0.2)
    p = F.normalize(heads.obj_proj(feats), dim=1).flatten(2)[0]
    full = p.T @ p
    torch.testing.assert_close(corr[0], torch.where(full >= 0.2, full, torch.zeros_like(full)))


def test_published_head_layout_loads_and_changes_features(tiny, tmp_path):
    from insight.config import config_with

    bb = build_backbone(tiny.backbone, device="cpu")
    torch.manual_seed(0)
    heads = DinoiserHeads(bb.width)
    path = tmp_path / "heads.safetensors"
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(path))
    assert set(heads.state_dict()) == {"obj_proj.weight", "obj_proj.bias", "bkg_decoder.weight", "bkg_decoder.bias"}
    refined = build_backbone(config_with(tiny, {"backbone.dinoiser.heads": str(path)}).backbone, device="cpu")
    x = torch.randn(1, 3, 112, 112)
    plain, pooled = bb.encode_patches(x), refined.encode_patches(x)
    assert pooled.shape == plain.shape and not torch.allclose(pooled, plain)
    assert refined.last_background.shape == (1, 7, 7)
    assert refined.identity() != bb.identity()
    bad = tmp_path / "bad.safetensors"
    save_file({"obj_proj.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="lacks tensors"):
        build_backbone(config_with(tiny, {"backbone.dinoiser.heads": str(bad)}).backbone, device="cpu")
