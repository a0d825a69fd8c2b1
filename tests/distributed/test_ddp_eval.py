"""Distributed evaluation equals a single-device evaluation of the same checkpoint on an uneven split.

5 evaluation images on 2 gloo ranks (3 and 2): ``validate`` and ``test`` under DDP through ``cli.py`` must log the
numbers ``devices=1`` logs, for every metric of the three tasks (accuracy and loss, COCO box and mask mAP, mIoU and
pixel accuracy). A sampler that pads the split repeats an image, which moves all of them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from swin.cli import main

pytestmark = pytest.mark.slow  # 2-process runs: make test, not make test-fast

DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]
EVAL_IMAGES = 5
ODD_SPLIT = {
    # one image per class and 5 classes; a constant prediction scores exactly 1/5, a padded split 1/6 or 2/6
    "classification": [f'--data.synthetic_kwargs={{"num_train": 4, "num_val": {EVAL_IMAGES // 5}, "image_size": 32}}'],
    "detection": [
        f'--data.synthetic_kwargs={{"num_train": 4, "num_val": {EVAL_IMAGES}, "image_size": 64}}',
        # small anchors and every box: some of the untrained detector's masks then hit objects (mask mAP > 0)
        "--model.anchor_sizes=[8, 16, 32, 64, 128]",
        '--model.detector_kwargs={"box_score_thresh": 0.0, "box_detections_per_img": 100}',
    ],
    "segmentation": [f'--data.synthetic_kwargs={{"num_train": 4, "num_val": {EVAL_IMAGES}, "image_size": 64}}'],
}


def metrics(run: Path) -> dict[str, float]:
    """Every value of a run's CSVLogger file (one evaluation: each column once)."""
    out: dict[str, float] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v != "" and k not in ("epoch", "step")})
    return out


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_ddp_validate_and_test_equal_one_device_on_an_odd_split(task, tmp_path, dist, monkeypatch):
    runs = tmp_path / "runs"
    args = [
        *dist.tiny_args(task, tmp_path),
        *ODD_SPLIT[task],
        "--trainer.limit_val_batches=1.0",
        "--trainer.limit_test_batches=1.0",
        f"--trainer.default_root_dir={runs}",
    ]
    monkeypatch.setenv("SWIN_RUN_VERSION", "")  # the in-process CLI records its run folder there
    main(["fit", *args, "--trainer.devices=1"])  # version_0
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2

    for command in ("validate", "test"):  # DDP: version_1 and version_2
        out = dist.run_cli(command, *args, *DDP, f"--ckpt_path={ckpt}")
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-3000:]
    for command in ("validate", "test"):  # one device: version_3 and version_4
        main([command, *args, "--trainer.devices=1", f"--ckpt_path={ckpt}"])

    for command, ddp_run, single_run in (("validate", 1, 3), ("test", 2, 4)):
        ddp, single = metrics(runs / f"version_{ddp_run}"), metrics(runs / f"version_{single_run}")
        stage = "val" if command == "validate" else "test"
        assert single and all(k.startswith(f"{stage}/") for k in single), single
        assert ddp.keys() == single.keys()
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{command} {key}: DDP {ddp[key]} != {value}"
        # the untrained detector's boxes hit no object at IoU 0.5 (box mAP 0), some of its masks do
        headline = {"classification": "acc1", "detection": "segm_map", "segmentation": "miou"}[task]
        assert 0 < single[f"{stage}/{headline}"] < 1, f"degenerate {headline} {single}: the comparison shows nothing"
    print(task, json.dumps(single))
