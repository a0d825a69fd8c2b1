"""Pieces the fault tests put into ``cli.py fit`` runs (imported there through ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from lightning.pytorch import Callback

from swin.checkpoints import AtomicCheckpointIO
from swin.files import atomic_write


class KillAt(Callback):
    """SIGKILL this process at the start of the training batch of global step ``step`` (with ``validation``: at the
    start of the validation after ``step`` steps)."""

    def __init__(self, step: int, validation: bool = False) -> None:
        self.step = step
        self.validation = validation

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.validation:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == self.step and self.validation and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(Callback):
    """Append ``global_step path path ...`` for every training batch to ``output`` (unbuffered, survives a kill)."""

    def __init__(self, output: str) -> None:
        self.output = output

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        with open(self.output, "a") as f:
            f.write(f"{trainer.global_step} {' '.join(batch['path'])}\n")


class SlowCheckpointIO(AtomicCheckpointIO):
    """The project's checkpoint IO, with each write dragged over ``seconds`` (written in pieces): a kill at a random
    moment then often lands inside one."""

    def __init__(self, seconds: float = 0.3) -> None:
        super().__init__()
        self.seconds = seconds

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()

        def write(f: Any, pieces: int = 10) -> None:
            step = len(data) // pieces + 1
            for i in range(0, len(data), step):
                f.write(data[i : i + step])
                f.flush()
                time.sleep(self.seconds / pieces)

        atomic_write(path, write)
