"""DINOiser heads training: targets, teacher, CLIP mid features, the CLI job, use in extraction.

The pooling formula itself is checked in test_backbone.py; here: what the heads
are trained against, that training lowers the loss, and that the saved file is
what extraction loads.
"""

import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY
from insight.backbones import build_backbone
from insight.backbones.dinoiser import HEAD_KEYS, DinoiserHeads, load_heads
from insight.training.dinoiser.clip import clip_mid_features, plain_backbone_config
from insight.training.dinoiser.targets import correlation_targets, head_losses, saliency_targets
from insight.training.dinoiser.teacher import TeacherFeatures, build_teacher, teacher_targets

# A small problem the CLI test trains on: 8 images, 2 steps per epoch, 4 epochs.
TRAIN_SETS = (
    "data.max_images=8",
    "dinoiser_train.batch_size=4",
    "dinoiser_train.epochs=4",
    "dinoiser_train.eval_images=8",
    "dinoiser_train.checkpoint_every=2",
)


def test_correlation_targets_from_known_teacher_correlation():
    # Three teacher vectors (deliberately unnormalised) with known cosines:
    # cos(t0, t1) = 0.5, cos(t0, t2) = 0.1 (< gamma), cos(t1, t2) = 0.05 + 0.866 * 0.995 = 0.91.
    t1 = torch.tensor([0.5, math.sqrt(0.75)])
    t2 = torch.tensor([0.1, math.sqrt(0.99)])
    teacher = torch.stack([torch.tensor([3.0, 0.0]), 2 * t1, 0.5 * t2])[None]
    expected = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    torch.testing.assert_close(correlation_targets(teacher, gamma=0.2), expected)
    # Above 0.5 only the pair (t1, t2) and the diagonal survive.
    torch.testing.assert_close(
        correlation_targets(teacher, gamma=0.6), torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    )
    # Anti-correlated patches are negatives even at gamma 0.
    anti = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    torch.testing.assert_close(correlation_targets(anti, gamma=0.0), torch.eye(2)[None])


def test_saliency_targets_binarise_class_attention_at_its_mean():
    attn = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(saliency_targets(attn), torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0] * 4]))


def test_head_losses_are_masked_bce_with_shifted_logits():
    sim = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[1.0, -0.3], [-0.3, 1.0]]])
    corr_t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    bkg = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    sal_t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    valid = torch.tensor([True, False])  # the second image is masked out entirely
    lc, lb = head_losses(sim, bkg, corr_t, sal_t, valid, gamma=0.2, scale=10.0)

    def bce(z: float, t: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    exp_c = (2 * bce(8.0, 1.0) + 2 * bce(3.0, 0.0)) / 4
    exp_b = (bce(2.0, 1.0) + bce(-1.0, 1.0)) / 2
    assert lc.item() == pytest.approx(exp_c, rel=1e-5) and lb.item() == pytest.approx(exp_b, rel=1e-5)


@pytest.fixture(scope="module")
def tiny():
    from insight.config import load_config

    return load_config(TINY)


def test_teacher_values_and_class_attention_match_timm(tiny):
    model, wid, mode = build_teacher(tiny.dinoiser_train, 112)
    assert (wid, mode) == ("random-init:seed=0", "random")
    teacher = TeacherFeatures(model, "tiny")
    attn = model.blocks[-1].attn
    attn.fused_attn = False  # so timm materialises the attention matrix we compare with
    seen = {}
    hooks = [
        attn.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out)),
        attn.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out)),
    ]
    torch.manual_seed(0)
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        model.forward_features((images - teacher.mean) / teacher.std)
    for h in hooks:
        h.remove()
    values, cls = teacher(images)
    c = attn.num_heads * attn.head_dim
    v_ref = seen["qkv"][:, 1:, 2 * c :].transpose(1, 2).reshape(2, c, 7, 7)
    cls_ref = seen["attn"][:, :, 0, 1:].mean(1).reshape(2, 7, 7)
    torch.testing.assert_close(values, v_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, cls_ref, rtol=1e-4, atol=1e-6)


