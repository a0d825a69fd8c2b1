"""Object detection and instance segmentation: Swin + FPN in Mask R-CNN or Cascade Mask R-CNN, the paper's COCO recipes.

Batches are dicts of lists (variable sizes): ``image`` (float images in [0, 1]) and ``target`` (torchvision targets
with labels 1..K), plus ``image_id`` and ``path``. Training images arrive resized by the datamodule; for evaluation
and prediction the detector's transform resizes (``min_size`` / ``max_size``) and maps the results back to the
original images. The contiguous-label → dataset-category-id map is a buffer, so it travels in every checkpoint. A
prediction is one image's detections in the dataset's category ids (:class:`swin.writers.DetectionWriter` writes
COCO results and overlays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from pycocotools import mask as mask_utils
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from swin.models import build_cascade, build_detector
from swin.models.singlestage import SINGLE_STAGE_OUT_INDICES, build_fcos, build_retinanet
from swin.tasks.base import BaseTask, Schedule

MASK_THRESHOLD = 0.5  # mask probability → binary mask (torchvision's and mmdet's rule)
# pycocotools' own float64 thresholds: torchmetrics' defaults are float32 values (0.6 → 0.6000000238), which moves
# IoUs and recalls that sit exactly on a threshold to the other side
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()
#: the detector builders ``framework`` selects; the two-stage ones read Swin stages 0-3 and take the RoI-head widths
FRAMEWORKS = {"mask_rcnn": build_detector, "cascade_mask_rcnn": build_cascade, "retinanet": build_retinanet,
              "fcos": build_fcos}  # fmt: skip
TWO_STAGE = ("mask_rcnn", "cascade_mask_rcnn")
Framework = Literal["mask_rcnn", "cascade_mask_rcnn", "retinanet", "fcos"]


def map_backend() -> str:
    """``faster_coco_eval`` (same numbers as pycocotools, faster) when installed, else ``pycocotools``."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster_coco_eval"


def coco_map(masks: bool) -> MeanAveragePrecision:
    """COCO box (and mask) AP with pycocotools' thresholds, masks RLE-encoded as they arrive; not synchronised by
    torchmetrics (:func:`gather_map_states` gathers uneven splits)."""
    return MeanAveragePrecision(
        iou_type=("bbox", "segm") if masks else ("bbox",),
        backend=map_backend(),
        iou_thresholds=COCO_IOU_THRESHOLDS,
        rec_thresholds=COCO_RECALL_THRESHOLDS,
        sync_on_compute=False,
    )


def binary_masks(pred: dict[str, Tensor]) -> Tensor:
    """torchvision's (N, 1, H, W) mask probabilities → (N, H, W) bool."""
    return pred["masks"][:, 0] > MASK_THRESHOLD


