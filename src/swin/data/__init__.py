"""LightningDataModules, datasets and transforms (no model code here)."""

from swin.data.ade20k import ADE20KDataModule
from swin.data.coco import COCODataModule
from swin.data.imagenet import ImageNetDataModule

__all__ = ["ADE20KDataModule", "COCODataModule", "ImageNetDataModule"]