def test_teacher_targets_follow_the_clip_grid(tiny):
    # A patch-8 teacher sees a 14x14 grid; its targets are resized to CLIP's 7x7.
    tc = tiny.dinoiser_train.model_copy(update={"teacher_kwargs": {"depth": 1, "patch_size": 8}})
    teacher = TeacherFeatures(build_teacher(tc, 112)[0], "tiny-p8")
    images = torch.rand(2, 3, 112, 112)
    assert teacher(images)[0].shape[-2:] == (14, 14)
    corr_t, sal_t = teacher_targets(teacher, images, (7, 7), 0.2)
    assert corr_t.shape == (2, 49, 49) and sal_t.shape == (2, 49)
    torch.testing.assert_close(corr_t, corr_t.transpose(1, 2))
    assert bool((corr_t.diagonal(dim1=1, dim2=2) == 1).all()) and 0 < float(sal_t.mean()) < 1


def test_teacher_fallback_and_errors(tiny, caplog, tmp_path):
    tc = tiny.dinoiser_train.model_copy(update={"teacher_weights": "auto", "teacher_kwargs": {"depth": 1}})
    with caplog.at_level(logging.WARNING, logger="insight.training.dinoiser.teacher"):
        _, wid, mode = build_teacher(tc, 112)  # HF_HUB_OFFLINE=1: no weights here
    assert mode == "random" and wid == "random-init:seed=0"
    loud = [r for r in caplog.records if "NO PRETRAINED WEIGHTS" in r.getMessage()]
    assert len(loud) == 1 and "vit_tiny_patch16_224" in loud[0].getMessage()
    with pytest.raises(FileNotFoundError, match="teacher_weights: no file"):
        build_teacher(tc.model_copy(update={"teacher_weights": str(tmp_path / "nope.pth")}), 112)
    with pytest.raises(ValueError, match="dinoiser_train.teacher='not_a_vit'"):
        build_teacher(tc.model_copy(update={"teacher": "not_a_vit"}), 112)


def test_config_rejects_a_heads_file_that_extraction_cannot_load(tmp_path):
    from insight.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="must end with .safetensors"):
        load_config(TINY, [f"workdir={tmp_path}", "dinoiser_train.out=heads.pt"])


def test_clip_mid_features_match_the_extraction_branch(tiny, tmp_path):
    from safetensors.torch import save_file

    from insight.config import config_with

    torch.manual_seed(0)
    path = tmp_path / "heads.safetensors"
    save_file({k: v.contiguous() for k, v in DinoiserHeads(64).state_dict().items()}, str(path))
    refined = build_backbone(config_with(tiny, {"backbone.dinoiser.heads": str(path)}).backbone, device="cpu")
    blocks = refined.model.visual.transformer.resblocks
    seen = {}
    hook = blocks[len(blocks) - 3].ln_2.register_forward_hook(lambda m, a, out: seen.__setitem__("mid", out))
    images = torch.randn(2, 3, 112, 112)
    refined.encode_patches(images)
    hook.remove()
    plain = build_backbone(plain_backbone_config(tiny), device="cpu")
    mid = clip_mid_features(plain, images, tiny.backbone.dinoiser.block)
    assert mid.shape == (2, 64, 7, 7)
    torch.testing.assert_close(mid, seen["mid"][:, 1:].transpose(1, 2).reshape(2, 64, 7, 7))


# ---------------------------------------------------------------- the job, end to end


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """`insight train-dinoiser` as a user runs it, on the session's Ray cluster."""
    import shutil

    from insight.data.samples import write_samples

    work = tmp_path_factory.mktemp("dinoiser")
    images = work / "images"  # seven real photos and one truncated file, which must be masked out
    images.mkdir()
    for src in sorted(write_samples(work / "samples")[1].glob("*.png"))[:7]:
        shutil.copy(src, images / src.name)
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    address = ray_local.get_runtime_context().gcs_address
    sets = [f"workdir={work}", f"cluster.address={address}", "data.kind=folder", f"data.root={images}", *TRAIN_SETS]
    args = [sys.executable, "-m", "insight.cli", "train-dinoiser", "--config", str(TINY)]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return work, sets, last_json(p.stdout), p.stderr


