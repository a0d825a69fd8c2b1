"""Whole training steps of each task against the peer a user would assemble by hand (``python -m swin.bench --task``).

One optimiser step (forward, the task's loss, backward, fused AdamW step) of this project's task as its recipe config
builds it, against the same task with its network swapped for the peer's: timm's Swin-T classifier; torchvision's
Mask R-CNN on torchvision's Swin-T features through ``BackboneWithFPN``; torchvision's Swin-T features under this
project's UperNet head. The loss is the task's own ``training_step`` on both sides, the inputs and targets are the
same generated tensors, the weights random. Both sides are timed in alternating runs (swin.bench.common); the
report gives seconds per step, ours ÷ peer in speed, peak memory above the steady state and the top operators.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from swin.bench.backbone import _autocast, _build_torchvision, architecture, peak_memory_mb
from swin.bench.coco_eval import ellipse_mask, random_boxes
from swin.bench.common import (
    cpu_name,
    load_average,
    machine,
    machine_line,
    memory_child,
    section,
    time_alternating,
    top_ops,
)
from swin.models import load_pretrained
from swin.tasks.base import BaseTask, param_groups

TASKS = ("classification", "detection", "segmentation")
CONFIGS = {
    "classification": "classification/swin_t_imagenet1k.yaml",
    "detection": "detection/mask_rcnn_swin_t_coco_1x.yaml",
    "segmentation": "segmentation/upernet_swin_t_ade20k_160k.yaml",
}
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
# real recipe sizes (batch, (height, width)) and the tiny ones of --quick
SIZES = {"classification": (8, (224, 224)), "detection": (1, (800, 1333)), "segmentation": (2, (512, 512))}
# (timm's Swin clamps its windows to smaller maps: at 224² both classifiers are the same function)
QUICK_SIZES = {"classification": (1, (224, 224)), "detection": (1, (128, 160)), "segmentation": (2, (64, 64))}
PEERS = {
    "classification": "timm swin_tiny_patch4_window7_224",
    "detection": "torchvision MaskRCNN + swin_t() features + BackboneWithFPN",
    "segmentation": "torchvision swin_t() features + UperNet",
}
SIDES = ("ours", "peer")
OBJECTS = 8  # generated objects per detection image
IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------------------


class TorchvisionStages(nn.Module):
    """torchvision's Swin ``features`` as a dense backbone: each stage's output through its own LayerNorm (as the
    official detection and segmentation backbones, and ours) and permuted to NCHW.

    ``forward_features`` gives the list of maps (the :class:`~swin.models.upernet.Segmentor` interface), ``forward``
    the ``{"0": ..., "3": ...}`` dict that torchvision's FPN takes.
    """

    def __init__(self, features: nn.Sequential, widths: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.out_channels = list(widths)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):  # patch embedding, stage 1, merging, stage 2, ...
            x = layer(x)
            if i % 2:
                outs.append(self.norms[i // 2](x).permute(0, 3, 1, 2).contiguous())
        return outs

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((str(i), f) for i, f in enumerate(self.forward_features(x)))


def torchvision_stages(drop_path_rate: float) -> TorchvisionStages:
    """torchvision's Swin-T (``swin_t()``'s architecture with the recipe's drop path; random weights) without its
    classifier, as :class:`TorchvisionStages`."""
    arch = {**architecture("swin_t"), "drop_path_rate": drop_path_rate}
    return TorchvisionStages(_build_torchvision(arch, 0).features, [arch["embed_dim"] * 2**i for i in range(4)])


def recipe(task: str) -> tuple[type[BaseTask], dict[str, Any]]:
    """The task class and its ``init_args`` from the task's Swin-T recipe config, without the pretrained weights."""
    model = yaml.safe_load((CONFIG_DIR / CONFIGS[task]).read_text())["model"]
    module, _, name = model["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name), {**model["init_args"], "pretrained": None}


def peer_model(task: str, hp: Any, size: tuple[int, int]) -> nn.Module:
    """The network a user would assemble from timm / torchvision for ``task``, with the recipe's widths."""
    drop_path_rate = (hp.backbone_kwargs or {}).get("drop_path_rate", 0.0)
    if task == "classification":
        import timm

        return timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, num_classes=hp.num_classes, img_size=size,
            drop_path_rate=drop_path_rate,
        )
    stages = torchvision_stages(drop_path_rate)
    if task == "segmentation":
        from swin.models.upernet import build_upernet

        return build_upernet(
            stages, hp.num_classes, hp.channels, hp.pool_scales, hp.dropout, hp.aux_weight > 0, hp.aux_channels,
            hp.aux_num_convs,
        )
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from swin.models.detector import IMAGENET_MEAN, IMAGENET_STD

    names = {str(2 * i + 1): str(i) for i in range(4)}  # the stages among torchvision's features
    neck = BackboneWithFPN(stages.features, names, stages.out_channels, hp.fpn_channels)
    neck.body = stages  # the stage outputs normed and in NCHW (IntermediateLayerGetter would return them NHWC)
    levels = len(hp.anchor_sizes)
    return MaskRCNN(
        neck, num_classes=None, min_size=hp.min_size, max_size=hp.max_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in hp.anchor_sizes), (tuple(hp.aspect_ratios),) * levels),
        box_head=TwoMLPHead(hp.fpn_channels * 7 * 7, hp.representation_size),
        box_predictor=FastRCNNPredictor(hp.representation_size, hp.num_classes + 1),
        mask_head=MaskRCNNHeads(hp.fpn_channels, (hp.mask_channels,) * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(hp.mask_channels, hp.mask_channels, hp.num_classes + 1),
        _skip_resize=True,  # as ours (train_resize=False): the training images arrive resized
        **(hp.detector_kwargs or {}),
    )  # fmt: skip


