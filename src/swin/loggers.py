"""CSV and TensorBoard loggers that continue an existing run folder (a requeued or resumed job) step for step."""

from __future__ import annotations

import csv
import io

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from swin.files import atomic_write


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing ``metrics.csv`` and appends rows in place; this one keeps the file's
    rows and header, and rewrites it whole at every flush (:func:`swin.files.atomic_write`)."""

    def _check_log_dir_exists(self) -> None:
        self.rows: list[dict[str, object]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self.rows = list(reader)
                self.metrics_keys = list(reader.fieldnames or [])

    def save(self) -> None:
        if self.metrics:
            self._record_new_keys()
            self.rows.extend(self.metrics)
            self.metrics = []
            self._write()

    def drop_from_step(self, step: int) -> None:
        """Forget the rows logged at ``step`` and after (a resumed run logs them again)."""
        self.save()
        kept = [row for row in self.rows if row.get("step") in (None, "") or int(float(row["step"])) < step]
        if len(kept) < len(self.rows):
            self.rows = kept
            self._write()

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.metrics_file_path, text.getvalue())


class Resumable:
    """After :meth:`resume`, the first ``log_metrics`` call forgets what was logged at its step and after: the
    steps after the checkpoint, which the resumed run logs again. A call repeating the previous one (the same
    step and metrics: :class:`swin.callbacks.ResumableLogs` logs a step early) is dropped."""

    _purge_pending = False
    _previous: tuple[int | None, dict[str, float]] | None = None

    def resume(self) -> None:
        self._purge_pending = True

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if (step, metrics) == self._previous:
            return
        self._previous = (step, dict(metrics))
        if self._purge_pending and step is not None:
            self._purge_pending = False
            self.purge_from(step)
        super().log_metrics(metrics, step)

    def purge_from(self, step: int) -> None:
        raise NotImplementedError


class ResumableCSVLogger(Resumable, CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a SLURM requeue or a resume into the same version folder."""

    @rank_zero_only
    def purge_from(self, step: int) -> None:
        self.experiment.drop_from_step(step)

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ResumableTensorBoardLogger(Resumable, TensorBoardLogger):
    """``TensorBoardLogger`` that, on resume, has TensorBoard discard the events from the first resumed step on
    (a ``SessionLog.START`` event, which its readers apply, as ``SummaryWriter(purge_step=...)`` writes)."""

    @rank_zero_only
    def purge_from(self, step: int) -> None:
        writer = self.experiment._get_file_writer()
        writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
        writer.flush()
