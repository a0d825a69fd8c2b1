"""The input-pipeline benchmark times both sides of each pipeline on the same generated files, and the fast paths it
led to (OpenCV's JPEG decode, shared augmentation generators, mask stacks resized and flipped in one array) give
what the slower paths gave."""

import io
import json

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from swin.bench import data as bench
from swin.bench import main as bench_main
from swin.data import shapes
from swin.data.coco import ShorterSideResize
from swin.data.imagenet import ImageNetDataModule
from swin.data.io import decode_jpeg, jpeg_components, read_image
from swin.data.samplers import derived_seed
from swin.data.transforms import HorizontalFlip, Pipeline, VerticalFlip, flip_masks

REPO_CONFIGS = bench.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-data")
    return bench_main(["--data", "--quick", "--out", str(out), "--data-dir", str(out / "data")]), out


def test_the_report_holds_both_sides_of_every_pipeline(report):
    report, out = report
    assert not report["errors"]
    rows = {r["pipeline"]: r for r in report["rows"]}
    assert list(rows) == list(bench.PIPELINES)
    for name, r in rows.items():
        assert r["peer"] == bench.PEERS[name] and r["ours_images_per_s"] > 0 and r["peer_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_images_per_s"] / r["peer_images_per_s"])
        assert r["ours_spread"][0] <= r["ours_images_per_s"] <= r["ours_spread"][1]
        assert (r["goal"] is None) == (name == "evaluation")
        assert r["met"] == (None if r["goal"] is None else r["ratio"] >= r["goal"])
        assert len(r["samples"]["ours"]) == len(r["samples"]["peer"]) == 2
    for name, side in [(n, s) for n in ("classification", "evaluation") for s in ("ours", "timm")]:
        assert rows[name]["outputs"][side] == {"shape": [3, 224, 224], "dtype": "float32"}, (name, side)
    for side in ("ours", "torchvision"):
        assert rows["segmentation"]["outputs"][side] == {"shape": [3, 512, 512], "dtype": "float32"}
        height, width = rows["detection"]["outputs"][side]["shape"][1:]
        assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
    table = (out / "bench.md").read_text()
    assert bench.machine_line(report["machine"]) in table and "| detection |" in table and "| ≥ ×1.2 |" in table
    assert json.loads((out / "bench.json").read_text())["rows"][0]["pipeline"] == "classification"


def test_both_detection_sides_resize_boxes_and_masks_with_the_image(report):
    folders = bench.write_data(report[1] / "data", 8, 0)  # written by the run already
    ours, count = bench.ours("detection", folders)
    peer = bench.peer("detection", folders)
    assert count == 8
    for index in range(3):
        mine = ours(index)
        theirs_image, theirs = peer(index)
        for image, target in ((mine["image"], mine["target"]), (theirs_image, theirs)):
            height, width = image.shape[1:]
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
            assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
            boxes, masks = target["boxes"], target["masks"]
            assert len(boxes) == len(masks) == len(target["labels"]) > 0 and masks.shape[1:] == (height, width)
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all() and masks.flatten(1).any(1).all()


def jpeg_bytes(image: np.ndarray | Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def test_opencv_decodes_jpegs_as_pil_does_and_leaves_the_rest_to_pil(tmp_path):
    rng = np.random.default_rng(0)
    colour = bench.natural_image(rng, bench.photographs()[:2], 120, 90)
    for name, image in (("colour", Image.fromarray(colour)), ("grey", Image.fromarray(colour[..., 1]))):
        data = jpeg_bytes(image)
        fast = decode_jpeg(data)
        with Image.open(io.BytesIO(data)) as pil:
            expected = np.asarray(pil.convert("RGB"))
        assert fast is not None and fast.shape == (90, 120, 3) and fast.dtype == np.uint8, name
        assert np.abs(fast.astype(int) - expected).max() <= 2, name  # both libjpeg-turbo
        (tmp_path / f"{name}.jpg").write_bytes(data)
        assert np.array_equal(read_image(tmp_path / f"{name}.jpg"), fast)
    assert jpeg_components(jpeg_bytes(colour)) == 3 and jpeg_components(b"\x89PNG\r\n") is None
    # EXIF orientation 6 (rotate): PIL does not apply it, so neither does the fast path
    exif = Image.Exif()
    exif[0x0112] = 6
    assert decode_jpeg(jpeg_bytes(colour, exif=exif.tobytes())).shape == (90, 120, 3)
    # CMYK: PIL's conversion; truncated: PIL's error, naming the file
    cmyk = jpeg_bytes(Image.fromarray(colour).convert("CMYK"))
    assert jpeg_components(cmyk) == 4 and decode_jpeg(cmyk) is None
    (tmp_path / "cmyk.jpg").write_bytes(cmyk)
    with Image.open(tmp_path / "cmyk.jpg") as pil:
        assert np.array_equal(read_image(tmp_path / "cmyk.jpg"), np.asarray(pil.convert("RGB")))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes(colour)[:-300])
    assert decode_jpeg(truncated.read_bytes()) is None
    with pytest.raises(RuntimeError, match=f"cannot read image {truncated}"):
        read_image(truncated)


