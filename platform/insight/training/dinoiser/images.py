"""Training images: seeded augmented crops in [0, 1], unreadable files masked, not fatal."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch


class AugmentedImages(torch.utils.data.Dataset):
    """(image id, path) items -> crops in [0, 1] (3, S, S); unreadable images come back masked."""

    def __init__(
        self, items: list[tuple[str, str]], crop: int, hflip: float, color_jitter: float, seed: int, train: bool = True
    ) -> None:
        import albumentations as A
        import cv2

        self.items, self.crop, self.seed, self.train, self.epoch = items, crop, seed, train, 0
        resize = A.SmallestMaxSize(max_size=crop, interpolation=cv2.INTER_CUBIC)
        if train:
            cj = color_jitter
            self.transform = A.Compose(
                [
                    resize,
                    A.RandomCrop(crop, crop),
                    A.HorizontalFlip(p=hflip),
                    A.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=min(0.5, cj / 4), p=0.8),
                ]
            )
        else:
            self.transform = A.Compose([resize, A.CenterCrop(crop, crop)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from insight.data.datasets import load_image

        image_id, path = self.items[i]
        rgb, _why = load_image(path)
        if rgb is None:
            return {"image": np.zeros((3, self.crop, self.crop), np.float32), "valid": False, "index": i}
        if self.train:
            self.transform.set_random_seed(zlib.crc32(f"{self.seed}:{self.epoch}:{image_id}".encode()))
        out = self.transform(image=rgb)["image"]
        chw = np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / 255.0
        return {"image": chw, "valid": True, "index": i}
