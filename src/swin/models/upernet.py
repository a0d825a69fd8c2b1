"""UperNet and FCN decode heads, the segmentor that joins them to a Swin backbone, and dense inference.

The heads follow mmsegmentation's ``UPerHead`` and ``FCNHead`` (the heads of the official Swin ADE20K results):
conv → BatchNorm → ReLU modules without conv bias, ``Dropout2d`` before a 1×1 classifier, bilinear resizing with
``align_corners=False``. Under DDP the trainer's ``sync_batchnorm`` turns the BatchNorms into SyncBatchNorm.

Inference is a set of pure functions over a ``forward`` callable (image → logits at the image's size): whole
image, sliding window (overlapping logits averaged by a count map), and multi-scale + flip test-time augmentation
(softmax averaged over views).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from swin.models.ops import exporting
from swin.models.swin import SwinTransformer

__all__ = [
    "ConvModule",
    "AdaptivePool",
    "PyramidPooling",
    "UperNetHead",
    "FCNHead",
    "Segmentor",
    "build_upernet",
    "resize",
    "slide_inference",
    "tta_inference",
]

Forward = Callable[[Tensor], Tensor]


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of NCHW maps to ``size`` (align_corners False); a no-op at the same size. Symbolic sizes
    (an export with a dynamic height and width) stay symbolic: no ``int()``, and no comparison that would become
    a guard; the resize is kept unless the sizes are known equal."""
    size = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)
    if all(statically_known_true(a == b) for a, b in zip(x.shape[-2:], size)):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AdaptivePool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(size)`` for an int ``size``; while exporting, the mean over each of PyTorch's bins
    (rows ⌊i·H/s⌋ to ⌈(i+1)·H/s⌉, columns alike) by two averaging matrices, which keep a dynamic height and width:
    the exporters' decomposition fixes the bins' length at the example's size (other sizes index out of range)."""

    output_size: int

    def forward(self, x: Tensor) -> Tensor:
        if not exporting():
            return super().forward(x)
        rows = (x.unsqueeze(2) * self._bins(x.shape[-2], x)[:, :, None]).sum(3)  # (B, C, s, W)
        return (rows.unsqueeze(3) * self._bins(x.shape[-1], x)).sum(4)  # broadcasts: a matmul's reshapes would guard

    def _bins(self, length: int, x: Tensor) -> Tensor:
        """(s, length): 1 / bin length where a position lies in an output's bin, else 0."""
        s = self.output_size
        out, pos = torch.arange(s, device=x.device)[:, None], torch.arange(length, device=x.device)[None, :]
        inside = (pos >= out * length // s) & (pos < ((out + 1) * length + s - 1) // s)
        return inside.to(x.dtype) / inside.sum(1, keepdim=True).to(x.dtype)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: adaptive average pools at ``scales``, 1×1 ConvModules, upsampled and concatenated
    with the input (``in_channels + len(scales) * channels`` outputs)."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(AdaptivePool(s), ConvModule(in_channels, channels, 1)) for s in scales
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, *(resize(stage(x), x.shape[-2:]) for stage in self.stages)], dim=1)


