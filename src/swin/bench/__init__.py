"""Benchmarks (``python -m swin.bench [MODE] ...``); each mode is one module of this package.

- no mode: the backbone against timm's and torchvision's (:mod:`swin.bench.backbone`);
- ``--attention``: the paper's Table 5, cyclic shift against padding and sliding windows (:mod:`swin.bench.attention`);
- ``--coco-eval``: the detection metric at COCO val scale against ``COCOeval`` (:mod:`swin.bench.coco_eval`);
- ``--data``: the input pipelines against timm's and torchvision's, per loader worker (:mod:`swin.bench.data`);
- ``--task classification|detection|segmentation``: one training step of a task against the peer a user would
  assemble from timm / torchvision (:mod:`swin.bench.task`);
- ``--allocator``: glibc's malloc settings against this project's, tcmalloc and jemalloc (:mod:`swin.bench.allocator`).

Every mode runs with the allocator setting the CLI uses (:func:`swin.allocator.tune_malloc`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

# the flag that selects a mode -> the module whose ``main(argv)`` runs it
MODES: dict[str, str] = {"--attention": "swin.bench.attention", "--coco-eval": "swin.bench.coco_eval",
                        "--data": "swin.bench.data", "--task": "swin.bench.task",
                        "--allocator": "swin.bench.allocator"}


def main(argv: Sequence[str] | None = None) -> dict:
    """Dispatch on a leading mode flag; everything else goes to the backbone benchmark."""
    import sys

    from swin.allocator import tune_malloc

    tune_malloc()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODES:
        return importlib.import_module(MODES[argv[0]]).main(argv[1:])
    return importlib.import_module("swin.bench.backbone").main(argv)
