"""Cascade (Mask) R-CNN on Swin + FPN, from torchvision's parts: the paper's best COCO detector.

As the official Swin detection config ``cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_
adamw_3x_coco`` and mmdet's ``CascadeRoIHead`` read: the same Swin + FPN, anchors and RPN as
:func:`swin.models.build_detector`, then three box stages trained at IoU 0.5 / 0.6 / 0.7 with box-coder standard
deviations (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067). Each stage:

- samples 512 RoIs per image (25% positive) from its proposals plus the ground-truth boxes, positives at IoU ≥ its
  threshold, the rest background (no ignore band, no low-quality matches);
- a 4-conv (3×3, BatchNorm, ReLU) 1-fc (1024) box head, class-specific regression; the loss is cross-entropy plus
  10 × GIoU of the decoded positive boxes, averaged over all sampled RoIs;
- a mask head of its own (4 convs, deconv, per-class 28×28 logits) on its positives;
- all its losses weighted by 1 / 0.5 / 0.25;
- passes its refined boxes (detached, the sampled ground truths left out; background RoIs regressed with their
  best foreground class) to the next stage.

At test time each stage re-scores and refines the previous stage's boxes; the class scores are the softmax of the
stages' averaged logits (``score_mode="logits"``, mmdet's rule; ``"probs"`` averages the softmaxes), the boxes the
last stage's, the masks the average of the three mask heads' probabilities on the final boxes. Under DDP the
trainer's ``sync_batchnorm`` turns the box heads' BatchNorms into SyncBatchNorm as in the official config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss
from torchvision.ops import remove_small_boxes

from swin.models.losses import class_weight_tensor
from swin.models.detector import IMAGENET_MEAN, IMAGENET_STD, SwinFPN, mask_branch, pyramid_anchors
from swin.models.swin import SwinTransformer

__all__ = ["CascadeRCNN", "CascadeRoIHeads", "CascadeStage", "build_cascade", "STAGE_IOUS", "STAGE_STDS"]

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
ScoreMode = Literal["logits", "probs"]


class CascadeRCNN(GeneralizedRCNN):
    """torchvision's generalized R-CNN (transform, backbone, RPN) with :class:`CascadeRoIHeads`."""


