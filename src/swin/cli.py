"""LightningCLI in subclass mode: any task in ``swin.tasks`` and any datamodule in ``swin.data`` is a ``class_path``.

Every run logs to TensorBoard and CSV in one version folder under ``trainer.default_root_dir`` (the folder is named
after the SLURM job when there is one, so a requeued job continues in it), keeps the best and the last checkpoint
(see ``BaseTask.configure_callbacks``), each written whole or not at all (:mod:`swin.checkpoints`), and saves its
config, overwriting on resume. ``fit --ckpt_path last`` resumes from the newest whole checkpoint under
``trainer.default_root_dir`` and logs on in that checkpoint's version folder (starting afresh when there is none). ``predict`` hands the
predictions to the prediction writers in ``trainer.callbacks`` (:mod:`swin.writers`), without also keeping them all
in memory unless ``--return_predictions true``. With ``--ckpt_path``, Lightning replaces the model's arguments by
the checkpoint's hyperparameters, except the task's evaluation options (``BaseTask.eval_hparams``: test-time
augmentation, inference mode), which stay as the command line and config give them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from swin.allocator import tune_malloc
from swin.checkpoints import resume_checkpoint, run_folder
from swin.files import atomic_write
from swin.tasks.base import BaseTask

VERSION_ENV = "SWIN_RUN_VERSION"


def run_version(root: str | os.PathLike) -> str:
    """One version name for all loggers and ranks: the SLURM job id, or the next free ``version_N``."""
    spawned = os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"
    if spawned and os.environ.get(VERSION_ENV):  # a DDP child process: use the folder rank 0 chose
        return os.environ[VERSION_ENV]
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_JOB_NAME") not in (None, "bash", "interactive"):
        version = f"slurm_{job}"
    else:
        taken = [int(m.group(1)) for p in Path(root).glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
        version = f"version_{max(taken, default=-1) + 1}"
    return version


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (overwriting), with ``config.yaml`` written whole or not at all."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcasts the folder
        if trainer.is_global_zero and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write(Path(log_dir) / self.config_filename, text)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True


class SwinCLI(LightningCLI):
    """The project's CLI: links the datamodule's classes into the task, sets up loggers, checkpoint IO and resume."""

    _resume_version: str | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        plugins = trainer.plugins or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(_is_checkpoint_io(p) for p in plugins):
            trainer.plugins = [*plugins, Namespace(class_path="swin.checkpoints.AtomicCheckpointIO")]
        if trainer.logger in (None, True):
            root = trainer.default_root_dir or "runs"
            trainer.default_root_dir = root
            version = self._resume_version or run_version(root)
            os.environ[VERSION_ENV] = version  # DDP ranks started later inherit it
            where = dict(save_dir=root, name="", version=version)
            trainer.logger = [
                Namespace(class_path="swin.loggers.ResumableCSVLogger", init_args=Namespace(**where)),
                # no placeholder hp_metric: each (re)start would log it at step 0 again
                Namespace(
                    class_path="swin.loggers.ResumableTensorBoardLogger",
                    init_args=Namespace(**where, default_hp_metric=False),
                ),
            ]

    def _resolve_last(self) -> None:
        """``fit --ckpt_path last``: the newest whole checkpoint under the run root, and its version folder."""
        config = self.config.get(self.config.get("subcommand") or "", None)
        if self.config.get("subcommand") != "fit" or config.get("ckpt_path") != "last":
            return
        root = config.trainer.default_root_dir or "runs"
        found = resume_checkpoint(root)
        if found is None:
            rank_zero_info(f"[swin] --ckpt_path last: no checkpoint under {root}, starting afresh")
        else:
            rank_zero_info(f"[swin] --ckpt_path last: resuming from {found}")
            self._resume_version = run_folder(found)
        config.ckpt_path = None if found is None else str(found)

    def _parse_ckpt_path(self) -> None:
        """Lightning's checkpoint hyperparameters over the config, but the task's ``eval_hparams`` as configured."""
        self._resolve_last()
        model = self.config[self.config.subcommand].model if self.config.get("subcommand") else None
        if not isinstance(model, Namespace) or not model.get("class_path"):
            return super()._parse_ckpt_path()
        names = getattr(import_object(model.class_path), "eval_hparams", ())
        kept = {name: model.init_args[name] for name in names if name in (model.get("init_args") or {})}
        super()._parse_ckpt_path()
        model = self.config[self.config.subcommand].model
        for name, value in kept.items():
            model.init_args[name] = value
        if model.get("dict_kwargs"):
            for name in kept:
                model.dict_kwargs.pop(name, None)

    def before_fit(self) -> None:
        """Gradient checkpointing asks for memory over speed: glibc's malloc then hands each freed buffer back
        (``SWIN_MALLOC=lean`` unless ``SWIN_MALLOC`` is set; :mod:`swin.allocator`)."""
        if any(getattr(m, "grad_checkpointing", False) for m in self.model.modules()):
            rank_zero_info(f"[swin] gradient checkpointing: malloc {tune_malloc('lean')}")

    def predict(self, **kwargs: Any) -> Any:
        """``trainer.predict``; with a prediction writer among the callbacks, the predictions are not also returned."""
        if kwargs.get("return_predictions") is None:
            writers = [c for c in self.trainer.callbacks if isinstance(c, BasePredictionWriter)]
            kwargs["return_predictions"] = not writers
        return self.trainer.predict(**kwargs)


def _is_checkpoint_io(plugin: Any) -> bool:
    """Whether a ``trainer.plugins`` entry (an object, a class path or a ``class_path`` namespace) is a CheckpointIO."""
    if isinstance(plugin, Namespace):
        plugin = plugin.get("class_path")
    if isinstance(plugin, str):
        try:
            plugin = import_object(plugin)
        except (ImportError, AttributeError, ValueError):
            return False
    return isinstance(plugin, CheckpointIO) or (isinstance(plugin, type) and issubclass(plugin, CheckpointIO))


def main(args: list[str] | None = None, run: bool = True) -> SwinCLI:
    """Entry point of ``cli.py``, ``python -m swin`` and the ``swin`` command (``run=False``: only instantiate).

    Sets glibc's malloc to keep freed tensor buffers between steps first (``SWIN_MALLOC``, :mod:`swin.allocator`)."""
    tune_malloc()
    return SwinCLI(
        BaseTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
