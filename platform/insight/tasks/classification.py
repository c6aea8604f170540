"""Image classification through concepts: zero-shot and a concept-bottleneck probe.

Zero-shot (docs/method.md, Tasks and explanations; the classification analogue of segmentation):
the image's patch vectors are mean-pooled, and the class logit is the cosine
of the pooled vector with the class text vector; through concepts the pooled
vector is the pooled reconstruction, mean_p x^(p) = (mean_p z(p)) W_dec + b_dec,
so the logit splits exactly over concepts like a patch logit does
(`insight.tasks.explain`). The opaque route pools the backbone features.

Concept-bottleneck probe: s = max_p z(p), logits = W s with no bias, trained
with cross-entropy + lambda * ||W||_1 and Adam on Ray Train (`train_probe`).
Concept i's contribution to class c is W[c, i] * s_i, localised by concept i's
activation map z_i(p); `coverage_counts` says how many concepts carry 90/95/99 %
of the logit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from insight.atomic import swap_in_folder
from insight.tasks.explain import (
    ConceptContribution,
    Decomposition,
    PatchCodes,
    coverage_counts,
    decompose,
    encode_sparse,
    top_contributions,
)
from insight.tasks.segmentation import VIAS, ClassBank, Via

PROBE_FORMAT = "insight-probe/1"


# ------------------------------------------------------------------ zero-shot


@dataclass
class ClassExplanation:
    """Why an image scores class ``class_name``: top concepts, the bias term, coverage, maps."""

    class_index: int
    class_name: str
    logit: float
    bias: float
    top: list[ConceptContribution]
    coverage: dict[str, int]
    maps_khw: Tensor = field(repr=False)  # (K, gh, gw) activation maps z_i(p) of the top concepts

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.class_name, "index": self.class_index, "logit": self.logit, "bias": self.bias,
                "top": [c.as_dict() for c in self.top], "coverage": self.coverage}


@dataclass
class ClassificationResult:
    """Zero-shot class logits of one image; through concepts with the exact pooled decomposition."""

    logits_f: Tensor  # (F,) cosine logits
    class_names: list[str]
    via: Via
    temperature: float
    grid_hw: tuple[int, int]
    codes: PatchCodes | None = None  # per-patch codes of the classified view (concepts route)
    decomposition: Decomposition | None = None  # one "patch": the pooled reconstruction

    def probs(self) -> Tensor:
        return torch.softmax(self.temperature * self.logits_f, dim=0)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        p = self.probs()
        vals, idx = torch.topk(p, min(k, len(p)))
        return [(self.class_names[int(i)], float(v)) for v, i in zip(vals, idx, strict=True)]

    def concept_vector(self) -> Tensor:
        """s = max_p z(p): the probe's input for this image."""
        if self.codes is None:
            raise ValueError("concept vectors need a classification through concepts")
        return self.codes.pooled("max").cpu()


