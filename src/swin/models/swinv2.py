"""Swin Transformer V2 (arXiv 2111.09883), exact to the official ``models/swin_transformer_v2.py``, in the V1 family.

What changes from V1 (:mod:`swin.models.swin`), and only that:

- residual post-norm: x + DropPath(LN(Attn(x))), then x + DropPath(LN(MLP(x))); these norms start at zero;
- scaled cosine attention: normalize(q) · normalize(k)ᵀ × exp(min(logit_scale, log 100)), one learnable scale per
  head; the q / v projections have biases, the k projection none;
- continuous relative position bias: 16·sigmoid of a 2-layer MLP (2 → 512 → heads) over log-spaced relative
  coordinates, normalised by the pretrained window (``pretrained_window_sizes``) or else the window itself;
- patch merging: the reduction, then LayerNorm on 2C.

Everything else is V1's: the geometry helpers, token gathers, padding for any input size, the dense pyramid
(``out_indices``, ``forward_features``), ``frozen_stages``, gradient checkpointing, the CPU fast paths. As in the
official code, a block whose map is no larger than its window in one dimension shrinks its window to the map's
smaller side and does not shift (official and timm at their native sizes; torchvision instead pads such a map to
one full window). The state dict is the official layout, ``relative_coords_table`` buffers included.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from swin.models.ops import Linear
from swin.models.swin import (
    Mlp, PatchMerging, SwinTransformer, WindowBlock, cacheable, cached, relative_position_index
)

__all__ = [
    "SwinTransformerV2",
    "WindowAttentionV2",
    "SwinBlockV2",
    "PatchMergingV2",
    "VARIANTS_V2",
    "build_swinv2",
    "relative_coords_table",
    "swinv2_t",
    "swinv2_s",
    "swinv2_b",
    "swinv2_l",
]

LOGIT_SCALE_MAX = math.log(100.0)  # official: log(1 / 0.01)
CPB_HIDDEN = 512


@functools.lru_cache(maxsize=32)
def relative_coords_table(window: int, normalisation: int, device: torch.device | None = None) -> Tensor:
    """(1, 2M-1, 2M-1, 2) log-spaced relative coordinates (dy, dx) of an M×M window, the continuous bias's input.

    Each coordinate is divided by ``normalisation - 1`` (the pretrained window, else the window), times 8, then
    sign(t)·log2(|t| + 1) / log2(8). A window of 1 has only the coordinate 0 (divided by 1, as timm does).
    """
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode first call
        r = torch.arange(-(window - 1), window, dtype=torch.float32, device="cpu")  # not a default (meta) device
        t = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).unsqueeze(0)
        t = t / max(normalisation - 1, 1) * 8
        return (torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)).to(device)


class WindowAttentionV2(nn.Module):
    """Scaled cosine attention inside windows with the continuous relative position bias.

    ``forward`` takes windows (B·nW, N, C) of side ``window`` (the block's, which may be smaller than
    ``window_size``) and an optional additive shift mask (nW, N, N).
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: int = 0,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        self.register_buffer("relative_coords_table", relative_coords_table(window_size, self.normalisation()).clone())
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: tuple | None = None

    def normalisation(self, window: int | None = None) -> int:
        """The window the coordinates of a ``window``-sided window are normalised by (pretrained, else itself)."""
        return self.pretrained_window_size if self.pretrained_window_size > 0 else (window or self.window_size)

    def set_pretrained_window_size(self, size: int) -> None:
        """Normalise by ``size`` from now on (0: by the window itself); regenerates ``relative_coords_table``."""
        self.pretrained_window_size = size
        table = self.relative_coords_table
        self.relative_coords_table = relative_coords_table(self.window_size, self.normalisation()).to(table)
        self._bias_cache = None

    def position_bias(self, window: int) -> Tensor:
        """(nH, N, N) continuous relative position bias, 16·sigmoid(MLP(coordinates)), of a ``window``-sided window."""
        table = self.relative_coords_table
        if window != self.window_size:
            table = cached(relative_coords_table)(window, self.normalisation(window), table.device).to(table.dtype)
        n = window * window
        index = cached(relative_position_index)(window, table.device)
        bias = self.cpb_mlp(table).view(-1, self.num_heads)[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def attention_bias(self, window: int, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """(nW or 1, nH, N, N) position bias plus shift mask; cached while autograd is off."""
        keep = cacheable()
        if keep:
            tensors = (*self.cpb_mlp.parameters(), self.relative_coords_table)
            key = (window, dtype, *((t.data_ptr(), t._version) for t in tensors))
            if self._bias_cache is not None and self._bias_cache[0] == key and self._bias_cache[1] is mask:
                return self._bias_cache[2]
        bias = self.position_bias(window).unsqueeze(0)
        bias = (bias + mask.unsqueeze(1) if mask is not None else bias).to(dtype).contiguous()
        if keep:
            self._bias_cache = (key, mask, bias)
        return bias

    def forward(self, x: Tensor, window: int, mask: Tensor | None = None, windows: slice | None = None) -> Tensor:
        """Attention of windows (B·nW, N, C); ``windows`` picks the mask's windows when ``x`` holds only those.

        As in V1, SDPA (with the logit scale folded into q) runs on accelerators and at CPU fp32 inference; the
        explicit softmax elsewhere or with ``fused=False``.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)).to(qkv.dtype)
        q, k, v = qkv.view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        scale = torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp().to(q.dtype)  # (nH, 1, 1)
        bias = self.attention_bias(window, mask, q.dtype)  # (nW, nH, N, N)
        if windows is not None and bias.shape[0] > 1:
            bias = bias[windows]
        num_windows = bias.shape[0]
        cpu_sdpa = q.dtype == torch.float32 and not bias.requires_grad and not scale.requires_grad
        if self.fused and (q.device.type != "cpu" or cpu_sdpa):
            if num_windows > 1:  # 4-D SDPA needs the mask per batch entry
                bias = bias.expand(bw // num_windows, -1, -1, -1, -1).reshape(bw, *bias.shape[1:])
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q * scale, k, v, attn_mask=bias, dropout_p=drop, scale=1.0)
        else:
            q, k, v = (t.view(bw // num_windows, num_windows, *t.shape[1:]) for t in (q, k, v))
            attn = (q @ k.transpose(-2, -1)) * scale + bias
            attn = attn.softmax(dim=-1)
            out = (F.dropout(attn, self.attn_drop, self.training) @ v).flatten(0, 1)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class SwinBlockV2(WindowBlock):
    """Residual post-norm block: x + DropPath(LN(W-MSA / SW-MSA(x))), then x + DropPath(LN(MLP(x))).

    Padding tokens enter attention as zeros (as torchvision pads the block's input). Where the map is no larger
    than the window in one dimension, the window shrinks to the map's smaller side, without shift (official).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 8,
        shifted: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
        piece_tokens: int = 0,
        pretrained_window_size: int = 0,
    ):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.piece_tokens = piece_tokens
        self.attn = WindowAttentionV2(
            dim, window_size, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size, fused_attn
        )
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)

    def geometry(self, height: int, width: int) -> tuple[int, int, int, tuple[int, int]]:
        """As V1, except that a map no larger than the window in one dimension gets a window of its smaller side."""
        small = min(height, width)
        if small <= self.window_size:
            return small, -(-height // small) * small, -(-width // small) * small, (0, 0)
        return super().geometry(height, width)

    def windows_forward(
        self, tokens: Tensor, positions: slice, window: int, mask: Tensor | None, valid: Tensor | None
    ) -> Tensor:
        """See :meth:`~swin.models.swin.WindowBlock.windows_forward`; padding tokens are zeros already."""
        b, length, c = tokens.shape
        n = window**2
        windows = slice(positions.start // n, positions.stop // n)
        y = self.attn(tokens.view(-1, n, c), window, mask, windows).view(b, length, c)
        x = tokens + self.drop_path(self.norm1(y))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMergingV2(PatchMerging):
    """2×2 neighbourhood → 4C (official order) → Linear → LN on 2C."""

    def __init__(self, dim: int, piece_tokens: int = 0):
        super().__init__(dim, piece_tokens)
        self.norm = nn.LayerNorm(2 * dim)

    def _merge(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x))


class SwinTransformerV2(SwinTransformer):
    """Swin Transformer V2: :class:`~swin.models.swin.SwinTransformer`'s arguments and behaviour, V2 blocks.

    Args:
        window_size: window side M (8 in the official ImageNet-1K 256² recipe).
        pretrained_window_sizes: per stage, the window the checkpoint to be fine-tuned was trained with (0: none,
            the coordinates are normalised by the window itself); :func:`~swin.models.weights.load_pretrained`
            sets them from the checkpoint's ``relative_coords_table`` where it has one.
        **kwargs: any other :class:`~swin.models.swin.SwinTransformer` argument except ``rel_pos_bias``.
    """

    merging = PatchMergingV2

    def __init__(self, window_size: int = 8, pretrained_window_sizes: Sequence[int] | None = None, **kwargs: Any):
        if not kwargs.pop("rel_pos_bias", True):
            raise ValueError("SwinTransformerV2 has no rel_pos_bias switch (its continuous bias is part of V2)")
        depths = kwargs.get("depths", (2, 2, 6, 2))
        sizes = tuple(pretrained_window_sizes) if pretrained_window_sizes is not None else (0,) * len(depths)
        if len(sizes) != len(depths):
            raise ValueError(f"pretrained_window_sizes {sizes} and depths {tuple(depths)} differ in length")
        self.pretrained_window_sizes = sizes
        super().__init__(window_size=window_size, **kwargs)
        for stage in self.layers:  # official _init_respostnorm
            for block in stage.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def block_factory(self, stage: int) -> Callable[..., WindowBlock]:
        return functools.partial(SwinBlockV2, pretrained_window_size=self.pretrained_window_sizes[stage])

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay besides 1-D parameters (official keywords)."""
        return {"absolute_pos_embed", "cpb_mlp", "logit_scale"}


# ---------------------------------------------------------------------------------------------------------------
# Variants and factories
# ---------------------------------------------------------------------------------------------------------------

VARIANTS_V2: dict[str, dict] = {
    "swinv2_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8, drop_path_rate=0.2),
    "swinv2_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=8, drop_path_rate=0.3),
    "swinv2_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=8, drop_path_rate=0.5),
    "swinv2_l": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.2
    ),
}


def build_swinv2(variant: str, **overrides) -> SwinTransformerV2:
    """A named V2 variant (``swinv2_t``, ``swinv2_s``, ``swinv2_b``, ``swinv2_l``) with constructor overrides."""
    key = variant.lower()
    if key not in VARIANTS_V2:
        raise ValueError(f"unknown Swin V2 variant {variant!r}; choose one of {sorted(VARIANTS_V2)}")
    return SwinTransformerV2(**{**VARIANTS_V2[key], **overrides})


def swinv2_t(**overrides) -> SwinTransformerV2:
    """Swin-V2-T: C=96, depths 2-2-6-2, heads 3-6-12-24, window 8 (official window8_256 recipe)."""
    return build_swinv2("swinv2_t", **overrides)


def swinv2_s(**overrides) -> SwinTransformerV2:
    """Swin-V2-S: C=96, depths 2-2-18-2, heads 3-6-12-24, window 8."""
    return build_swinv2("swinv2_s", **overrides)


def swinv2_b(**overrides) -> SwinTransformerV2:
    """Swin-V2-B: C=128, depths 2-2-18-2, heads 4-8-16-32, window 8."""
    return build_swinv2("swinv2_b", **overrides)


def swinv2_l(**overrides) -> SwinTransformerV2:
    """Swin-V2-L: C=192, depths 2-2-18-2, heads 6-12-24-48, window 12 (the official 22K release's window)."""
    return build_swinv2("swinv2_l", **overrides)
