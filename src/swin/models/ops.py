"""CPU fast paths of the backbone: they change the speed, never the numbers.

What they buy (docs/benchmarks.md): linear layers through oneDNN instead of the default BLAS (fp32 and bf16, the MLP's
GELU fused into fc1 at inference, weights cast and pre-packed once while autograd is off), a gather-only backward
for token permutations, and piecewise execution: at inference a block runs a few windows at a time, and the patch
embedding and patch merging a band of rows at a time, so that intermediates stay in cache and the time per pixel
stays flat as images grow.

When they are active: oneDNN only for CPU tensors, outside tracing, ``torch.export`` and ONNX export (which see
plain ``F.linear``); pieces and bands only for CPU inference (eval mode, no autograd, not compiling). Elsewhere
(CUDA, training, ``torch.compile``) every function here is the plain PyTorch computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "gather_tokens", "in_pieces", "in_bands", "run_in_pieces", "exporting"]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def exporting() -> bool:
    """Inside ``torch.export`` (also the ONNX exporter's), a TorchScript trace or a TorchScript-based ONNX export."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _use_onednn(x: Tensor) -> bool:
    """CPU tensors, outside tracing and export."""
    return _ONEDNN and x.device.type == "cpu" and not exporting()


# ---------------------------------------------------------------------------------------------------------------
# oneDNN linear layers as custom ops: torch.compile keeps them as opaque calls (Inductor lowers oneDNN linears only
# on frozen weights)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("swin::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    """x @ weightᵀ + bias, then exact GELU when ``gelu``, with oneDNN's kernel (``weight`` may be a strided view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("swin::onednn_mm", mutates_args=())
def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D tensors through oneDNN, with the wider side as its output features (its fast case)."""
    if b.shape[1] >= a.shape[0]:
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(b.t(), a, None, "none", [], "").t().contiguous()


@_onednn_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


def _onednn_linear_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, gelu = inputs
    ctx.save_for_backward(x, weight, bias if gelu else None)
    ctx.has_bias, ctx.gelu = bias is not None, gelu


def _onednn_linear_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """fp32 matmuls through oneDNN too (ATen's bf16 matmuls already are); with ``gelu`` the pre-activation is
    recomputed (``linear`` itself splits the GELU off whenever autograd records, so this costs nothing there)."""
    x, weight, bias = ctx.saved_tensors
    if ctx.gelu:
        grad = torch.ops.aten.gelu_backward(grad, _onednn_linear(x, weight, bias, False))
    grad2d = grad.reshape(-1, grad.shape[-1])
    fp32 = grad.dtype == torch.float32
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _onednn_linear(grad, weight.t(), None, False) if fp32 else grad @ weight
    if ctx.needs_input_grad[1]:
        x2d = x.reshape(-1, x.shape[-1])
        grad_w = _onednn_mm(grad2d.t(), x2d) if fp32 else grad2d.t() @ x2d
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad2d.sum(0)
    return grad_x, grad_w, grad_b, None


_onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """``F.linear``, then exact GELU when ``gelu``; with CPU autocast semantics.

    On CPU in fp32 / bf16 it runs through oneDNN, about twice as fast as the default BLAS in fp32 on AVX-512 machines
    (and a little faster than ATen's bf16 ``addmm``); without autograd the GELU is fused into the matmul.
    """
    if _use_onednn(x):
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
            if not (gelu and grad):
                return _onednn_linear(x, weight, bias, gelu)
            return F.gelu(_onednn_linear(x, weight, bias, False))
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, state dict and numerics).

    While autograd is off on CPU it keeps its weights cast and packed in oneDNN's layout (one copy, rebuilt when a
    parameter changes, dropped by ``train()``), saving the per-call cast and reorder.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: tuple | None = None

    def train(self, mode: bool = True) -> Linear:
        self._packed = None
        return super().train(mode)

    def _inference_weights(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        weight, bias = self.weight, self.bias
        if not _use_onednn(x) or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return weight, bias
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype not in _ONEDNN_DTYPES or weight.dtype not in _ONEDNN_DTYPES:
            return weight, bias
        key = (weight.data_ptr(), weight._version, -1 if bias is None else bias._version, dtype)
        if self._packed is None or self._packed[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), x.numel() // x.shape[-1])
            self._packed = (key, packed, None if bias is None else bias.to(dtype))
        return self._packed[1], self._packed[2]

    def forward(self, x: Tensor, gelu: bool = False) -> Tensor:
        """:func:`linear` of ``x``, then exact GELU when ``gelu``."""
        return linear(x, *self._inference_weights(x), gelu=gelu)


# ---------------------------------------------------------------------------------------------------------------
# Token permutations and piecewise execution
# ---------------------------------------------------------------------------------------------------------------


def gather_tokens(x: Tensor, index: Tensor, inverse: Tensor | None = None) -> Tensor:
    """``x.index_select(1, index)``; give ``inverse`` when ``index`` is a permutation, for a gather-only backward."""
    return x.index_select(1, index) if inverse is None else _TokenGather.apply(x, index, inverse)


class _TokenGather(torch.autograd.Function):
    """``x.index_select(1, index)`` for a permutation ``index``: the backward gathers by ``inverse`` (no scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def in_pieces(module: nn.Module, x: Tensor, piece_tokens: int) -> bool:
    """Whether ``module`` maps ``x`` a piece at a time: CPU inference (eval mode, no autograd, not compiling)."""
    return (
        piece_tokens > 0
        and x.device.type == "cpu"
        and not module.training
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def in_bands(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int, band: int, scale: int = 1) -> Tensor:
    """``fn(x)`` for a per-token ``fn`` that maps ``scale`` rows of ``x`` (along ``dim``) to one output row of
    its dim 1, computed ``band`` output rows at a time and concatenated."""
    rows = x.shape[dim] // scale
    return torch.cat([fn(x.narrow(dim, r * scale, min(band, rows - r) * scale)) for r in range(0, rows, band)], 1)


def run_in_pieces(fn: Callable[[Tensor, slice], Tensor], tokens: Tensor, order: Tensor, piece: int) -> Tensor:
    """``out[:, order] = fn(tokens[:, order], slice(0, len(order)))``, ``piece`` positions of ``order`` at a time.

    ``fn(part, positions)`` gets the tokens ``tokens[:, order[positions]]`` and must treat each piece on its own
    (e.g. whole windows when ``order`` lists tokens window by window and ``piece`` is a multiple of the window);
    each result is written straight back to its places in ``out``, which has the shape of ``tokens`` and the
    dtype of ``fn``'s results.
    """
    out = None
    for start in range(0, order.numel(), piece):
        index = order[start : start + piece]
        part = fn(tokens.index_select(1, index), slice(start, start + index.numel()))
        if out is None:
            out = tokens.new_empty(tokens.shape, dtype=part.dtype)
        out.index_copy_(1, index, part)
    return out
