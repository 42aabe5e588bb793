"""Atomic file writes: write a temp file beside the target, then rename it over the target.

A reader (or a resumed run) sees either the old file or the complete new one, never half of it.
Temp files are named ``.<name>.<pid>-<random>.medsam-harness.tmp`` (:data:`TEMP_SUFFIX`): a name no other
program uses, carrying the writer's process id. A killed writer can leave one behind;
:func:`sweep_temp_files` removes those, and only those, in the folders a run writes. The subprocess
runner's case folders in ``OUT`` carry the same kind of name (``.case.<pid>-<random>.medsam-harness.tmp``)
and are swept from ``OUT`` itself the same way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

TEMP_SUFFIX = ".medsam-harness.tmp"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_writer(path, "w") as fh: ...`` replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX)
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


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that named ``tmp`` still runs (then its file is not stale)."""
    try:
        pid = int(tmp.name.rsplit(TEMP_SUFFIX, 1)[0].rsplit(".", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process has no write open while it sweeps
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike, recursive: Iterable[str] = ()) -> int:
    """Remove the harness's own temp files (``.*`` + :data:`TEMP_SUFFIX`) that dead writers left in
    ``folder`` itself and in its subfolders named in ``recursive`` (searched to any depth), and its temp
    folders of that name (a killed run's case folders) in ``folder`` itself; return how many. Nothing else
    is touched: files of other programs, whatever their names, other folders, and what symlinks point to."""
    folder = Path(folder)
    top = list(folder.glob(f".*{TEMP_SUFFIX}"))
    candidates = list(top)
    for sub in recursive:
        if (folder / sub).is_dir() and not (folder / sub).is_symlink():
            candidates += (folder / sub).rglob(f".*{TEMP_SUFFIX}")
    removed = 0
    for tmp in candidates:
        if tmp.is_symlink() or _writer_alive(tmp):
            continue
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
        elif tmp.is_dir() and tmp in top:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed
