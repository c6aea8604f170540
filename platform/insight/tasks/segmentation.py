"""Zero-shot open-vocabulary segmentation, through concepts or on the opaque features.

One image in, one `SegmentationResult` out (`Segmenter.segment`), so a server
can call it per request; `insight evaluate` runs the same function over a
dataset. Per patch, the class logit is cos(x, t_c) with t_c the class name
embedded over the prompt templates, and x either the backbone feature
(``via="opaque"``, the reference) or its SAE reconstruction
x^ = z W_dec + b_dec (``via="concepts"``); ``via="residual"`` adds the
residual x - x^ back as one more term, so it equals the opaque route and says
how much of each opaque logit the concepts carry (`Segmenter.residual_logits`).
Logits go to pixels through the
sliding-window assembly (`insight.tasks.windows`), are turned into
probabilities with softmax(temperature * logit), and the arg-max is the label.

Background (datasets whose label 0 is background), ``tasks.background``:
``threshold`` (our default): label 0 gets no prompt; a pixel becomes background
when its max probability is below ``tasks.bg_threshold`` and, when the
backbone has DINOiser heads, its background saliency is also low
(< ``tasks.saliency_threshold``); without heads the probability test alone
decides (docs/method.md, Tasks and explanations). ``prompted`` (the reference
setting): the word "background" is prompted and competes in the softmax with
the other classes; with DINOiser heads, pixels whose max probability is below
the threshold and whose saliency is low also become background. Either way
``logits_fhw`` and the explanations cover the foreground classes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from insight.data.classes import BackgroundOffset
from insight.tasks.explain import Decomposition, PatchCodes, decompose, encode_sparse
from insight.tasks.windows import SlidePlan, assemble, plan_windows, window_pixels

Via = Literal["concepts", "opaque", "residual"]
VIAS: tuple[Via, ...] = ("concepts", "opaque")  # the two routes compared; "residual" is their bridge


@dataclass
class ClassBank(BackgroundOffset):
    """The label set of a task: names (label i = names[i]) and the text vectors of the prompted ones.

    With ``background``, label 0 is background; the text rows are then for
    labels 1..K-1 ("foreground" classes). A prompted background (the
    reference rule, module doc) has its own vector in ``background_text_d``.
    """

    names: list[str]
    background: bool
    text_fd: Tensor  # (F, D) unit vectors of the foreground classes
    background_text_d: Tensor | None = None  # (D,) label 0's prompt when the background is prompted

    @classmethod
    def build(cls, backbone, names: Sequence[str], templates: Sequence[str],
              background: bool | str | None = False) -> ClassBank:
        """Embed every foreground name over the templates (readable prompt words, see data.classes).

        ``background``: False/None (no background label), True or "threshold" (label 0 unprompted), or
        "prompted" (label 0 prompted with its name, e.g. "background")."""
        from insight.backbones import embed_classnames
        from insight.data.classes import prompt_name

        if background not in (False, None, True, "threshold", "prompted"):
            raise ValueError(f"background must be false, true, 'threshold' or 'prompted', got {background!r}")
        names = [str(n) for n in names]
        has_bg = bool(background)
        fg = names[1:] if has_bg else names
        if not fg:
            raise ValueError(f"no classes to prompt in {names} (background={background})")
        text = embed_classnames(backbone, [prompt_name(n) for n in fg], list(templates))
        bg_text = None
        if background == "prompted":
            bg_text = embed_classnames(backbone, [prompt_name(names[0])], list(templates))[0]
        return cls(names, has_bg, text, bg_text)


@dataclass
class WindowFeatures:
    """The backbone's view of one image: patch vectors of every window, window-major."""

    plan: SlidePlan
    feats_pd: Tensor  # (n_windows * gh * gw, D)
    saliency_p: Tensor | None  # (P,) DINOiser background saliency (high = object), when heads are loaded


@dataclass
class SegmentationResult:
    """A segmentation of one image, with what explanations need.

    ``logits_fhw`` are the cosine logits of the foreground classes at pixel
    resolution; ``labels_hw`` index ``class_names``. Through concepts,
    ``decomposition`` holds the exact per-concept terms of the patch logits
    (see `insight.tasks.explain`).
    """

    labels_hw: np.ndarray
    logits_fhw: Tensor
    class_names: list[str]
    background: bool
    via: Via
    plan: SlidePlan
    temperature: float
    saliency_hw: Tensor | None = None
    decomposition: Decomposition | None = None
    background_mask_hw: np.ndarray | None = None

    @property
    def offset(self) -> int:
        return 1 if self.background else 0

    def probs(self) -> Tensor:
        """(F, H, W) softmax(temperature * logits) over the foreground classes."""
        return torch.softmax(self.temperature * self.logits_fhw, dim=0)

    def present(self) -> list[tuple[int, str, int]]:
        """(label, name, pixels) of every label in the prediction, largest first."""
        labels, counts = np.unique(self.labels_hw, return_counts=True)
        rows = [(int(lab), self.class_names[int(lab)], int(n)) for lab, n in zip(labels, counts, strict=True)]
        return sorted(rows, key=lambda r: -r[2])


