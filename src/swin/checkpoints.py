"""Checkpoints that survive a kill at any instant, and the newest whole one to resume from.

Every checkpoint the trainer writes (best, last, the SLURM ``hpc_ckpt_N.ckpt``) goes through
:class:`AtomicCheckpointIO`, which :class:`swin.cli.SwinCLI` puts in ``trainer.plugins``. ``fit --ckpt_path last``
resumes from :func:`resume_checkpoint`: the newest checkpoint under ``trainer.default_root_dir`` that is whole, each
broken one on the way reported by name and set aside.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from swin.files import atomic_write, stale_temporaries


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, each checkpoint written by :func:`swin.files.atomic_write`.

    Lightning saves through an fsspec transaction whose temporary file lies in the system's temporary folder; when
    that is another file system than the run folder (a local ``/tmp``, runs on NFS or Lustre), the final move is a
    copy, and a kill during it leaves half a checkpoint under its own name. Here the temporary file lies beside the
    checkpoint, is synced, then renamed. Remote URLs (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()  # serialised first, as Lightning does: a failing write then raises the OSError itself
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getbuffer())


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every validation (at every epoch end without one) and, with ``every_n_train_steps``, also
    every that many training steps in between.

    No step checkpoint is taken on an epoch's last batch, where the epoch-end one follows: Lightning resumes a
    checkpoint taken between an epoch's last batch and its validation as the start of a new epoch, so that the
    validation never runs, and the checkpoints of the resumed run count one epoch too few.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        super().__init__(
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
        )
        self._every_n_epochs = 1  # besides the steps: ModelCheckpoint's arguments take one trigger only

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not last_batch_of_epoch(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def last_batch_of_epoch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether the training batch ``batch_idx`` ends its epoch (at its end, before the epoch's validation)."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches


def checkpoint_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole training checkpoint, or None when it is.

    A truncated file has no zip directory; a corrupted one fails the CRC-32 that ``torch.save`` stores for every
    record (``torch.load`` alone does not check it); a whole one loads with ``weights_only=True`` and holds the
    weights and the loops' state.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"its record {bad} fails its CRC-32 check"
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read it is the answer
        return f"{type(err).__name__}: {err}"
    if not isinstance(state, dict) or not {"state_dict", "loops"} <= state.keys():
        return "it holds no training state (state_dict and loops)"
    return None


def _primary() -> bool:
    """Whether this process is the first of its job (it alone renames or removes files before training starts)."""
    return all(os.environ.get(k, "0") == "0" for k in ("SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def run_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoints of the runs under ``root``: ``hpc_ckpt_*.ckpt`` and ``*/checkpoints/*.ckpt``, newest first."""
    root = Path(root)
    found = [*root.glob("hpc_ckpt_*.ckpt"), *root.glob("*/checkpoints/*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest whole checkpoint under ``root`` (see :func:`run_checkpoints`), None when there is none.

    Each broken one met on the way is reported by name with the reason and renamed ``NAME.corrupt`` (kept, never
    picked again); temporary files of writes that a kill interrupted are removed, reported.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    if _primary():
        for folder in [root, *root.glob("*/checkpoints")]:
            for tmp in stale_temporaries(folder):
                rank_zero_warn(f"[swin] removing {tmp}, the remains of a write that was interrupted")
                tmp.unlink(missing_ok=True)
    for path in run_checkpoints(root):
        error = checkpoint_error(path)
        if error is None:
            return path
        rank_zero_warn(f"[swin] skipping the broken checkpoint {path}: {error}; set aside as {path.name}.corrupt")
        if _primary():
            path.rename(path.with_name(path.name + ".corrupt"))
    return None


def run_folder(checkpoint: str | os.PathLike) -> str | None:
    """The version folder a checkpoint belongs to (``VERSION/checkpoints/NAME.ckpt``), None for one in the root."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else None
