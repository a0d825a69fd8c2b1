"""LightningDataModules, datasets and transforms (no model code here)."""

from swin.data.ade20k import ADE20KDataModule
from swin.data.base import SwinDataModule
from swin.data.coco import COCODataModule
from swin.data.imagenet import ImageNetDataModule
from swin.data.io import IMAGE_EXTENSIONS, PredictFolder, list_images, read_image

__all__ = [
    "SwinDataModule",
    "ImageNetDataModule",
    "COCODataModule",
    "ADE20KDataModule",
    "IMAGE_EXTENSIONS",
    "PredictFolder",
    "list_images",
    "read_image",
]
