"""`insight evaluate`: tasks through concepts against the opaque backbone, over a dataset.

The claim being tested (docs/method.md, Tasks and explanations): going through the concept
bottleneck costs little against the opaque backbone. So every number is
reported side by side: through concepts, opaque, their ratio (and the mIoU
difference in points).

A ratio alone does not say why concepts lose, so segmentation also reports
what explains it: reconstruction fidelity of the patches the segmenter saw
(``recon_cosine``, mean per-patch cos(x, x^), and ``recon_fvu``, both as the
SAE's training metrics define them, plus the mean of each window's own FVU),
the inference ``l0``, the share of patches whose arg-max class is the same
both ways (``argmax_agreement``), mIoU with the background rule off
(``miou_fg_*``: every pixel gets its arg-max class, scored on the pixels
annotated with a foreground class, so the fixed ``tasks.bg_threshold`` no
longer favours one route's logit scale), the majority-class baseline
(``miou_majority``: every pixel labelled with the most frequent true class),
and the "concepts + residual" route (x = x^ + (x - x^): concept terms plus
a residual term), which must reproduce the opaque labels
(``residual_equals_opaque``). Per-image figures go to
``per_image_segmentation.csv``.

Flow: the driver resolves the label space (`resolve_classes`) and the images
(`select_records`), then a Ray Data pool of model replicas (`EvalWorker`, one
per ``tasks.num_workers``, GPUs with ``tasks.gpus_per_worker``) segments and
classifies each image both ways from one backbone pass and returns, per
batch of images, summed confusion matrices, classification logits, concept
vectors (for the probe) and the explanation pictures of the first
``tasks.pictures`` images, as PNG bytes. Replicas load the model themselves
from its reference, so the pool can sit on other machines. The driver adds
everything up, writes the per-class tables and pictures atomically under
``<workdir>/evaluate/<run id>/`` and logs it all to a new MLflow run tagged
with the model's run id.

Ground truth: the data layer's ``semantic_mask`` (COCO annotations through
pycocotools, or PNG index masks), mapped into the label space: COCO
categories by name (unannotated pixels are background when the label space
has one, else ignored), PNG values through ``tasks.label_transform``.
Image-level labels for classification: the dominant foreground class by area
(masks), or the first folder of the image's path (class folders).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from insight.data.classes import BackgroundOffset
from insight.tasks.metrics import (
    IGNORE_INDEX,
    confusion_matrix,
    finite_or_none,
    iou_per_class,
    majority_confusion,
    mean_iou,
    pixel_accuracy,
    ratio,
    reconstruction_fidelity,
    topk_accuracy,
)

log = logging.getLogger(__name__)

EVAL_TASKS = ("auto", "segmentation", "classification", "both")
VIAS = ("concepts", "opaque")


# ------------------------------------------------------------------ config


def load_eval_config(config: str | None, dataset: str | None, sets: list[str] | None):
    """The step's config: ``--config`` (or defaults), then ``--dataset``, then ``--set`` overrides.

    A dataset YAML is either a partial config (its ``data`` section replaces
    the config's, its ``tasks`` keys are merged) or a bare data section.
    """
    from insight.config import ConfigError, build_config, read_yaml_mapping

    data: dict[str, Any] = read_yaml_mapping(config, "config") if config else {}
    source = config or "defaults"
    if dataset:
        ds = read_yaml_mapping(dataset, "dataset")
        if "data" not in ds and "tasks" not in ds:
            ds = {"data": ds}
        extra = sorted(set(ds) - {"data", "tasks"})
        if extra:
            raise ConfigError(f"dataset file {dataset}: only 'data' and 'tasks' sections belong here, found {extra}")
        if "data" in ds:
            data["data"] = ds["data"]
        if "tasks" in ds:
            data["tasks"] = {**(data.get("tasks") or {}), **(ds["tasks"] or {})}
        source += f" + --dataset {dataset}"
    return build_config(data, sets, source)


# ------------------------------------------------------------------ label space and ground truth


@dataclass(frozen=True)
class LabelSpace(BackgroundOffset):
    """Label i = names[i]; with background, label 0 is background (no prompt)."""

    names: list[str]
    background: bool


def _folder_class(image_id: str) -> str | None:
    parts = image_id.replace("\\", "/").split("/")
    return parts[0] if len(parts) > 1 else None


def resolve_classes(tasks, dataset, records=None) -> LabelSpace:
    """The label space from ``tasks.classes``/``tasks.background`` and the dataset's own classes.

    ``annotated`` needs ``records`` (the images being evaluated): a small dataset's COCO file often
    lists every category of its source (the bundled photo lists all 20 VOC ones) while its images
    show a few, and prompting absent classes only measures how often they are confused.
    """
    from insight.data.classes import BENCHMARKS

    spec = tasks.classes
    if spec == "annotated":
        from insight.data.coco import annotated_categories

        if dataset.kind != "coco":
            raise ValueError(f"tasks.classes=annotated reads COCO category annotations; data.kind={dataset.kind} has "
                             "none: give the classes as a list or a built-in name")
        ids = [r.coco_id for r in (records if records is not None else dataset.records)]
        names, bg_default = annotated_categories(dataset.annotations, ids), True
        if not names:
            raise ValueError(f"tasks.classes=annotated: the {len(ids)} evaluated images of {dataset.annotations} "
                             "carry no annotation")
        spec = None  # the dataset's own names, narrowed; background is added below
    elif isinstance(spec, str):
        names, bg_default = list(BENCHMARKS[spec][0]), BENCHMARKS[spec][1]
    elif isinstance(spec, list):
        names, bg_default = list(spec), False
    elif dataset.kind == "folder":
        names = sorted({c for r in dataset.records if (c := _folder_class(r.image_id))})
        bg_default = False
        if not names:
            raise ValueError(f"data.root {dataset.root}: images are not in class folders (root/<class>/<image>) and "
                             "tasks.classes is not set, so there are no classes to evaluate")
    else:
        names = list(dataset.class_names)
        bg_default = bool(names) and names[0].lower() == "background"
    rule = tasks.background if isinstance(tasks.background, str) else None  # threshold|prompted: how, not whether
    if tasks.background is None or rule:
        has_bg = bg_default or (rule is not None and names[:1] == ["background"])
    else:
        has_bg = tasks.background
    background = (rule or True) if has_bg else False  # truthy = label 0 is background; ClassBank reads the rule
    if background and spec is None and dataset.kind == "coco" and names[:1] != ["background"]:
        names = ["background", *names]
    if len(names) - (1 if background else 0) < 1:
        raise ValueError(f"the label space {names} (background={background}) has no class to prompt")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{len(names)} classes: at most {IGNORE_INDEX} fit beside the ignore index {IGNORE_INDEX}")
    return LabelSpace(names, background)


def _png_lut(transform: str, n_classes: int) -> np.ndarray | None:
    """Raw mask value -> label for the fixed transforms; None for the plain ones (checked per mask)."""
    from insight.data.classes import CITYSCAPES_ID_TO_TRAINID, COCO_STUFF_171_IDS

    if transform == "cocostuff171":
        lut = np.full(256, IGNORE_INDEX, np.int64)
        for label, cat_id in enumerate(COCO_STUFF_171_IDS):
            lut[cat_id - 1] = label
    elif transform == "cityscapes19":
        lut = np.full(256, IGNORE_INDEX, np.int64)
        for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
            lut[label_id] = train_id
    else:
        return None
    if int(lut[lut != IGNORE_INDEX].max()) >= n_classes:
        raise ValueError(f"tasks.label_transform={transform} gives labels up to {int(lut[lut != IGNORE_INDEX].max())} "
                         f"but the label space has {n_classes} classes")
    return lut


class GroundTruth:
    """Dataset masks and folders -> labels of a `LabelSpace`."""

    def __init__(self, dataset, space: LabelSpace, label_transform: str = "none") -> None:
        self.dataset, self.space, self.transform = dataset, space, label_transform
        n = len(space.names)
        self.coco_lut: np.ndarray | None = None
        if dataset.kind == "coco":
            if label_transform != "none":
                raise ValueError(f"tasks.label_transform={label_transform} applies to PNG masks; COCO annotations are "
                                 "mapped by category name")
            if len(dataset.class_names) >= IGNORE_INDEX:
                raise ValueError(f"{len(dataset.class_names)} COCO categories do not fit beside the ignore index")
            index = {name.lower(): i for i, name in enumerate(space.names) if i >= space.offset}
            lut = np.full(IGNORE_INDEX + 1, IGNORE_INDEX, np.int64)
            for pos, name in enumerate(dataset.class_names):
                lut[pos] = index.get(name.lower(), IGNORE_INDEX)
            if not (lut[: len(dataset.class_names)] != IGNORE_INDEX).any():
                raise ValueError(f"no COCO category of {dataset.annotations} is in the label space {space.names[:8]}...: "
                                 "check tasks.classes")
            lut[IGNORE_INDEX] = 0 if space.background else IGNORE_INDEX  # unannotated pixels
            self.coco_lut = lut
        self.png_lut = _png_lut(label_transform, n) if dataset.kind != "coco" else None
        self.fg_index = {name.lower(): i for i, name in enumerate(space.fg_names)}

    def labels(self, record) -> np.ndarray | None:
        """(H, W) labels, IGNORE_INDEX where unlabelled; None when the record has no mask."""
        raw = self.dataset.semantic_mask(record)
        if raw is None:
            return None
        raw = np.asarray(raw, dtype=np.int64)
        if self.coco_lut is not None:
            return self.coco_lut[raw]
        if self.png_lut is not None:
            if raw.max(initial=0) >= len(self.png_lut):
                raise ValueError(f"mask {record.mask_path} has value {int(raw.max())}, outside the "
                                 f"{self.transform} mapping")
            return self.png_lut[raw]
        if self.transform == "reduce_zero":
            raw = np.where(raw == 0, IGNORE_INDEX, np.where(raw == IGNORE_INDEX, IGNORE_INDEX, raw - 1))
        n = len(self.space.names)
        bad = (raw != IGNORE_INDEX) & ((raw < 0) | (raw >= n))
        if bad.any():
            raise ValueError(f"mask {record.mask_path} has label {int(raw[bad][0])}, but the label space has {n} "
                             f"classes (0..{n - 1}, {IGNORE_INDEX} ignored): check tasks.classes / tasks.label_transform")
        return raw

    def class_label(self, record, gt_hw: np.ndarray | None) -> int | None:
        """Image-level foreground class index: dominant foreground label by area, or the class folder."""
        if gt_hw is not None:
            valid = gt_hw[(gt_hw != IGNORE_INDEX) & (gt_hw >= self.space.offset)]
            if valid.size == 0:
                return None
            return int(np.bincount(valid).argmax()) - self.space.offset
        name = _folder_class(record.image_id)
        return self.fg_index.get(name.lower()) if name else None


def select_records(dataset, split: str | None) -> list:
    """The dataset's records, restricted to the ids listed in ``split`` when given."""
    records = list(dataset.records)
    if not split:
        return records
    path = Path(split)
    if not path.is_absolute() and dataset.root and not path.is_file():
        path = Path(dataset.root) / split
    if not path.is_file():
        raise FileNotFoundError(f"tasks.split: no id list at {path}")
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    by_id = {r.image_id: r for r in records}
    by_stem = {Path(r.image_id).name: r for r in records}
    picked, missing = [], []
    for w in wanted:
        r = by_id.get(w) or by_stem.get(Path(w).name)
        (picked if r is not None else missing).append(r if r is not None else w)
    if missing:
        log.warning("tasks.split: %d of %d ids have no image/mask in the dataset (e.g. %s)", len(missing), len(wanted),
                    ", ".join(missing[:3]))
    if not picked:
        raise ValueError(f"tasks.split {path}: none of its {len(wanted)} ids is in the dataset")
    return picked


def choose_tasks(task: str, dataset_kind: str) -> tuple[bool, bool]:
    """(segmentation, classification) for a --task value and a dataset kind."""
    if task not in EVAL_TASKS:
        raise ValueError(f"--task must be one of {', '.join(EVAL_TASKS)}, got {task!r}")
    has_masks = dataset_kind in ("coco", "voc")
    if task == "auto":
        return has_masks, True
    seg = task in ("segmentation", "both")
    if seg and not has_masks:
        raise ValueError(f"segmentation needs masks: data.kind={dataset_kind!r} has none (use coco or voc)")
    return seg, task in ("classification", "both")


# ------------------------------------------------------------------ the replica


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") or "image"


def _fold(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
    """Add diagnostic statistics into ``total`` (``max_*`` keys keep the maximum)."""
    for key, value in part.items():
        if key not in total:
            total[key] = np.asarray(value)
        else:
            total[key] = np.maximum(total[key], value) if key.startswith("max_") else total[key] + value


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class EvalWorker:
    """A model replica: segments/classifies a batch of images both ways; returns one packed summary row.

    Configuration errors (a ValueError or FileNotFoundError from the set-up
    or the task functions) come back as data, ``meta["error"]``, so the driver
    can fail the step with the message itself rather than a remote traceback.
    """

    def __init__(self, spec_json: str, records: list[dict]) -> None:
        self.error: str | None = None
        try:
            self._setup(spec_json, records)
        except (ValueError, FileNotFoundError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _setup(self, spec_json: str, records: list[dict]) -> None:
        import torch

        from insight.backbones import build_backbone
        from insight.config import InsightConfig
        from insight.data.datasets import ImageDataset, ImageRecord
        from insight.tasks.classification import Classifier
        from insight.tasks.explain import concept_namer
        from insight.tasks.segmentation import ClassBank, Segmenter
        from insight.tracking import load_model

        spec = json.loads(spec_json)
        self.spec = spec
        self.cfg = InsightConfig.model_validate(spec["cfg"])
        torch.set_num_threads(max(1, int(self.cfg.tasks.cpus_per_worker)))
        self._tmp = tempfile.TemporaryDirectory(prefix="insight-eval-model-")
        model = load_model(spec["model"], tracking_uri=spec["tracking_uri"], dst=self._tmp.name)
        backbone = build_backbone(model.config.backbone)
        if self.cfg.tasks.gpus_per_worker > 0 and torch.cuda.is_available():
            model.sae.to("cuda")  # codes, reconstructions and decompositions on the GPU too
        self.space = LabelSpace(spec["names"], spec["background"])
        bank = ClassBank.build(backbone, self.space.names, model.config.backbone.templates, self.space.background)
        self.segmenter = Segmenter(backbone, bank, self.cfg.tasks, model.sae)
        self.classifier = Classifier(backbone, bank, self.cfg.tasks, model.sae)
        self.namer = concept_namer(model)
        ds = spec["dataset"]
        self.dataset = ImageDataset(ds["kind"], ds["root"], [], class_names=ds["class_names"],
                                    annotations=ds["annotations"])
        self.gt = GroundTruth(self.dataset, self.space, self.cfg.tasks.label_transform)
        self.records = [ImageRecord(**r) for r in records]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is None:
            try:
                return self._process(batch)
            except (ValueError, FileNotFoundError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        return {"payload": np.array([_pack({})], dtype=object),
                "meta": np.array([json.dumps({"error": self.error, "images": len(batch["index"])})], dtype=object)}

    def _process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from insight.data.datasets import load_image

        t0 = time.perf_counter()
        k = len(self.space.names)
        conf = {v: np.zeros((k, k), np.int64) for v in VIAS}
        cls: dict[str, list] = {"ids": [], "labels": [], "concepts": [], "opaque": [], "s": []}
        skipped: dict[str, str] = {}
        pictures: dict[str, bytes] = {}
        explanations: dict[str, Any] = {}
        seg_images = 0
        per_image: list[dict[str, Any]] = []
        diag: dict[str, np.ndarray] = {}  # summed sufficient statistics of the diagnostics (`_diagnose`)
        for idx in batch["index"]:
            rec = self.records[int(idx)]
            rgb, why = load_image(rec.path)
            if rgb is None:
                skipped[rec.image_id] = f"image {why}"
                continue
            gt = None
            if self.spec["seg"] or self.dataset.kind in ("coco", "voc"):
                try:
                    gt = self.gt.labels(rec)
                except OSError as exc:  # a missing/unreadable mask skips the image; a wrong label fails the step
                    skipped[rec.image_id] = f"mask: {exc}"
                    continue
                if gt is not None and gt.shape != rgb.shape[:2]:
                    skipped[rec.image_id] = f"mask is {gt.shape[1]}x{gt.shape[0]}, image is {rgb.shape[1]}x{rgb.shape[0]}"
                    continue
            seg = None
            if self.spec["seg"]:
                if gt is None:
                    skipped[rec.image_id] = "no mask"
                    continue
                wf = self.segmenter.encode(rgb)
                seg = {v: self.segmenter.segment_features(wf, v) for v in VIAS}
                for v in VIAS:
                    conf[v] += confusion_matrix(gt, seg[v].labels_hw, k)
                row, parts = self._diagnose(rec.image_id, wf, seg, gt)
                per_image.append(row)
                _fold(diag, parts)
                seg_images += 1
            clsres = None
            if self.spec["cls"]:
                label = self.gt.class_label(rec, gt)
                if label is not None:
                    clsres = self.classifier.classify_both(rgb)
                    cls["ids"].append(rec.image_id)
                    cls["labels"].append(label)
                    for v in VIAS:
                        cls[v].append(clsres[v].logits_f.numpy())
                    if self.spec["probe"]:
                        cls["s"].append(clsres["concepts"].concept_vector().numpy())
            if int(idx) < self.spec["pictures"]:
                name = f"{int(idx):04d}_{_safe_name(rec.image_id)}"
                if seg is not None:
                    pics, expl = self._segmentation_pictures(rgb, gt, seg, rec.image_id, name)
                elif clsres is not None:
                    pics, expl = self._classification_pictures(rgb, clsres, rec.image_id, name)
                else:
                    pics, expl = {}, None
                pictures.update(pics)
                if expl is not None:
                    explanations[name] = expl
        arrays: dict[str, np.ndarray] = {f"conf_{v}": conf[v] for v in VIAS}
        arrays.update({f"diag_{key}": np.asarray(value) for key, value in diag.items()})
        f = len(self.space.fg_names)
        arrays["cls_labels"] = np.asarray(cls["labels"], np.int64)
        for v in VIAS:
            arrays[f"cls_{v}"] = np.stack(cls[v]).astype(np.float32) if cls[v] else np.zeros((0, f), np.float32)
        if cls["s"]:
            arrays["cls_s"] = np.stack(cls["s"]).astype(np.float32)
        for name, png in pictures.items():
            arrays[f"png:{name}"] = np.frombuffer(png, np.uint8)
        meta = {"skipped": skipped, "cls_ids": cls["ids"], "explanations": explanations, "seg_images": seg_images,
                "per_image": per_image,
                "images": len(batch["index"]), "seconds": time.perf_counter() - t0}
        return {"payload": np.array([_pack(arrays)], dtype=object), "meta": np.array([json.dumps(meta)], dtype=object)}

    # ------------------------------------------------------------ diagnostics

    def _diagnose(self, image_id: str, wf, seg, gt: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What explains a gap between the routes, for one image: its figures and summable statistics.

        Reconstruction fidelity of the patches the segmenter saw (per window and pooled), inference
        L0, patch-level arg-max agreement of the class logits, the "concepts + residual" route
        (which must give the opaque labels), mIoU with the background rule off, and the
        majority-class baseline.
        """
        import torch
        import torch.nn.functional as F

        from insight.sae.metrics import cosine

        k = len(self.space.names)
        offset = self.space.offset
        sae = self.segmenter.sae
        codes = seg["concepts"].decomposition.codes
        x = wf.feats_pd.to(sae.W_dec.device, sae.W_dec.dtype)
        with torch.no_grad():
            x_hat = codes.decode(sae)
            fid = reconstruction_fidelity(x, x_hat, wf.plan.n_windows)
            text = F.normalize(self.segmenter.bank.text_fd.to(x), dim=-1)
            agree = float((seg["concepts"].decomposition.logits().argmax(1) == (F.normalize(x, dim=-1) @ text.T)
                           .argmax(1)).float().mean())
            residual = self.segmenter.segment_features(wf, "residual")
            xd = x.double()
            parts = {"n": np.array(len(x), np.float64), "sum_x": xd.sum(0).cpu().numpy(),
                     "sum_sq": np.array(float((xd**2).sum())),
                     "err": np.array(float(((xd - x_hat.double()) ** 2).sum())),
                     "cos_sum": np.array(cosine(x, x_hat) * len(x)), "nnz": np.array(float(codes.nnz)),
                     "agree": np.array(agree * len(x)),
                     "max_residual_diff": np.array(float((residual.logits_fhw - seg["opaque"].logits_fhw).abs().max())),
                     "residual_mismatch": np.array(float((residual.labels_hw != seg["opaque"].labels_hw).sum()))}
        gt_fg = np.where(gt >= offset, gt, IGNORE_INDEX) if offset else gt
        conf_img = {v: confusion_matrix(gt, seg[v].labels_hw, k) for v in VIAS}
        conf_fg = {v: confusion_matrix(gt_fg, seg[v].logits_fhw.argmax(0).numpy() + offset, k) for v in VIAS}
        for v in VIAS:
            parts[f"conf_fg_{v}"] = conf_fg[v]
        miou = {v: mean_iou(conf_img[v]) for v in VIAS}
        miou_fg = {v: mean_iou(conf_fg[v]) for v in VIAS}
        row = {"image": image_id, "windows": wf.plan.n_windows, "patches": len(x),
               "classes_present": int((conf_img["opaque"].sum(1) > 0).sum()),
               "miou_concepts": miou["concepts"], "miou_opaque": miou["opaque"],
               "miou_ratio": ratio(miou["concepts"], miou["opaque"]),
               "miou_majority": mean_iou(majority_confusion(conf_img["opaque"])),
               "miou_fg_concepts": miou_fg["concepts"], "miou_fg_opaque": miou_fg["opaque"],
               "recon_cosine": fid["cosine"], "recon_fvu": fid["fvu"], "recon_fvu_window_mean": fid["fvu_window_mean"],
               "recon_cosine_window_min": fid["cosine_window_min"], "l0": codes.nnz / max(1, len(x)),
               "argmax_agreement": agree, "residual_equals_opaque": bool(parts["residual_mismatch"] == 0)}
        return {key: finite_or_none(v) if isinstance(v, float) else v for key, v in row.items()}, parts

    # ------------------------------------------------------------ pictures

    def _segmentation_pictures(self, rgb, gt, seg, image_id: str, name: str) -> tuple[dict[str, bytes], dict]:
        from insight.tasks.explain import explain_segments, segment_concept_maps
        from insight.tasks.pictures import contributions_png, overlay_png, segment_heatmaps_png

        k = len(self.space.names)
        scores = {v: f"mIoU {100 * mean_iou(confusion_matrix(gt, seg[v].labels_hw, k)):.1f}" for v in VIAS}
        res = seg["concepts"]
        exps = explain_segments(res, top=self.cfg.tasks.top_concepts, namer=self.namer, max_segments=4)
        rows = []
        for e in exps:
            concepts = [c.concept for c in e.top]
            maps = segment_concept_maps(res, e.label, concepts).numpy() if concepts else np.zeros((0, *rgb.shape[:2]))
            rows.append({"class": e.class_name, "mask_hw": res.labels_hw == e.label, "maps": maps,
                         "concepts": [f"{c.name} ({c.contribution:+.3f})" for c in e.top]})
        pics = {
            f"{name}_overlay.png": overlay_png(rgb, {v: seg[v].labels_hw for v in VIAS}, self.space.names, gt,
                                               title=image_id, scores=scores),
            f"{name}_concepts.png": segment_heatmaps_png(rgb, rows, title=f"{image_id}: top concepts per segment"),
            f"{name}_contributions.png": contributions_png([e.as_dict() for e in exps],
                                                           title=f"{image_id}: concept contributions per class"),
        }
        return pics, {"image": image_id, "segments": [e.as_dict() for e in exps]}

    def _classification_pictures(self, rgb, clsres, image_id: str, name: str) -> tuple[dict[str, bytes], dict]:
        from insight.tasks.classification import explain_zero_shot
        from insight.tasks.pictures import class_heatmaps_png, contributions_png

        res = clsres["concepts"]
        c = int(res.logits_f.argmax())
        ex = explain_zero_shot(res, c, top=self.cfg.tasks.top_concepts, namer=self.namer)
        d = ex.as_dict()
        bar = {"class": d["class"], "top": d["top"], "bias": ex.bias, "concepts_total": ex.logit - ex.bias,
               "mean_logit": ex.logit}
        view = self.classifier.view(rgb)
        pics = {
            f"{name}_class_concepts.png": class_heatmaps_png(view, d, ex.maps_khw.numpy(),
                                                             title=f"{image_id}: predicted {d['class']}"),
            f"{name}_contributions.png": contributions_png([bar], title=f"{image_id}: zero-shot contributions"),
        }
        return pics, {"image": image_id, "predicted": d, "top5": res.top(5)}


# ------------------------------------------------------------------ the step


def _run_pool(cfg, spec: dict[str, Any], records: list) -> list[tuple[dict[str, np.ndarray], dict]]:
    """Run the replicas over the records with Ray Data; returns the unpacked per-batch summaries."""
    import ray.data
    from tqdm import tqdm

    from insight.runtime import ensure_ray

    ensure_ray(cfg)
    t = cfg.tasks
    rows = [{"index": i} for i in range(len(records))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * t.num_workers)))
    rec_dicts = [{"image_id": r.image_id, "path": r.path, "mask_path": r.mask_path, "coco_id": r.coco_id}
                 for r in records]
    results = ds.map_batches(
        EvalWorker,
        fn_constructor_kwargs={"spec_json": json.dumps(spec), "records": rec_dicts},
        batch_size=t.images_per_batch,
        compute=ray.data.ActorPoolStrategy(size=t.num_workers),
        num_cpus=t.cpus_per_worker,
        num_gpus=t.gpus_per_worker if t.gpus_per_worker > 0 else None,
        batch_format="numpy",
    )
    out = []
    bar = tqdm(total=len(records), unit="img", desc="evaluate", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        for row in results.iter_rows():
            meta = json.loads(row["meta"])
            if meta.get("error"):
                raise ValueError(f"evaluation replica failed: {meta['error']}")
            with np.load(io.BytesIO(row["payload"])) as z:
                arrays = {key: z[key] for key in z.files}
            out.append((arrays, meta))
            bar.update(meta["images"])
    finally:
        bar.close()
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    from insight.tasks.pictures import write_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


def _r(x: float | None, nd: int = 6) -> float | None:
    x = finite_or_none(x)
    return None if x is None else round(x, nd)


def evaluate(cfg, model_ref: str | None = None, task: str = "auto", probe: bool = False) -> dict[str, Any]:
    """Evaluate ``model_ref`` (default: the registered champion) on the config's dataset: through
    concepts, opaque, and their ratio. Returns the step result (the CLI prints it as the last line).
    """
    from insight import tracking
    from insight.tracking import load_model

    model_ref = model_ref or tracking.champion_ref(cfg)
    t0 = time.perf_counter()
    tracking.check_model(model_ref, cfg.tracking.resolved_uri(cfg.workdir))  # no store made for a missing model
    uri = tracking.setup(cfg)
    with tempfile.TemporaryDirectory(prefix="insight-eval-") as tmp:
        model = load_model(model_ref, tracking_uri=uri, dst=tmp)
        return _evaluate(cfg, model, model_ref, uri, task, probe, t0)


def _evaluate(cfg, model, model_ref: str, uri: str, task: str, probe: bool, t0: float) -> dict[str, Any]:
    import mlflow

    from insight import tracking
    from insight.data.datasets import build_dataset
    from insight.tasks.pictures import write_atomic

    dataset = build_dataset(cfg.data, cfg.workdir)
    seg, cls = choose_tasks(task, dataset.kind)
    records = select_records(dataset, cfg.tasks.split)
    space = resolve_classes(cfg.tasks, dataset, records)
    GroundTruth(dataset, space, cfg.tasks.label_transform)  # fails here, before any work, on a bad mapping
    if probe and not cls:
        raise ValueError("--probe needs image-level labels (classification)")
    if not model.config.backbone == cfg.backbone:
        log.info("evaluate: using the backbone the model was trained on (%s), not the config's",
                 model.config.backbone.model)
    spec = {"cfg": cfg.to_dict(), "model": model_ref if not Path(model_ref).is_dir() else str(Path(model_ref).resolve()),
            "tracking_uri": uri, "names": space.names, "background": space.background, "seg": seg, "cls": cls,
            "probe": probe, "pictures": cfg.tasks.pictures,
            "dataset": {"kind": dataset.kind, "root": dataset.root, "class_names": list(dataset.class_names),
                        "annotations": dataset.annotations}}
    tags = {"insight.model_run_id": model.run_id or "none", "insight.model": model_ref,
            "insight.dataset": f"{dataset.kind}:{dataset.root}"}
    with tracking.step_run(cfg, "evaluate", tags=tags) as run:
        out_dir = Path(cfg.workdir).resolve() / "evaluate" / run.info.run_id
        batches = _run_pool(cfg, spec, records)
        k = len(space.names)
        conf = {v: sum((a[f"conf_{v}"] for a, _ in batches), np.zeros((k, k), np.int64)) for v in VIAS}
        skipped: dict[str, str] = {}
        explanations: dict[str, Any] = {}
        seg_images = 0
        pictures: list[str] = []
        diag: dict[str, np.ndarray] = {}
        per_image: list[dict[str, Any]] = []
        for arrays, meta in batches:
            skipped.update(meta["skipped"])
            explanations.update(meta["explanations"])
            seg_images += meta["seg_images"]
            per_image += meta.get("per_image", [])
            _fold(diag, {key[5:]: arrays[key] for key in arrays if key.startswith("diag_")})
            for key in arrays:
                if key.startswith("png:"):
                    path = write_atomic(out_dir / "pictures" / key[4:], arrays[key].tobytes())
                    pictures.append(str(path))
        result: dict[str, Any] = {
            "run_id": run.info.run_id, "model": model_ref, "model_run_id": model.run_id,
            "dataset": f"{dataset.kind}:{dataset.root}", "images": len(records), "skipped": len(skipped),
            "classes": len(space.names), "background": space.background,
        }
        if skipped:
            log.warning("evaluate: skipped %d images: %s", len(skipped),
                        ", ".join(f"{i} ({w})" for i, w in list(skipped.items())[:5]))
        if seg:
            result.update(_segmentation_metrics(conf, space, seg_images, out_dir))
            if diag:
                result.update(_diagnostics(diag, per_image, conf, out_dir))
        if cls:
            result.update(_classification_metrics(batches, space, out_dir))
        if probe:
            result.update(_probe(cfg, batches, space, out_dir, model))
        if explanations:
            write_atomic(out_dir / "explanations.json", json.dumps(explanations, indent=1).encode())
        write_atomic(out_dir / "skipped.json", json.dumps(skipped, indent=1).encode())
        result.update({"pictures": sorted(pictures), "out_dir": str(out_dir),
                       "seconds": round(time.perf_counter() - t0, 3)})
        write_atomic(out_dir / "results.json", json.dumps(result, indent=1).encode())
        tracking.log_result({k: v for k, v in result.items() if k not in ("images", "skipped", "classes")})
        mlflow.log_metrics({"images": len(records), "skipped_images": len(skipped)})
        mlflow.log_artifacts(str(out_dir), "evaluation")
        return result


def _segmentation_metrics(conf: dict[str, np.ndarray], space: LabelSpace, images: int, out_dir: Path) -> dict[str, Any]:
    ious = {v: iou_per_class(conf[v]) for v in VIAS}
    miou = {v: mean_iou(conf[v]) for v in VIAS}
    gt_pixels = conf["concepts"].sum(1)
    rows = [[i, name, _r(ious["concepts"][i]), _r(ious["opaque"][i]), int(gt_pixels[i]),
             int(conf["concepts"][:, i].sum()), int(conf["opaque"][:, i].sum())]
            for i, name in enumerate(space.names)]
    _write_csv(out_dir / "per_class_segmentation.csv",
               ["label", "class", "iou_concepts", "iou_opaque", "gt_pixels", "pred_pixels_concepts",
                "pred_pixels_opaque"], rows)
    import mlflow

    from insight.tasks.pictures import write_atomic

    write_atomic(out_dir / "confusion.json", json.dumps({v: conf[v].tolist() for v in VIAS}).encode())
    columns = ["label", "class", "iou_concepts", "iou_opaque", "gt_pixels"]
    mlflow.log_table({c: [r[j] for r in rows] for j, c in enumerate(columns)}, "tables/per_class_segmentation.json")
    return {
        "segmentation_images": images,
        "miou_concepts": _r(miou["concepts"]), "miou_opaque": _r(miou["opaque"]),
        "miou_ratio": _r(ratio(miou["concepts"], miou["opaque"])),
        "miou_delta": _r(100 * (miou["concepts"] - miou["opaque"]) if math.isfinite(miou["concepts"] - miou["opaque"])
                         else math.nan),
        "pixel_acc_concepts": _r(pixel_accuracy(conf["concepts"])), "pixel_acc_opaque": _r(pixel_accuracy(conf["opaque"])),
        "per_class_segmentation": str(out_dir / "per_class_segmentation.csv"),
    }


PER_IMAGE_COLUMNS = ["image", "classes_present", "miou_concepts", "miou_opaque", "miou_ratio", "miou_majority",
                     "miou_fg_concepts", "miou_fg_opaque", "recon_cosine", "recon_fvu", "recon_fvu_window_mean",
                     "recon_cosine_window_min", "l0", "argmax_agreement", "residual_equals_opaque", "windows",
                     "patches"]


def _diagnostics(diag: dict[str, np.ndarray], per_image: list[dict[str, Any]], conf: dict[str, np.ndarray],
                 out_dir: Path) -> dict[str, Any]:
    """Dataset-level diagnostics from the replicas' summed statistics, and the per-image table.

    The reconstruction figures are those of the SAE's training metrics (FVU against the mean of all
    evaluated patches, mean per-patch cosine) on the patches the segmenter saw, so they compare with
    the sweep's validation FVU; the window figures average each window's own FVU and cosine.
    """
    n = float(diag["n"])
    sum_x = diag["sum_x"].astype(np.float64)
    total_var = float(diag["sum_sq"]) - float(sum_x @ sum_x) / max(n, 1.0)
    fg = {v: mean_iou(diag[f"conf_fg_{v}"]) for v in VIAS}
    rows = sorted(per_image, key=lambda r: r["image"])
    _write_csv(out_dir / "per_image_segmentation.csv", PER_IMAGE_COLUMNS,
               [[_r(r[c]) if isinstance(r[c], float) else r[c] for c in PER_IMAGE_COLUMNS] for r in rows])
    import mlflow

    mlflow.log_table({c: [r[c] for r in rows] for c in PER_IMAGE_COLUMNS}, "tables/per_image_segmentation.json")
    window_fvu = [r["recon_fvu_window_mean"] for r in rows if r["recon_fvu_window_mean"] is not None]
    return {
        "recon_cosine": _r(float(diag["cos_sum"]) / n), "recon_fvu": _r(float(diag["err"]) / max(total_var, 1e-30)),
        "recon_fvu_window_mean": _r(float(np.mean(window_fvu))) if window_fvu else None,
        "l0": _r(float(diag["nnz"]) / n), "patches": int(n),
        "argmax_agreement": _r(float(diag["agree"]) / n),
        "residual_equals_opaque": bool(float(diag["residual_mismatch"]) == 0),
        "residual_max_logit_diff": float(diag["max_residual_diff"]),
        "miou_majority": _r(mean_iou(majority_confusion(conf["opaque"]))),
        "miou_fg_concepts": _r(fg["concepts"]), "miou_fg_opaque": _r(fg["opaque"]),
        "miou_fg_ratio": _r(ratio(fg["concepts"], fg["opaque"])),
        "per_image_segmentation": str(out_dir / "per_image_segmentation.csv"),
    }


def _classification_metrics(batches, space: LabelSpace, out_dir: Path) -> dict[str, Any]:
    labels = np.concatenate([a["cls_labels"] for a, _ in batches]) if batches else np.zeros(0, np.int64)
    if len(labels) == 0:
        return {"classification_images": 0}
    acc = {}
    for v in VIAS:
        logits = np.concatenate([a[f"cls_{v}"] for a, _ in batches])
        acc[v] = topk_accuracy(logits, labels, (1, 5))
        pred = logits.argmax(1)
        acc[v]["per_class"] = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
                               for c in range(len(space.fg_names))]
    rows = [[c, name, int((labels == c).sum()), _r(acc["concepts"]["per_class"][c]), _r(acc["opaque"]["per_class"][c])]
            for c, name in enumerate(space.fg_names)]
    _write_csv(out_dir / "per_class_classification.csv",
               ["index", "class", "images", "top1_concepts", "top1_opaque"], rows)
    return {
        "classification_images": int(len(labels)),
        "top1_concepts": _r(acc["concepts"][1]), "top5_concepts": _r(acc["concepts"][5]),
        "top1_opaque": _r(acc["opaque"][1]), "top5_opaque": _r(acc["opaque"][5]),
        "top1_ratio": _r(ratio(acc["concepts"][1], acc["opaque"][1])),
        "top5_ratio": _r(ratio(acc["concepts"][5], acc["opaque"][5])),
    }


def _probe(cfg, batches, space: LabelSpace, out_dir: Path, model) -> dict[str, Any]:
    """Train the concept-bottleneck probe on a split of the evaluated images; score the rest."""
    from insight.cache.format import is_validation
    from insight.tasks.classification import train_probe
    from insight.tasks.explain import concept_namer
    from insight.tasks.pictures import write_atomic

    ids = [i for _, meta in batches for i in meta["cls_ids"]]
    if not ids:
        raise ValueError("--probe: no image has a class label")
    s = np.concatenate([a["cls_s"] for a, _ in batches if "cls_s" in a])
    labels = np.concatenate([a["cls_labels"] for a, _ in batches])
    held = np.array([is_validation(i, cfg.tasks.probe_val_fraction) for i in ids])
    if held.all() or not held.any():
        raise ValueError(f"--probe: {len(ids)} labelled images give an empty train or held-out split at "
                         f"tasks.probe_val_fraction={cfg.tasks.probe_val_fraction}; evaluate more images")
    probe, info = train_probe(cfg, s[~held], labels[~held], space.fg_names)
    probe.save(out_dir / "probe")
    logits = probe.logits(s[held]).numpy()
    acc = topk_accuracy(logits, labels[held], (1, 5))
    namer = concept_namer(model)
    held_ids = [i for i, h in zip(ids, held, strict=True) if h]
    expl, cover = [], {"90": [], "95": [], "99": []}
    for j, row in enumerate(s[held]):
        ex = probe.explain(row, top=cfg.tasks.top_concepts, namer=namer)
        for key in cover:
            cover[key].append(ex.coverage[key])
        if j < 50:
            expl.append({"image": held_ids[j], "label": space.fg_names[int(labels[held][j])], **ex.as_dict()})
    write_atomic(out_dir / "probe_explanations.json", json.dumps(expl, indent=1).encode())
    return {**info, "probe_top1": _r(acc[1]), "probe_top5": _r(acc[5]), "probe_heldout_images": int(held.sum()),
            **{f"probe_concepts_{key}": _r(float(np.mean(v))) for key, v in cover.items()}}