# the head modules both networks have with the same structure and names (their weights go from ours to the peer)
SHARED_HEADS = {"classification": (), "detection": ("backbone.fpn", "rpn", "roi_heads"),
                "segmentation": ("decode_head", "aux_head")}  # fmt: skip


def same_weights(task: str, ours: nn.Module, peer: nn.Module) -> None:
    """Make both networks one function, so that they do the same work (the same proposals, the same positives):
    the peer's Swin weights into ours (:func:`swin.models.load_pretrained` reads timm's and torchvision's layouts,
    strictly), our head weights into the peer's heads of the same structure."""
    if task == "classification":
        load_pretrained(ours, peer.state_dict(), strict=True)
    else:
        stages = peer.backbone.body if task == "detection" else peer.backbone
        state = {f"features.{k}": v for k, v in stages.features.state_dict().items()}
        state.update({f"norm{k}": v for k, v in stages.norms.state_dict().items()})  # "0.weight" -> "norm0.weight"
        load_pretrained(ours.backbone.body if task == "detection" else ours.backbone, state, strict=True)
    for name in SHARED_HEADS[task]:
        peer.get_submodule(name).load_state_dict(ours.get_submodule(name).state_dict())


@dataclass
class Side:
    """One side of a comparison: the task (its ``model`` ours or the peer's) and its optimiser."""

    task: BaseTask
    optimizer: torch.optim.Optimizer


def build_sides(
    task: str, size: tuple[int, int], device: torch.device, names: Sequence[str] = SIDES
) -> dict[str, Side]:
    """Our task as its recipe builds it, and the same task with the peer's network and the same weights
    (:func:`same_weights`); each with the tasks' fused AdamW at the recipe's learning rate, no weight decay on 1-D
    parameters and biases (nor on our backbone's position tables). ``names`` picks the sides returned."""
    cls, init_args = recipe(task)
    torch.manual_seed(0)
    modules = {"ours": cls(**init_args), "peer": cls(**init_args)}
    modules["peer"].model = peer_model(task, modules["peer"].hparams, size)
    same_weights(task, modules["ours"].model, modules["peer"].model)
    sides = {}
    for name in names:
        module = modules[name].to(device).train()
        hp = module.hparams
        backbone = module.backbone if name == "ours" else None  # its no_weight_decay() names
        optimizer = torch.optim.AdamW(
            param_groups(module, hp.weight_decay, backbone), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=True
        )
        sides[name] = Side(module, optimizer)
    return sides


# ---------------------------------------------------------------------------------------------------------------
# Inputs and steps
# ---------------------------------------------------------------------------------------------------------------


