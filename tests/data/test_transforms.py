import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from swin.data import shapes
from swin.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Sharpness,
    SolarizeAdd,
    classification_transforms,
    rand_augment,
)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    picture, _ = shapes.render_scene(np.random.default_rng(0), (60, 80), [(3, 0.3), (0, 0.2)])
    return picture


def _types(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_eval_pipeline_resizes_then_centre_crops(image):
    transform = classification_transforms(32, train=False)
    assert _types(transform) == ["SmallestMaxSize", "CenterCrop", "Normalize", "ToTensorV2"]
    assert transform.transforms[0].max_size == 36  # floor(32 / 0.875), as timm
    out = transform(image=image)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(image=image)["image"])  # deterministic
    # a constant ImageNet-mean image normalises to zero
    mean_image = np.broadcast_to(np.array(IMAGENET_MEAN) * 255, (40, 40, 3)).astype(np.float32)
    assert transform(image=mean_image)["image"].abs().max() < 1e-5


def test_train_pipeline_contents_follow_the_switches(image):
    full = classification_transforms(48, train=True)
    assert _types(full) == ["RandomResizedCrop", "HorizontalFlip", "SomeOf", "Erasing", "Normalize", "ToTensorV2"]
    crop = full.transforms[0]
    assert crop.size == (48, 48) and crop.scale == (0.08, 1.0) and crop.interpolation == 2  # bicubic
    assert classification_transforms(48, train=True, crop_scale=(0.35, 1.0)).transforms[0].scale == (0.35, 1.0)
    assert full.transforms[3].p == 0.25
    plain = classification_transforms(48, train=True, randaugment=False, color_jitter=0.3, random_erasing=0.0)
    assert _types(plain) == ["RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Normalize", "ToTensorV2"]
    assert plain.transforms[2].brightness == pytest.approx((0.7, 1.3))
    bare = classification_transforms(48, train=True, randaugment=False, color_jitter=0.0, random_erasing=0.0)
    assert _types(bare) == ["RandomResizedCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]
    outs = torch.stack([full(image=image)["image"] for _ in range(8)])
    assert outs.shape == (8, 3, 48, 48) and outs.dtype == torch.float32
    assert (outs[0] != outs[1]).any()  # random


def test_rand_augment_follows_timm_rand_m9_mstd05_inc1(image):
    ra = rand_augment()
    assert ra.n == 2 and ra.replace and len(ra.transforms) == 15
    assert all(op.p == 0.5 for op in ra.transforms)
    by_name = {}
    for op in ra.transforms:
        inner = op.transforms if isinstance(op, A.OneOf) else [op]
        by_name.setdefault(type(inner[0]).__name__, []).append(inner)
    assert by_name["Posterize"][0][0].num_bits == (1, 1)  # 4 - int(4 * m/10) for m in 9 ± √3·0.5
    assert by_name["SolarizeAdd"][0][0].addition_range == (89, 108)  # int(110 * m/10)
    lo, hi = by_name["Solarize"][0][0].threshold_range
    assert (round(lo * 255), round(hi * 255)) == (4, 48)  # 256 - int(256 * m/10)
    rotate = by_name["Affine"][0]  # rotation, both signs at the same magnitude
    for op, sign in zip(rotate, (1, -1)):
        assert op.p == 1.0
        params = [op.get_params_dependent_on_data({"shape": image.shape}, {"image": image}) for _ in range(20)]
        angles = [p["rotate"] for p in params]
        assert all(24.3 < sign * a < 29.7 for a in angles)  # 30 * m/10
    for op in ra.transforms:  # every op runs on uint8 images
        out = op(image=image, force_apply=True)["image"] if not isinstance(op, A.OneOf) else None
        if out is None:
            out = op.transforms[1](image=image, force_apply=True)["image"]
        assert out.shape == image.shape and out.dtype == np.uint8


@pytest.mark.parametrize("factor", [0.2, 1.8])
def test_sharpness_matches_pil(image, factor):
    ours = Sharpness(factor_range=(factor, factor), p=1.0)(image=image)["image"]
    theirs = np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(factor))
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    assert np.abs(ours.astype(int) - image).max() > 10  # it does change the image


