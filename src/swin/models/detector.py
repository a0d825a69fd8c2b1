"""Swin + FPN inside torchvision's Mask R-CNN (or Faster R-CNN): the paper's COCO detector.

The backbone's four normed stage outputs (strides 4-32) feed torchvision's ``FeaturePyramidNetwork`` with an extra
max-pooled level (P2-P6); anchors, RPN, ``MultiScaleRoIAlign``, box and mask heads, NMS and box coding are
torchvision's. With the defaults (256-channel FPN, 1024-wide box head, 4×256 mask convs) Swin-T with 80 classes has
the size of the paper's 48M-parameter model.

torchvision's ``GeneralizedRCNNTransform`` normalises the images (float, [0, 1]) with ``image_mean`` / ``image_std``
and, in evaluation, resizes them to ``min_size`` / ``max_size`` and maps the predictions back to the input size.
``train_resize=False`` leaves the training images at the size they come in (the datamodule's multi-scale resize).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from swin.models.losses import class_weight_tensor
from swin.models.swin import SwinTransformer

__all__ = ["SwinFPN", "WeightedRoIHeads", "build_detector", "pyramid_anchors", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SwinFPN(nn.Module):
    """Swin's dense outputs through an FPN, as torchvision's detectors take a backbone.

    ``forward`` returns an ``OrderedDict`` ``{"0": P2, ..., "3": P5, "pool": P6}``, each with ``out_channels``; with
    ``out_indices=(1, 2, 3)`` and ``extra_blocks=LastLevelP6P7(8C, out_channels)`` the single-stage detectors'
    P3-P7 (``{"0": P3, "1": P4, "2": P5, "p6", "p7"}``, P6 from C5 as mmdet's ``add_extra_convs="on_input"``).
    """

    def __init__(self, body: SwinTransformer, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        if not body.out_indices:
            raise ValueError("the Swin backbone needs out_indices, e.g. (0, 1, 2, 3), to feed an FPN")
        self.body = body
        extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    @property
    def feature_names(self) -> list[str]:
        """Names of the FPN levels the RoI heads pool from (the extra max-pool level feeds only the RPN)."""
        return [str(i) for i in range(len(self.body.out_indices))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict(zip(self.feature_names, self.body.forward_features(x))))


class WeightedRoIHeads(RoIHeads):
    """torchvision's RoI heads, the same parts and settings as ``heads``, with a class-weighted classifier loss.

    ``loss_classifier`` is the cross-entropy of the sampled RoIs weighted per class (``class_weight``: background
    first, then the K classes), a weighted mean as ``F.cross_entropy(weight=...)``; with all weights equal it is
    torchvision's loss. torchvision computes that loss in a module-level function, so the logits are taken from the
    box predictor and the sampled labels from :meth:`select_training_samples`.
    """

    def __init__(self, heads: RoIHeads, class_weight: Tensor) -> None:
        super().__init__(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights,
            heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            heads.mask_roi_pool, heads.mask_head, heads.mask_predictor,
            heads.keypoint_roi_pool, heads.keypoint_head, heads.keypoint_predictor,
        )  # fmt: skip
        self.box_coder.bbox_xform_clip = heads.box_coder.bbox_xform_clip
        self.register_buffer("class_weight", class_weight.float(), persistent=False)  # not in checkpoints
        self._sampled_labels: list[Tensor] = []

    def select_training_samples(self, proposals, targets):  # noqa: ANN001, ANN201 (torchvision's signature)
        sampled = super().select_training_samples(proposals, targets)
        self._sampled_labels = sampled[2]
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201
        logits: list[Tensor] = []
        hook = self.box_predictor.register_forward_hook(lambda module, args, out: logits.append(out[0]))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        if self.training:
            labels, self._sampled_labels = torch.cat(self._sampled_labels), []
            weight = self.class_weight.to(logits[0].dtype)
            losses["loss_classifier"] = F.cross_entropy(logits[0], labels, weight=weight)
        return result, losses


def pyramid_anchors(neck: SwinFPN, anchor_sizes: Sequence[int], aspect_ratios: Sequence[float]) -> AnchorGenerator:
    """One anchor size per pyramid level (P2..P6 or P3..P7) with the same aspect ratios at every level."""
    levels = len(neck.feature_names) + (2 if isinstance(neck.fpn.extra_blocks, LastLevelP6P7) else 1)
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per pyramid level ({levels}), got {tuple(anchor_sizes)}")
    return AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * levels)


def mask_branch(fpn_channels: int, mask_channels: int, num_classes: int) -> dict[str, nn.Module]:
    """torchvision's Mask R-CNN mask head (four 3×3 convs of ``mask_channels``) and predictor (upsampling, one 1×1
    output per class and the background), as ``mask_head`` / ``mask_predictor`` keyword arguments."""
    return dict(
        mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
    )


def build_detector(
    backbone: SwinTransformer,
    num_classes: int,
    masks: bool = True,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    train_resize: bool = True,
    class_weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Mask R-CNN (``masks=True``) or Faster R-CNN on ``backbone`` + FPN.

    Args:
        backbone: a Swin with ``out_indices`` (normally (0, 1, 2, 3)) and ``num_classes=None``.
        num_classes: object classes, without the background (labels 1..num_classes; 0 is the background).
        masks: add the mask branch (Mask R-CNN).
        fpn_channels: channels of the FPN levels, the RPN and the RoI features.
        representation_size: width of the two-layer box head.
        mask_channels: width of the four mask-head convolutions and the mask upsampling.
        anchor_sizes: one anchor size per pyramid level (P2..P6), in input pixels.
        aspect_ratios: anchor aspect ratios at every level.
        min_size: shorter side torchvision's transform resizes to (evaluation; training too with ``train_resize``).
        max_size: longest side after that resize.
        image_mean: normalisation mean of the [0, 1] images.
        image_std: normalisation standard deviation.
        train_resize: let the transform resize training images as well (False: they arrive resized).
        class_weights: weight of each class (K values; the background keeps 1) in the classifier's cross-entropy
            (:class:`WeightedRoIHeads`); None: torchvision's unweighted loss, as the recipe.
        **kwargs: further torchvision ``FasterRCNN`` / ``MaskRCNN`` options (``box_detections_per_img``,
            ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``, ...).
    """
    neck = SwinFPN(backbone, fpn_channels)
    anchors = pyramid_anchors(neck, anchor_sizes, aspect_ratios)
    options = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(neck.feature_names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        _skip_resize=not train_resize,
        **kwargs,
    )
    weight = class_weight_tensor(class_weights, num_classes, background=True)
    if not masks:
        detector = FasterRCNN(neck, **options)
    else:
        detector = MaskRCNN(
            neck,
            mask_roi_pool=MultiScaleRoIAlign(neck.feature_names, output_size=14, sampling_ratio=2),
            **mask_branch(fpn_channels, mask_channels, num_classes),
            **options,
        )
    if weight is not None:
        detector.roi_heads = WeightedRoIHeads(detector.roi_heads, weight)
    return detector
