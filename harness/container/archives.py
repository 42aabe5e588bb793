"""Image archives as the challenge exchanges them: ``docker save | gzip`` of ``<team>:latest``, the team
read from the file name before the first '.'; saving (compressed on every CPU) and loading with a
format check that names the file.
"""
from __future__ import annotations

import gzip
import os
import re
import time
import zlib
from pathlib import Path
from typing import Iterable

from harness.container.common import ImageArchiveError, Log, mb

_TEAM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def team_from_archive(path: Path) -> str:
    """The team name the challenge derives from an archive's file name: the part before the first '.',
    lowercased."""
    return Path(path).name.split(".")[0].lower()


def export_image(client, tag: str, out: Path, team: str, log: Log = print, compresslevel: int = 6) -> Path:
    """Save image ``tag`` as ``<team>:latest`` to the gzip-compressed tar ``out`` (``docker save | gzip``)."""
    from docker.errors import ImageNotFound

    team = team.strip().lower()
    if not _TEAM_RE.match(team):
        raise ValueError(f"team name '{team}' is not valid: lowercase letters, digits, '_' and '-', "
                         "starting with a letter or digit (the challenge reads it from the file name before the first '.')")
    out = Path(out)
    if team_from_archive(out) != team:
        log(f"warning: the challenge reads the team from the file name: {out.name} -> "
            f"'{team_from_archive(out)}:latest', but the image is tagged '{team}:latest'")
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        raise ValueError(f"export: no image {tag} in the engine (build it first: harness build)") from None
    image.tag(team, "latest")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    started = time.monotonic()
    try:
        with open(partial, "wb") as raw:
            _gzip_parallel(client.api.get_image(f"{team}:latest", chunk_size=1 << 20), raw, compresslevel)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log(f"exported {tag} as {team}:latest to {out} ({mb(out.stat().st_size)}, {time.monotonic() - started:.0f} s)")
    return out


def _gzip_parallel(chunks: Iterable[bytes], out, compresslevel: int, block: int = 8 << 20) -> None:
    """gzip ``chunks`` into ``out`` on every CPU: each 8 MiB block is compressed (zlib frees the GIL)
    into its own gzip member. Concatenated members are one valid gzip file (RFC 1952), which
    ``docker load``, ``gunzip`` and Python's gzip read whole."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    try:
        workers = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        workers = os.cpu_count() or 1
    pending: deque = deque()
    buffer = bytearray()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(data: bytes) -> None:
            pending.append(pool.submit(gzip.compress, data, compresslevel, mtime=0))
            while len(pending) > 2 * workers:
                out.write(pending.popleft().result())

        for chunk in chunks:
            buffer += chunk
            while len(buffer) >= block:
                submit(bytes(buffer[:block]))
                del buffer[:block]
        if buffer or not pending:
            submit(bytes(buffer))
        while pending:
            out.write(pending.popleft().result())


def _archive_head(path: Path) -> bytes:
    """The first tar block of ``path`` (decompressed when it is gzip), for a quick format check."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    try:
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                return handle.read(512)
        with open(path, "rb") as handle:
            return handle.read(512)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageArchiveError(f"{path}: not an image archive: a corrupt gzip file ({exc})") from None


def load_image(client, tarball: Path, log: Log = print) -> str:
    """Load a ``docker save`` archive (gzip-compressed or plain tar) and return its tag.

    When the archive holds several tags, the one the challenge runs (``<team>:latest``, the team being
    the file name before the first '.') is returned if present.

    Raises:
        ImageArchiveError: the file is missing, is not a tar archive, or the engine cannot load it as an
            image, or it holds no tagged image; the message names the file.
    """
    from docker.errors import APIError

    path = Path(tarball)
    if not path.is_file():
        raise ImageArchiveError(f"{path}: no such file")
    head = _archive_head(path)
    if len(head) < 512 or head[257:262] != b"ustar":
        raise ImageArchiveError(
            f"{path}: not an image archive: neither a tar nor a gzip-compressed tar "
            "(expected the output of `docker save IMAGE | gzip`)"
        )
    started = time.monotonic()
    tags: list[str] = []
    ids: list[str] = []
    try:
        with open(path, "rb") as handle:
            for chunk in client.api.load_image(handle):
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "")
                    raise ImageArchiveError(f"{path}: the engine could not load it as an image archive: {detail}")
                text = chunk.get("stream", "")
                for line in text.splitlines():
                    if line.startswith("Loaded image: "):
                        tags.append(line[len("Loaded image: "):].strip())
                    elif line.startswith("Loaded image ID: "):
                        ids.append(line[len("Loaded image ID: "):].strip())
    except APIError as exc:
        reason = exc.explanation or str(exc)
        raise ImageArchiveError(f"{path}: the engine could not load it as an image archive: {reason}") from None
    if not tags:
        what = f"only untagged image(s) {', '.join(ids)}" if ids else "no image"
        raise ImageArchiveError(f"{path}: the archive holds {what}; the challenge runs <team>:latest, "
                                f"here {team_from_archive(path)}:latest")
    expected = f"{team_from_archive(path)}:latest"
    chosen = expected if expected in tags else tags[0]
    if chosen != expected:
        log(f"warning: {path} holds {', '.join(tags)}, not {expected}, which the challenge would run")
    log(f"loaded {chosen} from {path} in {time.monotonic() - started:.0f} s")
    return chosen