def test_reseeded_pipeline_draws_independent_decisions_reproducibly():
    """``A.Compose`` seeds every transform alike, so after each reseed two flips of p 0.5 always agree."""
    image = np.zeros((2, 2, 1), np.uint8)
    image[0, 0] = 1  # where the 1 lands tells which flips ran
    pipeline = Pipeline([HorizontalFlip(p=0.5), VerticalFlip(p=0.5)], seed=0)

    def flips(index: int) -> tuple[int, int]:
        pipeline.set_random_seed(derived_seed(0, 1, 0, index))
        y, x = np.argwhere(pipeline(image=image)["image"][..., 0])[0]
        return int(y), int(x)

    draws = [flips(i) for i in range(400)]
    assert all(60 < draws.count(pair) < 140 for pair in ((0, 0), (0, 1), (1, 0), (1, 1)))  # 100 each if independent
    assert [flips(i) for i in range(20)] == draws[:20]


def test_mask_stacks_are_resized_and_flipped_as_mask_by_mask():
    rng = np.random.default_rng(1)
    masks = (rng.random((5, 37, 53)) < 0.3).astype(np.uint8)
    resize = ShorterSideResize([61], 1000)
    expected = np.stack([resize.apply_to_mask(m, scale=61 / 37) for m in masks])
    assert np.array_equal(resize.apply_to_masks(masks, scale=61 / 37), expected) and expected.shape == (5, 61, 87)
    assert np.array_equal(flip_masks(masks, 1), masks[:, :, ::-1])
    assert np.array_equal(VerticalFlip(p=1).apply_to_masks(masks), masks[:, ::-1])
    assert np.array_equal(HorizontalFlip(p=1).apply_to_masks(masks), A.HorizontalFlip(p=1).apply_to_masks(masks))


def test_dataloader_settings_go_from_the_yaml_to_the_loader(tmp_path):
    from jsonargparse import ArgumentParser

    shapes.write_imagefolder(tmp_path, num_train=2, num_val=1, image_size=32)
    config = yaml.safe_load((REPO_CONFIGS / "classification" / "swin_t_imagenet1k.yaml").read_text())["data"]
    assert config["init_args"]["persistent_workers"] is True and config["init_args"]["prefetch_factor"] == 2
    parser = ArgumentParser()
    parser.add_class_arguments(ImageNetDataModule, "data")
    init = {**config["init_args"], "root": str(tmp_path), "image_size": 32, "batch_size": 2, "num_workers": 1,
            "prefetch_factor": 3, "pin_memory": False}  # fmt: skip
    data = parser.instantiate(parser.parse_object({"data": init})).data
    data.setup("fit")
    loader = data.train_dataloader()
    assert (loader.prefetch_factor, loader.persistent_workers, loader.pin_memory) == (3, True, False)
    serial = ImageNetDataModule(str(tmp_path), image_size=32, batch_size=2, num_workers=0, pin_memory=True)
    serial.setup("fit")
    loader = serial.val_dataloader()
    assert (loader.prefetch_factor, loader.persistent_workers, loader.pin_memory) == (None, False, True)
    with pytest.raises(ValueError, match="prefetch_factor must be at least 1"):
        ImageNetDataModule(str(tmp_path), prefetch_factor=0)


def test_an_unknown_pipeline_or_evaluator_is_named(capsys):
    from swin.bench import coco_eval

    for parse, argv in ((bench.parse_args, ["--pipelines", "classification,segmentatoin"]),
                        (coco_eval.parse_args, ["--evaluators", "ours,cocoeval"])):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(argv)
        err = capsys.readouterr().err
        assert ("'segmentatoin'" in err or "'cocoeval'" in err) and "choose from" in err
    assert bench.parse_args(["--pipelines", "detection,"]).pipelines == ["detection"]
