"""Atomic file writes: write a temp file beside the target, then rename it over the target.

A reader (or a resumed run) sees either the old file or the complete new one, never half of it.
Temp files are named ``.<name>.<random>.tmp``; a killed writer can leave one behind, and
:func:`sweep_temp_files` removes them when a run folder is opened again.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_writer(path, "w") as fh: ...`` replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sweep_temp_files(folder: str | os.PathLike) -> int:
    """Remove temp files a killed writer left under ``folder``; return how many."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
