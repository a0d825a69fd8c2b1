"""Export a trained task's network: ONNX, a ``torch.export`` program (``.pt2``) and the input contract (JSON).

    python -m swin.export --config CONFIG.yaml --ckpt CHECKPOINT.ckpt --out DIR [--format onnx pt2] [--size H W]

The network is built from the config's ``model`` section by the task class it names (LightningCLI's parser; the
class count and names come from the checkpoint), then the checkpoint's ``state_dict`` is loaded strictly (read with
``torch.load(weights_only=True)``). Written to DIR: ``model.onnx`` and / or ``model.pt2`` and always
``contract.json`` (mean / std, input size and layout, class names); ``--format safetensors`` / ``timm`` write the
backbone as ``backbone.safetensors`` (official layout) / ``timm.safetensors`` (timm's, for
``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` or ``load_state_dict``) / ``torchvision.safetensors``
(``torchvision.models.swin_t(num_classes=...).load_state_dict(load_file(...))``, V2: ``swin_v2_t`` and kin). Classification exports ``eval_model()`` (the EMA
weights when on) with logits as output, dynamic batch, height and width those of ``--size`` (default: the config's
``data.init_args.image_size``, else 224); segmentation the UperNet segmentor (logits at the input's size, no
auxiliary head) with a dynamic batch, height and width: one graph for any size from :func:`min_size` on (33 for four
stages; ``--size`` is the example), and ``contract.json`` says so (``dynamic``, ``min_size``). ``export_onnx`` /
``export_pt2`` with ``dynamic_hw=True`` export any such module (the dense backbone too). While exporting, the Swin
blocks compute their cyclic shift, padding and window partition as tensor arithmetic
(:func:`swin.models.swin.window_tensors`) and the pyramid pooling its bins as matrices
(:class:`swin.models.upernet.AdaptivePool`), with the eager numbers and no branch on a size. Detection (the
``mask_rcnn`` framework: torchvision's Mask R-CNN or Faster R-CNN) exports as ONNX only, the way torchvision's
detectors support it: through torch's TorchScript-based exporter, one image (3, H, W) in [0, 1] of ``--size`` →
``boxes``, ``labels``, ``scores``, ``masks``; ``contract.json`` maps the labels to the dataset's category ids. The
cascade and single-stage detectors are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from swin.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from swin.models import CheckpointError, SwinTransformer
from swin.models.swin import WindowAttention
from swin.tasks.base import BaseTask

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = [
    "FORMATS", "build_task", "load_task", "export_module", "min_size", "export_onnx", "explicit_attention",
    "drop_constant_wheres", "export_pt2", "to_timm", "torchvision_model", "to_torchvision", "save_backbone",
    "contract", "main",
]  # fmt: skip

FORMATS = ("onnx", "pt2", "safetensors", "timm", "torchvision")
LAYOUTS = {"safetensors": "backbone.safetensors", "timm": "timm.safetensors", "torchvision": "torchvision.safetensors"}


def build_task(model: dict[str, Any], **init_args: Any) -> BaseTask:
    """The task of a config's ``model`` section (``class_path`` / ``init_args``), parsed as LightningCLI parses it;
    ``init_args`` override the section's (e.g. what the CLI links from the datamodule)."""
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(BaseTask, "model", required=True)
    section = {**model, "init_args": {**(model.get("init_args") or {}), **init_args}}
    return parser.instantiate(parser.parse_object({"model": section})).model


