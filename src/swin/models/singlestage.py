"""Single-stage detectors on Swin + FPN: torchvision's RetinaNet and FCOS (the paper's Table 2(a) frameworks).

Both read P3-P7: the FPN takes Swin's stages 1-3 (strides 8, 16, 32) and adds P6 (a stride-2 3×3 conv on C5, as
mmdet's ``add_extra_convs="on_input"``) and P7 (on ReLU(P6)); heads, anchors or points, losses (focal, GIoU,
centerness), box coding and NMS are torchvision's. RetinaNet puts 3 anchor sizes per octave (``s``, ``s·2^(1/3)``,
``s·2^(2/3)``) × 3 aspect ratios at every level; FCOS one point per location, sized by the level's stride.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from swin.models.detector import IMAGENET_MEAN, IMAGENET_STD, SwinFPN
from swin.models.swin import SwinTransformer

__all__ = ["SwinRetinaNet", "SwinFCOS", "build_retinanet", "build_fcos", "SINGLE_STAGE_OUT_INDICES"]

#: the Swin stages the P3-P7 FPN reads
SINGLE_STAGE_OUT_INDICES = (1, 2, 3)


class _LabelsFromOne:
    """torchvision's RetinaNet and FCOS number the classes 0..K-1; this project's labels run 1..K (0: background)."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] - 1} for t in targets]
        out = super().forward(images, targets)
        return out if self.training else [{**d, "labels": d["labels"] + 1} for d in out]


class SwinRetinaNet(_LabelsFromOne, RetinaNet):
    """torchvision's RetinaNet, labels 1..K."""


class SwinFCOS(_LabelsFromOne, FCOS):
    """torchvision's FCOS, labels 1..K."""


def _neck(backbone: SwinTransformer, fpn_channels: int, levels: int) -> SwinFPN:
    if tuple(backbone.out_indices) != SINGLE_STAGE_OUT_INDICES:
        raise ValueError(f"single-stage detectors read Swin stages {SINGLE_STAGE_OUT_INDICES} (out_indices), "
                         f"got {tuple(backbone.out_indices)}")  # fmt: skip
    if levels != 5:
        raise ValueError(f"anchor_sizes needs one size per pyramid level P3..P7 (5), got {levels}")
    return SwinFPN(backbone, fpn_channels, LastLevelP6P7(backbone.out_channels[-1], fpn_channels))


def build_retinanet(
    backbone: SwinTransformer,
    num_classes: int,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    train_resize: bool = True,
    **kwargs,
) -> SwinRetinaNet:
    """torchvision's RetinaNet on Swin (``out_indices=(1, 2, 3)``) + FPN P3-P7; labels 1..``num_classes``.

    ``kwargs``: further ``RetinaNet`` options (``score_thresh``, ``detections_per_img``, ``fg_iou_thresh``, ...).
    """
    neck = _neck(backbone, fpn_channels, len(anchor_sizes))
    sizes = tuple(tuple(int(s * 2 ** (k / 3)) for k in range(3)) for s in anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    return SwinRetinaNet(neck, num_classes, min_size, max_size, list(image_mean), list(image_std),
                     anchor_generator=anchors, _skip_resize=not train_resize, **kwargs)  # fmt: skip


def build_fcos(
    backbone: SwinTransformer,
    num_classes: int,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128),
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    train_resize: bool = True,
    **kwargs,
) -> SwinFCOS:
    """torchvision's FCOS on Swin (``out_indices=(1, 2, 3)``) + FPN P3-P7, labels 1..``num_classes``;
    ``anchor_sizes`` are the levels' strides.

    ``kwargs``: further ``FCOS`` options (``score_thresh``, ``center_sampling_radius``, ...).
    """
    neck = _neck(backbone, fpn_channels, len(anchor_sizes))
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
    return SwinFCOS(neck, num_classes, min_size, max_size, list(image_mean), list(image_std),
                anchor_generator=anchors, _skip_resize=not train_resize, **kwargs)  # fmt: skip
