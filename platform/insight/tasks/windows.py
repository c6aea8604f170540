"""Sliding-window inference as one linear map, and that map's adjoint.

An image is resized (short side to ``short_side``), normalised, zero-padded
where a side is shorter than a crop (to a whole number of patches) and cut
into ``crop`` windows every ``stride``
pixels (the last window of a row or column is shifted back to end at the edge,
as in mmsegmentation's slide inference). Every window gives a patch grid.

Per-patch maps (logits, saliency, single concept contributions) go back to
pixels through `assemble`: bilinear upsampling of each window's grid to the
window's pixels, averaging where windows overlap, removing the padding and a
bilinear resize to the original size. Every step is linear in the patch
values, so per-concept contribution maps assembled this way add up exactly to
the assembled logits, and the sum of a pixel map over a segment equals a
weighted sum over patches whose weights are the adjoint of `assemble` applied
to the segment mask (`assemble_adjoint`). That is what makes per-segment
explanations exact without ever building per-pixel, per-concept tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SlidePlan:
    """Where the windows of one image lie (all windows have the same size)."""

    orig_hw: tuple[int, int]  # the input image
    resized_hw: tuple[int, int]  # after the short-side resize
    padded_hw: tuple[int, int]  # after zero padding of sides shorter than a crop
    window_hw: tuple[int, int]  # pixels of every window
    grid_hw: tuple[int, int]  # patches of every window
    origins: tuple[tuple[int, int], ...]  # (y0, x0) of every window in the padded image

    @property
    def n_windows(self) -> int:
        return len(self.origins)

    @property
    def n_patches(self) -> int:
        """Patches over all windows, window-major (the row order of every per-patch tensor)."""
        return self.n_windows * self.grid_hw[0] * self.grid_hw[1]


def _starts(size: int, window: int, stride: int) -> list[int]:
    n = max(size - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def plan_windows(orig_hw: tuple[int, int], crop: int, stride: int, patch: int,
                 short_side: int | None = None, max_long_side: int = 2048) -> SlidePlan:
    """The window layout of an image of ``orig_hw`` pixels."""
    h0, w0 = int(orig_hw[0]), int(orig_hw[1])
    if h0 < 1 or w0 < 1:
        raise ValueError(f"image has no pixels: {orig_hw}")
    if crop % patch:
        raise ValueError(f"tasks.crop={crop} must be a multiple of the backbone's patch size {patch}")
    if not 0 < stride <= crop:
        raise ValueError(f"tasks.stride={stride} must be in 1..tasks.crop={crop}")
    target = short_side or crop
    scale = target / min(h0, w0)
    if max(h0, w0) * scale > max_long_side:
        scale = max_long_side / max(h0, w0)
    hr, wr = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    # Sides of at least a crop are cut into crop windows as they are; shorter ones are padded
    # to a whole number of patches (the window is then the padded side).
    hp = hr if hr >= crop else math.ceil(hr / patch) * patch
    wp = wr if wr >= crop else math.ceil(wr / patch) * patch
    wh, ww = min(crop, hp), min(crop, wp)
    origins = tuple((y, x) for y in _starts(hp, wh, stride) for x in _starts(wp, ww, stride))
    return SlidePlan((h0, w0), (hr, wr), (hp, wp), (wh, ww), (wh // patch, ww // patch), origins)


def window_pixels(image_rgb: np.ndarray, plan: SlidePlan, mean, std) -> torch.Tensor:
    """Normalised windows (n_windows, 3, h, w) of an RGB uint8 image, as the plan lays them out."""
    import cv2

    rgb = np.asarray(image_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.shape[:2] != plan.orig_hw:
        raise ValueError(f"image {rgb.shape[:2]} does not match its plan {plan.orig_hw}")
    if plan.resized_hw != plan.orig_hw:
        rgb = cv2.resize(rgb, (plan.resized_hw[1], plan.resized_hw[0]), interpolation=cv2.INTER_LINEAR)
    img = (rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    hp, wp = plan.padded_hw
    canvas = np.zeros((hp, wp, 3), np.float32)  # zero = the mean colour after normalisation
    canvas[: img.shape[0], : img.shape[1]] = img
    wh, ww = plan.window_hw
    crops = [canvas[y : y + wh, x : x + ww] for y, x in plan.origins]
    return torch.from_numpy(np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)))


def assemble(maps_nkgg: torch.Tensor, plan: SlidePlan) -> torch.Tensor:
    """Per-window patch maps (n_windows, K, gh, gw) -> pixel maps (K, H, W) of the original image.

    Linear in ``maps_nkgg``: bilinear upsampling per window, averaging of
    overlaps, un-padding, bilinear resize to the original size.
    """
    n, k = maps_nkgg.shape[:2]
    if n != plan.n_windows or tuple(maps_nkgg.shape[2:]) != plan.grid_hw:
        raise ValueError(f"maps {tuple(maps_nkgg.shape)} do not fit the plan ({plan.n_windows} windows of "
                         f"{plan.grid_hw} patches)")
    wh, ww = plan.window_hw
    hp, wp = plan.padded_hw

    def up(i: int) -> torch.Tensor:  # one window at a time: never (n, K, h, w) at once
        return F.interpolate(maps_nkgg[i : i + 1].float(), size=(wh, ww), mode="bilinear", align_corners=False)[0]

    if n == 1 and plan.origins[0] == (0, 0) and (wh, ww) == (hp, wp):
        out_khw = up(0)
    else:
        canvas_khw = maps_nkgg.new_zeros(k, hp, wp, dtype=torch.float32)
        count_hw = torch.zeros(hp, wp, dtype=torch.float32, device=maps_nkgg.device)
        for i, (y, x) in enumerate(plan.origins):
            canvas_khw[:, y : y + wh, x : x + ww] += up(i)
            count_hw[y : y + wh, x : x + ww] += 1
        out_khw = canvas_khw / count_hw
    hr, wr = plan.resized_hw
    out_khw = out_khw[:, :hr, :wr]
    if plan.resized_hw != plan.orig_hw:
        out_khw = F.interpolate(out_khw[None], size=plan.orig_hw, mode="bilinear", align_corners=False)[0]
    return out_khw


def assemble_adjoint(weights_khw: torch.Tensor, plan: SlidePlan) -> torch.Tensor:
    """The adjoint of `assemble`: pixel weights (K, H, W) -> patch weights (n_windows, K, gh, gw).

    For any patch map u: sum over pixels of weights * assemble(u) == sum over
    patches of assemble_adjoint(weights) * u. With a segment's 0/1 mask as
    weights, it says how much each patch counts in that segment's pixel sum.
    Computed by reverse-mode autodiff of the linear map (exact, and the same
    cost as one `assemble`).
    """
    k = weights_khw.shape[0]
    if tuple(weights_khw.shape[1:]) != plan.orig_hw:
        raise ValueError(f"pixel weights {tuple(weights_khw.shape)} do not match the image {plan.orig_hw}")
    with torch.inference_mode(False), torch.enable_grad():
        u = torch.zeros(plan.n_windows, k, *plan.grid_hw, requires_grad=True, device=weights_khw.device)
        out = assemble(u, plan)
        (grad,) = torch.autograd.grad(out, u, grad_outputs=weights_khw.detach().float().clone())
    return grad.detach()
