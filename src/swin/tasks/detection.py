"""Object detection and instance segmentation: Swin + FPN in torchvision's Mask R-CNN, the paper's COCO recipe.

Batches are ``(images, targets)`` lists (variable sizes): float images in [0, 1] and torchvision targets with labels
1..K. Training images arrive resized by the datamodule; for evaluation and prediction the detector's transform
resizes (``min_size`` / ``max_size``) and maps the results back to the original images. The contiguous-label →
dataset-category-id map is a buffer, so it travels in every checkpoint.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import write_png
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from swin.models import SwinTransformer
from swin.models.detector import build_detector
from swin.tasks.base import BaseTask, Schedule

Batch = tuple[list[Tensor], list[dict[str, Any]]]
MASK_THRESHOLD = 0.5  # mask probability → binary mask (torchvision's and mmdet's rule)
# pycocotools' own float64 thresholds: torchmetrics' defaults are float32 values (0.6 → 0.6000000238), which moves
# IoUs and recalls that sit exactly on a threshold to the other side
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()


def map_backend() -> str:
    """``faster_coco_eval`` (same numbers as pycocotools, faster) when installed, else ``pycocotools``."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"


def binary_masks(pred: dict[str, Tensor]) -> Tensor:
    """torchvision's (N, 1, H, W) mask probabilities → (N, H, W) bool."""
    return pred["masks"][:, 0] > MASK_THRESHOLD


