"""torch.hub entry points: ``torch.hub.load(repo_or_dir, "swin_t", weights=None, source="local")``.

``weights`` is a path to any checkpoint :func:`swin.models.load_pretrained` reads (official, timm, torchvision,
OpenMMLab, Hugging Face, ``.safetensors``, this project's); other keyword arguments override the variant's
constructor arguments (e.g. ``num_classes``, ``window_size``).
"""

import os
import sys

dependencies = ["torch", "torchvision"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from swin.models import build_swin, load_pretrained  # noqa: E402


def _hub(variant: str, weights: str | None, kwargs: dict):
    model = build_swin(variant, **kwargs)
    if weights is not None:
        load_pretrained(model, weights, strict=True)
    return model


def swin_t(weights: str | None = None, **kwargs):
    """Swin-T (C=96, depths 2-2-6-2); ``weights``: a checkpoint path or None for random weights."""
    return _hub("swin_t", weights, kwargs)


def swin_s(weights: str | None = None, **kwargs):
    """Swin-S (C=96, depths 2-2-18-2)."""
    return _hub("swin_s", weights, kwargs)


def swin_b(weights: str | None = None, **kwargs):
    """Swin-B (C=128, depths 2-2-18-2)."""
    return _hub("swin_b", weights, kwargs)


def swin_l(weights: str | None = None, **kwargs):
    """Swin-L (C=192, depths 2-2-18-2)."""
    return _hub("swin_l", weights, kwargs)
