"""Whole files or none: atomic writes, the checks that tell a whole checkpoint from a torn or corrupted one, the
choice of the checkpoint to resume from, and CSV logs that continue a resumed run."""

from __future__ import annotations

import csv
import os
import struct
import zipfile

import pytest
import torch

from swin.checkpoints import checkpoint_error, resume_checkpoint, run_folder
from swin.files import atomic_write, stale_temporaries
from swin.loggers import ResumableCSVLogger


def fake_checkpoint(path, step: int) -> None:
    torch.save({"state_dict": {"w": torch.full((64,), float(step))}, "loops": {}, "global_step": step}, path)


def test_atomic_write_replaces_whole_and_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "out" / "metrics.csv"
    atomic_write(path, "a,b\n")
    atomic_write(path, b"a,b\n1,2\n")
    assert path.read_text() == "a,b\n1,2\n" and oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def half_then_fail(f):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=rf"could not write metrics.csv into the folder {path.parent} .*"
                                      r"No space left on device.*the previous metrics.csv is left intact"):  # fmt: skip
        atomic_write(path, half_then_fail)
    assert path.read_text() == "a,b\n1,2\n" and not stale_temporaries(path.parent)

    with pytest.raises(OSError, match="nothing was written"):
        atomic_write(tmp_path / "new.bin", half_then_fail)
    assert not (tmp_path / "new.bin").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_error_finds_truncated_and_flipped_files_that_torch_load_alone_misses(tmp_path):
    whole = tmp_path / "whole.ckpt"
    fake_checkpoint(whole, 3)
    assert checkpoint_error(whole) is None
    data = whole.read_bytes()

    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 2])
    assert "zip" in checkpoint_error(tmp_path / "torn.ckpt").lower()

    # one byte flipped inside the tensor's stored record: torch.load reads the wrong value without a word
    with zipfile.ZipFile(whole) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    start = record.header_offset + 30 + name_len + extra_len  # the record's bytes follow its local header
    flipped = bytearray(data)
    flipped[start + 4] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    loaded = torch.load(tmp_path / "flipped.ckpt", weights_only=True)["state_dict"]["w"]
    assert not torch.equal(loaded, torch.full((64,), 3.0))
    assert "CRC-32" in checkpoint_error(tmp_path / "flipped.ckpt")

    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    assert "no training state" in checkpoint_error(tmp_path / "weights.pt")


def test_resume_checkpoint_takes_the_newest_whole_one_and_sets_broken_ones_aside(tmp_path):
    folder = tmp_path / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    assert resume_checkpoint(tmp_path / "missing") is None and resume_checkpoint(tmp_path) is None
    for i, name in enumerate(["best-epoch000-step4.ckpt", "last.ckpt"]):
        fake_checkpoint(folder / name, i)
        os.utime(folder / name, ns=(i * 10**9, i * 10**9))
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"PK\x03\x04 torn")  # the newest, broken
    (folder / ".last.ckpt.abc123.tmp").write_bytes(b"half")

    with pytest.warns(UserWarning) as caught:
        chosen = resume_checkpoint(tmp_path)
    assert chosen == folder / "last.ckpt" and run_folder(chosen) == "version_0"
    messages = " ".join(str(w.message) for w in caught)
    assert "removing" in messages and "skipping the broken checkpoint" in messages and "hpc_ckpt_1.ckpt" in messages
    assert (tmp_path / "hpc_ckpt_1.ckpt.corrupt").exists() and not (tmp_path / "hpc_ckpt_1.ckpt").exists()
    assert not stale_temporaries(folder)
    assert run_folder(tmp_path / "hpc_ckpt_1.ckpt") is None


def rows(path) -> list[tuple[str, str]]:
    return [(r["step"], r["loss"]) for r in csv.DictReader(path.open())]


def test_csv_log_continues_a_resumed_run_without_repeats_or_gaps(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="", version=0)
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step)
    first.log_metrics({"loss": 4.0}, 4)  # the repeat a step logged early leaves behind
    first.save()
    metrics = tmp_path / "version_0" / "metrics.csv"
    assert rows(metrics) == [(str(s), f"{float(s)}") for s in range(5)]

    # the run was killed after its checkpoint of step 3: a new process resumes and logs steps 3 and on again
    second = ResumableCSVLogger(tmp_path, name="", version=0)
    second.resume()
    for step in range(3, 6):
        second.log_metrics({"loss": step + 0.5}, step)
    second.save()
    assert rows(metrics) == [("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "3.5"), ("4", "4.5"), ("5", "5.5")]
