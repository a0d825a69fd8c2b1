"""Semantic segmentation: Swin + UperNet (+ auxiliary FCN head), the paper's ADE20K recipe.

Training: cross-entropy (ignore index 255) of the decode logits plus ``aux_weight`` × that of the auxiliary
logits, both resized to the label size. Evaluation: whole-image or sliding-window inference, resized to the
annotation's own size before the metrics (mIoU, pixel accuracy); test and predict may add multi-scale and flip
test-time augmentation. Predict writes a palette label PNG and an overlay PNG per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from swin.models import SwinTransformer
from swin.models.upernet import FCNHead, Segmentor, UperNetHead
from swin.tasks.base import BaseTask, Schedule

__all__ = ["SegmentationTask", "label_palette", "save_label_png", "save_overlay_png"]


def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, PASCAL VOC's bit-interleaved palette (class 0 is not black here)."""
    ids = np.arange(1, num_classes + 1)
    colours = np.zeros((num_classes, 3), np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def save_label_png(label: np.ndarray, palette: np.ndarray, path: Path) -> None:
    """An H×W class map as a palette ('P' mode) PNG: pixel values are class indices, colours from ``palette``."""
    if len(palette) > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, not {len(palette)}")
    image = Image.fromarray(label.astype(np.uint8))
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path)


def save_overlay_png(image: np.ndarray, label: np.ndarray, palette: np.ndarray, path: Path, alpha: float = 0.5) -> None:
    """The H×W×3 uint8 image blended with the class colours of ``label`` (weight ``alpha``)."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * palette[label].astype(np.float32)
    Image.fromarray(blend.round().clip(0, 255).astype(np.uint8)).save(path)


class SegmentationTask(BaseTask):
    """Swin UperNet semantic segmentation.

    Args:
        num_classes: classes (linked from the datamodule by the CLI).
        class_names: class names (linked from the datamodule).
        channels: width of the UperNet head.
        pool_scales: pyramid pooling sizes of the UperNet head.
        aux_channels: width of the auxiliary FCN head on stage 3.
        aux_num_convs: 3×3 convs of the auxiliary head.
        aux_weight: weight of the auxiliary loss (training only); 0 drops the auxiliary head.
        dropout: Dropout2d before both classifiers.
        ignore_index: label ignored by the loss and the metrics.
        inference: ``whole`` image at once or ``slide`` through ``crop_size`` windows every ``stride`` pixels.
        crop_size: sliding-window size (H, W) or one side.
        stride: sliding-window step (H, W) or one side.
        test_scales: image scales averaged in test and predict (e.g. 0.5 … 1.75 for the paper's multi-scale).
        test_flip: also average the horizontal mirror in test and predict.
        overlay_alpha: weight of the class colours in the overlay PNGs.
        **kwargs: the other :class:`~swin.tasks.base.BaseTask` arguments (backbone, backbone_kwargs, pretrained, betas, layer_decay, ...).

    The remaining arguments are :class:`~swin.tasks.base.BaseTask`'s with the ADE20K recipe as defaults: AdamW
    lr 6e-5 per 16 images, weight decay 0.01, 1500 warm-up iterations from 1e-6 × lr, then poly (power 1) to 0.
    """

    monitor = "val/miou"
    monitor_mode = "max"

    def __init__(
        self,
        num_classes: int = 150,
        class_names: list[str] | None = None,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux_channels: int = 256,
        aux_num_convs: int = 1,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        ignore_index: int = 255,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        overlay_alpha: float = 0.5,
        lr: float = 6e-5,
        lr_batch_size: int | None = 16,
        weight_decay: float = 0.01,
        warmup_steps: int = 1500,
        warmup_start: float = 1e-6,
        schedule: Schedule = "poly",
        min_lr_ratio: float = 0.0,
        poly_power: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr,
            lr_batch_size=lr_batch_size,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            warmup_start=warmup_start,
            schedule=schedule,
            min_lr_ratio=min_lr_ratio,
            poly_power=poly_power,
            **kwargs,
        )

    @property
    def backbone(self) -> SwinTransformer:
        """The segmentor's backbone (what :class:`BaseTask` loads weights into and groups parameters of)."""
        return self.model.backbone

    def configure_models(self) -> None:
        hp = self.hparams
        backbone = self.build_backbone(num_classes=None, out_indices=(0, 1, 2, 3))
        widths = backbone.out_channels
        decode_head = UperNetHead(widths, hp.num_classes, hp.channels, hp.pool_scales, hp.dropout)
        aux_head = None
        if hp.aux_weight > 0:
            aux_head = FCNHead(widths[2], hp.num_classes, hp.aux_channels, hp.aux_num_convs, hp.dropout)
        self.model = Segmentor(backbone, decode_head, aux_head, aux_index=2)

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(ignore_index=self.hparams.ignore_index, reduction="sum")

    def configure_metrics(self) -> None:
        hp = self.hparams
        metrics = MetricCollection(
            {
                "miou": MulticlassJaccardIndex(hp.num_classes, ignore_index=hp.ignore_index, average="macro"),
                "pixel_acc": MulticlassAccuracy(hp.num_classes, ignore_index=hp.ignore_index, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    # -- training -----------------------------------------------------------------------------------------------------
    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled pixels (0 when a batch has none, not NaN)."""
        labelled = (target != self.hparams.ignore_index).sum().clamp(min=1)
        return self.criterion(logits.float(), target) / labelled

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["mask"]
        logits, aux_logits = self.model.forward_train(image)
        loss = decode_loss = self.loss(logits, target)
        if aux_logits is not None:
            aux_loss = self.loss(aux_logits, target)
            loss = loss + self.hparams.aux_weight * aux_loss
            self.log("train/aux_loss", aux_loss, batch_size=len(image))
        self.log("train/decode_loss", decode_loss, batch_size=len(image))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def infer(self, image: Tensor, size: Sequence[int], tta: bool = False) -> Tensor:
        """Class probabilities (B, K, *size) by the configured inference mode; ``tta`` adds the test scales / flip."""
        hp = self.hparams
        scales, flip = (hp.test_scales, hp.test_flip) if tta else ((1.0,), False)
        return self.model.inference(image, size, hp.inference, hp.crop_size, hp.stride, scales, flip)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, tta: bool) -> None:
        for image, target in zip(batch["image"], batch["mask"]):
            probs = self.infer(image[None], target.shape[-2:], tta)
            metrics.update(probs.argmax(dim=1), target[None])
        self.log_dict(metrics, batch_size=len(batch["image"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, tta=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, tta=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Write ``<stem>.png`` (palette labels at the image's size) and ``<stem>_overlay.png`` into
        ``output_dir()/predictions``; returns the label files written."""
        folder = self.output_dir() / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        palette = label_palette(self.hparams.num_classes)
        written = []
        for image, original, path in zip(batch["image"], batch["original"], batch["path"]):
            label = self.infer(image[None], original.shape[:2], tta=True).argmax(dim=1)[0].cpu().numpy()
            stem = Path(path).stem
            save_label_png(label, palette, folder / f"{stem}.png")
            save_overlay_png(original, label, palette, folder / f"{stem}_overlay.png", self.hparams.overlay_alpha)
            written.append(str(folder / f"{stem}.png"))
        return written
