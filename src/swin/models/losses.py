"""Loss options the heads share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["class_weight_tensor"]


def class_weight_tensor(
    weights: Sequence[float] | None, num_classes: int, background: bool = False, name: str = "class_weights"
) -> Tensor | None:
    """Per-class cross-entropy weights as a float32 tensor, checked: one non-negative weight per class, not all 0
    (None stays None). ``background``: a detector's classes, with the background first at weight 1."""
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != num_classes or min(weights, default=0) < 0 or not any(weights):
        raise ValueError(
            f"{name} needs {num_classes} non-negative weights (one per class, not all 0), "
            f"got {len(weights)}: {weights}"
        )
    return torch.tensor([1.0] * background + weights, dtype=torch.float32)
