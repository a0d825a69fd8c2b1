"""Image classification: Swin + linear head, the paper's ImageNet recipe (mixup / cutmix, label smoothing, EMA).

Batches are dicts: ``image`` (B, 3, H, W) and ``label`` (B,); predict batches ``image`` and ``path``. A prediction is
the class probabilities of every image (:class:`swin.writers.ClassificationCSVWriter` writes their top k).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from swin.tasks.base import BaseTask


class ClassificationTask(BaseTask):
    """Swin classifier.

    Args:
        num_classes: classes (linked from the datamodule by the CLI).
        class_names: names for predictions (linked from the datamodule).
        label_smoothing: ε of the (soft-target) cross-entropy.
        mixup_alpha: Beta(α, α) of mixup; 0 turns it off.
        cutmix_alpha: Beta(α, α) of cutmix; 0 turns it off.
        mix_prob: probability that a training batch is mixed at all.
        switch_prob: probability of cutmix rather than mixup when both are on.
        ema_decay: exponential moving average of the weights (e.g. 0.9998), used for validation, test and
            predict; None for off.
        **kwargs: :class:`~swin.tasks.base.BaseTask` arguments (backbone, pretrained, lr, schedule, ...).
    """

    monitor = "val/acc1"
    monitor_mode = "max"
    removed_hparams = {"top_k": "swin.writers.ClassificationCSVWriter(top_k)"}
    legacy_prefixes = {"backbone.": "model."}

    def __init__(
        self,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = self.build_backbone(num_classes=hp.num_classes)
        self.ema = None
        if hp.ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)

    def configure_losses(self) -> None:
        hp = self.hparams
        mixers = []
        if hp.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=hp.mixup_alpha, num_classes=hp.num_classes))
        if hp.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=hp.cutmix_alpha, num_classes=hp.num_classes))
        if len(mixers) == 2:
            self.mixer = v2.RandomChoice(mixers, p=[1 - hp.switch_prob, hp.switch_prob])
        else:
            self.mixer = mixers[0] if mixers else None

    def configure_metrics(self) -> None:
        k = min(5, self.hparams.num_classes)
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(self.hparams.num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(self.hparams.num_classes, top_k=k, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # the mean loss over all images of all ranks: Lightning's sync_dist mean truncates the summed batch sizes to
        # an integer, which is wrong on an uneven split (3 + 2 images on 2 ranks count as 2 x 2)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # -- mixing and the loss --------------------------------------------------------------------------------------
    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup / cutmix (with ``mix_prob``) and label smoothing: images and soft targets (B, K)."""
        hp = self.hparams
        if self.mixer is not None and torch.rand(()) < hp.mix_prob:
            images, targets = self.mixer(images, labels)
        else:
            targets = F.one_hot(labels, hp.num_classes).to(images.dtype)
        return images, targets * (1 - hp.label_smoothing) + hp.label_smoothing / hp.num_classes

    def eval_model(self) -> torch.nn.Module:
        """The EMA weights when on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: Tensor) -> Tensor:
        return self.eval_model()(images)

    # -- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, targets = self.mix(batch["image"], batch["label"])
        loss = F.cross_entropy(self.model(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA's: before any callback's ``on_train_batch_end``, so that a checkpoint
        saved there holds both."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, mean_loss: MeanMetric, stage: str) -> None:
        images, labels = batch["image"], batch["label"]
        logits = self(images)
        metrics.update(logits, labels)
        mean_loss.update(F.cross_entropy(logits, labels), weight=images.shape[0])
        self.log(f"{stage}/loss", mean_loss, batch_size=images.shape[0])
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=images.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_loss, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_loss, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"path": [...], "probs": (B, K)}``: the class probabilities of every image."""
        return {"path": batch["path"], "probs": self(batch["image"]).softmax(dim=-1)}
