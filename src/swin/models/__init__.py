"""Pure PyTorch models: the Swin backbone, dense heads and detectors, checkpoint loading (no Lightning here)."""

from swin.models.cascade import CascadeRCNN, build_cascade
from swin.models.detector import SwinFPN, build_detector
from swin.models.flops import count_flops
from swin.models.swin import VARIANTS, SwinTransformer, build_swin, swin_b, swin_l, swin_s, swin_t
from swin.models.swinv2 import (
    VARIANTS_V2,
    SwinTransformerV2,
    build_swinv2,
    swinv2_b,
    swinv2_l,
    swinv2_s,
    swinv2_t,
)
from swin.models.upernet import FCNHead, Segmentor, UperNetHead, build_upernet
from swin.models.weights import CheckpointError, detect_format, load_pretrained, read_state_dict, to_official

__all__ = [
    "VARIANTS",
    "SwinTransformer",
    "build_swin",
    "swin_t",
    "swin_s",
    "swin_b",
    "swin_l",
    "VARIANTS_V2",
    "SwinTransformerV2",
    "build_swinv2",
    "swinv2_t",
    "swinv2_s",
    "swinv2_b",
    "swinv2_l",
    "count_flops",
    "load_pretrained",
    "read_state_dict",
    "detect_format",
    "to_official",
    "CheckpointError",
    "SwinFPN",
    "build_detector",
    "CascadeRCNN",
    "build_cascade",
    "Segmentor",
    "UperNetHead",
    "FCNHead",
    "build_upernet",
]
