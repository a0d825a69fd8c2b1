"""CPU fast paths of the backbone: they change the speed, never the numbers.

What they buy (docs/benchmarks.md): linear layers through oneDNN instead of the default BLAS (fp32 and bf16, the MLP's
GELU fused into fc1 at inference, weights cast and pre-packed once while autograd is off), a gather-only backward
for token permutations, and piecewise execution: at inference a block runs a few windows at a time, and the patch
embedding and patch merging a band of rows at a time, so that intermediates stay in cache and the time per pixel
stays flat as images grow.

When they are active: oneDNN only for CPU tensors, outside tracing, ``torch.export`` and ONNX export (which see
plain ``F.linear``), and only where it is faster on this machine, one path for a whole model (:func:`choose_kernels`):
the first time a model of an architecture runs (inference or training, dtype, input tokens rounded to a power of
two, thread count), its forward (and backward) is timed with every linear on ATen's kernels and on oneDNN's, and
oneDNN is kept only if it is at least 3 % faster. The choices are cached for the process and in
``~/.cache/swin/kernels.json`` per CPU model and torch version, so that later runs (a resumed one too) take the same
kernels. ``SWIN_KERNELS=aten|onednn`` forces one path (default ``auto``); ``SWIN_KERNEL_CACHE=PATH`` moves the cache
file, ``SWIN_KERNEL_CACHE=`` keeps it in memory only. Pieces and bands only for CPU inference (eval mode, no
autograd, not compiling). On CUDA every function here is the plain PyTorch computation; under ``torch.compile`` the
linears take oneDNN as opaque custom ops (no timing while tracing).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Linear", "linear", "gather_tokens", "in_pieces", "in_bands", "run_in_pieces", "exporting", "kernel_mode",
    "kernel_choices", "use_kernels", "choose_kernels",
]

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def exporting() -> bool:
    """Inside ``torch.export`` (also the ONNX exporter's), a TorchScript trace or a TorchScript-based ONNX export."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _use_onednn(x: Tensor) -> bool:
    """CPU tensors, outside tracing and export."""
    return _ONEDNN and x.device.type == "cpu" and not exporting()


# ---------------------------------------------------------------------------------------------------------------
# Which kernel path a model's linear layers take on this machine: timed once per model and input kind, cached
# ---------------------------------------------------------------------------------------------------------------

KERNEL_MODES = ("auto", "onednn", "aten")
_TIMING = 4  # how the kernels are timed: a change here invalidates the cached choices
_MARGIN = 0.97  # oneDNN must take at most 97 % of ATen's time to be chosen
_choices: dict[str, bool] = {}  # choice key -> use oneDNN (this process, merged with the cache file's)
_cache_loaded: tuple | None = None  # (SWIN_KERNEL_CACHE,) that _choices was filled from
_forced: str | None = None  # set by use_kernels()
_timing = False  # a model is being timed: its forwards inside take the path set on its layers


def kernel_mode() -> str:
    """The kernel path: :func:`use_kernels`'s, else ``SWIN_KERNELS``: ``auto`` (timed choice, the default),
    ``onednn`` or ``aten``."""
    mode = _forced or os.environ.get("SWIN_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"SWIN_KERNELS={mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Run the linear layers inside on one path (``auto``, ``onednn`` or ``aten``), whatever ``SWIN_KERNELS`` says."""
    global _forced
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel path {mode!r}: expected one of {', '.join(KERNEL_MODES)}")
    outer, _forced = _forced, mode
    try:
        yield
    finally:
        _forced = outer


@functools.cache
def _machine() -> str:
    """The CPU model, torch's kernel level and version: choices made on one machine are not reused on another."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | timing {_TIMING}"


def _cache_file() -> Path | None:
    path = os.environ.get("SWIN_KERNEL_CACHE")
    if path is None:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swin" / "kernels.json"
    return Path(path) if path else None


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"kernel cache {path} is unreadable ({err}); timing the kernels again", stacklevel=3)
        return {}


def kernel_choices() -> dict[str, str]:
    """The kernels chosen so far on this machine, ``{choice key: "onednn" | "aten"}``."""
    _load_cache()
    return {key: "onednn" if fast else "aten" for key, fast in sorted(_choices.items())}


def _load_cache() -> None:
    global _cache_loaded
    where = (os.environ.get("SWIN_KERNEL_CACHE"),)
    if _cache_loaded != where:
        path = _cache_file()
        _choices.clear()
        if path is not None:
            _choices.update(_read_cache(path).get(_machine(), {}))
        _cache_loaded = where


@contextlib.contextmanager
def _cache_locked() -> Iterator[Path | None]:
    """The cache file, locked against the other processes of this machine (DDP ranks, a resumed run) while one
    process times a model: the first choice written is the one every process takes."""
    path = _cache_file()
    if path is None:
        yield None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - held for the block
    except OSError as err:
        warnings.warn(f"kernel choices are kept for this process only: {err}", stacklevel=4)
        yield None
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path


def _decide(key: str, time_paths: Callable[[], tuple[float, float]]) -> bool:
    """The choice another process wrote meanwhile, else time both paths (``time_paths``: ATen's and oneDNN's
    seconds) and write this one's."""
    with _cache_locked() as path:
        data = _read_cache(path) if path is not None else {}
        fast = data.get(_machine(), {}).get(key)
        if fast is None:
            aten_s, onednn_s = time_paths()
            fast = onednn_s < _MARGIN * aten_s
            if path is not None:
                from swin.files import atomic_write

                data.setdefault(_machine(), {})[key] = fast
                try:
                    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
                except OSError as err:
                    warnings.warn(f"kernel choices are kept for this process only: {err}", stacklevel=4)
    _choices[key] = fast
    return fast


def _set_path(model: nn.Module, onednn: bool) -> None:
    """Every :class:`Linear` of ``model`` on oneDNN's kernels (True) or ATen's (False)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.onednn = onednn


def _signature(model: nn.Module) -> str:
    """The model's class and its linear layers' shapes, in short: one choice per architecture."""
    shapes = [tuple(m.weight.shape) + (m.bias is not None,) for m in model.modules() if isinstance(m, Linear)]
    digest = hashlib.sha1(repr(shapes).encode()).hexdigest()[:10]
    return f"{type(model).__name__} {len(shapes)} linears {digest}"


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP wraps parts of ``model``: its forward and backward drive collectives and its own state machine,
    which an extra timed forward and backward inside the step would upset."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _time_model(model: nn.Module, forward: Callable[[Tensor], object], x: Tensor, grad: bool) -> tuple[float, float]:
    """Seconds of ``forward(x)`` (and its backward when ``grad``: gradients returned, not accumulated) with every
    linear on ATen's and on oneDNN's kernels: after a warm-up of each, the least of three alternating samples."""
    global _timing
    inputs = [t for t in (x, *model.parameters()) if t.requires_grad] if grad else []

    def run() -> float:
        start = time.perf_counter()
        out = forward(x)
        if inputs:
            outs = [out] if isinstance(out, Tensor) else list(out)
            torch.autograd.grad([o.float().sum() for o in outs], inputs, allow_unused=True)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    # its own random stream: dropout and drop path draw from the global one, which a timing must not shift
    with torch.random.fork_rng(devices=[]):
        _timing = True
        try:
            for onednn in (False, True, True, False, False, True, True, False):
                _set_path(model, onednn)
                times[onednn].append(run())
        finally:
            _timing = False
    return min(times[False][1:]), min(times[True][1:])


def choose_kernels(model: nn.Module, x: Tensor, forward: Callable[[Tensor], object]) -> None:
    """Put ``model``'s linear layers on the faster kernel path for this call, one path for the whole model.

    The first time a model of this architecture runs on this machine with this kind of input (inference or
    training, dtype, tokens of the input rounded down to a power of two, thread count), ``forward(x)`` (with its
    backward in training) is timed with every linear on ATen's kernels and on oneDNN's, and oneDNN is kept only if
    it takes at most 97 % of ATen's time. One path for all layers: switching kernels between consecutive layers
    costs time of its own. Nothing is timed for CUDA tensors, while tracing, exporting or compiling, inside FSDP or
    when ``SWIN_KERNELS`` / :func:`use_kernels` force a path.
    """
    if _timing or not _ONEDNN or x.device.type != "cpu" or exporting() or torch.compiler.is_compiling():
        return
    if kernel_mode() != "auto":
        return
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in _ONEDNN_DTYPES:
        return
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters()))
    tokens = x.numel() // max(x.shape[1], 1)
    key = (f"{'train' if grad else 'infer'} {str(dtype).removeprefix('torch.')} {_signature(model)} "
           f"tokens~{1 << max(0, tokens.bit_length() - 1)} threads={torch.get_num_threads()}")  # fmt: skip
    _load_cache()
    onednn = _choices.get(key)
    if onednn is None:
        if _sharded(model):
            return
        onednn = _decide(key, lambda: _time_model(model, forward, x, grad))
    _set_path(model, onednn)


def _take_onednn(onednn: bool) -> bool:
    """Whether this call takes oneDNN: forced by ``SWIN_KERNELS`` / :func:`use_kernels`, else ``onednn``."""
    if torch.compiler.is_compiling():  # oneDNN, opaque to the compiler
        return True
    mode = kernel_mode()
    return onednn if mode == "auto" else mode == "onednn"


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


def _onednn_fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return x.dtype in _ONEDNN_DTYPES and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False, onednn: bool = False) -> Tensor:
    """``F.linear``, then exact GELU when ``gelu``; with CPU autocast semantics.

    With ``onednn`` (or ``SWIN_KERNELS=onednn``), on CPU in fp32 / bf16, through oneDNN's kernels (up to twice as fast
    as the default BLAS on some AVX-512 machines, slower on others: :func:`choose_kernels` picks per machine);
    without autograd the GELU is then fused into the matmul.
    """
    if _use_onednn(x):
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if _onednn_fits(x, weight, bias) and _take_onednn(onednn):
            grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
            if not (gelu and grad):
                return _onednn_linear(x, weight, bias, gelu)
            return F.gelu(_onednn_linear(x, weight, bias, False))
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, state dict and numerics), on oneDNN's kernels
    when ``onednn`` is set (by :func:`choose_kernels` for the whole model; ATen's otherwise).

    While autograd is off on CPU it keeps its weights cast (and packed in oneDNN's layout on the oneDNN path; one
    copy, rebuilt when a parameter changes, dropped by ``train()``), saving the per-call cast and reorder.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.onednn = False
        self._packed: tuple | None = None

    def train(self, mode: bool = True) -> Linear:
        self._packed = None
        return super().train(mode)

    def _inference_inputs(self, x: Tensor, gelu: bool) -> tuple[Tensor, Tensor, Tensor | None, bool] | None:
        """Without autograd on CPU: ``x``, weight and bias cast once (the weight packed where oneDNN is chosen) and
        whether oneDNN is chosen for this call; else None."""
        weight, bias = self.weight, self.bias
        if not _use_onednn(x) or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype not in _ONEDNN_DTYPES or weight.dtype not in _ONEDNN_DTYPES:
            return None
        key = (weight.data_ptr(), weight._version, -1 if bias is None else bias._version, dtype)
        if self._packed is None or self._packed[0] != key:
            cast_bias = None if bias is None else bias.to(dtype)
            self._packed = (key, weight.to(dtype), cast_bias, None)
        _, cast_weight, cast_bias, packed = self._packed
        x = x.to(dtype)
        if not _take_onednn(self.onednn):
            return x, cast_weight, cast_bias, False
        if packed is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(cast_weight, x.numel() // x.shape[-1])
            self._packed = (key, cast_weight, cast_bias, packed)
        return x, packed, cast_bias, True

    def forward(self, x: Tensor, gelu: bool = False) -> Tensor:
        """:func:`linear` of ``x``, then exact GELU when ``gelu``."""
        inputs = self._inference_inputs(x, gelu)
        if inputs is None:
            return linear(x, self.weight, self.bias, gelu=gelu, onednn=self.onednn)
        x, weight, bias, onednn = inputs
        if onednn:
            return _onednn_linear(x, weight, bias, gelu)
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y


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
    parts = []
    for r in range(0, rows, band):
        parts.append(fn(x.narrow(dim, r * scale, min(band, rows - r) * scale)))
    return torch.cat(parts, 1)


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
