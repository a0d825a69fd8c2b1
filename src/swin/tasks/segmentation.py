"""Semantic segmentation: Swin + UperNet (+ auxiliary FCN head), the paper's ADE20K recipe.

Training: cross-entropy (ignore index 255) of the decode logits plus ``aux_weight`` × that of the auxiliary
logits, both resized to the label size. Evaluation: whole-image or sliding-window inference, resized to the
annotation's own size before the metrics (mIoU, pixel accuracy); test and predict may add multi-scale and flip
test-time augmentation. Batches are dicts: ``image`` and ``mask`` (evaluation: lists, sizes differ), predict batches
``image``, ``path`` and ``size``. A prediction is one class map per image at its file's size
(:class:`swin.writers.SegmentationWriter` writes palette PNGs and overlays).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from swin.models import build_upernet
from swin.models.losses import class_weight_tensor
from swin.tasks.base import BaseTask, Schedule

__all__ = ["SegmentationTask"]


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
        class_weights: per-class weights of the cross-entropy (one per class; None: all 1, as the recipe), for
            small or imbalanced datasets; the loss stays a weighted mean over the labelled pixels.
        inference: ``whole`` image at once or ``slide`` through ``crop_size`` windows every ``stride`` pixels.
        crop_size: sliding-window size (H, W) or one side.
        stride: sliding-window step (H, W) or one side.
        test_scales: image scales averaged in test and predict (e.g. 0.5 … 1.75 for the paper's multi-scale).
        test_flip: also average the horizontal mirror in test and predict.
        **kwargs: the other :class:`~swin.tasks.base.BaseTask` arguments (backbone, backbone_kwargs, pretrained, betas, layer_decay, ...).

    The remaining arguments are :class:`~swin.tasks.base.BaseTask`'s with the ADE20K recipe as defaults: AdamW
    lr 6e-5 per 16 images, weight decay 0.01, 1500 warm-up iterations from 1e-6 × lr, then poly (power 1) to 0.
    """

    monitor = "val/miou"
    monitor_mode = "max"
    removed_hparams = {"overlay_alpha": "swin.writers.SegmentationWriter(overlay_alpha)"}
    eval_hparams = ("inference", "crop_size", "stride", "test_scales", "test_flip")

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
        class_weights: list[float] | None = None,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
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

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_upernet(
            self.build_backbone(num_classes=None, out_indices=(0, 1, 2, 3)),
            hp.num_classes,
            channels=hp.channels,
            pool_scales=hp.pool_scales,
            dropout=hp.dropout,
            auxiliary=hp.aux_weight > 0,
            aux_channels=hp.aux_channels,
            aux_num_convs=hp.aux_num_convs,
        )

    def configure_losses(self) -> None:
        hp = self.hparams
        weight = class_weight_tensor(hp.class_weights, hp.num_classes, name="model.class_weights")
        self.criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=hp.ignore_index, reduction="sum")

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
        """Mean cross-entropy over the labelled pixels, weighted by ``class_weights`` when given (0 when a batch
        has none, not NaN)."""
        labelled = target != self.hparams.ignore_index
        weight = self.criterion.weight
        total = labelled.sum() if weight is None else weight[target[labelled]].sum()
        return self.criterion(logits.float(), target) / total.float().clamp(min=1e-12)

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"path": [...], "label": [(H, W) class indices at each file's size]}`` (with the test-time views)."""
        labels = [
            self.infer(image[None], size.tolist(), tta=True).argmax(dim=1)[0]
            for image, size in zip(batch["image"], batch["size"])
        ]
        return {"path": batch["path"], "label": labels}