class Classifier:
    """Backbone + SAE + class bank for one image at a time (centre crop at the backbone's size)."""

    def __init__(self, backbone, bank: ClassBank, tasks, sae=None) -> None:
        if bank.background:
            bank = ClassBank(bank.fg_names, False, bank.text_fd)  # classification has no background label
        self.backbone, self.bank, self.tasks, self.sae = backbone, bank, tasks, sae
        from insight.data.transforms import eval_transform

        self._transform = eval_transform(backbone.image_size, backbone.mean, backbone.std)

    @classmethod
    def from_model(cls, model, class_names: Sequence[str], tasks=None, backbone=None,
                   device: str | None = None) -> Classifier:
        from insight.backbones import build_backbone

        cfg = model.config
        backbone = backbone or build_backbone(cfg.backbone, device=device)
        return cls(backbone, ClassBank.build(backbone, class_names, cfg.backbone.templates), tasks or cfg.tasks,
                   sae=model.sae)

    def view(self, image_rgb: np.ndarray) -> np.ndarray:
        """The centre-cropped RGB view that is classified (uint8, for pictures)."""
        import albumentations as A
        import cv2

        size = self.backbone.image_size
        return A.Compose([A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
                          A.CenterCrop(size, size)])(image=np.asarray(image_rgb))["image"]

    @torch.no_grad()
    def encode(self, image_rgb: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(P, D) patch vectors of the centre crop, and the grid shape."""
        rgb = np.asarray(image_rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
        x_chw = np.ascontiguousarray(self._transform(image=rgb)["image"].transpose(2, 0, 1))
        f_bhwd = self.backbone.encode_patches(torch.from_numpy(x_chw)[None])
        return f_bhwd.reshape(-1, f_bhwd.shape[-1]).float(), (int(f_bhwd.shape[1]), int(f_bhwd.shape[2]))

    def classify_features(self, feats_pd: Tensor, grid_hw: tuple[int, int], via: Via = "concepts") -> ClassificationResult:
        text = self.bank.text_fd
        if via == "opaque":
            pooled = feats_pd.mean(0, keepdim=True)
            logits = (F.normalize(pooled, dim=-1) @ text.to(pooled).T)[0]
            return ClassificationResult(logits.cpu(), self.bank.names, via, self.tasks.temperature, grid_hw)
        if via != "concepts":
            raise ValueError(f"via must be one of {VIAS}, got {via!r}")
        if self.sae is None:
            raise ValueError("classification through concepts needs an SAE; this Classifier has none")
        codes = encode_sparse(self.sae, feats_pd)
        pooled = PatchCodes.from_dense(codes.pooled("mean")[None])
        dec = decompose(pooled, self.sae, text)
        x_1d = pooled.decode(self.sae)
        logits = ((x_1d @ F.normalize(text.to(x_1d), dim=-1).T) / dec.norm_p[:, None])[0]
        return ClassificationResult(logits.float().cpu(), self.bank.names, via, self.tasks.temperature, grid_hw,
                                    codes=codes, decomposition=dec)

    def classify(self, image_rgb: np.ndarray, via: Via = "concepts") -> ClassificationResult:
        return self.classify_features(*self.encode(image_rgb), via)

    def classify_both(self, image_rgb: np.ndarray) -> dict[Via, ClassificationResult]:
        feats, grid = self.encode(image_rgb)
        return {via: self.classify_features(feats, grid, via) for via in VIAS}


def explain_zero_shot(result: ClassificationResult, class_index: int, top: int = 5,
                      namer: Callable[[int], str] | None = None) -> ClassExplanation:
    """Concept contributions to one class of a zero-shot concept classification (exact: sum + bias = logit)."""
    dec = result.decomposition
    if dec is None or result.codes is None:
        raise ValueError(f"explanations need a classification through concepts, not via={result.via!r}")
    namer = namer or (lambda i: f"concept {i}")
    contrib_m, bias = dec.weighted_sums(torch.ones_like(dec.norm_p), class_index)
    contrib_m = contrib_m.cpu()
    tops = top_contributions(contrib_m, top, namer)
    maps = result.codes.concept_values([c.concept for c in tops]).reshape(len(tops), *result.grid_hw).cpu()
    return ClassExplanation(class_index, result.class_names[class_index], float(result.logits_f[class_index]), bias,
                            tops, coverage_counts(contrib_m), maps)


# ------------------------------------------------------------------ the probe


@dataclass
class ConceptProbe:
    """A linear head on the max-pooled concept vector: logits = s @ W^T (no bias)."""

    weight_cm: Tensor  # (C, M)
    class_names: list[str]

    def logits(self, s_nm: Tensor | np.ndarray) -> Tensor:
        s = torch.as_tensor(np.asarray(s_nm) if not isinstance(s_nm, Tensor) else s_nm, dtype=torch.float32)
        if s.shape[-1] != self.weight_cm.shape[1]:
            raise ValueError(f"concept vectors have {s.shape[-1]} concepts, the probe expects {self.weight_cm.shape[1]}")
        return s @ self.weight_cm.T

    def explain(self, s_m: Tensor, class_index: int | None = None, top: int = 5,
                namer: Callable[[int], str] | None = None, codes: PatchCodes | None = None,
                grid_hw: tuple[int, int] | None = None) -> ClassExplanation:
        """Contributions w_c,i * s_i to one class (default: the predicted one), with the top concepts' maps."""
        namer = namer or (lambda i: f"concept {i}")
        s_m = torch.as_tensor(s_m, dtype=torch.float32)
        logits = self.logits(s_m[None])[0]
        c = int(logits.argmax()) if class_index is None else int(class_index)
        contrib_m = self.weight_cm[c] * s_m
        tops = top_contributions(contrib_m, top, namer)
        if codes is not None and grid_hw is not None:
            maps = codes.concept_values([t.concept for t in tops]).reshape(len(tops), *grid_hw)
        else:
            maps = torch.zeros(len(tops), 0, 0)
        return ClassExplanation(c, self.class_names[c], float(logits[c]), 0.0, tops, coverage_counts(contrib_m), maps)

    def save(self, folder: str | os.PathLike) -> Path:
        """safetensors weights + JSON (class names), written into a temp folder then moved into place."""
        from safetensors.torch import save_file

        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        save_file({"weight": self.weight_cm.contiguous()}, str(tmp / "probe.safetensors"))
        (tmp / "probe.json").write_text(json.dumps({"format": PROBE_FORMAT, "class_names": self.class_names,
                                                    "n_concepts": int(self.weight_cm.shape[1])}))
        swap_in_folder(tmp, target)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ConceptProbe:
        from safetensors.torch import load_file

        root = Path(folder)
        meta_path = root / "probe.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no concept probe at {root} (probe.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != PROBE_FORMAT:
            raise ValueError(f"{root}: unknown probe format {meta.get('format')!r}, expected {PROBE_FORMAT!r}")
        return cls(load_file(str(root / "probe.safetensors"))["weight"], list(meta["class_names"]))


def probe_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: Adam on cross-entropy + l1 * ||W||_1 over this worker's shard."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(config["seed"]))
    head = torch.nn.Linear(int(config["n_concepts"]), int(config["n_classes"]), bias=False)
    torch.nn.init.zeros_(head.weight)  # the problem is convex: start from "no concept matters"
    model = ray.train.torch.prepare_model(head) if world > 1 else head
    device = ray.train.torch.get_device() if world > 1 else torch.device("cpu")
    opt = torch.optim.Adam(head.parameters(), lr=float(config["lr"]))
    l1 = float(config["l1"])
    shard = ray.train.get_dataset_shard("train")
    epochs = int(config["epochs"])
    for epoch in range(epochs):
        loss_sum, seen, correct = 0.0, 0, 0
        for batch in shard.iter_torch_batches(batch_size=int(config["batch"]), dtypes={"s": torch.float32,
                                                                                     "y": torch.int64},
                                              device=device, local_shuffle_buffer_size=int(config["shuffle"]),
                                              local_shuffle_seed=int(config["seed"]) + epoch):
            s_bm, y_b = batch["s"], batch["y"]
            logits_bc = model(s_bm)
            ce = F.cross_entropy(logits_bc, y_b)
            loss = ce + l1 * head.weight.abs().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(ce) * len(y_b)
            seen += len(y_b)
            correct += int((logits_bc.argmax(1) == y_b).sum())
        last = epoch == epochs - 1
        if not last and (epoch + 1) % int(config["report_every"]):
            continue
        metrics = {"epoch": epoch + 1, "train_ce": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                   "l1": float(head.weight.abs().sum())}
        ckpt_dir = None
        if last and rank == 0:
            ckpt_dir = tempfile.mkdtemp(prefix="insight-probe-")
            save_file({"weight": head.weight.detach().cpu().contiguous()}, os.path.join(ckpt_dir, "probe.safetensors"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def train_probe(cfg, s_nm: np.ndarray, labels_n: np.ndarray, class_names: Sequence[str], *,
                num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float | None = None,
                seed: int = 0) -> tuple[ConceptProbe, dict[str, Any]]:
    """Train the concept-bottleneck probe on concept vectors with Ray Train (TorchTrainer).

    ``s_nm``: (N, M) max-pooled concept vectors (fresh from `Classifier` or
    from a cache, `concept_vectors_from_cache`); ``labels_n``: class indices.
    Hyper-parameters come from ``cfg.tasks`` (probe_lr, probe_l1, probe_batch,
    probe_epochs); Ray keeps the run under ``<workdir>/ray``.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from insight.runtime import ensure_ray

    s = np.ascontiguousarray(np.asarray(s_nm, dtype=np.float32))
    y = np.asarray(labels_n, dtype=np.int64)
    n_classes = len(class_names)
    if s.ndim != 2 or len(s) != len(y) or len(s) == 0:
        raise ValueError(f"probe data: concept vectors {s.shape} and labels {y.shape} must pair up (N, M) / (N,)")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"probe labels must lie in 0..{n_classes - 1}, got {int(y.min())}..{int(y.max())}")
    if not np.isfinite(s).all():
        raise ValueError("probe data: concept vectors contain NaN or inf")
    t = cfg.tasks
    ensure_ray(cfg)
    ds = ray.data.from_arrow(pa.table({"s": ArrowTensorArray.from_numpy(s), "y": pa.array(y)})).materialize()
    name = f"{cfg.name}-probe-{uuid.uuid4().hex[:8]}"
    storage = Path(cfg.workdir).resolve() / "ray"
    loop_cfg = {"n_concepts": s.shape[1], "n_classes": n_classes, "lr": t.probe_lr, "l1": t.probe_l1,
                "batch": t.probe_batch, "epochs": t.probe_epochs, "seed": seed, "shuffle": min(len(s), 4096),
                "report_every": max(1, t.probe_epochs // 5)}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        probe_loop, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker or t.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"probe training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("probe training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        weight = load_file(os.path.join(d, "probe.safetensors"))["weight"]
    shutil.rmtree(storage / name, ignore_errors=True)  # the weights are returned; the run folder is scratch
    metrics = dict(result.metrics or {})
    info = {"probe_train_acc": metrics.get("train_acc"), "probe_train_ce": metrics.get("train_ce"),
            "probe_epochs": t.probe_epochs, "probe_train_images": int(len(s)),
            "probe_nonzero_weights": int((weight.abs() > 1e-6).sum()), "probe_fit_s": time.perf_counter() - t0}
    return ConceptProbe(weight, list(class_names)), info


# ------------------------------------------------------------------ concept vectors


@torch.no_grad()
def concept_vectors(sae, feats_npd: Tensor | np.ndarray) -> Tensor:
    """(N, M) max-pooled concept vectors of N images' patch vectors (N, P, D)."""
    x = torch.as_tensor(np.asarray(feats_npd, dtype=np.float32))
    if x.ndim == 4:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.stack([encode_sparse(sae, x[i]).pooled("max") for i in range(len(x))]) if len(x) else \
        torch.zeros(0, sae.n_concepts)


def concept_vectors_from_cache(location: str, sae, ids: Iterable[str] | None = None,
                               batch: int = 64) -> tuple[list[str], np.ndarray]:
    """Concept vectors of the images of an activation cache (all, or those in ``ids``).

    Augmented views (ids ``<image>#v<k>``) are included when their base id is
    wanted; callers label them by the base id.
    """
    from insight.cache import CacheReader

    reader = CacheReader(location)
    if reader.manifest.dim != sae.d_in:
        raise ValueError(f"cache {location} holds {reader.manifest.dim}-dim features; the SAE reads {sae.d_in}")
    wanted = set(ids) if ids is not None else None
    out_ids: list[str] = []
    out: list[Tensor] = []
    pending_ids: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            out.append(concept_vectors(sae, np.stack(pending)))
            out_ids.extend(pending_ids)
            pending.clear()
            pending_ids.clear()

    for image_id, feats_hwd in reader.iter_images():
        if wanted is not None and image_id.split("#v")[0] not in wanted:
            continue
        pending_ids.append(image_id)
        pending.append(feats_hwd)
        if len(pending) >= batch:
            flush()
    flush()
    s = torch.cat(out).numpy() if out else np.zeros((0, sae.n_concepts), np.float32)
    return out_ids, s