def coco_results(pred: dict[str, Tensor], meta: dict[str, Any], category_ids: Sequence[int]) -> list[dict]:
    """One image's detections in COCO results format: xywh boxes, compressed-RLE masks, the dataset's category ids.

    Each result carries the image's ``image_id`` (None for a plain folder) and ``file_name``.
    """
    boxes = box_convert(pred["boxes"].float(), "xyxy", "xywh").tolist()
    masks = binary_masks(pred).cpu().numpy() if "masks" in pred else None
    results = []
    for k, (box, label, score) in enumerate(zip(boxes, pred["labels"].tolist(), pred["scores"].tolist())):
        result = {
            "image_id": meta.get("image_id"),
            "file_name": meta["file_name"],
            "category_id": int(category_ids[label - 1]),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    return results


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.75, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_detections(
    image: Tensor, pred: dict[str, Tensor], class_names: Sequence[str], score_threshold: float = 0.5
) -> Tensor:
    """(3, H, W) uint8 overlay of the detections above ``score_threshold``: masks, boxes, class names and scores."""
    canvas = (image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8)
    keep = pred["scores"] >= score_threshold
    labels = pred["labels"][keep].tolist()
    if not labels:
        return canvas
    colors = [class_color(label) for label in labels]
    if "masks" in pred:
        canvas = draw_segmentation_masks(canvas, binary_masks(pred)[keep].cpu(), alpha=0.45, colors=colors)
    captions = [f"{class_names[label - 1]} {s:.2f}" for label, s in zip(labels, pred["scores"][keep].tolist())]
    return draw_bounding_boxes(canvas, pred["boxes"][keep].detach().cpu(), captions, colors=colors, width=2)


class DetectionTask(BaseTask):
    """Swin Mask R-CNN (Faster R-CNN with ``masks=False``).

    Args:
        num_classes: object classes without the background (linked from the datamodule by the CLI).
        class_names: class names (linked from the datamodule), for the overlays.
        masks: instance masks (Mask R-CNN); False gives Faster R-CNN.
        fpn_channels: FPN, RPN and RoI feature channels (256 in the paper).
        representation_size: width of the box head (1024).
        mask_channels: width of the mask head (256).
        anchor_sizes: anchor size per pyramid level P2..P6 (32-512 for COCO).
        aspect_ratios: anchor aspect ratios.
        min_size: evaluation / prediction resize of the shorter side (800; training images come resized).
        max_size: longest side of that resize (1333).
        detector_kwargs: further torchvision ``MaskRCNN`` options (``box_detections_per_img``, ...).
        score_threshold: detections drawn in the prediction overlays (the results JSON keeps all).
        backbone, backbone_kwargs, pretrained, lr, ...: see :class:`~swin.tasks.base.BaseTask`; the defaults here
            are the paper's COCO recipe: AdamW 1e-4 per 16 images, weight decay 0.05, 500 warm-up iterations from
            0.001×, ×0.1 at epochs 8 and 11.
    """

    monitor = "val/bbox_map"
    monitor_mode = "max"

    def __init__(
        self,
        num_classes: int = 80,
        class_names: list[str] | None = None,
        masks: bool = True,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        min_size: int = 800,
        max_size: int = 1333,
        detector_kwargs: dict[str, Any] | None = None,
        score_threshold: float = 0.5,
        lr: float = 1e-4,
        lr_batch_size: int | None = 16,
        weight_decay: float = 0.05,
        warmup_steps: int = 500,
        warmup_start: float = 1e-3,
        schedule: Schedule = "step",
        milestones: Sequence[float] = (8, 11),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr,
            lr_batch_size=lr_batch_size,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            warmup_start=warmup_start,
            schedule=schedule,
            milestones=milestones,
            **kwargs,
        )

    def configure_models(self) -> None:
        hp = self.hparams
        self.detector = build_detector(
            self.build_backbone(num_classes=None, out_indices=(0, 1, 2, 3)),
            hp.num_classes,
            masks=hp.masks,
            fpn_channels=hp.fpn_channels,
            representation_size=hp.representation_size,
            mask_channels=hp.mask_channels,
            anchor_sizes=hp.anchor_sizes,
            aspect_ratios=hp.aspect_ratios,
            min_size=hp.min_size,
            max_size=hp.max_size,
            train_resize=False,
            **(hp.detector_kwargs or {}),
        )
        #: dataset category id of each label 1..K (identity until the datamodule or a checkpoint sets it)
        self.register_buffer("category_ids", torch.arange(1, hp.num_classes + 1))

    @property
    def backbone(self) -> SwinTransformer:
        """The Swin inside the detector (``detector.backbone.body``)."""
        return self.detector.backbone.body

    def configure_metrics(self) -> None:
        iou_types = ("bbox", "segm") if self.hparams.masks else ("bbox",)
        self.val_map = MeanAveragePrecision(
            iou_type=iou_types,
            backend=map_backend(),
            iou_thresholds=COCO_IOU_THRESHOLDS,
            rec_thresholds=COCO_RECALL_THRESHOLDS,
        )
        self.test_map = self.val_map.clone()

    # -- the category map -----------------------------------------------------------------------------------------
    def _datamodule_category_ids(self) -> list[int] | None:
        return getattr(self._trainer.datamodule, "category_ids", None) if self._trainer is not None else None

    def setup(self, stage: str) -> None:
        ids = self._datamodule_category_ids()
        if ids is None:
            return
        if len(ids) != self.hparams.num_classes:
            raise ValueError(f"the datamodule has {len(ids)} category ids for num_classes={self.hparams.num_classes}")
        self.category_ids.copy_(torch.as_tensor(ids))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("state_dict", {}).get("category_ids")
        if saved is not None and self._datamodule_category_ids() is not None:
            if saved.tolist() != self.category_ids.tolist():
                raise ValueError(
                    f"the checkpoint was trained on category ids {saved.tolist()}, the datamodule has "
                    f"{self.category_ids.tolist()}"
                )

    # -- steps ----------------------------------------------------------------------------------------------------
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image (eval mode), in the images' own coordinates."""
        return self.detector(images)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def _metric_inputs(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Any]]) -> tuple[list, list]:
        keys = ("boxes", "labels", "iscrowd", "area")
        metric_preds = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
        metric_targets = [{k: t[k] for k in keys} for t in targets]
        if self.hparams.masks:
            for p, mp, t, mt in zip(preds, metric_preds, targets, metric_targets):
                mp["masks"], mt["masks"] = binary_masks(p), t["masks"].bool()
        return metric_preds, metric_targets

    def _evaluate(self, batch: Batch, metric: MeanAveragePrecision) -> None:
        images, targets = batch
        metric.update(*self._metric_inputs(self(images), targets))

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        results = metric.compute()
        metric.reset()
        results.pop("classes")
        scalars = {f"{stage}/{k}": v for k, v in results.items() if not k.endswith("_per_class")}
        self.log_dict(scalars, sync_dist=True)  # already synchronised by torchmetrics: the mean changes nothing

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    # -- predict: COCO results JSON and overlays ------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._results: list[dict] = []

    def predict_step(self, batch: Batch, batch_idx: int) -> None:
        images, metas = batch
        names = self.hparams.class_names or [str(i) for i in self.category_ids.tolist()]
        folder = self.output_dir() / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        for image, meta, pred in zip(images, metas, self(images)):
            self._results.extend(coco_results(pred, meta, self.category_ids.tolist()))
            overlay = draw_detections(image, pred, names, self.hparams.score_threshold)
            write_png(overlay, str(folder / f"{Path(meta['file_name']).stem}.png"))

    def on_predict_epoch_end(self) -> None:
        results = self.gather_objects(self._results)
        if not self.trainer.is_global_zero:
            return
        unique = {(r["file_name"], r["category_id"], tuple(r["bbox"]), r["score"]): r for r in results}  # DDP repeats
        out = self.output_dir() / "predictions" / "coco_results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(list(unique.values())))
        print(f"[swin] wrote {len(unique)} detections to {out} and overlays to {out.parent}")
