"""The model replica (`EvalWorker`) and its Ray Data pool (`run_pool`).

Each replica loads the model from its reference, segments and classifies a batch of images
both ways from one backbone pass, and returns one packed row per batch: summed confusion
matrices and diagnostic statistics, classification logits, concept vectors (for the probe)
and the explanation pictures of the first ``tasks.pictures`` images as PNG bytes.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
import time
from typing import Any

import numpy as np

from insight.tasks.evaluate.labels import GroundTruth, LabelSpace
from insight.tasks.metrics import (
    IGNORE_INDEX,
    confusion_matrix,
    finite_or_none,
    majority_confusion,
    mean_iou,
    ratio,
    reconstruction_fidelity,
)

VIAS = ("concepts", "opaque")


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_") or "image"


def fold(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
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
        from insight.models import load_model
        from insight.tasks.classification import Classifier
        from insight.tasks.explain import concept_namer
        from insight.tasks.segmentation import ClassBank, Segmenter

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
                fold(diag, parts)
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


def run_pool(cfg, spec: dict[str, Any], records: list) -> list[tuple[dict[str, np.ndarray], dict]]:
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
