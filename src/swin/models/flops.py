"""Multiply-adds of a Swin forward pass, counted as the official ``flops()`` methods count them."""

from __future__ import annotations

from torch import nn

from swin.models.swin import SwinTransformer

__all__ = ["count_flops"]


def count_flops(model: SwinTransformer, img_size: int | tuple[int, int] = 224) -> int:
    """Multiply-adds of one forward pass of the classification model, counted as the official ``flops()`` does.

    Linear layers, attention matmuls (on the padded window grid) and norms; at 224² Swin-T gives about 4.5 G.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = model.patch_size
    h, w = -(-h // p), -(-w // p)
    c = model.embed_dim
    flops = h * w * c * model.in_chans * p * p + (h * w * c if isinstance(model.patch_embed.norm, nn.LayerNorm) else 0)
    for stage in model.layers:
        for block in stage.blocks:
            ws, pad_h, pad_w, _ = block.geometry(h, w)
            n, windows = ws * ws, (pad_h // ws) * (pad_w // ws)
            hidden = block.mlp.fc1.out_features
            flops += 2 * h * w * c  # norm1, norm2
            flops += windows * (n * c * 3 * c + 2 * n * n * c + n * c * c)  # qkv, q·kᵀ, attn·v, proj
            flops += 2 * h * w * c * hidden  # mlp
        if stage.downsample is not None:
            flops += h * w * c  # norm (official count)
            h, w = -(-h // 2), -(-w // 2)
            flops += h * w * 4 * c * 2 * c
            c *= 2
    if model.norm is not None:
        flops += h * w * c
    if isinstance(model.head, nn.Linear):
        flops += c * model.head.out_features
    return flops