def load_task(config: str | os.PathLike, ckpt: str | os.PathLike) -> tuple[BaseTask, dict[str, Any]]:
    """The task the config's ``model`` section names, with the checkpoint's weights, in eval mode; and the config."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{config} has no 'model' section")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle, zip and safe-globals errors all mean "not a checkpoint we load"
        raise CheckpointError(f"{ckpt} is not a checkpoint that loads with weights_only=True: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        found = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{ckpt} is not a Lightning checkpoint of this project (no 'state_dict'; found {found})")
    hparams = state.get("hyper_parameters") or {}
    linked = {k: hparams[k] for k in ("num_classes", "class_names") if hparams.get(k) is not None}
    task = build_task(cfg["model"], pretrained=None, **linked)  # the checkpoint holds every weight
    task.on_load_checkpoint(state)
    try:
        result = task.load_state_dict(state["state_dict"], strict=False)
    except RuntimeError as err:  # torch names every key whose shape differs
        raise CheckpointError(f"{ckpt} does not fit {type(task).__name__} of {config}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt} is not a {type(task).__name__} checkpoint for {config}: "
            f"{len(result.missing_keys)} missing keys (first {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (first {result.unexpected_keys[:3]})"
        )
    return task.eval(), cfg


def export_module(task: BaseTask) -> nn.Module:
    """The network to deploy: image batch (B, 3, H, W) → logits; for detection torchvision's Mask R-CNN (or Faster
    R-CNN): one image (3, H, W) in [0, 1] → boxes, labels, scores (and masks)."""
    from swin.tasks.classification import ClassificationTask
    from swin.tasks.detection import DetectionTask
    from swin.tasks.segmentation import SegmentationTask

    if isinstance(task, ClassificationTask):
        return task.eval_model().eval()
    if isinstance(task, SegmentationTask) or (isinstance(task, DetectionTask) and task.hparams.framework == "mask_rcnn"):
        return task.model.eval()
    raise NotImplementedError(
        f"{type(task).__name__} ({task.hparams.get('framework')}): export supports classification, segmentation and "
        "the mask_rcnn detection framework (torchvision's Mask R-CNN / Faster R-CNN, through torchvision's ONNX "
        "support); the cascade and single-stage detectors are not exported yet"
    )


def min_size(module: nn.Module) -> int:
    """Smallest height and width of a dynamic-size export of ``module``: every Swin stage's map at least 2 a side
    (patch · 2^(stages-1) + 1; 33 for the usual four stages), since a size of 1 is a special case (contiguity,
    broadcasting) that would specialise the graph; 8 without a Swin inside."""
    swins = [m for m in module.modules() if isinstance(m, SwinTransformer)]
    return max((m.patch_size * 2 ** (len(m.layers) - 1) + 1 for m in swins), default=8)


def _dynamic(module: nn.Module, example: Tensor, dynamic_hw: bool) -> tuple[dict[int, Any]]:
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_hw:
        low = min_size(module)
        if min(example.shape[-2:]) < low:
            raise ValueError(
                f"a dynamic-size export of {type(module).__name__} takes sizes from {low}; the example is "
                f"{tuple(example.shape[-2:])}"
            )
        dims.update({2: torch.export.Dim("height", min=low, max=4096), 3: torch.export.Dim("width", min=low, max=4096)})
    return (dims,)


def export_pt2(module: nn.Module, example: Tensor, path: str | os.PathLike, dynamic_hw: bool = False) -> Path:
    """``torch.export`` program of ``module`` (dynamic batch; also height and width with ``dynamic_hw``)."""
    if isinstance(module, GeneralizedRCNN):
        raise NotImplementedError(
            "torchvision's detectors do not export with torch.export (their proposals and detections have "
            "data-dependent sizes): export Mask R-CNN as ONNX (--format onnx)"
        )
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=_dynamic(module, example, dynamic_hw))
    torch.export.save(program, path)
    return Path(path)


def export_onnx(module: nn.Module, example: Tensor, path: str | os.PathLike, dynamic_hw: bool = False) -> Path:
    """ONNX (torch's dynamo exporter) of ``module``: input ``image``, dynamic batch (also height / width); window
    attention on its explicit path (:func:`explicit_attention`), constant ``Where`` nodes dropped
    (:func:`drop_constant_wheres`)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    if isinstance(module, GeneralizedRCNN):
        return _export_detector_onnx(module, example[0] if example.ndim == 4 else example, path)
    with torch.no_grad():
        out = module(example)
    names = ["logits"] if isinstance(out, Tensor) else [f"features{i}" for i in range(len(out))]
    with torch.no_grad(), explicit_attention(module):
        program = torch.onnx.export(
            module, (example,), dynamo=True, dynamic_shapes=_dynamic(module, example, dynamic_hw),
            input_names=["image"], output_names=names, verbose=False,
        )  # fmt: skip
    if drop_constant_wheres(program.model.graph):
        RemoveUnusedNodesPass()(program.model)
    program.save(str(path))
    return Path(path)


def _export_detector_onnx(module: GeneralizedRCNN, image: Tensor, path: str | os.PathLike) -> Path:
    """torchvision's detector through torch's TorchScript-based exporter, the one torchvision's detection models
    support: one image (3, H, W) in [0, 1] of the example's size (the graph holds its resize), outputs ``boxes``
    (xyxy, input pixels), ``labels`` (1..K), ``scores`` and, with a mask branch, ``masks`` (N, 1, H, W
    probabilities). The Swin backbone exports its window geometry as tensor arithmetic here too."""
    names = ["boxes", "labels", "scores"] + (["masks"] if module.roi_heads.has_mask() else [])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        torch.onnx.export(module, ([image],), str(path), dynamo=False, opset_version=17, input_names=["image"],
                          output_names=names)  # fmt: skip
    return Path(path)


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """``module``'s window attentions on their explicit path (``fused=False``: matmul, bias add, softmax, matmul,
    windows grouped per image so that the bias broadcasts) for the duration, then as they were. Exported, SDPA
    becomes a decomposition that copies the bias per image and transposes the keys through 3-D reshapes: onnxruntime
    runs the explicit graph faster (Swin-T fp32: ×1.09), with the same numbers."""
    attentions = [m for m in module.modules() if isinstance(m, WindowAttention)]
    fused = [m.fused for m in attentions]
    try:
        for m in attentions:
            m.fused = False
        yield
    finally:
        for m, f in zip(attentions, fused):
            m.fused = f


def drop_constant_wheres(graph: ir.Graph) -> int:
    """Remove every ``Where`` whose condition is a constant, all True or all False, and whose output is the branch it
    picks, unchanged (same shape and type): e.g. a fixed-size export's padding mask (``masked_fill``) where there is
    no padding, a full read and write of the tokens per block that onnxruntime keeps. Returns how many went."""
    import onnx_ir as ir  # the export extra's (onnxscript's)

    dropped = 0
    for node in list(graph):
        cond = node.inputs[0].const_value if node.op_type == "Where" else None
        if cond is None or node.outputs[0].is_graph_output():
            continue
        values = cond.numpy()
        if values.all() or not values.any():
            kept, out = node.inputs[1 if values.all() else 2], node.outputs[0]
            if kept.shape is not None and (kept.shape, kept.dtype) == (out.shape, out.dtype):
                ir.convenience.replace_all_uses_with(out, kept)
                graph.remove(node, safe=True)
                dropped += 1
    return dropped


def to_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """This project's (official) backbone keys → timm's: each downsample starts the next stage, head ``head.fc``."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        out["head.fc." + k[len("head.") :] if k.startswith("head.") else k] = v
    return out


def torchvision_model(backbone: SwinTransformer) -> nn.Module:
    """torchvision's ``SwinTransformer`` (V2 blocks for a V2 backbone) with ``backbone``'s architecture, random
    weights: what ``torchvision.models.swin_t`` / ``swin_v2_t`` ... build for the published variants."""
    from torchvision.models import swin_transformer as tv

    from swin.models.swinv2 import SwinTransformerV2

    if not isinstance(backbone.head, nn.Linear):
        raise ValueError(
            f"torchvision's layout needs a classifier with a head; this {type(backbone).__name__} has "
            f"{'no head (a dense backbone)' if backbone.head is None else 'pooled features only (num_classes=0)'}"
        )
    v2 = isinstance(backbone, SwinTransformerV2)
    return tv.SwinTransformer(
        patch_size=[backbone.patch_size] * 2, embed_dim=backbone.embed_dim,
        depths=[len(stage.blocks) for stage in backbone.layers],
        num_heads=[stage.blocks[0].attn.num_heads for stage in backbone.layers],
        window_size=[backbone.window_size] * 2, num_classes=backbone.head.out_features,
        **({"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2} if v2 else {}),
    )  # fmt: skip


def to_torchvision(backbone: SwinTransformer) -> dict[str, Tensor]:
    """``backbone``'s weights under torchvision's keys: every key of :func:`torchvision_model`'s state dict, named
    through the loader's torchvision → official mapping (:func:`swin.models.weights.to_official`) read backwards;
    V2's q / v biases become one ``qkv.bias`` (k third zero); torchvision's own index and coordinate buffers."""
    from swin.models.weights import to_official

    template = torchvision_model(backbone).state_dict()
    pretrained = getattr(backbone, "pretrained_window_sizes", ())
    if any(size and size != backbone.window_size for size in pretrained):
        raise ValueError(
            f"pretrained_window_sizes {tuple(pretrained)}: torchvision's V2 normalises its relative coordinates by "
            f"the window ({backbone.window_size}) and has no such setting"
        )
    ours = backbone.state_dict()
    names = {next(iter(to_official({k: v}, "torchvision")), None): k for k, v in template.items()}
    out = {}
    for official, k in names.items():
        if official in ours:
            out[k] = ours[official]
    for k, v in template.items():
        stem = k[: -len("qkv.bias")]
        if k not in out and k.endswith("attn.qkv.bias") and stem + "logit_scale" in template:
            prefix = next(o for o, t in names.items() if t == stem + "logit_scale")[: -len("logit_scale")]
            out[k] = torch.cat([ours[prefix + "q_bias"], torch.zeros_like(ours[prefix + "v_bias"]), ours[prefix + "v_bias"]])
        elif k not in out and k.endswith(("relative_position_index", "relative_coords_table")):
            out[k] = v
        if k not in out:
            raise CheckpointError(f"{type(backbone).__name__} has no weight for torchvision's {k}")
        if out[k].shape != v.shape:
            raise CheckpointError(f"torchvision's {k} is {tuple(v.shape)}, ours {tuple(out[k].shape)}")
    return out


def save_backbone(task: BaseTask, path: str | os.PathLike, layout: str = "safetensors") -> Path:
    """The task's Swin as a ``.safetensors`` file: the official layout (``safetensors``, what
    :func:`~swin.models.load_pretrained` and the official code read), timm's (``timm``) or torchvision's
    (``torchvision``: ``load_state_dict(..., strict=True)`` into ``torchvision.models.swin_t()`` and kin)."""
    from safetensors.torch import save_file

    sd = {k: v.detach() for k, v in task.backbone.state_dict().items()}
    sd = to_timm(sd) if layout == "timm" else to_torchvision(task.backbone) if layout == "torchvision" else sd
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt", "layout": layout})
    return Path(path)


def contract(task: BaseTask, size: Sequence[int], min_hw: int | None = None) -> dict[str, Any]:
    """What a caller feeds the exported model and gets back; ``min_hw``: a dynamic height and width from it on
    (``size`` is then the export's example)."""
    from swin.tasks.classification import ClassificationTask
    from swin.tasks.detection import DetectionTask

    if isinstance(task, DetectionTask):
        return _detection_contract(task, size)
    classify = isinstance(task, ClassificationTask)
    return {
        "task": type(task).__name__,
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "scale": "pixel / 255, then (x - mean) / std per channel",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "size": list(size),
            "dynamic": ["batch", "height", "width"] if min_hw else ["batch"],
            **({"min_size": min_hw} if min_hw else {}),
        },
        "output": {
            "name": "logits",
            "shape": ["batch", "num_classes"] if classify else ["batch", "num_classes", "height", "width"],
        },
        "class_names": task.class_names,
    }


