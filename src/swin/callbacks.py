"""Training callbacks shared by every task."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from swin.checkpoints import last_batch_of_epoch
from swin.data.samplers import EpochSampler, derived_seed
from swin.loggers import Resumable


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
    from exactly that step. A signal that comes at an epoch's last batch is acted on after the epoch's validation,
    at the next batch (see :class:`swin.checkpoints.LastCheckpoint`). Does nothing outside SLURM.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: Any = None
        self._signalled = False  # set by the signal handler, acted on at the next batch end

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the trainer's environment, as Lightning's own signal handling reads it: a single-device strategy (a one-GPU
        # job) has no cluster_environment of its own
        env = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        env.auto_requeue = False  # keeps Lightning from installing its own handler
        self._signum = env.requeue_signal or signal.SIGUSR1
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._signum is None or last_batch_of_epoch(trainer, batch_idx):
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
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


class StepTimer(Callback):
    """Time every training step after ``warmup_steps`` (synchronising the device), and record the peak device memory
    and the GPU utilisation; writes a JSON summary to ``output`` at the end of fit (rank 0).

    Args:
        output: JSON file for the summary (median and mean step seconds, images per second, peak memory, GPU
            utilisation sampled at each step end).
        warmup_steps: steps left out of the timing (compilation, allocator warm-up, cuDNN autotuning).
    """

    def __init__(self, output: str, warmup_steps: int = 5) -> None:
        self.output = output
        self.warmup_steps = warmup_steps
        self._times: list[float] = []
        self._utilisation: list[float] = []
        self._start = 0.0
        self._batch = 0

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        images = batch["image"] if isinstance(batch, dict) else batch
        self._batch = images.shape[0] if isinstance(images, torch.Tensor) else len(images)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._sync(pl_module)
        if trainer.global_step > self.warmup_steps:
            self._times.append(time.perf_counter() - self._start)
            if pl_module.device.type == "cuda":
                with contextlib.suppress(Exception):  # needs pynvml; absent: no utilisation figure
                    self._utilisation.append(float(torch.cuda.utilization(pl_module.device)))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        summary: dict[str, Any] = {"steps_timed": len(self._times), "batch_per_device": self._batch}
        if self._times:
            median = statistics.median(self._times)
            summary.update(
                step_s_median=median,
                step_s_mean=statistics.fmean(self._times),
                images_per_s=self._batch * trainer.world_size / median,
            )
        if pl_module.device.type == "cuda":
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if self._utilisation:
            summary["gpu_utilisation_pct"] = statistics.fmean(self._utilisation)
        Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output).write_text(json.dumps(summary, indent=1))


class CompileModel(Callback):
    """``torch.compile`` the task's network in place (``self.model.compile()``: the state dict keeps its keys, so
    checkpoints are those of the eager model) when fit, validate, test or predict start.

    Args:
        backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` to check tracing quickly).
        mode: the ``torch.compile`` mode (None, ``max-autotune``, ``reduce-overhead``, ...).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None) -> None:
        self.backend = backend
        self.mode = mode

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.model.compile(backend=self.backend, mode=self.mode)


class StepSeed(Callback):
    """Reseed torch, numpy and ``random`` before every training batch from ``(seed, epoch, batch)``.

    Dropout, drop path, mixup and cutmix then draw the same numbers at the same step whether or not the run was
    killed and resumed in between (together with :class:`swin.data.samplers.SeededSamples` for the augmentations).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        seed = derived_seed(self.seed, 2, trainer.current_epoch, batch_idx)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


# ResumeData makes the training loaders resumable part-way through an epoch; Lightning, which looks for a
# ``state_dict`` on the loader, would warn at every such resume that they are not
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumeData(Callback):
    """A resumed fit goes on with the batch after its checkpoint's: the training loader's
    :class:`~swin.data.samplers.EpochSampler` is put at the saved epoch and batch, and the loader's iterator, which
    Lightning makes before it restores the checkpoint (its workers already drawing from epoch 0), is made anew."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loop = trainer.fit_loop
        loader = trainer.train_dataloader
        if not loop.restarting or not isinstance(getattr(loader, "sampler", None), EpochSampler):
            return
        epoch = loop.epoch_progress.current.processed
        done = loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: the next one comes
            epoch, done = epoch + 1, 0
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = done * loader.batch_size
        if loop._data_fetcher is not None:
            iter(loop._data_fetcher)


class ResumableLogs(Callback):
    """The logs of a resumed run continue without a duplicated or a missing step.

    Lightning hands a step's metrics to the loggers only after every ``on_train_batch_end``, and so after the
    checkpoint a ``ModelCheckpoint`` writes there: a kill in between (under DDP, the ranks meet after the save) would
    lose that step's row for good, as the resumed run starts at the next step. With the project's loggers
    (:class:`swin.loggers.Resumable`, which drop the repeat), the step is logged here, before checkpoint callbacks
    run. Every checkpoint flushes the loggers, so nothing logged before it is lost with the process; when training
    resumes, the loggers forget what they hold from the first step the resumed run logs on.
    """

    def __init__(self) -> None:
        self._resumed = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.loggers and all(isinstance(logger, Resumable) for logger in trainer.loggers):
            trainer._logger_connector.update_train_step_metrics()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.flush()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._resumed = trainer.state.fn == "fit"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._resumed:
            self._resumed = False
            for logger in trainer.loggers:
                if isinstance(logger, Resumable):
                    logger.resume()
