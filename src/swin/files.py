"""Files written whole or not at all: what a run kills at any instant must not leave half-written under its name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes | memoryview | str | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (bytes, text, or a function that writes into a binary file) to ``path``.

    Through a temporary file in the same folder, flushed to disk, then renamed over ``path`` (a rename within one
    file system is atomic) and the folder synced: a kill at any moment leaves either the previous file or the new
    one, and at worst a ``.NAME.*.tmp`` beside them. A failure (disk full, read-only folder) raises an ``OSError``
    naming the file and the folder; the previous file is left as it was.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as err:
        raise type(err)(
            err.errno, f"could not write {path.name} into the folder {path.parent} ({err.strerror or err}); "
            f"{'the previous ' + path.name + ' is left intact' if path.exists() else 'nothing was written'}"
        ) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves in ``folder`` when killed before its rename."""
    return sorted(Path(folder).glob(".*.tmp"))