def _detection_contract(task: BaseTask, size: Sequence[int]) -> dict[str, Any]:
    """The detector's: one image in [0, 1] (it normalises and resizes inside), detections of that image."""
    outputs = {
        "boxes": "(N, 4) float32, x1 y1 x2 y2 in input pixels",
        "labels": "(N,) int64, 1..K: category_ids[label - 1], class_names[label - 1]",
        "scores": "(N,) float32, descending",
    }
    if task.hparams.masks:
        outputs["masks"] = "(N, 1, H, W) float32 probabilities; a mask is masks > 0.5"
    return {
        "task": type(task).__name__,
        "input": {
            "name": "image",
            "layout": "CHW, one image",
            "dtype": "float32",
            "channels": "RGB",
            "scale": "pixel / 255 (the model normalises with mean / std and resizes itself)",
            "mean": list(task.model.transform.image_mean),
            "std": list(task.model.transform.image_std),
            "size": list(size),
            "dynamic": [],
        },
        "output": outputs,
        "class_names": task.class_names,
        "category_ids": task.category_ids.tolist(),
    }


def _default_size(cfg: dict[str, Any]) -> tuple[int, int]:
    size = ((cfg.get("data") or {}).get("init_args") or {}).get("image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    from swin.tasks.detection import DetectionTask
    from swin.tasks.segmentation import SegmentationTask

    parser = argparse.ArgumentParser(prog="python -m swin.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the task's training config (YAML)")
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of that task")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--format", nargs="+", choices=FORMATS,
        help="what to write (default: all but torchvision; detection: onnx, the one torchvision's detectors support)",
    )  # fmt: skip
    parser.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"),
        help="input size (default: the config's); segmentation: the example, the graph takes any size from min_size; "
        "detection: the one image size the graph takes",
    )  # fmt: skip
    args = parser.parse_args(argv)
    task, cfg = load_task(args.config, args.ckpt)
    args.format = args.format or (["onnx"] if isinstance(task, DetectionTask) else list(FORMATS[:4]))
    module = export_module(task) if {"onnx", "pt2"} & set(args.format) else None
    dense = isinstance(task, SegmentationTask)  # logits at the input's size: one graph for any height and width
    size = tuple(args.size) if args.size else _default_size(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, *size)
    written = []
    if "onnx" in args.format:
        written.append(export_onnx(module, example, out / "model.onnx", dynamic_hw=dense))
    if "pt2" in args.format:
        written.append(export_pt2(module, example, out / "model.pt2", dynamic_hw=dense))
    for layout, name in LAYOUTS.items():
        if layout in args.format:
            written.append(save_backbone(task, out / name, layout))
    info = contract(task, size, min_size(task) if dense else None)
    (out / "contract.json").write_text(json.dumps(info, indent=2) + "\n")
    written.append(out / "contract.json")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