def make_batch(task: str, batch: int, size: tuple[int, int], num_classes: int, device: torch.device) -> dict:
    """A generated training batch in the task's format (fixed seed): classification images and labels; detection
    images in [0, 1] with ``OBJECTS`` boxes, ellipse masks and labels 1..K each; segmentation images and label
    maps of 16×16-pixel blocks with an ignored border."""
    generator = torch.Generator().manual_seed(0)
    height, width = size
    if task == "classification":
        images = torch.randn(batch, 3, height, width, generator=generator)
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        return {"image": images.to(device), "label": labels.to(device)}
    if task == "segmentation":
        blocks = torch.randint(0, num_classes, (batch, -(-height // 16), -(-width // 16)), generator=generator)
        mask = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :height, :width].clone()
        mask[:, :8], mask[:, -8:] = IGNORE_INDEX, IGNORE_INDEX
        return {"image": torch.randn(batch, 3, height, width, generator=generator).to(device), "mask": mask.to(device)}
    rng = np.random.default_rng(0)
    images, targets = [], []
    for _ in range(batch):
        boxes = random_boxes(rng, OBJECTS, width, height)
        masks = np.stack([ellipse_mask(b, height, width) for b in boxes])
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        targets.append({
            "boxes": torch.as_tensor(boxes, dtype=torch.float32, device=device),
            "labels": torch.as_tensor(rng.integers(1, num_classes + 1, OBJECTS), device=device),
            "masks": torch.as_tensor(masks, dtype=torch.uint8, device=device),
        })  # fmt: skip
    return {"image": images, "target": targets}


def make_step(side: Side, batch: dict, precision: str, device: torch.device) -> Callable[[], Tensor]:
    """One optimiser step: the task's ``training_step`` (forward and loss) under autocast, backward, AdamW step;
    returns the loss (detached, not synchronised)."""

    def step() -> Tensor:
        with _autocast(device, precision), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer here: Lightning skips the logging
            loss = side.task.training_step(batch, 0)
        loss.backward()
        side.optimizer.step()
        side.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def time_case(steps: dict[str, Callable[[], Tensor]], device: torch.device, repeats: int, min_time: float) -> dict:
    """Seconds per step of both sides in alternating runs: samples, medians, spread and ours ÷ peer in speed."""
    losses: dict[str, Tensor] = {}

    def keep_loss(name: str) -> Callable[[], None]:
        return lambda: losses.__setitem__(name, steps[name]())

    load_before = load_average()
    times = time_alternating({name: keep_loss(name) for name in steps}, device, repeats, min_time)
    ratios = [p / o for p, o in zip(times["peer"], times["ours"])]
    return {
        "load": [load_before, load_average()],
        "sides": {
            name: {"sec": t, "median": statistics.median(t), "min": min(t), "max": max(t), "loss": losses[name].item()}
            for name, t in times.items()
        },
        "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
    }


def watch_mask_rois(sides: dict[str, Side]) -> dict[str, list[int]]:
    """Per detection side, the RoIs its mask head pools in each step (the sampled positives): they set the mask
    head's work, and the two sides' proposals part once their weights do (drop path draws differ)."""
    counts: dict[str, list[int]] = {name: [] for name in sides}
    for name, side in sides.items():
        side.task.model.roi_heads.mask_roi_pool.register_forward_hook(
            lambda module, args, out, rois=counts[name]: rois.append(out.shape[0])
        )
    return counts


def memory_rows(task: str, batch: int, size: tuple[int, int], precisions: Sequence[str], device: torch.device) -> list:
    """Peak memory of one step above the steady state (weights, optimizer state), per side and precision."""
    rows = []
    for name in SIDES:
        side = build_sides(task, size, device, [name])[name]
        data = make_batch(task, batch, size, side.task.hparams.num_classes, device)
        for precision in precisions:
            mb = peak_memory_mb(make_step(side, data, precision, device), device)
            rows.append({"precision": precision, "side": name, "peak_mb": mb})
        del side
    return rows


def _memory_child() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.pop("threads"))
    spec["size"] = tuple(spec["size"])
    print(json.dumps(memory_rows(**spec, device=torch.device("cpu"))))


def memory_cpu(task: str, batch: int, size: tuple[int, int], precisions: Sequence[str]) -> list:
    """:func:`memory_rows` in a child process whose allocator returns every freed tensor buffer to the system, so
    that the resident size follows the live tensors (as :func:`swin.bench.backbone.memory_cpu`)."""
    spec = dict(task=task, batch=batch, size=size, precisions=list(precisions), threads=torch.get_num_threads())
    return memory_child("swin.bench.task", spec)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The report's tables in Markdown: time per step, peak memory, top operators."""
    height, width = report["size"]
    lines = [
        f"`{report['command']}` — {report['task']}, batch {report['batch']}, {height}×{width}, "
        f"{report['device_name']}, {report['threads']} threads, torch {report['torch']}, {report['repeats']} repeats",
        "",
        f"Machine: {machine_line(report['machine'])}",
        "",
        f"Ours: {report['ours']}. Peer: {report['peer']}. Parameters: ours {report['params']['ours'] / 1e6:.2f}M, "
        f"peer {report['params']['peer'] / 1e6:.2f}M.",
        "",
        "| precision | ours s/step (min-max) | peer s/step (min-max) | ours ÷ peer in speed (range) "
        "| loss ours / peer | load (1 min) |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        o, p = c["sides"]["ours"], c["sides"]["peer"]
        load = "–".join(f"{v:.1f}" for v in c["load"] if v is not None)
        lines.append(
            f"| {c['precision']} | {o['median']:.3f} ({o['min']:.3f}-{o['max']:.3f}) "
            f"| {p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f}) "
            f"| ×{c['speedup']:.2f} (×{c['speedup_range'][0]:.2f}-{c['speedup_range'][1]:.2f}) "
            f"| {o['loss']:.3f} / {p['loss']:.3f} | {load} |"
        )
    for c in report["cases"]:
        if "mask_rois" in c:
            lines.append(f"\nMask-head RoIs (sampled positives) per step, {c['precision']}: ours "
                         f"{c['mask_rois']['ours']:.0f}, peer {c['mask_rois']['peer']:.0f}.")
    if report["memory"]:
        lines += ["", "| peak memory above the steady state (weights, optimizer) | ours MB | peer MB |"]
        lines.append("|---|---|---|")
        for precision in report["precisions"]:
            mb = {r["side"]: r["peak_mb"] for r in report["memory"] if r["precision"] == precision}
            cells = " | ".join("n/a" if mb.get(s) is None else f"{mb[s]:.0f}" for s in SIDES)
            lines.append(f"| {precision} | {cells} |")
    for name, rows in report["profile"].items():
        lines += ["", f"| {name}: top ops ({report['profile_case']}) | ms / step | share | calls |"]
        lines.append("|---|---|---|---|")
        lines += [f"| `{r['op']}` | {r['ms_per_step']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |" for r in rows]
    lines += [f"\n**{e}**" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def _size(value: str) -> tuple[int, int]:
    """``512`` or ``800x1333`` → (height, width)."""
    height, _, width = value.lower().partition("x")
    return int(height), int(width or height)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m swin.bench --task", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 / 1 / 2 (quick: 1 / 1 / 2)")
    parser.add_argument(
        "--image-size", type=_size, default=None,
        help="H or HxW; default 224 / 800x1333 / 512 (quick: 224 / 128x160 / 64)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precisions", default=None, help="fp32,bf16 (CUDA default: bf16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.0, help="seconds per timed sample (default: one step)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--no-profile", action="store_true", help="skip the top operators")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-task"), help="folder for bench.json and bench.md")
    parser.add_argument("--quick", action="store_true", help="tiny images, 2 repeats")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    args.precisions = args.precisions.split(",") if args.precisions else (["bf16"] if cuda else ["fp32", "bf16"])
    batch, size = (QUICK_SIZES if args.quick else SIZES)[args.task]
    args.batch_size = args.batch_size or batch
    args.image_size = args.image_size or size
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, task, size = torch.device(args.device), args.task, args.image_size
    report = {
        "task": task, "batch": args.batch_size, "size": list(size), "device": args.device,
        "precisions": args.precisions,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
        "command": "python -m swin.bench --task " + " ".join(sys.argv[2:] if argv is None else argv),
        "ours": f"{recipe(task)[0].__name__} of configs/{CONFIGS[task]}", "peer": PEERS[task],
        "cases": [], "memory": [], "profile": {}, "errors": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))

    sides = build_sides(task, size, device)
    report["params"] = {name: sum(p.numel() for p in side.task.parameters()) for name, side in sides.items()}
    data = make_batch(task, args.batch_size, size, sides["ours"].task.hparams.num_classes, device)
    steps = {}
    mask_rois = watch_mask_rois(sides) if task == "detection" else {}

    def case(precision: str) -> None:
        steps[precision] = {name: make_step(side, data, precision, device) for name, side in sides.items()}
        for rois in mask_rois.values():
            rois.clear()
        result = {"precision": precision, **time_case(steps[precision], device, args.repeats, args.min_time)}
        if mask_rois:
            result["mask_rois"] = {name: statistics.mean(rois) for name, rois in mask_rois.items()}
        report["cases"].append(result)
        medians = ", ".join(f"{k} {v['median']:.3f} s" for k, v in result["sides"].items())
        print(f"{task} {precision}: {medians} | ours ×{result['speedup']:.2f} | load {result['load']}", flush=True)

    def profile() -> None:
        precision = args.precisions[0]  # its steps are warm
        report["profile_case"] = f"train {precision}"
        report["profile"] = {name: top_ops(step, device) for name, step in steps[precision].items()}

    def memory() -> None:
        spec = (task, args.batch_size, size, args.precisions)
        report["memory"] = memory_rows(*spec, device) if device.type == "cuda" else memory_cpu(*spec)

    for precision in args.precisions:
        section(report, f"{task} {precision}", functools.partial(case, precision), save)
    if not args.no_profile and args.precisions[0] in steps:
        section(report, "profile", profile, save)
    if not args.no_memory:
        del sides, steps
        section(report, "memory", memory, save)
    (args.out / "bench.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote bench.json and bench.md to {args.out}")
    return report
