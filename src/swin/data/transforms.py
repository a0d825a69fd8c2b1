"""albumentations pipelines for classification, with a RandAugment equivalent of timm's ``rand-m9-mstd0.5-inc1``.

timm's RandAugment (the one the official Swin recipe uses) picks ``num_ops`` operations uniformly with
replacement; each one runs with probability 0.5 at a magnitude ``m ~ N(9, 0.5)`` clipped to [0, 10]. Here that is
an ``A.SomeOf(ops, n=2, replace=True)`` of ops with ``p=0.5`` whose arguments are drawn uniformly between the
values of timm's level functions at ``m_lo, m_hi = clip(9 ∓ √3·0.5, 0, 10)`` (a uniform law with the same mean
and standard deviation). Ops whose sign timm flips at random are an ``A.OneOf`` of the positive and the negative
range. The mapping ('inc1': the increasing-severity variants; ``l = m / 10``):

====================  ===============================  ========================================
timm op               timm argument                    albumentations op
====================  ===============================  ========================================
AutoContrast          -                                ``AutoContrast(method="pil")``
Equalize              -                                ``Equalize(mode="pil")``
Invert                -                                ``InvertImg``
Rotate                ±30·l degrees                    ``Affine(rotate=...)``
PosterizeIncreasing   keep 4 - int(4·l) bits           ``Posterize(num_bits=...)``
SolarizeIncreasing    invert ≥ 256 - int(256·l)        ``Solarize(threshold_range=.../255)``
SolarizeAdd           + int(110·l) where < 128         :class:`SolarizeAdd` (below)
ColorIncreasing       saturation × (1 ± 0.9·l)         ``ColorJitter(saturation=...)``
ContrastIncreasing    contrast × (1 ± 0.9·l)           ``ColorJitter(contrast=...)``
BrightnessIncreasing  brightness × (1 ± 0.9·l)         ``ColorJitter(brightness=...)``
SharpnessIncreasing   PIL sharpness × (1 ± 0.9·l)      :class:`Sharpness` (below)
ShearX / ShearY       shear factor ±0.3·l              ``Affine(shear=atan(factor) degrees)``
TranslateXRel / Y     ±0.45·l of the width / height    ``Affine(translate_percent=...)``
====================  ===============================  ========================================

Geometric ops are bicubic and fill with the ImageNet mean colour, as timm's ``create_transform`` sets them; they
act about the image centre (timm shears about the corner, which adds a translation).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)
CROP_PCT = 0.875  # evaluation: resize the shorter side to size / CROP_PCT, then centre crop
INTERPOLATIONS = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST,
                  "area": cv2.INTER_AREA}  # fmt: skip


def interpolation_flag(name: str) -> int:
    """The OpenCV flag of an interpolation name (``bicubic``, ``bilinear``, ``nearest``, ``area``)."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}: choose one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


class Pipeline(A.Compose):
    """An ``A.Compose`` whose transforms share its random generators, drawing from them in turn.

    ``A.Compose.set_random_seed`` gives every transform generators of its own seeded with the same seed, so that
    after each reseed (:class:`swin.data.samplers.SeededSamples` reseeds before every sample) all transforms draw the
    same first number, so their random decisions are correlated (in the ImageNet recipe RandAugment's ops of
    probability 0.5 run exactly on the horizontally flipped images, random erasing of 0.25 only on those), and
    seeding two generators per transform costs about 0.8 ms for that pipeline. Here one seed makes one pair of
    generators that all transforms share: independent decisions, still a pure function of the seed.
    """

    def set_random_seed(self, seed: int | None) -> None:
        self.seed = seed
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))


