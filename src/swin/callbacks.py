"""Training callbacks shared by every task."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def next_hpc_checkpoint(folder: str | os.PathLike) -> Path:
    """``folder/hpc_ckpt_<N+1>.ckpt``: Lightning resumes a requeued SLURM job from the highest N in its root dir."""
    found = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in Path(folder).glob("hpc_ckpt_*.ckpt"))
    return Path(folder) / f"hpc_ckpt_{max((int(m.group(1)) for m in found if m), default=0) + 1}.ckpt"


class SLURMRequeue(Callback):
    """Save an HPC checkpoint and requeue the job when SLURM signals the end of its time (``--signal=SIGUSR1@90``).

    Replaces Lightning's own handler, which saves inside the signal handler wherever training happens to be: under
    DDP the ranks then meet in different collectives and hang, and a checkpoint taken in the middle of a step resumes
    with a wrong epoch and step count. Here the signal only sets a flag; at the end of the next training batch all
    ranks agree on it, save ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` (where Lightning resumes from when the
    requeued job starts), rank 0 runs ``scontrol requeue``, and every rank stops there, so the requeued job goes on
    from exactly that step. Does nothing outside SLURM.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: Any = None
        self._signalled = False  # set by the signal handler, acted on at the next batch end

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)  # single-device strategies have none
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        env.auto_requeue = False  # keeps Lightning from installing its own handler
        self._signum = env.requeue_signal or signal.SIGUSR1
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._signum is None or not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)))
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"saved {path} at step {trainer.global_step}, but `scontrol requeue {job}` failed: "
                    f"{result.stderr.strip()}; submit the job again with the same default_root_dir to resume"
                )
            rank_zero_info(f"[swin] saved {path} at step {trainer.global_step} and requeued SLURM job {job}")
        # every rank stops right here, without another collective: SLURM is about to send SIGTERM
        raise SIGTERMException()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._signum is not None:  # a signal after training must not kill the finished run (SIGUSR1's default)
            keep = self._previous not in (None, signal.SIG_DFL)
            signal.signal(self._signum, self._previous if keep else signal.SIG_IGN)
            self._signum = None
