"""LightningModules: one task per file, sharing ``BaseTask``."""

from swin.tasks.base import BaseTask
from swin.tasks.classification import ClassificationTask
from swin.tasks.detection import DetectionTask
from swin.tasks.segmentation import SegmentationTask

__all__ = ["BaseTask", "ClassificationTask", "DetectionTask", "SegmentationTask"]