@pytest.mark.parametrize(
    ("op", "pil"),
    [
        (A.ColorJitter(brightness=(1.7, 1.7), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1), "Brightness"),
        (A.ColorJitter(brightness=(1, 1), contrast=(0.3, 0.3), saturation=(1, 1), hue=(0, 0), p=1), "Contrast"),
        (A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(1.8, 1.8), hue=(0, 0), p=1), "Color"),
    ],
)
def test_enhance_ops_match_pil(image, op, pil):
    factor = {"Brightness": 1.7, "Contrast": 0.3, "Color": 1.8}[pil]
    theirs = np.asarray(getattr(ImageEnhance, pil)(Image.fromarray(image)).enhance(factor)).astype(int)
    assert np.abs(op(image=image)["image"].astype(int) - theirs).max() <= 2


def test_solarize_add_matches_timm_definition(image):
    out = SolarizeAdd(addition_range=(100, 100), p=1.0)(image=image)["image"]
    expected = np.where(image < 128, np.minimum(image.astype(int) + 100, 255), image)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        A.Solarize(threshold_range=(100 / 255, 100 / 255), p=1)(image=image)["image"],
        np.asarray(ImageOps.solarize(Image.fromarray(image), 100)),
    )


def test_worker_seeding_gives_workers_different_augmentations(tmp_path):
    from torch.utils.data import DataLoader

    from swin.data.transforms import seed_worker_transforms

    class Same(torch.utils.data.Dataset):
        transform = classification_transforms(16, train=True, randaugment=False, random_erasing=0.0)

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return self.transform(image=np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3))["image"]

    def batches(worker_init_fn):
        loader = DataLoader(Same(), batch_size=1, num_workers=2, worker_init_fn=worker_init_fn)
        return torch.cat(list(loader))

    unseeded = batches(None)  # forked workers repeat one another: items 0/1 and 2/3 come from workers 0/1
    assert torch.equal(unseeded[0], unseeded[1])
    seeded = batches(seed_worker_transforms)
    assert not torch.equal(seeded[0], seeded[1])
    torch.manual_seed(0)
    first = batches(seed_worker_transforms)
    torch.manual_seed(0)
    assert torch.equal(first, batches(seed_worker_transforms))  # reproducible under a global seed
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_real_data_knobs_reach_the_pipelines(image):
    """Flips, crop ratio, evaluation crop fraction and interpolation are set from the datamodule's YAML."""
    train = classification_transforms(48, train=True, hflip=0.0, vflip=0.5, crop_ratio=(0.9, 1.1), interpolation="area")
    assert _types(train)[:2] == ["RandomResizedCrop", "VerticalFlip"] and train.transforms[1].p == 0.5
    assert train.transforms[0].ratio == (0.9, 1.1) and train.transforms[0].interpolation == 3  # cv2.INTER_AREA
    whole = classification_transforms(32, train=False, crop_pct=1.0, interpolation="bilinear")
    assert whole.transforms[0].max_size == 32 and whole.transforms[0].interpolation == 1
    # crop_pct 1 keeps the whole square image: equal to resizing it to 32² directly
    square = image[:60, :60]
    expected = A.Compose([A.Resize(32, 32, interpolation=1), A.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image=square)
    torch.testing.assert_close(whole(image=square)["image"], torch.from_numpy(expected["image"]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        classification_transforms(32, train=False, interpolation="cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        classification_transforms(32, train=False, crop_pct=1.5)


def test_hflip_zero_never_mirrors():
    """hflip 0 (text, digits): an image whose left and right halves differ keeps its orientation."""
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = 255
    transform = classification_transforms(32, train=True, randaugment=False, color_jitter=0.0, random_erasing=0.0,
                                          crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0)  # fmt: skip
    outs = torch.stack([transform(image=half)["image"] for _ in range(20)])
    assert (outs[:, 0, :, :8].mean() > outs[:, 0, :, -8:].mean()) and (outs[:, :, :, :8] > outs[:, :, :, -8:]).all()