class Segmenter:
    """Backbone + (optional) SAE + class bank: segments images through concepts and opaquely.

    ``sae`` may be None for opaque-only use. Build from a trained model with
    `Segmenter.from_model`.
    """

    def __init__(self, backbone, bank: ClassBank, tasks, sae=None) -> None:
        self.backbone = backbone
        self.bank = bank
        self.tasks = tasks
        self.sae = sae
        if sae is not None and sae.d_in != bank.text_fd.shape[1]:
            raise ValueError(f"the SAE reads {sae.d_in}-dim features but the text vectors are "
                             f"{bank.text_fd.shape[1]}-dim: model and backbone do not belong together")

    @classmethod
    def from_model(cls, model, class_names: Sequence[str], background: bool = False, tasks=None,
                   backbone=None, device: str | None = None) -> Segmenter:
        """From a `LoadedModel`: its training backbone, its SAE, the given classes."""
        from insight.backbones import build_backbone

        cfg = model.config
        backbone = backbone or build_backbone(cfg.backbone, device=device)
        bank = ClassBank.build(backbone, class_names, cfg.backbone.templates, background)
        return cls(backbone, bank, tasks or cfg.tasks, sae=model.sae)

    # ------------------------------------------------------------ features

    def plan(self, orig_hw: tuple[int, int]) -> SlidePlan:
        t = self.tasks
        return plan_windows(orig_hw, t.crop, t.stride, self.backbone.patch_size, t.short_side, t.max_long_side)

    @torch.no_grad()
    def encode(self, image_rgb: np.ndarray) -> WindowFeatures:
        """Run the backbone over the sliding windows of an RGB uint8 image (H, W, 3)."""
        plan = self.plan(tuple(np.asarray(image_rgb).shape[:2]))
        windows_n3hw = window_pixels(image_rgb, plan, self.backbone.mean, self.backbone.std)
        feats, sal = [], []
        heads = getattr(self.backbone, "heads", None) is not None
        for i in range(0, len(windows_n3hw), self.tasks.window_batch):
            if heads:
                self.backbone.last_background = None
            f_bhwd = self.backbone.encode_patches(windows_n3hw[i : i + self.tasks.window_batch])
            if tuple(f_bhwd.shape[1:3]) != plan.grid_hw:
                raise RuntimeError(f"backbone gave a {tuple(f_bhwd.shape[1:3])} grid for {plan.window_hw} windows, "
                                   f"expected {plan.grid_hw}")
            feats.append(f_bhwd.reshape(-1, f_bhwd.shape[-1]).float())
            bg = getattr(self.backbone, "last_background", None) if heads else None
            if bg is not None:
                sal.append(bg.reshape(-1).float())
        saliency = torch.cat(sal) if heads and len(sal) == len(feats) else None
        return WindowFeatures(plan, torch.cat(feats), saliency)

    # ------------------------------------------------------------ segmentation

    def patch_logits(self, wf: WindowFeatures, via: Via) -> tuple[Tensor, Decomposition | None]:
        """(P, F) cosine logits of every window patch, and the decomposition when via concepts."""
        text = self.bank.text_fd
        if via == "opaque":
            return F.normalize(wf.feats_pd, dim=-1) @ text.to(wf.feats_pd).T, None
        if via == "residual":  # equals the opaque logits; the split lives in `residual_logits`
            return self.residual_logits(wf)[0], None
        if via != "concepts":
            raise ValueError(f"via must be one of {(*VIAS, 'residual')}, got {via!r}")
        if self.sae is None:
            raise ValueError("segmentation through concepts needs an SAE; this Segmenter has none")
        codes: PatchCodes = encode_sparse(self.sae, wf.feats_pd)
        dec = decompose(codes, self.sae, text)
        x_pd = codes.decode(self.sae)
        logits = (x_pd @ F.normalize(text.to(x_pd), dim=-1).T) / dec.norm_p[:, None]
        return logits.float(), dec

    def residual_logits(self, wf: WindowFeatures) -> tuple[Tensor, Tensor, Decomposition]:
        """The "concepts + residual" route: the opaque logits split into concept terms and a residual.

        x = x^ + r with r = x - x^, so cos(x, t_c) = [x^ . t_c + r . t_c] / ||x||. The returned
        decomposition holds the concept and bias terms over the feature's own norm ||x||, so
        ``dec.logits() + residual_pf`` are the opaque logits (up to rounding): how much of each opaque
        logit the concepts carry and how much they miss. Returns (logits, residual_pf, dec).
        """
        if self.sae is None:
            raise ValueError("the concepts + residual route needs an SAE; this Segmenter has none")
        text = F.normalize(self.bank.text_fd.to(self.sae.W_dec.device, self.sae.W_dec.dtype), dim=-1)
        x_pd = wf.feats_pd.to(text)
        codes: PatchCodes = encode_sparse(self.sae, x_pd)
        x_hat = codes.decode(self.sae)
        norm_p = x_pd.norm(dim=-1).clamp_min(1e-12)
        dec = Decomposition(codes, self.sae.W_dec.detach() @ text.T, self.sae.b_dec.detach() @ text.T, norm_p)
        residual_pf = ((x_pd - x_hat) @ text.T) / norm_p[:, None]
        return (dec.logits() + residual_pf).float(), residual_pf.float(), dec

    def _background_logits(self, wf: WindowFeatures, via: Via, dec: Decomposition | None) -> Tensor:
        """(P,) cosine logits of the prompted background: on x^ through concepts, on x otherwise."""
        t = F.normalize(self.bank.background_text_d.float(), dim=-1)
        if via == "concepts" and dec is not None:
            x_hat = dec.codes.decode(self.sae)
            return ((x_hat @ t.to(x_hat)) / dec.norm_p).float()
        return (F.normalize(wf.feats_pd, dim=-1) @ t.to(wf.feats_pd)).float()

    def segment_features(self, wf: WindowFeatures, via: Via = "concepts") -> SegmentationResult:
        """Labels and logits from encoded windows (shared by both routes in evaluation)."""
        plan = wf.plan
        logits_pf, dec = self.patch_logits(wf, via)
        n, (gh, gw) = plan.n_windows, plan.grid_hw
        logits_fhw = assemble(logits_pf.T.reshape(-1, n, gh, gw).permute(1, 0, 2, 3), plan)
        saliency_hw = None
        if wf.saliency_p is not None:
            saliency_hw = assemble(wf.saliency_p.reshape(n, 1, gh, gw), plan)[0]
        prompted = self.bank.background and self.bank.background_text_d is not None
        scored_khw = logits_fhw
        if prompted:  # label 0 competes with its own logit map (module doc)
            bg_p = self._background_logits(wf, via, dec)
            scored_khw = torch.cat([assemble(bg_p.reshape(n, 1, gh, gw), plan).to(logits_fhw), logits_fhw])
        probs_fhw = torch.softmax(self.tasks.temperature * scored_khw, dim=0)
        max_prob, arg = probs_fhw.max(0)
        labels = arg if prompted else arg + self.bank.offset
        bg_mask = None
        if self.bank.background:
            uncertain = max_prob < self.tasks.bg_threshold
            if saliency_hw is not None:
                uncertain &= saliency_hw.to(uncertain.device) < self.tasks.saliency_threshold
            elif prompted:  # the reference only overrides the arg-max where the saliency says so
                uncertain = torch.zeros_like(uncertain)
            labels = torch.where(uncertain, torch.zeros_like(labels), labels)
            bg_mask = (labels == 0).cpu().numpy() if prompted else uncertain.cpu().numpy()
        return SegmentationResult(
            labels_hw=labels.cpu().numpy().astype(np.int64), logits_fhw=logits_fhw.cpu(), class_names=list(self.bank.names),
            background=self.bank.background, via=via, plan=plan, temperature=self.tasks.temperature,
            saliency_hw=None if saliency_hw is None else saliency_hw.cpu(), decomposition=dec,
            background_mask_hw=bg_mask)

    def segment(self, image_rgb: np.ndarray, via: Via = "concepts") -> SegmentationResult:
        """Segment one RGB uint8 image (H, W, 3); labels are at the image's own resolution."""
        return self.segment_features(self.encode(image_rgb), via)

    def segment_both(self, image_rgb: np.ndarray) -> dict[Via, SegmentationResult]:
        """Both routes from one backbone pass: {"concepts": ..., "opaque": ...}."""
        wf = self.encode(image_rgb)
        return {via: self.segment_features(wf, via) for via in VIAS}