class CascadeBoxPredictor(nn.Module):
    """Class logits (K + 1, background first) and box deltas (4 per foreground class, or 4 class-agnostic)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):  # mmdet's BBoxHead initialisation
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class CascadeStage(nn.Module):
    """One cascade stage: its IoU threshold, box coder, box head and predictor, and optionally its mask head."""

    def __init__(
        self,
        iou_threshold: float,
        stds: Sequence[float],
        box_head: nn.Module,
        box_predictor: CascadeBoxPredictor,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.iou_threshold = float(iou_threshold)
        self.stds = tuple(float(s) for s in stds)
        self.box_coder = BoxCoder(tuple(1.0 / s for s in self.stds))  # torchvision's weights are mmdet's 1 / std
        self.matcher = Matcher(self.iou_threshold, self.iou_threshold, allow_low_quality_matches=False)
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def decode(self, deltas: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """Boxes regressed by each RoI's class (1..K) from ``deltas`` (N, 4K or 4) around ``boxes`` (N, 4), in float32
        (under bf16 autocast too: the coordinates need the precision)."""
        deltas, boxes = deltas.float(), boxes.float()
        if deltas.shape[1] > 4:
            deltas = deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels - 1]
        return self.box_coder.decode_single(deltas, boxes)

    def decode_all(self, deltas: Tensor, boxes: Tensor, num_classes: int) -> Tensor:
        """(N, K, 4): the boxes regressed for every foreground class (float32)."""
        deltas, boxes = deltas.float(), boxes.float()
        deltas = deltas.view(len(deltas), -1, 4).expand(-1, num_classes, -1) if deltas.shape[1] == 4 else deltas
        repeated = boxes[:, None].expand(-1, num_classes, -1).reshape(-1, 4)
        return self.box_coder.decode_single(deltas.reshape(-1, 4), repeated).view(-1, num_classes, 4)


class CascadeRoIHeads(nn.Module):
    """The cascade's RoI stages, called as torchvision's ``RoIHeads``: ``(features, proposals, image_shapes,
    targets)`` → ``(detections, losses)``.

    Args:
        box_roi_pool: RoI features of the boxes (7×7, shared by the stages).
        stages: the :class:`CascadeStage` s in order.
        num_classes: foreground classes K (labels 1..K).
        stage_loss_weights: weight of each stage's losses.
        mask_roi_pool: RoI features for the mask heads (14×14); None: no masks.
        batch_size_per_image: RoIs sampled per image and stage.
        positive_fraction: at most this fraction of them positive.
        box_loss_weight: weight of the GIoU loss.
        score_thresh, nms_thresh, detections_per_img: test-time filtering (per-class NMS).
        score_mode: "logits": softmax of the stages' mean logits (mmdet); "probs": mean of the stages' softmaxes.
        class_weight: cross-entropy weight of the background and each class (K + 1); None: unweighted.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        stages: Sequence[CascadeStage],
        num_classes: int,
        stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_loss_weight: float = 10.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        score_mode: ScoreMode = "logits",
        class_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(stage_loss_weights) != len(stages):
            raise ValueError(f"stage_loss_weights needs one weight per stage ({len(stages)}), got {stage_loss_weights}")
        if score_mode not in ("logits", "probs"):
            raise ValueError(f"score_mode must be 'logits' or 'probs', got {score_mode!r}")
        if (mask_roi_pool is None) != any(s.mask_head is None for s in stages):
            raise ValueError("give mask_roi_pool together with a mask head in every stage, or neither")
        self.box_roi_pool = box_roi_pool
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.mask_roi_pool = mask_roi_pool
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.score_mode = score_mode
        self.register_buffer("class_weight", class_weight, persistent=False)  # not in checkpoints

    @property
    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None

    # -- training -------------------------------------------------------------------------------------------------
    def sample(self, stage: CascadeStage, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict:
        """The stage's training RoIs: proposals (detached) plus the ground truths, matched at the stage's IoU and
        subsampled. Returns per-image lists ``boxes``, ``labels`` (0 background), ``matched`` (ground-truth index),
        ``is_gt`` (the RoI is an added ground truth)."""
        out: dict[str, list[Tensor]] = {"boxes": [], "labels": [], "matched": [], "is_gt": []}
        per_image = []
        for boxes, target in zip(proposals, targets):
            gt = target["boxes"].to(boxes.dtype)
            boxes = torch.cat([boxes.detach(), gt])
            is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
            is_gt[len(boxes) - len(gt) :] = True
            if len(gt):
                matched = stage.matcher(box_iou(gt, boxes))
                labels = target["labels"][matched.clamp(min=0)].clone()
                labels[matched < 0] = 0
            else:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            per_image.append((boxes, labels, matched.clamp(min=0), is_gt))
        positives, negatives = self.sampler([labels for _, labels, _, _ in per_image])
        for (boxes, labels, matched, is_gt), pos, neg in zip(per_image, positives, negatives):
            keep = torch.where(pos | neg)[0]
            for key, value in zip(out, (boxes, labels, matched, is_gt)):
                out[key].append(value[keep])
        return out

    def stage_losses(
        self,
        stage: CascadeStage,
        features: dict[str, Tensor],
        samples: dict,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Unweighted classification, GIoU and mask losses of one stage; also its logits and deltas."""
        boxes, labels = torch.cat(samples["boxes"]), torch.cat(samples["labels"])
        pooled = self.box_roi_pool(features, samples["boxes"], image_shapes)
        logits, deltas = stage.box_predictor(stage.box_head(pooled))
        gt = torch.cat([t["boxes"][m] if len(t["boxes"]) else boxes.new_zeros(len(m), 4)
                        for t, m in zip(targets, samples["matched"])])  # fmt: skip
        pos = labels > 0
        decoded = stage.decode(deltas[pos], boxes[pos], labels[pos])
        giou = generalized_box_iou_loss(decoded, gt[pos].to(decoded.dtype), reduction="sum")
        weight = None if self.class_weight is None else self.class_weight.to(logits.dtype)
        losses = {"loss_cls": F.cross_entropy(logits, labels, weight=weight), "loss_box": self.box_loss_weight * giou / len(labels)}
        if self.has_mask:
            positives = [torch.where(lab > 0)[0] for lab in samples["labels"]]
            pos_boxes = [b[p] for b, p in zip(samples["boxes"], positives)]
            mask_logits = stage.mask_predictor(stage.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(
                mask_logits,
                pos_boxes,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                [m[p] for m, p in zip(samples["matched"], positives)],
            )
        return losses, logits, deltas

    @torch.no_grad()
    def refine(
        self, stage: CascadeStage, samples: dict, logits: Tensor, deltas: Tensor, image_shapes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """The next stage's proposals: every sampled RoI but the added ground truths, regressed by its label
        (background RoIs by their best foreground class), clipped to the image, detached."""
        labels = torch.cat(samples["labels"])
        labels = torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)
        refined = stage.decode(deltas, torch.cat(samples["boxes"]), labels)
        per_image = refined.split([len(b) for b in samples["boxes"]])
        return [clip_boxes_to_image(b[~gt], s) for b, gt, s in zip(per_image, samples["is_gt"], image_shapes)]

    # -- inference ------------------------------------------------------------------------------------------------
    def average_scores(self, stage_logits: Sequence[Tensor]) -> Tensor:
        """(N, K + 1) class probabilities from the stages' logits, by ``score_mode``."""
        if self.score_mode == "logits":
            return F.softmax(torch.stack(list(stage_logits)).mean(0), -1)
        return torch.stack([F.softmax(x, -1) for x in stage_logits]).mean(0)

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        counts = [len(p) for p in proposals]
        boxes, stage_logits = proposals, []
        for i, stage in enumerate(self.stages):
            logits, deltas = stage.box_predictor(stage.box_head(self.box_roi_pool(features, boxes, image_shapes)))
            stage_logits.append(logits)
            if i < len(self.stages) - 1:
                refined = stage.decode(deltas, torch.cat(boxes), logits[:, 1:].argmax(1) + 1)
                boxes = [clip_boxes_to_image(b, s) for b, s in zip(refined.split(counts), image_shapes)]
        scores = self.average_scores(stage_logits)[:, 1:]
        final = self.stages[-1].decode_all(deltas, torch.cat(boxes), self.num_classes)
        results = []
        for b, s, shape in zip(final.split(counts), scores.split(counts), image_shapes):
            b = clip_boxes_to_image(b, shape).reshape(-1, 4)
            labels = torch.arange(1, self.num_classes + 1, device=s.device).repeat(len(s))
            s = s.reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            keep = keep[remove_small_boxes(b[keep], 1e-2)]
            keep = keep[batched_nms(b[keep], s[keep], labels[keep], self.nms_thresh)][: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        if self.has_mask:
            mask_features = self.mask_roi_pool(features, [r["boxes"] for r in results], image_shapes)
            labels = torch.cat([r["labels"] for r in results])
            index = torch.arange(len(labels), device=labels.device)
            probs = torch.stack(
                [s.mask_predictor(s.mask_head(mask_features))[index, labels].sigmoid() for s in self.stages]
            ).mean(0)
            for r, p in zip(results, probs.split([len(r["labels"]) for r in results])):
                r["masks"] = p[:, None]  # (N, 1, M, M) probabilities: torchvision's transform pastes them
        return results

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return self.detect(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("targets are needed in training")
        if self.has_mask and any("masks" not in t for t in targets):
            raise ValueError("every target needs 'masks' for Cascade Mask R-CNN")
        losses = {}
        for i, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            samples = self.sample(stage, proposals, targets)
            stage_losses, logits, deltas = self.stage_losses(stage, features, samples, image_shapes, targets)
            losses.update({f"{name}_s{i}": weight * value for name, value in stage_losses.items()})
            if i < len(self.stages) - 1:
                proposals = self.refine(stage, samples, logits, deltas, image_shapes)
        return [], losses


def build_cascade(
    backbone: SwinTransformer,
    num_classes: int,
    masks: bool = True,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    box_convs: int = 4,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    train_resize: bool = True,
    stage_ious: Sequence[float] = STAGE_IOUS,
    stage_stds: Sequence[Sequence[float]] = STAGE_STDS,
    stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
    class_agnostic: bool = False,
    box_loss_weight: float = 10.0,
    score_mode: ScoreMode = "logits",
    sampling_ratio: int = 0,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    rpn_score_thresh: float = 0.0,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    class_weights: Sequence[float] | None = None,
) -> CascadeRCNN:
    """Cascade Mask R-CNN (``masks=True``) or Cascade R-CNN on ``backbone`` + FPN, the official Swin recipe's heads.

    The arguments shared with :func:`swin.models.build_detector` mean the same (the ``rpn_*`` / ``box_*`` ones are
    torchvision's detector options, with its defaults, which are mmdet's). Cascade-specific:

    Args:
        box_convs: 3×3 conv + BatchNorm + ReLU layers of ``fpn_channels`` before the box head's fc.
        stage_ious: each stage's IoU threshold for positives.
        stage_stds: each stage's box-coder standard deviations (dx, dy, dw, dh).
        stage_loss_weights: each stage's loss weight.
        class_agnostic: one box per RoI instead of one per class (the official Swin config: class-specific).
        box_loss_weight: weight of the GIoU loss on the decoded boxes.
        score_mode: "logits" (mmdet: softmax of the mean logits) or "probs" (mean of the stages' softmaxes).
        sampling_ratio: RoIAlign samples per bin (0: adaptive, as mmdet's config).
        class_weights: weight of each class (K values; the background keeps 1) in every stage's classification
            cross-entropy; None: unweighted, as the recipe.
    """
    if not len(stage_ious) == len(stage_stds) == len(stage_loss_weights):
        raise ValueError(
            f"stage_ious, stage_stds and stage_loss_weights need one entry per stage, got {len(stage_ious)}, "
            f"{len(stage_stds)} and {len(stage_loss_weights)}"
        )
    neck = SwinFPN(backbone, fpn_channels)
    anchors = pyramid_anchors(neck, anchor_sizes, aspect_ratios)
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        rpn_fg_iou_thresh,
        rpn_bg_iou_thresh,
        rpn_batch_size_per_image,
        rpn_positive_fraction,
        dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
        dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
        rpn_nms_thresh,
        score_thresh=rpn_score_thresh,
    )
    stages = []
    for iou, stds in zip(stage_ious, stage_stds):
        box_head = FastRCNNConvFCHead(
            (fpn_channels, 7, 7), [fpn_channels] * box_convs, [representation_size], norm_layer=nn.BatchNorm2d
        )
        mask_parts = mask_branch(fpn_channels, mask_channels, num_classes) if masks else {}
        predictor = CascadeBoxPredictor(representation_size, num_classes, class_agnostic)
        stages.append(CascadeStage(iou, stds, box_head, predictor, **mask_parts))
    roi_heads = CascadeRoIHeads(
        MultiScaleRoIAlign(neck.feature_names, output_size=7, sampling_ratio=sampling_ratio),
        stages,
        num_classes,
        stage_loss_weights,
        mask_roi_pool=MultiScaleRoIAlign(neck.feature_names, 14, sampling_ratio) if masks else None,
        batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction,
        box_loss_weight=box_loss_weight,
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
        score_mode=score_mode,
        class_weight=class_weight_tensor(class_weights, num_classes, background=True),
    )
    transform = GeneralizedRCNNTransform(
        min_size, max_size, list(image_mean), list(image_std), _skip_resize=not train_resize
    )
    return CascadeRCNN(neck, rpn, roi_heads, transform)