class Classifier(nn.Sequential):
    """Dropout2d → 1×1 conv to class logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class UperNetHead(nn.Module):
    """UperNet (Xiao et al., 2018) over a feature pyramid: PPM on the last level, lateral 1×1 convs and top-down
    additions, 3×3 FPN convs, every level upsampled to the finest one, concatenated and fused by a 3×3 conv.

    Args:
        in_channels: channels of the input maps, finest first (e.g. ``backbone.out_channels``).
        num_classes: logits per pixel.
        channels: width of every internal map.
        pool_scales: output sizes of the pyramid pooling.
        dropout: Dropout2d before the classifier.

    ``forward(features)`` returns logits at the finest level's resolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels = list(in_channels)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.ppm_bottleneck(self.ppm(features[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outs], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """FCN auxiliary head on one feature map: ``num_convs`` 3×3 ConvModules of ``channels``, then the classifier.

    Args:
        in_channels: channels of the input map.
        num_classes: logits per pixel.
        channels: width of the convs.
        num_convs: number of 3×3 ConvModules (1 in the Swin recipe).
        dropout: Dropout2d before the classifier.
    """

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs at least one conv, got num_convs={num_convs}")
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvModule(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.convs(x))


class Segmentor(nn.Module):
    """A dense backbone, a decode head over all its maps and an optional auxiliary head over one of them.

    Args:
        backbone: Swin with ``out_indices`` covering the head's inputs and ``num_classes=None``.
        decode_head: takes the backbone's list of maps.
        aux_head: takes the map at ``aux_index`` (training only).
        aux_index: which backbone output feeds the auxiliary head (2: stage 3 in the Swin recipe).
    """

    def __init__(
        self,
        backbone: SwinTransformer,
        decode_head: nn.Module,
        aux_head: nn.Module | None = None,
        aux_index: int = 2,
    ):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_index = aux_index

    def forward(self, image: Tensor) -> Tensor:
        """Logits of the decode head, resized to the image's size."""
        return resize(self.decode_head(self.backbone.forward_features(image)), image.shape[-2:])

    def forward_train(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """Decode and auxiliary logits (None without an auxiliary head), both resized to the image's size."""
        features = self.backbone.forward_features(image)
        logits = resize(self.decode_head(features), image.shape[-2:])
        if self.aux_head is None:
            return logits, None
        return logits, resize(self.aux_head(features[self.aux_index]), image.shape[-2:])

    @torch.no_grad()
    def inference(
        self,
        image: Tensor,
        size: Sequence[int] | None = None,
        mode: Literal["whole", "slide"] = "whole",
        crop_size: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 341,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> Tensor:
        """Class probabilities (B, K, *size) of an image batch, averaged over ``scales`` × flips.

        ``mode`` "whole" runs the image at once, "slide" through ``crop_size`` windows every ``stride`` pixels.
        ``size`` (default: the image's) is where the views are compared, e.g. the annotation's size.
        """
        if mode == "whole":
            infer: Forward = self
        elif mode == "slide":
            crop, step = _pair(crop_size), _pair(stride)
            infer = lambda x: slide_inference(self, x, crop, step)  # noqa: E731
        else:
            raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")
        return tta_inference(infer, image, size or image.shape[-2:], scales, flip)


def build_upernet(
    backbone: SwinTransformer,
    num_classes: int,
    channels: int = 512,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    auxiliary: bool = True,
    aux_channels: int = 256,
    aux_num_convs: int = 1,
    aux_index: int = 2,
) -> Segmentor:
    """The paper's ADE20K segmentor: UperNet over all of ``backbone``'s maps plus an auxiliary FCN head.

    Args:
        backbone: Swin with ``out_indices`` (normally (0, 1, 2, 3)) and ``num_classes=None``.
        num_classes: logits per pixel.
        channels: width of the UperNet head (512 in the paper).
        pool_scales: pyramid pooling sizes.
        dropout: Dropout2d before both classifiers.
        auxiliary: add the auxiliary FCN head (training only).
        aux_channels: width of the auxiliary head (256).
        aux_num_convs: its 3×3 convs (1).
        aux_index: the backbone output it reads (2: stage 3).
    """
    widths = backbone.out_channels
    decode_head = UperNetHead(widths, num_classes, channels, pool_scales, dropout)
    aux_head = FCNHead(widths[aux_index], num_classes, aux_channels, aux_num_convs, dropout) if auxiliary else None
    return Segmentor(backbone, decode_head, aux_head, aux_index)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    h, w = x
    return int(h), int(w)


def slide_inference(forward: Forward, image: Tensor, crop_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Logits of ``image`` from ``crop_size`` windows placed every ``stride`` pixels, overlaps averaged.

    ``forward`` maps an image crop to logits at the crop's size. An image smaller than the crop is padded
    (right / bottom, zeros) to the crop and the logits are cropped back; windows at the border are shifted
    inside the image, as mmsegmentation does.
    """
    (crop_h, crop_w), (step_h, step_w) = _pair(crop_size), _pair(stride)
    if min(crop_h, crop_w, step_h, step_w) < 1:
        raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
    _, _, height, width = image.shape
    image = F.pad(image, (0, max(crop_w - width, 0), 0, max(crop_h - height, 0)))
    pad_h, pad_w = image.shape[-2:]
    rows = max(pad_h - crop_h + step_h - 1, 0) // step_h + 1
    cols = max(pad_w - crop_w + step_w - 1, 0) // step_w + 1
    logits: Tensor | None = None
    count = image.new_zeros((1, 1, pad_h, pad_w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * step_h + crop_h, pad_h), min(c * step_w + crop_w, pad_w)
            y1, x1 = y2 - crop_h, x2 - crop_w
            out = forward(image[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = out.new_zeros((image.shape[0], out.shape[1], pad_h, pad_w))
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return (logits / count)[:, :, :height, :width]


def tta_inference(
    infer: Forward, image: Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,), flip: bool = False
) -> Tensor:
    """Softmax of ``infer``'s logits, resized to ``size`` and averaged over the image rescaled by each of
    ``scales`` and, with ``flip``, its horizontal mirror."""
    if not scales:
        raise ValueError("tta_inference needs at least one scale")
    height, width = image.shape[-2:]
    total: Tensor | None = None
    for scale in scales:
        scaled = resize(image, (int(height * scale + 0.5), int(width * scale + 0.5)))
        for mirrored in (False, True) if flip else (False,):
            logits = infer(scaled.flip(-1)) if mirrored else infer(scaled)
            probs = resize(logits.flip(-1) if mirrored else logits, size).softmax(dim=1)
            total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
