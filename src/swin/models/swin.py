"""Swin Transformer V1 (arXiv 2103.14030), exact to the official release, usable at any input size.

One module, two faces: ``model(x)`` gives class logits; with ``out_indices`` it is also a dense backbone whose
``forward_features(x)`` returns NCHW maps of the chosen stages, each through its own LayerNorm, as the official
detection / segmentation backbone does.

Tokens travel as (B, H, W, C). Each block pads its map (right / bottom, zeros) to a window multiple, computes the
shift mask on the padded grid, runs norm → (shifted) window attention → residual → MLP → residual on the tokens in
window order (the cyclic shift, padding and window partition are one token gather) and crops back; padding tokens
enter attention as zeros, as in the official code, which pads after the first norm. PatchMerging pads odd sizes.
Where the padded map is no larger than the window in a dimension there is no shift in that dimension.

The CPU speed machinery (oneDNN linears, packed weights, piecewise inference) lives in :mod:`swin.models.ops`
and changes no number; FLOP counting in :mod:`swin.models.flops`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from swin.models.ops import Linear, choose_kernels, exporting, gather_tokens, in_bands, in_pieces, run_in_pieces

__all__ = [
    "SwinTransformer",
    "PatchEmbed",
    "WindowAttention",
    "Mlp",
    "WindowBlock",
    "SwinBlock",
    "PatchMerging",
    "Stage",
    "VARIANTS",
    "build_swin",
    "swin_t",
    "swin_s",
    "swin_b",
    "swin_l",
    "relative_position_index",
    "shift_mask",
    "window_partition",
    "window_reverse",
    "window_geometry",
    "window_index",
    "window_tensors",
]

MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def relative_position_index(window: int, device: torch.device | None = None) -> Tensor:
    """(N, N) index into the (2M-1)² bias table for every token pair of an M×M window (N = M²)."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode first call
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)


def cached(function: Callable) -> Callable:
    """``function`` (an ``lru_cache``), or its uncached body inside an export, whose tensors must not outlive it."""
    return function.__wrapped__ if exporting() else function


def cacheable() -> bool:
    """Whether a module may keep a result for the next call: autograd off, not compiling, not exporting."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not exporting()


def _regions(size: int, window: int, shift: int) -> Tensor:
    """Region id of every row (or column) of a cyclically shifted, padded map: slices (0,-M), (-M,-s), (-s,None)."""
    ids = torch.zeros(size, dtype=torch.long)
    if shift > 0:
        ids[size - window : size - shift] = 1
        ids[size - shift :] = 2
    return ids


@functools.lru_cache(maxsize=64)
def shift_mask(
    height: int, width: int, window: int, shift: tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """(nW, N, N) additive mask: 0 between tokens of one region, -100 between regions (padded grid, row-major)."""
    with torch.inference_mode(False):  # cached, as above
        ids = _regions(height, window, shift[0])[:, None] * 3 + _regions(width, window, shift[1])[None, :]
        ids = window_partition(ids[None, :, :, None], window).squeeze(-1)  # (nW, N)
        mask = (ids[:, :, None] != ids[:, None, :]).float() * MASK_VALUE
        return mask.to(device)


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` → (B·nW, M², C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B·nW, M², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, height, width, c)


def window_geometry(height: int, width: int, window: int, shifted: bool) -> tuple[int, int, tuple[int, int]]:
    """Padded size and per-dimension shift of a block: no shift where the padded map fits in one window."""
    pad_h, pad_w = -(-height // window) * window, -(-width // window) * window
    if not shifted:
        return pad_h, pad_w, (0, 0)
    half = window // 2
    return pad_h, pad_w, (0 if pad_h <= window else half, 0 if pad_w <= window else half)


@functools.lru_cache(maxsize=64)
def window_index(
    height: int, width: int, window: int, pad: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token permutations of a block on its padded H'×W' raster, as flat indices, and which tokens are real.

    ``tokens.index_select(1, fwd)`` on the padded (B, H'·W', C) map equals roll(-shift) then window partition;
    ``windows.index_select(1, inv)`` equals window reverse then roll(+shift) (``inv`` is the inverse permutation).
    ``valid`` (in window order) is False at padding tokens, None without padding.
    """
    with torch.inference_mode(False):  # cached: must stay usable by autograd after an inference-mode first call
        pad_h, pad_w = pad
        grid = torch.arange(pad_h * pad_w, device=device).view(1, pad_h, pad_w, 1)
        if shift != (0, 0):
            grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        fwd = window_partition(grid, window).flatten()
        inv = torch.empty_like(fwd)
        inv[fwd] = torch.arange(fwd.numel(), device=device)
        valid = None
        if (pad_h, pad_w) != (height, width):
            raster = torch.zeros(pad_h, pad_w, dtype=torch.bool, device=device)
            raster[:height, :width] = True
            valid = raster.flatten()[fwd]
        return fwd, inv, valid


