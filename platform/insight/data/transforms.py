"""Preprocessing and multi-view augmentation with albumentations.

View 0 of every image is the plain CLIP preprocessing (bicubic shortest-side
resize, centre crop, mean/std); views 1.. are seeded random crops, flips and
colour jitter, so the same (image, view) always gives the same pixels and an
extraction can be resumed or repeated bit for bit.
"""

from __future__ import annotations

import zlib

import albumentations as A
import cv2
import numpy as np


def eval_transform(size: int, mean, std) -> A.Compose:
    return A.Compose([
        A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
        A.CenterCrop(size, size),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


def view_transform(size: int, mean, std, augment) -> A.Compose:
    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(augment.scale_min, 1.0),
                            interpolation=cv2.INTER_CUBIC),
        A.HorizontalFlip(p=augment.hflip),
        A.ColorJitter(brightness=augment.color_jitter, contrast=augment.color_jitter,
                      saturation=augment.color_jitter, hue=min(0.5, augment.color_jitter / 4), p=0.8),
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
    ])


class Preprocessor:
    """(image RGB uint8, view index) -> float32 CHW array."""

    def __init__(self, size: int, mean, std, augment) -> None:
        self.plain = eval_transform(size, mean, std)
        self.views = view_transform(size, mean, std, augment)

    def __call__(self, rgb: np.ndarray, image_id: str, view: int) -> np.ndarray:
        if view == 0:
            out = self.plain(image=rgb)["image"]
        else:
            self.views.set_random_seed(zlib.crc32(f"{image_id}#{view}".encode()))
            out = self.views(image=rgb)["image"]
        return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)
