"""The results store: one JSON line per (model, case), appended as each case finishes.

``OUT/results.jsonl`` is append-only. Each record is written with a single ``write`` of a complete
line followed by ``fsync``, so a process killed at any instant (SIGKILL included) leaves at most one
torn final line. Opening the store repairs that: the partial line is cut off, so a resumed run
neither duplicates nor loses a finished case. When a pair appears more than once (a retried
error), the last record wins.

``OUT/models.json`` holds one entry per model: what was run (title, resolution, weights, params,
FLOPs, published figures), for the leaderboard.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from harness.atomic import atomic_writer, sweep_temp_files

RESULTS_FILE = "results.jsonl"
MODELS_FILE = "models.json"
LOCK_FILE = ".harness.lock"
SEGS_DIR = "segs"


class StoreLockedError(RuntimeError):
    """Another harness process is writing into the same output folder."""


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become null, numpy scalars Python numbers, paths strings."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_records(path: str | os.PathLike) -> list[dict]:
    """All complete records of a results file, in file order (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: not a JSON record, ignored (that case will run again)",
                              RuntimeWarning, stacklevel=2)
    return records


def latest_records(records: list[dict]) -> list[dict]:
    """One record per (model, case): the last one written, in first-seen order."""
    latest: dict[tuple[str, str], dict] = {}
    for rec in records:
        latest[(rec.get("model"), rec.get("case"))] = rec
    return list(latest.values())


class ResultsStore:
    """Append-only JSONL store in an output folder, locked against concurrent writers."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS_FILE
        self._lock_fh = (self.out_dir / LOCK_FILE).open("w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise StoreLockedError(f"{self.out_dir}: another harness run is writing here") from None
        self._repair()
        sweep_temp_files(self.out_dir, recursive=(SEGS_DIR,))  # only where runs write, only our own names
        self._records = read_records(self.path)

    def _repair(self) -> None:
        """Cut a torn final line left by a killed writer."""
        if not self.path.is_file():
            return
        with self.path.open("rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            keep = fh.read().rfind(b"\n") + 1
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        if not self._lock_fh.closed:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def records(self) -> list[dict]:
        """The latest record of every (model, case) pair."""
        return latest_records(self._records)

    def finished(self, model: str, include_errors: bool = True) -> set[str]:
        """Cases of ``model`` that already have a record (only successful ones if not ``include_errors``)."""
        return {
            r["case"]
            for r in self.records()
            if r.get("model") == model and (include_errors or r.get("status") == "ok")
        }

    def append(self, record: dict) -> None:
        """Write one record as one line, durably.

        A failed write (a full disk, a quota) cuts the file back to its length before the write, so the
        records already stored stay whole and a later append does not join a torn line; it raises
        OSError with ``filename`` set to the results file."""
        line = (json.dumps(_clean(record), default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._write_error(exc, record) from exc
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    pass  # _repair cuts a torn last line when the store is next opened
                raise self._write_error(exc, record) from exc
        finally:
            os.close(fd)
        self._records.append(json.loads(line))

    def _write_error(self, exc: OSError, record: dict) -> OSError:
        """``exc`` as an OSError naming the results file and the record that could not be stored."""
        what = f"the record of {record.get('model')} / {record.get('case')} could not be stored"
        kept = f"the {len(self._records)} records before it are kept"
        return OSError(exc.errno, f"{what} ({exc.strerror or exc}); {kept}", str(self.path))


def read_models(out_dir: str | os.PathLike) -> dict[str, dict]:
    path = Path(out_dir) / MODELS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def update_models(out_dir: str | os.PathLike, name: str, info: dict) -> None:
    """Merge ``info`` into the entry for ``name`` in ``models.json`` (written atomically)."""
    out_dir = Path(out_dir)
    models = read_models(out_dir)
    models[name] = {**models.get(name, {}), **_clean(info)}
    write_json_atomic(out_dir / MODELS_FILE, models)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_writer(path, "w") as fh:
        json.dump(_clean(obj), fh, indent=1, default=str)
        fh.write("\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)
