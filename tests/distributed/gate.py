"""A test-only callback for the preemption test: hold training at one step until SLURM's signal has arrived.

Imported by ``cli.py`` in the SLURM job (``--trainer.callbacks+=...``), so that the signal reaches the job at a known
step however fast or slow the machine is.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback

from swin.callbacks import SLURMRequeue


class HoldUntilSignalled(Callback):
    """At the end of step ``step``, write ``marker.<rank>`` and wait (at most ``timeout`` s) for SLURMRequeue's flag."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.step:
            return
        requeue = next(c for c in trainer.callbacks if isinstance(c, SLURMRequeue))
        Path(f"{self.marker}.{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.timeout
        while not requeue._signalled:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no SIGUSR1 within {self.timeout:.0f} s of step {self.step}")
            time.sleep(0.05)
