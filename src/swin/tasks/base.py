"""What every task shares: the network and its pretrained backbone, parameter groups, schedules, learning-rate scaling.

Subclasses implement ``configure_models`` (set ``self.model``, the whole network: Swin and the task's head),
``configure_losses`` and ``configure_metrics``, and the steps, which read dict batches (``image`` plus ``label``,
``target`` or ``mask``). Optimisation lives here once: fused AdamW with no weight decay on 1-D
parameters, biases, relative position tables and the absolute position embedding; optional layer-wise
learning-rate decay of the backbone; a linear warm-up followed by a cosine, poly or step schedule, stepped every
optimiser step; the learning rate is given per ``lr_batch_size`` images and scaled by the real global batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from torch import nn

from swin.callbacks import ResumableLogs, ResumeData, SLURMRequeue, StepSeed
from swin.checkpoints import LastCheckpoint
from swin.models import SwinTransformer, build_swin, load_pretrained

Schedule = Literal["cosine", "poly", "step", "constant"]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 1e-3,
    schedule: Schedule = "cosine",
    min_ratio: float = 0.0,
    power: float = 1.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``warmup_start`` to 1 over ``warmup_steps``, then: ``cosine`` to ``min_ratio`` at
    ``total_steps``; ``poly`` (1 - t)^power down to ``min_ratio``; ``step``: × ``gamma`` at each milestone step;
    ``constant``. For ``cosine`` and ``poly``, t runs over the steps after warm-up (the official Swin / mmseg rule).
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return min_ratio + (1.0 - min_ratio) * (1.0 - t) ** power
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, poly, step or constant")


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth of a backbone parameter for layer-wise decay: 0 for the embedding, 1.. for blocks, last for the rest."""
    if name.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths[: stage + 1])  # downsample: with the last block of its stage
    return sum(depths) + 1


