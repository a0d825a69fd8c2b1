"""LightningDataModules, datasets and transforms (no model code here)."""

from swin.data.coco import COCODataModule
from swin.data.imagenet import ImageNetDataModule

__all__ = ["COCODataModule", "ImageNetDataModule"]