class SolarizeAdd(A.ImageOnlyTransform):
    """Add a value drawn from ``addition_range`` to the uint8 pixels below ``threshold`` (PIL/timm SolarizeAdd)."""

    def __init__(self, addition_range: tuple[int, int] = (0, 110), threshold: int = 128, p: float = 0.5):
        super().__init__(p=p)
        self.addition_range = addition_range
        self.threshold = threshold

    def get_params(self) -> dict[str, int]:
        return {"addition": self.py_random.randint(*self.addition_range)}

    def apply(self, img: np.ndarray, addition: int, **params) -> np.ndarray:
        added = np.minimum(img.astype(np.int16) + addition, 255).astype(np.uint8)
        return np.where(img < self.threshold, added, img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("addition_range", "threshold")


class Sharpness(A.ImageOnlyTransform):
    """PIL's ``ImageEnhance.Sharpness``: blend with a 3×3 smoothed copy; factor < 1 blurs, > 1 sharpens."""

    _SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13

    def __init__(self, factor_range: tuple[float, float] = (0.1, 1.9), p: float = 0.5):
        super().__init__(p=p)
        self.factor_range = factor_range

    def get_params(self) -> dict[str, float]:
        return {"factor": self.py_random.uniform(*self.factor_range)}

    def apply(self, img: np.ndarray, factor: float, **params) -> np.ndarray:
        image = img.astype(np.float32)
        smooth = image.copy()
        smooth[1:-1, 1:-1] = cv2.filter2D(image, -1, self._SMOOTH)[1:-1, 1:-1]  # PIL keeps the border pixels
        return np.clip(smooth + factor * (image - smooth) + 0.5, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("factor_range",)


def _signed(make: Callable[[tuple[float, float]], A.BasicTransform], lo: float, hi: float, p: float) -> A.OneOf:
    """``make((lo, hi))`` or ``make((-hi, -lo))`` with equal chance: timm's random negation of an op's argument."""
    return A.OneOf([make((lo, hi)), make((-hi, -lo))], p=p)


def rand_augment(
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    num_ops: int = 2,
    op_prob: float = 0.5,
    fill: tuple[int, ...] = IMAGENET_MEAN_PIXEL,
) -> A.SomeOf:
    """The RandAugment equivalent of timm's ``rand-m{magnitude}-mstd{magnitude_std}-inc1`` (module docstring)."""
    spread = math.sqrt(3) * magnitude_std
    lo, hi = max(0.0, (magnitude - spread) / 10), min(1.0, (magnitude + spread) / 10)
    affine = {"interpolation": cv2.INTER_CUBIC, "border_mode": cv2.BORDER_CONSTANT, "fill": fill, "p": 1.0}
    shear = (math.degrees(math.atan(0.3 * lo)), math.degrees(math.atan(0.3 * hi)))
    translate = (0.45 * lo, 0.45 * hi)

    def enhance(component: str) -> Callable[[tuple[float, float]], A.ColorJitter]:
        def make(delta: tuple[float, float]) -> A.ColorJitter:
            factors = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0)}
            factors[component] = tuple(sorted(max(0.1, 1 + d) for d in delta))
            return A.ColorJitter(**factors, hue=(0.0, 0.0), p=1.0)

        return make

    def sharpness(delta: tuple[float, float]) -> Sharpness:
        return Sharpness(factor_range=tuple(max(0.1, 1 + d) for d in delta), p=1.0)

    ops = [
        A.AutoContrast(method="pil", p=op_prob),
        A.Equalize(mode="pil", p=op_prob),
        A.InvertImg(p=op_prob),
        _signed(lambda r: A.Affine(rotate=r, **affine), 30 * lo, 30 * hi, op_prob),
        A.Posterize(num_bits=(4 - int(4 * hi), 4 - int(4 * lo)), p=op_prob),
        A.Solarize(threshold_range=((256 - int(256 * hi)) / 255, (256 - int(256 * lo)) / 255), p=op_prob),
        SolarizeAdd(addition_range=(int(110 * lo), int(110 * hi)), p=op_prob),
        _signed(enhance("saturation"), 0.9 * lo, 0.9 * hi, op_prob),
        _signed(enhance("contrast"), 0.9 * lo, 0.9 * hi, op_prob),
        _signed(enhance("brightness"), 0.9 * lo, 0.9 * hi, op_prob),
        _signed(sharpness, 0.9 * lo, 0.9 * hi, op_prob),
        _signed(lambda r: A.Affine(shear={"x": r, "y": (0.0, 0.0)}, **affine), *shear, op_prob),
        _signed(lambda r: A.Affine(shear={"x": (0.0, 0.0), "y": r}, **affine), *shear, op_prob),
        _signed(lambda r: A.Affine(translate_percent={"x": r, "y": (0.0, 0.0)}, **affine), *translate, op_prob),
        _signed(lambda r: A.Affine(translate_percent={"x": (0.0, 0.0), "y": r}, **affine), *translate, op_prob),
    ]
    return A.SomeOf(ops, n=num_ops, replace=True, p=1.0)