def _wrap(index: Tensor, size: int) -> Tensor:
    """``index % size`` for -size <= index < 2·size, without a remainder by a (possibly symbolic) size."""
    return torch.where(index >= size, index - size, torch.where(index < 0, index + size, index))


def _windows(size: int, window: int) -> int:
    """Windows a side of a padded map: ceil division without a negative floor division (ONNX divides integers
    towards zero); at least two for a symbolic size (the second of only padding where the map fits in one), so that
    no size is 1, whose special cases (contiguity, broadcasting) would be guards."""
    count = (size + window - 1) // window
    return torch.sym_max(count, 2) if isinstance(count, torch.SymInt) else count  # int, or a traced tensor


def window_tensors(
    height: int, width: int, window: int, shifted: bool, device: torch.device
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`window_geometry`, :func:`shift_mask` and :func:`window_index` as tensor arithmetic, for export.

    The sizes may be symbolic and nothing branches on them: the shift is a tensor (0 where the padded map fits in
    one window), there is always a ``valid`` (all True without padding) and, for shifted blocks, a mask (all 0
    where the shift is 0), so that one graph serves every input size with the same numbers. There is no padded copy
    of the map and no crop (whose size checks would be guards): ``fwd`` indexes the unpadded H·W raster, a padding
    position pointing at the nearest real token (masked out of attention by ``valid``, its result dropped), and
    ``inv`` holds the window-order position of each real token, raster order. Returns mask, fwd, inv, valid.
    """
    pad_h, pad_w = _windows(height, window) * window, _windows(width, window) * window
    rows, cols = torch.arange(pad_h, device=device), torch.arange(pad_w, device=device)
    real_h, real_w = torch.arange(height, device=device), torch.arange(width, device=device)
    half = window // 2 if shifted else 0  # no shift where the map fits in one window
    shift_h, shift_w = (real_h >= window).any().long() * half, (real_w >= window).any().long() * half
    # roll(-shift): the shifted map's row r holds the padded raster's row (r + shift) mod H'
    src_h, src_w = _wrap(rows + shift_h, pad_h), _wrap(cols + shift_w, pad_w)
    grid = src_h.clamp(max=height - 1)[:, None] * width + src_w.clamp(max=width - 1)[None, :]
    fwd = window_partition(grid[None, :, :, None], window).flatten()
    order = torch.arange(pad_h * pad_w, device=device).view(-1, window * window, 1)
    position = window_reverse(order, window, pad_h, pad_w)[0, :, :, 0]  # window-order position of each shifted cell
    inv = position.index_select(0, _wrap(real_h - shift_h, pad_h)).index_select(1, _wrap(real_w - shift_w, pad_w))
    valid = window_partition(((src_h < height)[:, None] & (src_w < width)[None, :])[None, :, :, None], window).flatten()
    mask = None
    if shifted:  # region ids of the slices (0, -M), (-M, -s), (-s, None), as _regions
        region_h = ((rows >= pad_h - window) & (shift_h > 0)).long() + (rows >= pad_h - shift_h).long()
        region_w = ((cols >= pad_w - window) & (shift_w > 0)).long() + (cols >= pad_w - shift_w).long()
        ids = window_partition((region_h[:, None] * 3 + region_w[None, :])[None, :, :, None], window).squeeze(-1)
        mask = (ids[:, :, None] != ids[:, None, :]).float() * MASK_VALUE
    return mask, fwd, inv.flatten(), valid


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Pad to a patch multiple (right / bottom, zeros), P×P conv with stride P, LayerNorm; returns (B, H, W, C)."""

    def __init__(
        self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True, piece_tokens: int = 0
    ):
        super().__init__()
        self.patch_size = patch_size
        self.piece_tokens = piece_tokens
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def _embed(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[2:]
        pad_h, pad_w = (h + p - 1) // p * p - h, (w + p - 1) // p * p - w  # ceil form: short symbolic sizes
        if exporting() or pad_h or pad_w:  # export: one graph for every size
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if in_pieces(self, x, self.piece_tokens):  # bands of patch rows
            return in_bands(self._embed, x, 2, max(1, self.piece_tokens // (x.shape[0] * x.shape[3] // p)), p)
        return self._embed(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    ``forward`` takes windows (B·nW, N, C) and an optional additive mask (nW, N, N); the bias and the mask are
    summed into one additive mask for ``scaled_dot_product_attention`` (``fused=False``: an explicit softmax).
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.relative_position_bias_table = (
            nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads)) if rel_pos_bias else None
        )
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: tuple | None = None
        if rel_pos_bias:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(nH, N, N) bias gathered from the table."""
        n = self.window_size**2
        index = cached(relative_position_index)(self.window_size, self.relative_position_bias_table.device)
        return self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def attention_bias(self, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """(nW or 1, nH, N, N) relative position bias plus shift mask; cached while autograd is off.

        Without the bias (``rel_pos_bias=False``): the mask as (nW, 1, N, N), or None.
        """
        table = self.relative_position_bias_table
        if table is None:
            return mask.unsqueeze(1).to(dtype) if mask is not None else None
        keep = cacheable()
        if keep:
            key = (table.data_ptr(), table._version, dtype)
            if self._bias_cache is not None and self._bias_cache[0] == key and self._bias_cache[1] is mask:
                return self._bias_cache[2]
        bias = self.relative_position_bias().unsqueeze(0)
        bias = (bias + mask.unsqueeze(1) if mask is not None else bias).to(dtype).contiguous()
        if keep:
            self._bias_cache = (key, mask, bias)
        return bias

    def forward(self, x: Tensor, mask: Tensor | None = None, windows: slice | None = None) -> Tensor:
        """Attention of windows (B·nW, N, C); ``windows`` picks the mask's windows when ``x`` holds only those.

        SDPA runs 4-D (so CPU fp32 inference gets its flash kernel). On CPU SDPA has only its slower math path
        where the bias needs a gradient, and its flash kernel loses to two bf16 matmuls at N = 49: there the
        explicit softmax runs, whatever ``fused`` says.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B·nW, nH, N, hd), views
        bias = self.attention_bias(mask, q.dtype)  # (nW, nH, N, N), (nW, 1, N, N), (1, nH, N, N) or None
        if windows is not None and mask is not None:
            bias = bias[windows]
        num_windows = bias.shape[0] if bias is not None else 1
        cpu_sdpa = q.dtype == torch.float32 and (bias is None or not bias.requires_grad)
        if self.fused and (q.device.type != "cpu" or cpu_sdpa):
            if mask is not None:  # 4-D SDPA needs the mask per batch entry
                bias = bias.expand(bw // num_windows, -1, -1, -1, -1).reshape(bw, *bias.shape[1:])
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        else:
            q, k, v = (t.view(bw // num_windows, num_windows, *t.shape[1:]) for t in (q, k, v))
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.add_(bias) if bias is not None else attn
            attn = attn.softmax(dim=-1)  # autocast's policy: fp32 on CUDA; on CPU the input's dtype, as in timm
            out = (F.dropout(attn, self.attn_drop, self.training) @ v).flatten(0, 1)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class Mlp(nn.Module):
    """fc1 → GELU → dropout → fc2 → dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.fc1, Linear) and type(self.act) is nn.GELU and self.act.approximate == "none":
            x = self.fc1(x, gelu=True)  # the GELU fused into the matmul where linear() can
        else:
            x = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(x)))


class WindowBlock(nn.Module):
    """What every Swin block shares: pad (B, H, W, C) to the block's window grid, gather the tokens into (shifted)
    windows and back, and run :meth:`windows_forward` on the whole map at once or, at CPU inference, a group of
    windows at a time (:func:`~swin.models.ops.run_in_pieces`), which gives the same numbers with the
    intermediates in cache.

    Subclasses set ``window_size``, ``shifted`` and ``piece_tokens`` and define :meth:`windows_forward`; they may
    change :meth:`geometry`.
    """

    window_size: int
    shifted: bool
    piece_tokens: int

    def geometry(self, height: int, width: int) -> tuple[int, int, int, tuple[int, int]]:
        """Window side, padded height and width, and per-dimension shift on an H×W map (:func:`window_geometry`)."""
        return self.window_size, *window_geometry(height, width, self.window_size, self.shifted)

    def windows_forward(
        self, tokens: Tensor, positions: slice, window: int, mask: Tensor | None, valid: Tensor | None
    ) -> Tensor:
        """The block on (B, L, C) tokens that lie window by window at ``positions`` of the window order.

        ``mask`` is the block's shift mask (all windows), ``valid`` marks the real (not padding) tokens of the whole
        window order.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        if exporting():  # the same geometry as tensors (window_tensors): sizes may be symbolic
            if type(self).geometry is not WindowBlock.geometry:
                raise NotImplementedError(f"{type(self).__name__} has its own window geometry and cannot be exported yet")
            mask, fwd, inv, valid = window_tensors(h, w, self.window_size, self.shifted, x.device)
            windows = x.reshape(b, h * w, c).index_select(1, fwd)
            out = self.windows_forward(windows, slice(0, fwd.numel()), self.window_size, mask, valid)
            return out.index_select(1, inv).view(b, h, w, c)
        ws, pad_h, pad_w, shift = self.geometry(h, w)
        mask = shift_mask(pad_h, pad_w, ws, shift, x.device) if shift != (0, 0) else None
        fwd, inv, valid = window_index(h, w, ws, (pad_h, pad_w), shift, x.device)
        if valid is not None:
            x = F.pad(x, (0, 0, 0, pad_w - w, 0, pad_h - h))
        tokens = x.reshape(b, pad_h * pad_w, c)

        def block(part: Tensor, positions: slice) -> Tensor:
            return self.windows_forward(part, positions, ws, mask, valid)

        if in_pieces(self, x, self.piece_tokens):  # written back in raster order by index
            out = run_in_pieces(block, tokens, fwd, max(1, self.piece_tokens // (b * ws * ws)) * ws * ws)
        else:  # roll and partition as one gather, and back
            out = gather_tokens(block(gather_tokens(tokens, fwd, inv), slice(0, fwd.numel())), inv, fwd)
        out = out.view(b, pad_h, pad_w, c)
        return out if valid is None else out[:, :h, :w]


class SwinBlock(WindowBlock):
    """Pre-norm block: x + DropPath(W-MSA / SW-MSA(LN(x))), then x + DropPath(MLP(LN(x))), on (B, H, W, C).

    ``rel_pos_bias=False`` drops the relative position bias (the paper's Table 4 ablation).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shifted: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
        piece_tokens: int = 0,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.piece_tokens = piece_tokens
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop, fused_attn, rel_pos_bias)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def windows_forward(
        self, tokens: Tensor, positions: slice, window: int, mask: Tensor | None, valid: Tensor | None
    ) -> Tensor:
        """See :meth:`WindowBlock.windows_forward`; padding tokens enter attention as zeros (after ``norm1``)."""
        b, length, c = tokens.shape
        n = window**2
        y = self.norm1(tokens)
        if valid is not None:
            y = y.masked_fill(~valid[positions].view(1, -1, 1), 0.0)
        windows = slice(positions.start // n, positions.stop // n)
        y = self.attn(y.view(-1, n, c), mask, windows).view(b, length, c)
        x = tokens + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood → 4C (official order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]) → LN → 2C."""

    def __init__(self, dim: int, piece_tokens: int = 0):
        super().__init__()
        self.piece_tokens = piece_tokens
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def _merge(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        if exporting() or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, (w + 1) // 2 * 2 - w, 0, (h + 1) // 2 * 2 - h))  # ceil form, as PatchEmbed
        if in_pieces(self, x, self.piece_tokens):  # bands of output rows
            return in_bands(self._merge, x, 1, max(1, self.piece_tokens // (b * x.shape[2] // 2)), 2)
        return self._merge(x)


class Stage(nn.Module):
    """``depth`` blocks alternating W-MSA and SW-MSA, then an optional PatchMerging (official layout).

    ``forward`` returns the map before the downsample (the dense output) and after it (the next stage's input).
    ``shift=False`` gives every block plain W-MSA (the paper's Table 4 ablation); ``block`` and ``merging`` build
    the blocks (with :class:`SwinBlock`'s positional arguments) and the downsample (``merging(dim, piece_tokens)``).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        downsample: bool = False,
        fused_attn: bool = True,
        piece_tokens: int = 0,
        shift: bool = True,
        block: Callable[..., WindowBlock] = SwinBlock,
        merging: Callable[[int, int], nn.Module] = PatchMerging,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            block(
                dim, num_heads, window_size, shift and i % 2 == 1, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i],
                fused_attn, piece_tokens,
            )
            for i in range(depth)
        )
        self.downsample = merging(dim, piece_tokens) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinTransformer(nn.Module):
    """Swin Transformer V1.

    Args:
        embed_dim: channels C of stage 1 (stage i has C·2^i).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side M.
        patch_size: side of the patch embedding.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives pooled features; None drops the final norm and head (a pure
            dense backbone, e.g. for detection).
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias on the q, k, v projection.
        drop_rate: dropout after the embedding, in MLPs and projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        ape: absolute position embedding (for ``img_size``; interpolated bicubically to other sizes).
        img_size: training image size, used only by ``ape``.
        patch_norm: LayerNorm after the patch embedding.
        out_indices: stages whose normed maps ``forward_features`` returns (adds ``norm{i}`` for each).
        frozen_stages: as the official detection backbone: 0 freezes the patch embedding, 1 also the absolute
            position embedding, k ≥ 2 also stages 0..k-2 (kept in eval mode).
        grad_checkpointing: recompute each block in the backward pass to save memory.
        fused_attn: attention through ``scaled_dot_product_attention`` (False: explicit softmax).
        piece_tokens: CPU inference runs the patch embedding and each patch merging in bands of rows, and each
            block in groups of windows, of about this many tokens, so that the intermediates stay in cache (same
            results; 0: the whole map at once).
        shift: shifted windows in every second block (False: W-MSA everywhere, the paper's Table 4 ablation).
        rel_pos_bias: the relative position bias (False: none, the paper's Table 4 ablation).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int | None = 1000,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        img_size: int = 224,
        patch_norm: bool = True,
        out_indices: Sequence[int] | None = None,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        fused_attn: bool = True,
        piece_tokens: int = 4096,
        shift: bool = True,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        num_stages = len(depths)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.window_size = window_size
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.out_indices = tuple(out_indices) if out_indices is not None else ()
        for i in self.out_indices:
            if not 0 <= i < num_stages:
                raise ValueError(f"out_indices {self.out_indices}: stage {i} does not exist (0..{num_stages - 1})")
        self.frozen_stages = frozen_stages
        self.rel_pos_bias = rel_pos_bias

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm, piece_tokens)
        if ape:
            grid = img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linspace(0, rate, total)
        self.layers = nn.ModuleList(
            Stage(
                dim=embed_dim * 2**i,
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                downsample=i < num_stages - 1,
                fused_attn=fused_attn,
                piece_tokens=piece_tokens,
                shift=shift,
                block=self.block_factory(i),
                merging=self.merging,
            )
            for i in range(num_stages)
        )
        if num_classes is not None:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.norm = None
            self.head = None
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
        self.apply(_init_weights)
        self.set_grad_checkpointing(grad_checkpointing)
        self._freeze_stages()

    #: the downsample between stages, ``merging(dim, piece_tokens)``
    merging: Callable[[int, int], nn.Module] = PatchMerging

    def block_factory(self, stage: int) -> Callable[..., WindowBlock]:
        """What builds the blocks of ``stage``, called with :class:`SwinBlock`'s positional arguments."""
        return functools.partial(SwinBlock, rel_pos_bias=self.rel_pos_bias)

    # -- properties used by heads ---------------------------------------------------------------------------------
    @property
    def out_channels(self) -> list[int]:
        """Channels of the maps ``forward_features`` returns."""
        return [self.embed_dim * 2**i for i in self.out_indices]

    @property
    def out_strides(self) -> list[int]:
        """Strides of the maps ``forward_features`` returns."""
        return [self.patch_size * 2**i for i in self.out_indices]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay besides 1-D parameters (official list)."""
        return {"absolute_pos_embed", "relative_position_bias_table"}

    def _freeze_stages(self) -> None:
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        if self.frozen_stages >= 1 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad_(False)
        if self.frozen_stages >= 2:
            frozen.append(self.pos_drop)
            frozen.extend(self.layers[: self.frozen_stages - 1])
        for module in frozen:
            module.eval()
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinTransformer:
        super().train(mode)
        self._freeze_stages()
        return self

    # -- forward ------------------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(
                f"expected a non-empty image batch of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}"
            )

    def _embed(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            _, h, w, c = x.shape
            pos = self.absolute_pos_embed
            grid = int(pos.shape[1] ** 0.5)
            if (h, w) != (grid, grid):
                pos = pos.transpose(1, 2).reshape(1, c, grid, grid)
                pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
            x = x + pos.view(1, h, w, c)
        return self.pos_drop(x)

    def _on_chosen_kernels(self, x: Tensor, forward: Callable[[Tensor], Any]) -> Any:
        """``forward(x)`` with the linear layers on the kernel path chosen for this model and input kind
        (:func:`swin.models.ops.choose_kernels`)."""
        self._check_input(x)
        choose_kernels(self, x, forward)
        return forward(x)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """NCHW maps of the ``out_indices`` stages, each through its own LayerNorm (ceil semantics: stride 4·2^i)."""
        if not self.out_indices:
            raise ValueError("forward_features needs out_indices, e.g. SwinTransformer(out_indices=(0, 1, 2, 3))")
        return self._on_chosen_kernels(x, self._features)

    def _features(self, x: Tensor) -> list[Tensor]:
        x = self._embed(x)
        outs = []
        last = max(self.out_indices)
        for i, stage in enumerate(self.layers[: last + 1]):
            y, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(y).permute(0, 3, 1, 2).contiguous())
        return outs

    def forward_head(self, x: Tensor) -> Tensor:
        """(B, H, W, C) last-stage tokens → final norm → average pool → head."""
        return self.head(self.norm(x).mean(dim=(1, 2)))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Class logits (pooled features when ``num_classes=0``; the dense maps when ``num_classes=None``)."""
        if self.head is None:
            return self.forward_features(x)
        return self._on_chosen_kernels(x, self._logits)

    def _logits(self, x: Tensor) -> Tensor:
        x = self._embed(x)
        for stage in self.layers:
            _, x = stage(x)
        return self.forward_head(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------
# Variants and factories
# ---------------------------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict] = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "swin_l": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
}


def build_swin(variant: str, **overrides) -> SwinTransformer:
    """A named variant (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l``, also ``t``/``tiny``...; V2: ``swinv2_t``,
    ``swinv2_s``, ``swinv2_b``, ``swinv2_l``) with overrides: the name a task's ``backbone:`` takes.

    ``variant="custom"`` takes every architecture argument from ``overrides``.
    """
    if variant.lower().startswith("swinv2"):
        from swin.models.swinv2 import build_swinv2  # V2 builds on this module

        return build_swinv2(variant, **overrides)
    aliases = {"t": "swin_t", "tiny": "swin_t", "s": "swin_s", "small": "swin_s", "b": "swin_b", "base": "swin_b"}
    aliases.update({"l": "swin_l", "large": "swin_l"})
    key = aliases.get(variant.lower(), variant.lower())
    if key == "custom":
        return SwinTransformer(**overrides)
    if key not in VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r}; choose one of {sorted(VARIANTS)} or 'custom'")
    return SwinTransformer(**{**VARIANTS[key], **overrides})


def swin_t(**overrides) -> SwinTransformer:
    """Swin-T: C=96, depths 2-2-6-2, heads 3-6-12-24 (28.3M parameters with 1000 classes)."""
    return build_swin("swin_t", **overrides)


def swin_s(**overrides) -> SwinTransformer:
    """Swin-S: C=96, depths 2-2-18-2, heads 3-6-12-24 (49.6M parameters)."""
    return build_swin("swin_s", **overrides)


def swin_b(**overrides) -> SwinTransformer:
    """Swin-B: C=128, depths 2-2-18-2, heads 4-8-16-32 (87.8M parameters)."""
    return build_swin("swin_b", **overrides)


def swin_l(**overrides) -> SwinTransformer:
    """Swin-L: C=192, depths 2-2-18-2, heads 6-12-24-48 (196.5M parameters)."""
    return build_swin("swin_l", **overrides)
