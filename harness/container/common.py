"""What every image builder here shares: the images' fixed paths and labels, the build errors, the
cache folder and its locks, recipe digests and tag checks."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

Log = Callable[[str], None]

CACHE_ENV = "HARNESS_CACHE_DIR"
MODEL_REPOSITORY = "medsam-harness"
LABEL = "org.medsam-harness."
VENV = "/opt/venv"
WEIGHTS_DIR = "/opt/weights"
WORKSPACE = "/workspace"
USER, UID = "harness", 1000
EXPORTS_CACHE = "/opt/harness-cache"  # HARNESS_CACHE_DIR of the model images: exports/ holds the baked graphs
# Bump when a recipe changes in a way its hash does not see: base image and wheelhouse / deps and runtime images.
BASE_RECIPE_VERSION = 1
RECIPE_VERSION = 2

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
TAG_RE = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?$")


class ImageBuildError(RuntimeError):
    """An image could not be built (a missing tool, a failed download, a failed Dockerfile step)."""


class ImageArchiveError(RuntimeError):
    """A file given as an image archive is not one the engine can load."""


@dataclass(frozen=True)
class ImageInfo:
    """A built model image."""

    tag: str
    id: str
    size_bytes: int
    model: str



def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/medsam-harness").expanduser()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two runs building the same image wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recipe_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_exists(client, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def normalize_tag(tag: str) -> str:
    """``tag`` with ``:latest`` added when it names no tag; ValueError naming it when Docker would refuse it."""
    tag = tag.strip()
    last = tag.rsplit("/", 1)[-1]
    if ":" not in last:
        tag += ":latest"
    if not TAG_RE.match(tag):
        raise ValueError(
            f"image tag '{tag}' is not valid: lowercase letters, digits and separators (. _ -) in "
            "'/'-separated names, then ':' and a tag of letters, digits, '_', '.', '-' (at most 128)"
        )
    return tag
