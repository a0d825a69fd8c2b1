"""Load any published Swin checkpoint into :class:`~swin.models.swin.SwinTransformer`.

Recognised layouts, each converted to the official one, which this project's backbone uses:

- official microsoft release: ``{'model': state_dict}``; ``layers.{i}.downsample`` ends stage i; buffers
  ``relative_position_index`` and ``attn_mask`` (dropped);
- timm: the downsample starts stage i + 1 (``layers.{i+1}.downsample``), head ``head.fc``;
- torchvision: ``features.0`` patch embedding, ``features.{1,3,5,7}`` blocks (``mlp.0`` / ``mlp.3``),
  ``features.{2,4,6}`` patch merging;
- OpenMMLab (mmdet / mmseg backbones, also under ``backbone.`` inside a detector or segmentor): ``stages.{i}``,
  ``attn.w_msa``, ``ffn.layers``, ``patch_embed.projection``, patch merging channels in nn.Unfold order;
- Hugging Face transformers Swin (``swin.embeddings.*``, ``swin.encoder.layers.*``, separate query / key / value,
  ``classifier``): renamed to the official layout on reading;
- this project's Lightning checkpoints: any prefix in front of the backbone's keys.

Swin V2 in the same layouts (official ``{'model': ...}`` with ``q_bias`` / ``v_bias``, timm's ``swinv2_*``,
torchvision's ``swin_v2_*`` with one ``qkv.bias`` whose k third is zero) goes to the official V2 layout.

Files are read with ``torch.load(weights_only=True)``, ``.safetensors`` files with ``safetensors``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["load_pretrained", "read_state_dict", "detect_format", "to_official", "CheckpointError"]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

_ANCHORS = re.compile(r"^(.*?)(patch_embed\.proj\.weight|patch_embed\.projection\.weight|features\.0\.0\.weight)$")
_WRAPPERS = ("state_dict", "model", "module", "model_state")


class CheckpointError(ValueError):
    """A file or state dict that is not a Swin checkpoint this loader knows."""


def read_state_dict(source: str | os.PathLike | Mapping[str, object]) -> StateDict:
    """The backbone's tensors from a path or a (possibly wrapped) state dict, with any key prefix removed."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source!s} does not exist")
        try:
            obj = _read_file(source)
        except Exception as err:  # pickle, zip and safe-globals errors all mean "not a checkpoint we load"
            raise CheckpointError(f"{source!s} is not a checkpoint that loads with weights_only=True: {err}") from err
    else:
        obj = source
    for _ in range(3):  # {'state_dict': {...}}, {'model': {...}}, nested once more at most
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict")
    obj = _from_transformers(obj)
    anchors = [m for k in obj if (m := _ANCHORS.match(k))]
    if not anchors:
        raise CheckpointError(
            f"{name} has no Swin patch embedding (looked for patch_embed.proj.weight, "
            f"patch_embed.projection.weight or features.0.0.weight under any prefix); first keys: {list(obj)[:5]}"
        )
    prefix = min((m.group(1) for m in anchors), key=len)
    return {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _read_file(path: str | os.PathLike) -> object:
    """A ``.safetensors`` file's tensors, else ``torch.load(weights_only=True)``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


_TRANSFORMERS_BLOCK = {  # the published files' names, then transformers 5's in-memory ones
    "layernorm_before.": "norm1.",
    "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}


def _from_transformers(sd: Mapping[str, object]) -> Mapping[str, object]:
    """Hugging Face transformers Swin V1 keys (any prefix before ``embeddings.patch_embeddings``) → official ones;
    other state dicts unchanged. Separate query / key / value (transformers 5 in memory: q_proj / k_proj / v_proj)
    become one ``qkv`` (official order q, k, v)."""
    anchor = next((k for k in sd if k.endswith("embeddings.patch_embeddings.projection.weight")), None)
    if anchor is None:
        return sd
    prefix = anchor[: -len("embeddings.patch_embeddings.projection.weight")]
    out: dict[str, object] = {}
    for k, v in sd.items():
        if k.startswith("classifier."):
            out["head." + k[len("classifier.") :]] = v
            continue
        if not k.startswith(prefix):
            continue
        k = k[len(prefix) :]
        k = k.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
        k = k.replace("embeddings.norm.", "patch_embed.norm.").replace("encoder.layers.", "layers.")
        k = re.sub(r"^layernorm\.", "norm.", k)
        for old, new in _TRANSFORMERS_BLOCK.items():
            k = k.replace(old, new)
        out[k] = v
    for q, parts in (("attention.self.query.", ("query", "key", "value")), ("attention.q_proj.", ("q", "k", "v"))):
        for k in [k for k in out if q in k]:
            keys = [k.replace(q, q.replace(parts[0], part, 1)) for part in parts]
            out[k.replace(q, "attn.qkv.")] = torch.cat([out.pop(key) for key in keys])
    return {k: v for k, v in out.items() if not k.endswith("relative_position_index")}


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """``official`` (also this project), ``timm``, ``torchvision`` or ``mmlab``."""
    if "features.0.0.weight" in sd:
        return "torchvision"
    if "patch_embed.projection.weight" in sd or any(k.startswith("stages.") for k in sd):
        return "mmlab"
    if any(k.startswith("layers.0.downsample.") for k in sd):
        return "official"
    if any(re.match(r"layers\.[1-9]\.downsample\.", k) for k in sd) or "head.fc.weight" in sd:
        return "timm"
    return "official"  # a single-stage model has no downsample at all


def _mmlab_merge_order(v: Tensor) -> Tensor:
    """OpenMMLab PatchMerging channels (nn.Unfold order, channel-major) → official order (4 chunks of C)."""
    if v.ndim == 1:
        return v.reshape(-1, 4).t()[[0, 2, 1, 3]].reshape(-1)
    out = v.shape[0]
    return v.reshape(out, -1, 4).transpose(1, 2)[:, [0, 2, 1, 3]].reshape(out, -1)


def to_official(sd: Mapping[str, Tensor], fmt: str | None = None) -> StateDict:
    """Convert a backbone state dict to the official layout; buffers (index, mask) are dropped."""
    fmt = fmt or detect_format(sd)
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if fmt == "timm":
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
            k = k.replace("head.fc.", "head.")
        elif fmt == "torchvision":
            k = _torchvision_key(k)
            if k is None:
                continue
        elif fmt == "mmlab":
            if not k.startswith(("stages.", "patch_embed.", "norm", "absolute_pos_embed")):
                continue  # neck / heads of a detector or segmentor
            k = k.replace("stages.", "layers.", 1).replace("patch_embed.projection.", "patch_embed.proj.")
            k = k.replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.").replace("ffn.layers.1.", "mlp.fc2.")
            if ".downsample." in k:
                v = _mmlab_merge_order(v)
            if k == "absolute_pos_embed" and v.ndim == 4:  # (1, C, H, W) → (1, HW, C)
                v = v.flatten(2).transpose(1, 2)
        out[k] = v
    return _split_v2_qkv_bias(out) if fmt == "torchvision" else out


def _split_v2_qkv_bias(sd: StateDict) -> StateDict:
    """torchvision's V2 ``attn.qkv.bias`` (3C, the k third kept at zero) → the official ``q_bias`` and ``v_bias``."""
    for k in [k for k in sd if k.endswith("attn.qkv.bias") and k[: -len("qkv.bias")] + "logit_scale" in sd]:
        q, _, v = sd.pop(k).chunk(3)
        sd[k[: -len("qkv.bias")] + "q_bias"], sd[k[: -len("qkv.bias")] + "v_bias"] = q, v
    return sd


def _coords_normalisation(table: Tensor) -> int | None:
    """The window a V2 ``relative_coords_table`` (1, 2M-1, 2M-1, 2) was normalised by; None for M = 1.

    Its entry at dy = M-1 is log2(8·(M-1)/(n-1) + 1) / 3 for normalisation n (the pretrained window, else M).
    """
    window = (table.shape[1] + 1) // 2
    t = float(table[0, -1, window - 1, 0])
    if window < 2 or t <= 0:
        return None
    return round(8 * (window - 1) / (2 ** (3 * t) - 1)) + 1


def _follow_coords_tables(sd: StateDict, model: nn.Module) -> None:
    """V2: the model normalises its relative coordinates as the checkpoint did, whatever either's window.

    Each checkpoint ``relative_coords_table`` (official and torchvision files have them, timm's not) gives the
    window it was normalised by; the model's block takes it as its pretrained window size where it differs and
    regenerates its own table, which replaces the checkpoint's in ``sd``. Without one the model keeps its own.
    """
    changed = []
    for name, buffer in model.named_buffers():
        if not name.endswith("relative_coords_table"):
            continue
        attn = model.get_submodule(name.rsplit(".", 1)[0])
        found = _coords_normalisation(sd[name]) if name in sd else None
        if found is not None and found != attn.normalisation():
            attn.set_pretrained_window_size(found)
            changed.append(f"{name.rsplit('.', 2)[0]}: {found}")
        sd[name] = attn.relative_coords_table
    if hasattr(model, "pretrained_window_sizes"):
        model.pretrained_window_sizes = tuple(s.blocks[0].attn.pretrained_window_size for s in model.layers)
    if changed:
        log.info("load_pretrained: pretrained window sizes from the checkpoint's coordinates: %s", ", ".join(changed))


def _torchvision_key(k: str) -> str | None:
    m = re.match(r"features\.(\d+)\.(.*)$", k)
    if m is None:
        return k  # norm.*, head.*
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:  # Conv2d, Permute, LayerNorm
        part = {"0": "patch_embed.proj.", "2": "patch_embed.norm."}.get(rest.split(".")[0])
        return part + rest.split(".", 1)[1] if part else None
    if idx % 2 == 1:  # blocks of stage (idx - 1) // 2
        rest = re.sub(r"(?<!\w)mlp\.0\.", "mlp.fc1.", re.sub(r"(?<!\w)mlp\.3\.", "mlp.fc2.", rest))  # not cpb_mlp
        return f"layers.{(idx - 1) // 2}.blocks.{rest}"
    return f"layers.{(idx - 2) // 2}.downsample.{rest}"


def _resize_table(v: Tensor, target: Tensor, key: str) -> Tensor:
    """(L1, nH) relative position bias table → (L2, nH), bicubic, as the official ``load_pretrained``."""
    (l1, h1), (l2, h2) = v.shape, target.shape
    if h1 != h2:
        raise CheckpointError(f"{key}: checkpoint has {h1} heads, the model {h2}")
    s1, s2 = int(l1**0.5), int(l2**0.5)
    grid = v.t().reshape(1, h1, s1, s1).float()
    return F.interpolate(grid, size=(s2, s2), mode="bicubic", align_corners=False).reshape(h2, l2).t().to(v.dtype)


def _resize_ape(v: Tensor, target: Tensor) -> Tensor:
    """(1, L1, C) absolute position embedding → (1, L2, C), bicubic."""
    c, s1, s2 = v.shape[-1], int(v.shape[1] ** 0.5), int(target.shape[1] ** 0.5)
    grid = v.transpose(1, 2).reshape(1, c, s1, s1).float()
    grid = F.interpolate(grid, size=(s2, s2), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(v.dtype)


def load_pretrained(
    model: nn.Module, source: str | os.PathLike | Mapping[str, object], strict: bool = False
) -> nn.modules.module._IncompatibleKeys:
    """Load a Swin checkpoint of any known layout into ``model``.

    Relative position tables and the absolute position embedding are interpolated to the model's window and grid
(V2: the model takes the checkpoint's coordinate normalisation, its pretrained window size, from the checkpoint's
``relative_coords_table`` where it has one);
    a head with another class count is dropped with a warning. Missing and unexpected keys are reported together
    in one warning (``strict=True``: raised as an error). Returns what ``load_state_dict`` returns.
    """
    sd = to_official(read_state_dict(source))
    _follow_coords_tables(sd, model)
    own = model.state_dict()
    notes = []
    for k in list(sd):
        if k not in own:
            continue
        v, t = sd[k], own[k]
        if v.shape == t.shape:
            continue
        if k.endswith("relative_position_bias_table"):
            sd[k] = _resize_table(v, t, k)
        elif k == "absolute_pos_embed":
            sd[k] = _resize_ape(v, t)
        elif k.startswith("head."):
            notes.append(f"dropped the checkpoint's head {tuple(v.shape)}: the model's is {tuple(t.shape)}")
            del sd[k]
        else:
            where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
            raise CheckpointError(
                f"{where}: {k}: checkpoint shape {tuple(v.shape)} does not fit the model's {tuple(t.shape)}"
            )
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("relative_position_index", "attn_mask"))]
    if missing or result.unexpected_keys:
        notes.append(f"missing keys ({len(missing)}): {missing}")
        notes.append(f"unexpected keys ({len(result.unexpected_keys)}): {result.unexpected_keys}")
    if notes:
        message = "load_pretrained: " + "; ".join(notes)
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=2)
    return result