def test_cli_prints_heads_file_and_final_loss(trained):
    work, _, out, stderr = trained
    assert out["ok"] and out["heads"] == str(work / "dinoiser" / "heads.safetensors")
    assert (work / "dinoiser" / "heads.safetensors").is_file()
    assert math.isfinite(out["final_loss"]) and out["epochs"] == 4 and out["steps"] == 8
    assert out["images"] == 8 and out["skipped"] == 1 and out["teacher_weights"] == "random-init:seed=0"
    assert "train-dinoiser: epoch 4/4 done" in stderr  # the progress line
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    assert run.data.params["dinoiser.teacher_weights"] == "random-init:seed=0"  # logged by rank 0
    curve = client.get_metric_history(out["run_id"], "dinoiser.loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert run.data.metrics["final_loss"] == pytest.approx(out["final_loss"])
    assert run.data.tags["insight.dinoiser_heads"] == out["heads"]


def test_training_lowers_the_correlation_loss(trained):
    out = trained[2]
    # Same fixed centre crops and teacher targets before and after training.
    assert out["final_loss_corr"] < 0.8 * out["initial_loss_corr"], out
    assert out["final_loss"] < out["initial_loss"], out


def test_saved_heads_load_back_and_change_features(trained, tiny):
    from safetensors import safe_open

    from insight.config import config_with

    heads, digest = load_heads(trained[2]["heads"], width=64)
    assert digest == trained[2]["heads_sha256"]
    state = heads.state_dict()
    assert set(state) == set(HEAD_KEYS)
    assert state["obj_proj.weight"].shape == (256, 64, 3, 3) and state["bkg_decoder.weight"].shape == (1, 64, 1, 1)
    with safe_open(trained[2]["heads"], "pt") as f:
        meta = f.metadata()
    assert meta["teacher"] == "vit_tiny_patch16_224" and json.loads(meta["gamma"]) == 0.2
    plain = build_backbone(tiny.backbone, device="cpu")
    refined = build_backbone(config_with(tiny, {"backbone.dinoiser.heads": trained[2]["heads"]}).backbone, device="cpu")
    x = torch.randn(1, 3, 112, 112)
    assert not torch.allclose(plain.encode_patches(x), refined.encode_patches(x), atol=1e-4)
    # The refined features are the pooling of the plain ones with the trained correlations.
    with torch.no_grad():
        corr = heads.correlations(clip_mid_features(plain, x, -3), 0.2)
        expected = corr @ plain.encode_patches(x).reshape(1, 49, -1) / (corr.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(refined.encode_patches(x).reshape(1, 49, -1), expected, rtol=1e-4, atol=1e-5)


def test_extract_with_trained_heads_changes_the_cache_key(trained):
    import numpy as np

    from insight.cache import CacheReader
    from insight.cache.extract import cache_identity, extract
    from insight.cache.format import content_key
    from insight.config import load_config
    from insight.data import build_dataset, load_image
    from insight.data.transforms import Preprocessor

    work, sets, out, _ = trained
    base = [s for s in sets if not s.startswith("dinoiser_train")] + ["data.max_images=2", "data.views=1"]
    plain_cfg = load_config(TINY, base)
    cfg = load_config(TINY, [*base, f"backbone.dinoiser.heads={out['heads']}"])
    result = extract(cfg, progress=False)
    plain_bb = build_backbone(plain_cfg.backbone, device="cpu")
    plain_ds = build_dataset(plain_cfg.data, plain_cfg.workdir)
    plain_key = content_key(cache_identity(plain_cfg, plain_bb.identity(), plain_ds.identity()))
    assert result["status"] == "written" and result["key"] != plain_key
    reader = CacheReader(result["cache"])
    assert reader.manifest.identity["backbone"]["dinoiser"]["heads_sha256"] == out["heads_sha256"]
    # The cached features are the refined ones, not the plain ones.
    refined_bb = build_backbone(cfg.backbone, device="cpu")
    records = {r.image_id: r for r in plain_ds.records}
    pre = Preprocessor(112, plain_bb.mean, plain_bb.std, cfg.data.augment)
    image_id, feats = next(iter(reader.iter_images()))
    x = torch.from_numpy(pre(load_image(records[image_id].path)[0], image_id, 0))[None]
    np.testing.assert_allclose(feats, refined_bb.encode_patches(x)[0].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats, plain_bb.encode_patches(x)[0].numpy(), atol=1e-4)
