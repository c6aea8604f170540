"""The model as the server runs it, without Ray: backbone + SAE + concept index.

A Serve replica wraps one :class:`Engine`; the benchmark calls the same
object in-process, so "served vs in-process" compares the same work. Inputs
are already-decoded uint8 views (the ingress decodes and bounds images);
outputs are small NumPy arrays that the ingress renders (``serve.render``).

Which config governs what: the model's own training config says what made
its features (``backbone``, ``sae``); the task settings (``tasks.*``:
temperature, windows, background threshold, ...) are the model's as well,
except for the keys the server's config sets explicitly (its ``tasks:``
section or ``--set tasks.*`` at `insight serve`): those win, so a serve-time
``--set tasks.temperature=50`` takes effect and nothing else changes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from serve.common import ExplainRaw, ModelLoader
from serve.concepts import ConceptIndex

__all__ = ["Engine", "ExplainRaw", "ModelLoader"]

log = logging.getLogger(__name__)


class Engine:
    """Everything one replica holds; thread-compatible but not thread-safe (one call at a time)."""

    def __init__(self, loaded: Any, threads: int | None = None, tasks: dict[str, Any] | None = None) -> None:
        """``tasks``: the serve-time ``tasks.*`` keys that override the model's (see the module docstring)."""
        from insight.backbones import build_backbone
        from insight.config import TasksConfig

        if threads:
            # One intra-op thread per granted CPU: on a busy machine more threads than cores make
            # OpenMP spin against other processes (measured here: a tiny ViT forward 3 ms -> 220 ms).
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.cfg = loaded.config
        if tasks:  # validated as a whole: an override may break a cross-field rule (stride <= crop)
            merged = TasksConfig.model_validate({**self.cfg.tasks.model_dump(), **tasks})
            self.cfg = self.cfg.model_copy(update={"tasks": merged})
        self.tasks_overridden = sorted(tasks or {})
        self.backbone = build_backbone(self.cfg.backbone)
        self.device = torch.device(getattr(self.backbone, "device_name", "cpu"))
        self.sae = loaded.sae.to(self.device).eval()
        if int(self.sae.d_in) != int(self.backbone.dim):
            raise ValueError(f"model {loaded.uri}: SAE input dim {self.sae.d_in} != backbone dim {self.backbone.dim}")
        self.image_size = int(self.backbone.image_size)
        self.mean = np.asarray(self.backbone.mean, dtype=np.float32) * 255.0
        self.std = np.asarray(self.backbone.std, dtype=np.float32) * 255.0
        self.grid = self.image_size // int(self.backbone.patch_size)
        self.concepts = ConceptIndex.for_model(loaded)
        # Before theta is learned the SAE encodes with BatchTopK, whose result depends on the batch:
        # encode each image alone then, so batching never changes an answer.
        self.per_image_topk = float(self.sae.threshold) < 0
        self._text_cache: dict[tuple[str, ...], Any] = {}  # class names -> ClassBank, oldest first
        self.probe = self._find_probe()

    # ------------------------------------------------------------------ info

    def public_ref(self) -> str:
        """How answers name the model: registry name and version, else run, else the weights' hash.

        Never a local path: a checkpoint folder is named by the SHA-256 of its weights file.
        """
        lm = self.loaded
        if lm.run_id:  # models:/name/version, else runs:/<id>/checkpoint
            return lm.uri
        from insight.cache.format import file_sha256

        return f"checkpoint:sha256={file_sha256(Path(lm.checkpoint) / 'model.safetensors')[:16]}"

    def info(self) -> dict[str, Any]:
        lm = self.loaded
        return {
            "name": lm.name, "version": None if lm.version is None else str(lm.version), "run_id": lm.run_id,
            "uri": self.public_ref(),
            "image_size": self.image_size, "grid": [self.grid, self.grid], "patch_size": int(self.backbone.patch_size),
            "dim": int(self.sae.d_in), "n_concepts": int(self.sae.n_concepts), "k": int(self.sae.k),
            "group_sizes": list(self.sae.group_sizes), "levels": self.concepts.levels,
            "threshold": float(self.sae.threshold), "concepts_named": self.concepts.named,
            "concepts_source": self.concepts.source, "device": str(self.device),
            "backbone": self.backbone.identity(), "metrics": dict(lm.metrics or {}),
            "has_probe": self.probe is not None,
            "probe_classes": list(self.probe.class_names) if self.probe is not None else None,
            "segment_short_side": self.segment_short_side, "segment_max_long_side": int(self.cfg.tasks.max_long_side),
            "config": self._public_config(),
        }

    def _public_config(self) -> dict[str, Any]:
        """What a client may know of the model's config: the SAE, the backbone's identity and the task
        settings in effect. Never the workdir, cache, dataset or tracking locations, nor secrets."""
        b = self.cfg.backbone
        pretrained = b.pretrained
        if pretrained and ("/" in pretrained or os.sep in pretrained or Path(pretrained).exists()):
            pretrained = "local file"
        tasks = self.cfg.tasks.model_dump(mode="json", exclude={"split"})
        return {"name": self.cfg.name, "sae": self.cfg.sae.model_dump(mode="json"),
                "backbone": {"kind": b.kind, "model": b.model, "pretrained": pretrained, "image_size": b.image_size},
                "tasks": tasks, "tasks_set_at_serve": self.tasks_overridden}

    # --------------------------------------------------------------- explain

    def _normalise(self, views: list[np.ndarray]) -> torch.Tensor:
        x = (np.stack(views).astype(np.float32) - self.mean) / self.std  # (B, S, S, 3)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    @torch.inference_mode()
    def features(self, views: list[np.ndarray]) -> torch.Tensor:
        """uint8 (S, S, 3) views -> patch grid (B, H, W, D) on the SAE's device."""
        return self.backbone.encode_patches(self._normalise(views)).to(self.device)

    @torch.inference_mode()
    def codes(self, feats_bhwd: torch.Tensor) -> torch.Tensor:
        if self.per_image_topk and feats_bhwd.shape[0] > 1:
            return torch.cat([self.sae.encode_grid(f[None]) for f in feats_bhwd])
        return self.sae.encode_grid(feats_bhwd)

    @torch.inference_mode()
    def explain_batch(self, views: list[np.ndarray], top_ks: list[int]) -> list[ExplainRaw]:
        """Top ``top_ks[b]`` concepts of each view by peak activation, with their maps."""
        t0 = time.perf_counter()
        feats = self.features(views)
        z_bhwm = self.codes(feats)
        b, h, w, m = z_bhwm.shape
        xh = self.sae.decode(z_bhwm.reshape(-1, m)).reshape(b, h, w, -1)
        cos_b = F.cosine_similarity(feats, xh, dim=-1).mean((1, 2))
        # FVU of the view's patches, as training reports it: squared error over variance about their mean
        var_b = (feats - feats.mean((1, 2), keepdim=True)).square().sum((1, 2, 3))
        fvu_b = (feats - xh).square().sum((1, 2, 3)) / var_b.clamp_min(1e-30)
        l0_b = (z_bhwm > 0).sum(-1).float().mean((1, 2))
        score_bm = z_bhwm.amax((1, 2))
        kmax = min(max(top_ks), m)
        top = torch.topk(score_bm, kmax, dim=1)
        ms = (time.perf_counter() - t0) * 1000.0
        out = []
        for i, k in enumerate(top_ks):
            vals, ids = top.values[i, :k], top.indices[i, :k]
            keep = vals > 0
            vals, ids = vals[keep], ids[keep]
            maps = z_bhwm[i].index_select(-1, ids).permute(2, 0, 1).contiguous()  # (k, H, W)
            out.append(ExplainRaw(
                ids=ids.cpu().numpy().astype(np.int64), scores=vals.float().cpu().numpy(),
                means=maps.mean((1, 2)).float().cpu().numpy(), areas=(maps > 0).float().mean((1, 2)).cpu().numpy(),
                maps=maps.float().cpu().numpy(), cosine=float(cos_b[i]), l0=float(l0_b[i]), compute_ms=ms,
                concepts=[self.concept_ref(int(c)) for c in ids.tolist()], fvu=float(fvu_b[i]),
            ))
        return out

    # ---------------------------------------------------------- segmentation

    def _bank(self, classes: tuple[str, ...]) -> Any:
        """Class-name text vectors, cached: pages and clients repeat the same class lists."""
        from insight.tasks.segmentation import ClassBank

        bank = self._text_cache.pop(classes, None)
        if bank is None:
            bank = ClassBank.build(self.backbone, list(classes), self.cfg.backbone.templates)
        self._text_cache[classes] = bank
        while len(self._text_cache) > 64:
            self._text_cache.pop(next(iter(self._text_cache)))
        return bank

    @property
    def segment_short_side(self) -> int:
        """The short side the segmenter resizes to: larger uploads are shrunk to it first."""
        return int(self.cfg.tasks.short_side or self.cfg.tasks.crop)

    @torch.inference_mode()
    def segment(self, image_rgb: np.ndarray, classes: list[str], top_k: int) -> dict[str, Any]:
        """Zero-shot segmentation through concepts, each predicted segment explained (insight.tasks).

        ``share`` of a concept is its contribution over the segment's total absolute
        concept contribution, so shares of all concepts have absolute values summing to 1.
        """
        from insight.tasks.explain import explain_segments
        from insight.tasks.segmentation import Segmenter

        t0 = time.perf_counter()
        seg = Segmenter(self.backbone, self._bank(tuple(classes)), self.cfg.tasks, sae=self.sae)
        result = seg.segment(image_rgb, via="concepts")
        explained = explain_segments(result, top=top_k, namer=lambda i: self.concepts.rows[i].label)
        total = int(result.labels_hw.size)
        probs_fhw = result.probs()
        segments = []
        for e in explained:
            mass = float(e.contributions_m.abs().sum()) or 1.0
            mask = torch.as_tensor(result.labels_hw == e.label)
            segments.append({
                "index": e.label, "class": e.class_name, "pixels": e.pixels, "fraction": e.pixels / total,
                "mean_probability": float(probs_fhw[e.label - result.offset][mask].mean()),
                "mean_logit": e.mean_logit, "bias": e.bias, "concepts_total": e.concepts_total,
                "coverage": e.coverage,
                "concepts": [{**self.concept_ref(c.concept), "contribution": c.contribution,
                              "share": c.contribution / mass} for c in e.top],
            })
        return {"labels": result.labels_hw.astype(np.int32), "segments": segments, "via": result.via,
                "windows": result.plan.n_windows, "background_index": None,
                "compute_ms": (time.perf_counter() - t0) * 1000.0}

    # --------------------------------------------------------- classification

    PROBE_CLASSES_LISTED = 10

    def _find_probe(self) -> Any:
        """The model's concept-bottleneck probe (`insight.tasks.classification.ConceptProbe`), if
        `insight evaluate --probe` trained one for it (`insight.models.LoadedModel.probe_folder`)."""
        from insight.tasks.classification import ConceptProbe

        folder = self.loaded.probe_folder()
        if folder is None:
            return None
        try:
            probe = ConceptProbe.load(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("probe of %s unusable: %s", self.loaded.uri, exc)
            return None
        if probe.weight_cm.shape[1] != self.sae.n_concepts:
            log.warning("probe of %s has %d concepts, the SAE %d: ignored", self.loaded.uri,
                        probe.weight_cm.shape[1], self.sae.n_concepts)
            return None
        return probe

    def _class_entry(self, name: str, index: int, prob: float, logit: float, bias: float, coverage: dict[str, int],
                     tops: list[Any], contrib_m: torch.Tensor) -> dict[str, Any]:
        mass = float(contrib_m.abs().sum()) or 1.0
        return {"class": name, "index": index, "score": prob, "logit": logit, "bias": bias, "coverage": coverage,
                "concepts": [{**self.concept_ref(c.concept), "contribution": c.contribution,
                              "share": c.contribution / mass} for c in tops]}

    @torch.inference_mode()
    def classify(self, view: np.ndarray, classes: list[str] | None, top_k: int) -> dict[str, Any]:
        """Zero-shot through concepts when ``classes`` are given, else the model's probe (insight.tasks).

        Every class lists its top concepts with their exact contributions to its logit;
        ``share`` is a contribution over the class's total absolute concept contribution.
        """
        from insight.tasks.classification import Classifier, explain_zero_shot
        from insight.tasks.explain import encode_sparse

        t0 = time.perf_counter()
        namer = lambda i: self.concepts.rows[i].label  # noqa: E731
        out: list[dict[str, Any]] = []
        if classes:
            clf = Classifier(self.backbone, self._bank(tuple(classes)), self.cfg.tasks, sae=self.sae)
            result = clf.classify(view, via="concepts")
            probs = result.probs()
            for c in torch.argsort(probs, descending=True).tolist():
                e = explain_zero_shot(result, c, top=top_k, namer=namer)
                contrib_m, _ = result.decomposition.weighted_sums(torch.ones(1, dtype=result.decomposition.norm_p.dtype), c)
                out.append(self._class_entry(e.class_name, c, float(probs[c]), e.logit, e.bias, e.coverage, e.top,
                                             contrib_m))
            mode = "zero-shot"
        else:
            if self.probe is None:
                raise ValueError("this model has no trained probe; give class names")
            feats = self.features([view])[0]
            codes = encode_sparse(self.sae, feats.reshape(-1, feats.shape[-1]))
            s_m = codes.pooled("max").float().cpu()
            logits = self.probe.logits(s_m[None])[0]
            probs = torch.softmax(logits, dim=0)
            for c in torch.argsort(probs, descending=True)[: self.PROBE_CLASSES_LISTED].tolist():
                e = self.probe.explain(s_m, c, top=top_k, namer=namer)
                out.append(self._class_entry(e.class_name, c, float(probs[c]), e.logit, e.bias, e.coverage, e.top,
                                             self.probe.weight_cm[c] * s_m))
            mode = f"probe ({len(self.probe.class_names)} classes, top {len(out)} listed)"
        return {"mode": mode, "via": "concepts", "classes": out, "compute_ms": (time.perf_counter() - t0) * 1000.0}

    # ------------------------------------------------------------- concepts

    def concepts_page(self, q: str | None, level: int | None, offset: int, limit: int) -> dict[str, Any]:
        total, items = self.concepts.search(q, level, offset, limit)
        return {"total": total, "offset": offset, "limit": limit, "named": self.concepts.named, "items": items}

    def concept_detail(self, concept_id: int) -> dict[str, Any] | None:
        return self.concepts.detail(concept_id)

    def concept_ref(self, concept_id: int) -> dict[str, Any]:
        """Name, label, level and the root..concept path of one concept (for explanations)."""
        return {**self.concepts.ref(concept_id), "path": [self.concepts.ref(p) for p in self.concepts.path(concept_id)]}
