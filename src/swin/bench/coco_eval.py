"""COCO evaluation at COCO scale (``python -m swin.bench --coco-eval``): the detection task's metric against
pycocotools' and faster-coco-eval's ``COCOeval`` called directly on the same detections.

Each image of a generated val set (COCO's image sizes, 80 categories, a few objects of every size, 100 detections
with masks: near copies of the objects and random boxes) reaches each evaluator as a detector hands it over: dense
(N, H, W) masks. What is timed is what each one does from there:

- **ours**: :func:`swin.tasks.detection.coco_map`, the task's ``MeanAveragePrecision``: ``update`` per image
  (which RLE-encodes the masks as they arrive), then ``compute``;
- **pycocotools** / **faster_coco_eval**: the masks RLE-encoded per image (``mask.encode``), results and ground
  truth gathered as COCO dicts, then ``COCO``, ``loadRes``, ``COCOeval`` ``evaluate`` / ``accumulate`` /
  ``summarize`` for ``bbox`` and ``segm`` (the segm results without their boxes, so that small, medium and large
  go by the mask area, as in detectron2 and in the metric).

Generating the images is not timed. Every evaluator runs in a process of its own, whose peak resident memory
(``ru_maxrss``) is reported with the same process's before it fed the first image; the 12 COCO numbers of each
IoU type are compared across evaluators.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swin.bench.common import machine, machine_line, name_list

EVALUATORS = ("ours", "faster_coco_eval", "pycocotools")
IOU_TYPES = ("bbox", "segm")
# COCOeval.stats in order, under torchmetrics' names
STATS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # fmt: skip
SIZES = ((640, 480), (640, 427), (480, 640), (640, 426), (500, 375), (640, 360), (427, 640), (640, 640))


def ellipse_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """The filled ellipse inscribed in an xyxy box, as an (H, W) bool mask."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    top, left = int(y0), int(x0)  # only the box's pixels are computed
    ys, xs = np.ogrid[top : min(int(np.ceil(y1)), height), left : min(int(np.ceil(x1)), width)]
    mask = np.zeros((height, width), bool)
    inside = ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1
    mask[top : top + ys.shape[0], left : left + xs.shape[1]] = inside
    return mask


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``n`` xyxy boxes inside the image, sides log-uniform from 6 px to the image side (small, medium, large)."""
    w = np.exp(rng.uniform(np.log(6), np.log(width), n))
    h = np.clip(w * np.exp(rng.uniform(-0.7, 0.7, n)), 6, height)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], 1).round(1)


def _size_and_objects(rng: np.random.Generator, objects: int) -> tuple[int, int, int]:
    width, height = SIZES[rng.integers(len(SIZES))]
    return width, height, int(rng.integers(1, 2 * objects))


def object_count(images: int, seed: int, objects: int) -> int:
    """The ground-truth objects of the generated val set (without generating it)."""
    return sum(_size_and_objects(np.random.default_rng((seed, i)), objects)[2] for i in range(images))


def scene(index: int, seed: int, detections: int, objects: int) -> dict[str, Any]:
    """Image ``index`` of the generated val set: its size, ground truth and detections, masks dense."""
    rng = np.random.default_rng((seed, index))
    width, height, n_gt = _size_and_objects(rng, objects)
    gt_boxes = random_boxes(rng, n_gt, width, height)
    gt_labels = rng.integers(1, 81, n_gt)
    near = min(detections, 3 * n_gt)  # near copies of the objects (some with the wrong class), the rest random
    source = rng.integers(0, n_gt, near)
    sides = np.stack([gt_boxes[source, 2] - gt_boxes[source, 0], gt_boxes[source, 3] - gt_boxes[source, 1]], 1)
    jitter = rng.normal(0, 0.12, (near, 4)) * np.tile(sides, 2)
    dt_boxes = np.concatenate([gt_boxes[source] + jitter, random_boxes(rng, detections - near, width, height)])
    dt_boxes = np.clip(dt_boxes, 0, [width, height, width, height]).round(1)
    dt_boxes[:, 2:] = np.maximum(dt_boxes[:, 2:], dt_boxes[:, :2] + 1)
    dt_labels = np.concatenate([np.where(rng.random(near) < 0.8, gt_labels[source], rng.integers(1, 81, near)),
                                rng.integers(1, 81, detections - near)])  # fmt: skip
    gt_masks = np.stack([ellipse_mask(b, height, width) for b in gt_boxes])
    return {
        "height": height, "width": width,
        "gt_boxes": gt_boxes.astype(np.float32), "gt_labels": gt_labels, "gt_masks": gt_masks,
        "gt_area": gt_masks.sum((1, 2)).astype(np.float32),
        "dt_boxes": dt_boxes.astype(np.float32), "dt_labels": dt_labels,
        "dt_scores": rng.random(detections).astype(np.float32),
        "dt_masks": np.stack([ellipse_mask(b, height, width) for b in dt_boxes]),
    }  # fmt: skip


def scenes(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for i in range(args.images):
        yield scene(i, args.seed, args.detections, args.objects)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def run_ours(args: argparse.Namespace) -> tuple[float, dict[str, list[float]]]:
    import torch

    from swin.tasks.detection import coco_map

    metric = coco_map(masks=True)
    seconds = 0.0
    for s in scenes(args):
        preds = [{"boxes": torch.from_numpy(s["dt_boxes"]), "scores": torch.from_numpy(s["dt_scores"]),
                  "labels": torch.from_numpy(s["dt_labels"]), "masks": torch.from_numpy(s["dt_masks"])}]
        targets = [{"boxes": torch.from_numpy(s["gt_boxes"]), "labels": torch.from_numpy(s["gt_labels"]),
                    "masks": torch.from_numpy(s["gt_masks"]), "area": torch.from_numpy(s["gt_area"]),
                    "iscrowd": torch.zeros(len(s["gt_labels"]), dtype=torch.int64)}]  # fmt: skip
        start = time.perf_counter()
        metric.update(preds, targets)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    result = metric.compute()
    seconds += time.perf_counter() - start
    return seconds, {t: [float(result[f"{t}_{k}"]) for k in STATS] for t in IOU_TYPES}


def backend(name: str) -> tuple[Any, Any, Any]:
    """``COCO``, ``COCOeval`` and the mask module of pycocotools or faster-coco-eval."""
    if name == "pycocotools":
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, mask
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval.core import mask

    return COCO, COCOeval_faster, mask


def run_direct(name: str, args: argparse.Namespace) -> tuple[float, dict[str, list[float]]]:
    coco, coco_eval, mask = backend(name)
    images, annotations, results = [], [], []
    seconds = 0.0
    for image_id, s in enumerate(scenes(args)):
        start = time.perf_counter()
        gt_rles, dt_rles = (mask.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
                            for m in (s["gt_masks"], s["dt_masks"]))  # (N, H, W) -> (H, W, N), one call each
        images.append({"id": image_id, "height": s["height"], "width": s["width"]})
        gts = zip(s["gt_boxes"].tolist(), s["gt_labels"].tolist(), s["gt_area"].tolist(), gt_rles)
        for (x0, y0, x1, y1), label, area, rle in gts:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "segmentation": rle})  # fmt: skip
        dts = zip(s["dt_boxes"].tolist(), s["dt_labels"].tolist(), s["dt_scores"].tolist(), dt_rles)
        for (x0, y0, x1, y1), label, score, rle in dts:
            results.append({"image_id": image_id, "category_id": label, "score": score,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle})  # fmt: skip
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    ground_truth = coco()
    ground_truth.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": i, "name": str(i)} for i in range(1, 81)]}  # fmt: skip
    ground_truth.createIndex()
    stats = {}
    for iou_type in IOU_TYPES:
        # one result field per IoU type: with a box, loadRes takes the box area for segm too (detectron2 drops it)
        other = "segmentation" if iou_type == "bbox" else "bbox"
        detections = ground_truth.loadRes([{k: v for k, v in r.items() if k != other} for r in results])
        evaluator = coco_eval(ground_truth, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats[iou_type] = [float(v) for v in evaluator.stats[: len(STATS)]]
    seconds += time.perf_counter() - start
    return seconds, stats


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One evaluator, in this process: its seconds, peak memory and COCO numbers."""
    import torch  # noqa: F401 - in every evaluator's baseline, as in the task's process

    baseline = peak_rss_gib()
    seconds, stats = run_ours(args) if name == "ours" else run_direct(name, args)
    return {"evaluator": name, "seconds": seconds, "peak_rss_gib": peak_rss_gib(), "baseline_rss_gib": baseline,
            "stats": stats}  # fmt: skip


