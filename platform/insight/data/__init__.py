"""Datasets and transforms: images in, normalised tensors out."""

from insight.data.datasets import ImageDataset, ImageRecord, build_dataset, load_image

__all__ = ["ImageDataset", "ImageRecord", "build_dataset", "load_image"]
