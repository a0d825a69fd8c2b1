"""Prediction writers: Lightning ``BasePredictionWriter`` callbacks that put each task's predictions on disk.

Set them under ``trainer.callbacks`` in a config (every task config here has its own), replace or tune them from YAML.
Each writes into ``output_dir`` (default: ``predictions/`` in the run folder), collects the predictions of every rank
under DDP and writes each image once; files appear whole under their names (written to a temporary name, then
renamed).
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from swin.data.io import read_image
from swin.files import atomic_write
from swin.tasks.detection import coco_results

__all__ = [
    "PredictionWriter",
    "ClassificationCSVWriter",
    "DetectionWriter",
    "SegmentationWriter",
    "class_color",
    "label_palette",
]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.75, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, PASCAL VOC's bit-interleaved palette (class 0 is not black here)."""
    ids = np.arange(1, num_classes + 1)
    colours = np.zeros((num_classes, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


class PredictionWriter(BasePredictionWriter):
    """What the writers share: the output folder and the rows gathered from every rank at the end of predict.

    Subclasses turn each batch's predictions into rows (``rows``), may write per-image files as they go
    (``write_on_batch_end``), and write the gathered rows once (``write_rows``, rank 0).

    Args:
        output_dir: where the files go (default: ``predictions/`` in the run folder, the loggers' version folder).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._rows: list[Any] = []

    def folder(self, trainer: Trainer) -> Path:
        """``output_dir``, else ``predictions/`` in the run folder (callable on one rank: no collective)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        logger = trainer.logger
        run = logger.log_dir if logger is not None and logger.log_dir else trainer.default_root_dir
        return Path(run) / "predictions"

    def rows(self, prediction: Any, batch: dict[str, Any], pl_module: LightningModule) -> list[Any]:
        """The rows of one batch for :meth:`write_rows` (picklable, they travel between ranks)."""
        return []

    def write_rows(self, rows: list[Any], folder: Path, pl_module: LightningModule) -> str:
        """Write every rank's rows (on rank 0); returns what was written, for the log."""
        return ""

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:  # fmt: skip
        self._rows.extend(self.rows(prediction, batch, pl_module))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self._rows
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if trainer.is_global_zero:
            rank_zero_info(f"[swin] wrote {self.write_rows(rows, self.folder(trainer), pl_module)}")
        self._rows = []


class ClassificationCSVWriter(PredictionWriter):
    """``predictions.csv``: one row per image (sorted by path) with its ``top_k`` classes and probabilities.

    Args:
        output_dir: see :class:`PredictionWriter`.
        top_k: classes per image (at most the class count).
        filename: the CSV's name in the output folder.
    """

    def __init__(self, output_dir: str | None = None, top_k: int = 5, filename: str = "predictions.csv") -> None:
        super().__init__(output_dir)
        self.top_k = top_k
        self.filename = filename

    def rows(self, prediction: dict[str, Any], batch: dict[str, Any], pl_module: LightningModule) -> list[Any]:
        probs = prediction["probs"].float()
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        return list(zip(map(str, prediction["path"]), top.indices.tolist(), top.values.tolist()))

    def write_rows(self, rows: list[Any], folder: Path, pl_module: LightningModule) -> str:
        names = pl_module.class_names
        unique = {path: (idx, p) for path, idx, p in rows}
        k = min(self.top_k, len(names))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "prob")])
        for path in sorted(unique):
            idx, p = unique[path]
            writer.writerow([path] + [v for i, q in zip(idx, p) for v in (names[i], f"{q:.6f}")])
        out = folder / self.filename
        atomic_write(out, text.getvalue())
        return f"{len(unique)} predictions to {out}"


def draw_detections(
    image: Tensor, pred: dict[str, Tensor], class_names: Sequence[str], score_threshold: float = 0.5
) -> Tensor:
    """(3, H, W) uint8 overlay of the detections above ``score_threshold``: masks, boxes, class names and scores."""
    canvas = image.detach().cpu()
    keep = pred["scores"] >= score_threshold
    labels = pred["labels"][keep].tolist()
    if not labels:
        return canvas
    colors = [class_color(label) for label in labels]
    if "masks" in pred:
        canvas = draw_segmentation_masks(canvas, pred["masks"][keep].cpu(), alpha=0.45, colors=colors)
    captions = [f"{class_names[label - 1]} {s:.2f}" for label, s in zip(labels, pred["scores"][keep].tolist())]
    return draw_bounding_boxes(canvas, pred["boxes"][keep].detach().cpu(), captions, colors=colors, width=2)


