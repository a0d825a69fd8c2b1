"""LightningModules: one task per file, sharing ``BaseTask``."""

from swin.tasks.base import BaseTask

__all__ = ["BaseTask"]