def coco_results(pred: dict[str, Any]) -> list[dict]:
    """One image's prediction (:meth:`DetectionTask.predict_step`) in COCO results format: xywh boxes, compressed-RLE
    masks, the dataset's category ids, the image's ``image_id`` (None for a plain folder) and ``file_name``."""
    boxes = box_convert(pred["boxes"].float(), "xyxy", "xywh").tolist()
    masks = pred["masks"].cpu().numpy() if "masks" in pred else None
    results = []
    for k, (box, category, score) in enumerate(zip(boxes, pred["category_id"].tolist(), pred["scores"].tolist())):
        result = {
            "image_id": pred["image_id"],
            "file_name": Path(pred["path"]).name,
            "category_id": int(category),
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    return results


def gather_map_states(metric: MeanAveragePrecision) -> None:
    """Replace the per-image states of ``metric`` by those of all ranks, in the datamodule's order of the images.

    torchmetrics gathers these lists one element at a time, which needs the same number of images on every rank
    (and its mask gather indexes every rank by rank 0's count); the unrepeated evaluation split gives ranks one
    image more or less. Here each rank's lists travel whole, and are interleaved back: rank r evaluated images
    r, r + W, ..., so image i is the (i // W)-th of rank i % W, the order of a single-device evaluation.
    """
    states = apply_to_collection(metric.metric_state, torch.Tensor, torch.Tensor.cpu)
    gathered: list[dict[str, list] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    for name in states:
        lists = [ranks[name] for ranks in gathered]
        merged = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
        setattr(metric, name, apply_to_collection(merged, torch.Tensor, torch.Tensor.to, metric.device))


class DetectionTask(BaseTask):
    """Swin Mask R-CNN or Cascade Mask R-CNN (Faster R-CNN / Cascade R-CNN with ``masks=False``).

    Args:
        framework: "mask_rcnn" (torchvision's, :func:`swin.models.build_detector`), "cascade_mask_rcnn"
            (:func:`swin.models.build_cascade`: three box stages, 4-conv-1-fc heads, GIoU, a mask head per stage),
            or the box-only "retinanet" / "fcos" (torchvision's, on P3-P7, :mod:`swin.models.singlestage`).
        num_classes: object classes without the background (linked from the datamodule by the CLI).
        class_names: class names (linked from the datamodule), for the overlays.
        masks: instance masks (Mask R-CNN); False gives Faster R-CNN (and is required by RetinaNet and FCOS).
        fpn_channels: FPN, RPN and RoI feature channels (256 in the paper).
        representation_size: width of the box head (1024).
        mask_channels: width of the mask head (256).
        anchor_sizes: anchor size per pyramid level; None: the framework's COCO default (32-512 on P2-P6 for the
            R-CNNs, 32-512 on P3-P7 for RetinaNet, the strides 8-128 for FCOS).
        aspect_ratios: anchor aspect ratios.
        min_size: evaluation / prediction resize of the shorter side (800; training images come resized).
        max_size: longest side of that resize (1333).
        detector_kwargs: further options of the framework's builder (``box_detections_per_img``, ...; for the
            cascade also ``stage_ious``, ``stage_loss_weights``, ``score_mode``, ...).
        class_weights: weight of each class (one per class, in label order; the background keeps 1) in the box
            classifier's cross-entropy, for small or imbalanced datasets (R-CNN frameworks; None: unweighted, as
            the recipe).
        backbone, backbone_kwargs, pretrained, lr, ...: see :class:`~swin.tasks.base.BaseTask`; the defaults here
            are the paper's COCO recipe: AdamW 1e-4 per 16 images, weight decay 0.05, 500 warm-up iterations from
            0.001×, ×0.1 at epochs 8 and 11.
    """

    monitor = "val/bbox_map"
    monitor_mode = "max"
    removed_hparams = {"score_threshold": "swin.writers.DetectionWriter(score_threshold)"}
    legacy_prefixes = {"detector.": "model."}

    def __init__(
        self,
        num_classes: int = 80,
        class_names: list[str] | None = None,
        framework: Framework = "mask_rcnn",
        masks: bool = True,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_channels: int = 256,
        anchor_sizes: Sequence[int] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        min_size: int = 800,
        max_size: int = 1333,
        detector_kwargs: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
        lr: float = 1e-4,
        lr_batch_size: int | None = 16,
        weight_decay: float = 0.05,
        warmup_steps: int = 500,
        warmup_start: float = 1e-3,
        schedule: Schedule = "step",
        milestones: Sequence[float] = (8, 11),
        **kwargs: Any,
    ) -> None:
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
        if masks and framework not in TWO_STAGE:
            raise ValueError(f"framework {framework!r} has no mask branch: set masks: false")
        if class_weights is not None and framework not in TWO_STAGE:
            raise ValueError(
                f"model.class_weights weights a softmax classifier (mask_rcnn, cascade_mask_rcnn); framework "
                f"{framework!r} scores classes with a sigmoid focal loss: leave class_weights unset"
            )
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
        two_stage = hp.framework in TWO_STAGE
        options = dict(fpn_channels=hp.fpn_channels, min_size=hp.min_size, max_size=hp.max_size, train_resize=False)
        if two_stage:
            options.update(masks=hp.masks, representation_size=hp.representation_size, mask_channels=hp.mask_channels)
            options["class_weights"] = hp.class_weights
        if hp.framework != "fcos":
            options["aspect_ratios"] = hp.aspect_ratios
        if hp.anchor_sizes is not None:
            options["anchor_sizes"] = hp.anchor_sizes
        out_indices = (0, 1, 2, 3) if two_stage else SINGLE_STAGE_OUT_INDICES
        self.model = FRAMEWORKS[hp.framework](
            self.build_backbone(num_classes=None, out_indices=out_indices),
            hp.num_classes,
            **options,
            **(hp.detector_kwargs or {}),
        )
        #: dataset category id of each label 1..K (identity until the datamodule or a checkpoint sets it)
        self.register_buffer("category_ids", torch.arange(1, hp.num_classes + 1))

    @property
    def class_names(self) -> list[str]:
        """The class names, else the dataset's category ids as strings."""
        return list(self.hparams.class_names or map(str, self.category_ids.tolist()))

    def configure_metrics(self) -> None:
        self.val_map = coco_map(self.hparams.masks)
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
        super().on_load_checkpoint(checkpoint)
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
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        losses = self.model(images, batch["target"])
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

    def _evaluate(self, batch: dict[str, Any], metric: MeanAveragePrecision) -> None:
        metric.update(*self._metric_inputs(self(batch["image"]), batch["target"]))

    def _log_map(self, stage: str, metric: MeanAveragePrecision) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gather_map_states(metric)
        results = metric.compute()
        metric.reset()
        results.pop("classes")
        if not self.hparams.masks:  # with one iou_type torchmetrics leaves out the "bbox_" prefix
            results = {f"bbox_{k}": v for k, v in results.items()}
        scalars = {f"{stage}/{k}": v for k, v in results.items() if not k.endswith("_per_class")}
        self.log_dict(scalars, sync_dist=True)  # every rank computed the same figures: the mean changes nothing

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``path``, ``image_id`` (None for a plain folder), ``boxes`` (xyxy, original pixels),
        ``scores``, ``labels`` (1..K), ``category_id`` (the dataset's ids) and, with masks, ``masks`` (N, H, W) bool."""
        image_ids = batch.get("image_id", [None] * len(batch["image"]))
        predictions = []
        for pred, path, image_id in zip(self(batch["image"]), batch["path"], image_ids):
            out = {"path": path, "image_id": image_id, **{k: pred[k] for k in ("boxes", "scores", "labels")}}
            out["category_id"] = self.category_ids[pred["labels"] - 1]
            if "masks" in pred:
                out["masks"] = binary_masks(pred)
            predictions.append(out)
        return predictions