class DetectionWriter(PredictionWriter):
    """``coco_results.json`` (COCO results format: every detection, the dataset's category ids, RLE masks) and one
    overlay PNG per image (``<stem>.png``: masks, boxes, names and scores above ``score_threshold``).

    Args:
        output_dir: see :class:`PredictionWriter`.
        score_threshold: detections drawn in the overlays (the results file keeps all).
        overlays: write the overlay PNGs.
        filename: the results file's name in the output folder.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        score_threshold: float = 0.5,
        overlays: bool = True,
        filename: str = "coco_results.json",
    ) -> None:
        super().__init__(output_dir)
        self.score_threshold = score_threshold
        self.overlays = overlays
        self.filename = filename

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:  # fmt: skip
        super().write_on_batch_end(trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx)
        if not self.overlays:
            return
        folder = self.folder(trainer)
        for pred in prediction:
            image = torch.from_numpy(read_image(pred["path"])).permute(2, 0, 1)
            overlay = draw_detections(image, pred, pl_module.class_names, self.score_threshold)
            png = _png_bytes(Image.fromarray(overlay.permute(1, 2, 0).numpy()))
            atomic_write(folder / f"{Path(pred['path']).stem}.png", png)

    def rows(self, prediction: list[dict[str, Any]], batch: dict[str, Any], pl_module: LightningModule) -> list[Any]:
        return [(pred["path"], coco_results(pred)) for pred in prediction]

    def write_rows(self, rows: list[Any], folder: Path, pl_module: LightningModule) -> str:
        per_image = dict(rows)  # one entry per image, whatever the ranks repeated
        results = [r for path in sorted(per_image) for r in per_image[path]]
        out = folder / self.filename
        atomic_write(out, json.dumps(results))
        return f"{len(results)} detections of {len(per_image)} images to {out}"


class SegmentationWriter(PredictionWriter):
    """``<stem>.png``, the class map as a palette PNG (pixel values are class indices), and ``<stem>_overlay.png``,
    the image blended with the class colours, per image.

    Args:
        output_dir: see :class:`PredictionWriter`.
        overlay_alpha: weight of the class colours in the overlays.
        overlays: write the overlay PNGs.
    """

    def __init__(self, output_dir: str | None = None, overlay_alpha: float = 0.5, overlays: bool = True) -> None:
        super().__init__(output_dir)
        self.overlay_alpha = overlay_alpha
        self.overlays = overlays

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any],
        batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:  # fmt: skip
        super().write_on_batch_end(trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx)
        folder = self.folder(trainer)
        palette = label_palette(pl_module.hparams.num_classes)
        if len(palette) > 256:
            raise ValueError(f"a palette PNG holds at most 256 classes, not {len(palette)}")
        for path, label in zip(prediction["path"], prediction["label"]):
            label = label.cpu().numpy().astype(np.uint8)
            stem = Path(path).stem
            image = Image.fromarray(label)
            image.putpalette(palette.reshape(-1).tolist())
            atomic_write(folder / f"{stem}.png", _png_bytes(image))
            if self.overlays:
                original = read_image(path).astype(np.float32)
                blend = (1 - self.overlay_alpha) * original + self.overlay_alpha * palette[label].astype(np.float32)
                overlay = Image.fromarray(blend.round().clip(0, 255).astype(np.uint8))
                atomic_write(folder / f"{stem}_overlay.png", _png_bytes(overlay))

    def rows(self, prediction: dict[str, Any], batch: dict[str, Any], pl_module: LightningModule) -> list[Any]:
        return [str(path) for path in prediction["path"]]

    def write_rows(self, rows: list[Any], folder: Path, pl_module: LightningModule) -> str:
        return f"{len(set(rows))} label maps and overlays to {folder}"