def flip_masks(masks: np.ndarray, flip_code: int) -> np.ndarray:
    """An N×H×W stack of masks flipped (``cv2.flip`` codes: 1 horizontal, 0 vertical) into one new array, a mask at a
    time (albumentations' ``apply_to_masks`` stacks a contiguous copy of each flipped view: two copies)."""
    out = np.empty_like(masks)
    for mask, flipped in zip(masks, out):
        cv2.flip(mask, flip_code, dst=flipped)
    return out


class HorizontalFlip(A.HorizontalFlip):
    """``A.HorizontalFlip`` with :func:`flip_masks` for a stack of masks."""

    def apply_to_masks(self, masks: np.ndarray, **params) -> np.ndarray:
        return flip_masks(masks, 1)


class VerticalFlip(A.VerticalFlip):
    """``A.VerticalFlip`` with :func:`flip_masks` for a stack of masks."""

    def apply_to_masks(self, masks: np.ndarray, **params) -> np.ndarray:
        return flip_masks(masks, 0)


def random_flips(hflip: float, vflip: float) -> list[A.BasicTransform]:
    """Horizontal and vertical flips with these probabilities (those with probability 0 left out); they move
    masks and boxes in lockstep with the image."""
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    return [flip(p=p) for flip, p in ((HorizontalFlip, hflip), (VerticalFlip, vflip)) if p > 0]


def classification_transforms(
    image_size: int,
    train: bool,
    randaugment: bool = True,
    color_jitter: float = 0.4,
    random_erasing: float = 0.25,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    crop_pct: float = CROP_PCT,
    interpolation: str = "bicubic",
) -> A.Compose:
    """The paper's (timm's) ImageNet pipelines: HWC uint8 RGB in, normalised CHW float tensor out.

    Train: RandomResizedCrop (area fraction ``crop_scale``, 0.08-1 in the recipe; aspect ratio ``crop_ratio``),
    horizontal and vertical flips with probabilities ``hflip`` and ``vflip``, RandAugment (``randaugment``), colour
    jitter of strength ``color_jitter`` (brightness, contrast, saturation; as in timm it is skipped while RandAugment
    is on, so the official recipe never applies it), random erasing with probability ``random_erasing`` (one
    rectangle of 2-33 % of the area, filled with per-pixel uniform noise), Normalize. Eval: resize the shorter side
    to ``floor(image_size / crop_pct)``, centre crop, Normalize. Resizing uses ``interpolation`` (bicubic in the
    recipe; see :data:`INTERPOLATIONS`).

    The training pipeline (a :class:`Pipeline`) starts its random generators from torch's initial seed (so a global
    seed makes it reproducible); DataLoader workers reseed their copies with :func:`seed_worker_transforms`.
    """
    flag = interpolation_flag(interpolation)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if not train:
        return A.Compose(
            [
                A.SmallestMaxSize(max_size=math.floor(image_size / crop_pct), interpolation=flag),
                A.CenterCrop(image_size, image_size),
                A.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ToTensorV2(),
            ]
        )
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop((image_size, image_size), scale=crop_scale, ratio=crop_ratio, interpolation=flag)
    ]
    steps += random_flips(hflip, vflip)
    if randaugment:
        steps.append(rand_augment())
    elif color_jitter > 0:
        steps.append(A.ColorJitter(color_jitter, color_jitter, color_jitter, hue=0.0, p=1.0))
    if random_erasing > 0:
        steps.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=random_erasing))
    steps += [A.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensorV2()]
    return Pipeline(steps, seed=torch.initial_seed() % 2**32)


def seed_worker_transforms(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's copy of its dataset's albumentations pipeline.

    An ``A.Compose`` keeps its own random generators, which forked workers would otherwise all copy and repeat;
    each worker takes torch's per-worker seed instead (distinct per worker and per epoch, reproducible under a
    global seed). Works for any dataset that keeps its pipeline in a ``transform`` attribute.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)