def param_groups(
    module: nn.Module,
    weight_decay: float,
    backbone: SwinTransformer | None = None,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D parameters, biases and names containing a ``no_weight_decay`` keyword.

    With ``layer_decay``, backbone parameters get ``lr_scale = layer_decay ** (L + 1 - layer_id)``; the rest
    (heads) scale 1. Each group carries ``lr_scale``, applied by the task's schedule.
    """
    skip = backbone.no_weight_decay() if backbone is not None else set()
    depths = [len(s.blocks) for s in backbone.layers] if backbone is not None else []
    in_backbone = {}
    if backbone is not None:
        in_backbone = {id(p): n for n, p in backbone.named_parameters()}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in skip)
        scale = 1.0
        if layer_decay is not None and id(p) in in_backbone:
            scale = layer_decay ** (sum(depths) + 1 - swin_layer_id(in_backbone[id(p)], depths))
        groups.setdefault((no_decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        for (no_decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]


class BaseTask(LightningModule):
    """Shared base of the classification, detection and segmentation tasks.

    Args:
        backbone: Swin variant (``swin_t``, ``swin_s``, ``swin_b``, ``swin_l`` or ``custom``).
        backbone_kwargs: overrides of the backbone constructor (``drop_path_rate``, ``window_size``, ...).
        pretrained: checkpoint for the backbone, any format ``swin.models.load_pretrained`` reads.
        lr: peak learning rate for a global batch of ``lr_batch_size`` images.
        lr_batch_size: the batch ``lr`` is given for; the real global batch scales it linearly (None: no scaling).
        weight_decay: AdamW weight decay (not on norms, biases, position tables).
        betas: AdamW betas.
        eps: AdamW epsilon.
        layer_decay: layer-wise learning-rate decay of the backbone (fine-tuning), None for off.
        warmup_epochs: linear warm-up length in epochs (fractions allowed); added to ``warmup_steps``.
        warmup_steps: linear warm-up length in optimiser steps.
        warmup_start: warm-up starts at this fraction of the learning rate.
        schedule: after warm-up: ``cosine``, ``poly``, ``step`` or ``constant``.
        min_lr_ratio: where cosine and poly end, as a fraction of the learning rate.
        poly_power: exponent of the poly schedule.
        milestones: epochs at which the step schedule multiplies the learning rate by ``gamma``.
        gamma: factor of the step schedule.
        checkpoint_every_n_steps: refresh ``last.ckpt`` also every this many optimiser steps, not only after every
            validation, which bounds what a killed run loses.
        **removed: arguments of older versions (``removed_hparams``), which their checkpoints still carry: ignored
            with a warning; anything else is an error.
    """

    def __init__(
        self,
        backbone: str = "swin_t",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        lr: float = 1e-3,
        lr_batch_size: int | None = 1024,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        warmup_start: float = 1e-3,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        poly_power: float = 1.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        checkpoint_every_n_steps: int | None = None,
        **removed: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(removed) - set(self.removed_hparams))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}")
        for name in removed:  # saved with older checkpoints, which --ckpt_path passes back
            rank_zero_warn(f"{type(self).__name__}: {name!r} moved to {self.removed_hparams[name]}; ignored here")
        self.save_hyperparameters(ignore=list(removed))  # the subclass's arguments too
        names, count = self.hparams.get("class_names"), self.hparams.get("num_classes")
        if names is not None and len(names) != count:
            raise ValueError(f"class_names has {len(names)} names for num_classes={count}")
        self.model: nn.Module
        self.configure_models()
        if pretrained:
            load_pretrained(self.backbone, pretrained)
        self.configure_losses()
        self.configure_metrics()

    #: the validation metric that picks the best checkpoint
    monitor: str = "val/loss"
    monitor_mode: Literal["min", "max"] = "min"
    #: state-dict prefixes of checkpoints written before the network moved to ``self.model`` (old → new)
    legacy_prefixes: dict[str, str] = {}
    #: arguments older versions took, and where they went
    removed_hparams: dict[str, str] = {}
    #: evaluation options that the command line decides over the hyperparameters of a ``--ckpt_path`` checkpoint
    eval_hparams: tuple[str, ...] = ()

    @property
    def backbone(self) -> SwinTransformer:
        """The Swin inside ``self.model`` (what ``pretrained`` loads into and layer decay groups)."""
        return next(m for m in self.model.modules() if isinstance(m, SwinTransformer))

    @property
    def class_names(self) -> list[str]:
        """The class names (``class_names``, else the class indices as strings), for predictions."""
        return list(self.hparams.get("class_names") or map(str, range(self.hparams.num_classes)))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rename the keys of checkpoints from before ``self.model`` (see ``legacy_prefixes``)."""
        state = checkpoint.get("state_dict", {})
        for old, new in self.legacy_prefixes.items():
            for key in [k for k in state if k.startswith(old)]:
                state[new + key[len(old) :]] = state.pop(key)

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def configure_models(self) -> None:
        """Build ``self.model``, the task's whole network."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Build the loss modules."""

    def configure_metrics(self) -> None:
        """Build the torchmetrics collections."""

    def build_backbone(self, **task_kwargs: Any) -> SwinTransformer:
        """The configured Swin variant with the user's overrides and the task's own arguments."""
        kwargs = {**(self.hparams.backbone_kwargs or {}), **task_kwargs}
        return build_swin(self.hparams.backbone, **kwargs)

    def configure_callbacks(self) -> list[Callback]:
        """The best checkpoint by ``monitor``, ``last.ckpt`` after every validation (and every
        ``checkpoint_every_n_steps``), SLURM requeue on SIGUSR1, logs that continue on resume and, under a global
        seed, the per-step reseeding that makes a resumed run draw what an uninterrupted one draws."""
        best = ModelCheckpoint(
            monitor=self.monitor,
            mode=self.monitor_mode,
            filename="best-epoch{epoch:03d}-step{step}",
            auto_insert_metric_name=False,
        )
        # Lightning's save_last refreshes last.ckpt only when a best checkpoint is saved: a second callback does it
        last = LastCheckpoint(every_n_train_steps=self.hparams.checkpoint_every_n_steps)
        callbacks = [best, last, SLURMRequeue(), ResumeData(), ResumableLogs()]
        if "PL_GLOBAL_SEED" in os.environ:
            callbacks.append(StepSeed(int(os.environ["PL_GLOBAL_SEED"])))
        return callbacks

    # -- optimisation ---------------------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Images per optimiser step: per-device batch × devices × nodes × gradient accumulation."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("the datamodule must expose batch_size so that the learning rate can be scaled")
        return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches

    def scaled_lr(self) -> float:
        """``lr`` × global batch / ``lr_batch_size``."""
        hp = self.hparams
        if hp.lr_batch_size is None:
            return hp.lr
        return hp.lr * self.global_batch_size() / hp.lr_batch_size

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        lr = self.scaled_lr()
        groups = param_groups(self, hp.weight_decay, self.backbone, hp.layer_decay)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        # the fused kernel: one pass over all parameters (Swin-T on CPU: 12 ms a step instead of 49); it unscales fp16
        # gradients itself, so not where fp16's grad scaler must unscale them before clipping
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None and self.trainer.gradient_clip_val
        fused = not scaled and all(
            p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"]
        )
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused or None)

        total = int(self.trainer.estimated_stepping_batches)
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        steps_per_epoch = total / max_epochs if max_epochs else 0.0
        if (hp.warmup_epochs or hp.milestones) and not steps_per_epoch:
            raise ValueError("warmup_epochs and milestones are in epochs: set trainer.max_epochs, or use warmup_steps")
        warmup = int(hp.warmup_steps + round(hp.warmup_epochs * steps_per_epoch))
        milestones = [round(m * steps_per_epoch) for m in hp.milestones]
        rank_zero_info(
            f"[swin] global batch {self.global_batch_size() if hp.lr_batch_size else '?'}: lr {lr:.3g} "
            f"({hp.lr:g} per {hp.lr_batch_size}), {total} steps, warm-up {warmup}, schedule {hp.schedule}"
        )

        def factor(step: int) -> float:
            return lr_factor(
                step, total, warmup, hp.warmup_start, hp.schedule, hp.min_lr_ratio, hp.poly_power, milestones, hp.gamma
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Lightning's clipping, also for the fused AdamW under bf16 autocast: Lightning refuses any optimizer that
        unscales gradients itself, but without a grad scaler (bf16) there is nothing to unscale."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
