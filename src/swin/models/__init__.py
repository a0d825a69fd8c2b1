"""Pure PyTorch models: the Swin backbone, dense heads and checkpoint loading (no Lightning here)."""

from swin.models.swin import (
    VARIANTS,
    SwinTransformer,
    build_swin,
    count_flops,
    swin_b,
    swin_l,
    swin_s,
    swin_t,
)

__all__ = ["VARIANTS", "SwinTransformer", "build_swin", "count_flops", "swin_b", "swin_l", "swin_s", "swin_t"]
