"""The COCO-scale evaluation benchmark feeds every evaluator the same generated val set, and the detection task's
metric gives the 24 COCO numbers of ``COCOeval`` called directly."""

import json

import numpy as np

from swin.bench import coco_eval as bench
from swin.bench import main as bench_main


def test_generated_images_are_reproducible_and_their_masks_lie_in_their_boxes():
    a, b = bench.scene(3, 0, 20, 4), bench.scene(3, 0, 20, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["dt_boxes"], bench.scene(4, 0, 20, 4)["dt_boxes"])
    assert a["dt_masks"].shape == (20, a["height"], a["width"]) and a["dt_masks"].dtype == bool
    for box, mask in zip(a["gt_boxes"], a["gt_masks"]):
        ys, xs = np.nonzero(mask)
        assert mask.any() and xs.min() >= np.floor(box[0]) and xs.max() < np.ceil(box[2])
        assert ys.min() >= np.floor(box[1]) and ys.max() < np.ceil(box[3])
    assert np.array_equal(a["gt_area"], a["gt_masks"].sum((1, 2)))
    assert bench.object_count(6, 0, 4) == sum(len(bench.scene(i, 0, 1, 4)["gt_labels"]) for i in range(6))


def test_the_metric_gives_cocoevals_numbers(tmp_path):
    report = bench_main(["--coco-eval", "--images", "6", "--detections", "30", "--objects", "4",
                         "--evaluators", "ours,pycocotools", "--out", str(tmp_path)])  # fmt: skip
    assert not report["errors"]
    rows = {r["evaluator"]: r for r in report["rows"]}
    assert set(rows) == {"ours", "pycocotools"}
    assert bench.same_numbers(rows["ours"]["stats"], rows["pycocotools"]["stats"])
    assert 0 < rows["ours"]["stats"]["segm"][0] < 1 and rows["ours"]["stats"]["bbox"][1] > 0.1
    assert rows["ours"]["peak_rss_gib"] >= rows["ours"]["baseline_rss_gib"] > 0
    table = (tmp_path / "coco_eval.md").read_text()
    assert "| pycocotools |" in table and "| yes |" in table
    assert json.loads((tmp_path / "coco_eval.json").read_text())["gt_objects"] == bench.object_count(6, 0, 4)