def same_numbers(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """The 24 COCO numbers agree as float32 (torchmetrics hands them over as float32 tensors)."""
    return all(np.array_equal(np.float32(a[t]), np.float32(b[t])) for t in IOU_TYPES)


def markdown(report: dict[str, Any]) -> str:
    rows = {r["evaluator"]: r for r in report["rows"]}
    ours = rows.get("ours")
    lines = [
        f"COCO evaluation of {report['images']} images × {report['detections']} detections with masks "
        f"(bbox + segm), {report['gt_objects']} ground-truth objects; {machine_line(report['machine'])}",
        "",
        "| evaluator | seconds | ours / it | peak RSS GiB (before feeding) | bbox AP | segm AP "
        "| same 24 numbers as ours |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        ratio = f"{ours['seconds'] / r['seconds']:.2f}" if ours else "-"
        same = "-" if name == "ours" or not ours else ("yes" if same_numbers(r["stats"], ours["stats"]) else "no")
        lines.append(f"| {name} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_gib']:.2f} ({r['baseline_rss_gib']:.2f}) "
                     f"| {r['stats']['bbox'][0]:.4f} | {r['stats']['segm'][0]:.4f} | {same} |")  # fmt: skip
    lines += ["", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench --coco-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="val images (COCO val 2017: 5000)")
    parser.add_argument("--detections", type=int, default=100, help="detections per image (COCO's maxDets: 100)")
    parser.add_argument("--objects", type=int, default=7, help="mean ground-truth objects per image (COCO: 7.3)")
    parser.add_argument("--evaluators", type=name_list(EVALUATORS), default=list(EVALUATORS), help=",".join(EVALUATORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-coco-eval"), help="for coco_eval.json and .md")
    parser.add_argument("--worker", choices=EVALUATORS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return {}
    gt_objects = object_count(args.images, args.seed, args.objects)
    report: dict[str, Any] = {
        "images": args.images, "detections": args.detections, "gt_objects": gt_objects, "machine": machine(),
        "command": "python -m swin.bench --coco-eval " + " ".join(argv), "rows": [], "errors": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.evaluators:
        proc = subprocess.run([sys.executable, "-m", "swin.bench", "--coco-eval", *argv, "--worker", name],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            report["errors"].append(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            print(report["errors"][-1], file=sys.stderr)
            continue
        report["rows"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    (args.out / "coco_eval.json").write_text(json.dumps(report, indent=1))
    (args.out / "coco_eval.md").write_text(markdown(report))
    print(markdown(report))
    return report
