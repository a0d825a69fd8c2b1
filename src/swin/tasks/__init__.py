"""LightningModules: one task per file, sharing ``BaseTask``."""

from swin.tasks.base import BaseTask
from swin.tasks.classification import ClassificationTask
from swin.tasks.detection import DetectionTask

__all__ = ["BaseTask", "ClassificationTask", "DetectionTask"]
