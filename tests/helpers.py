"""Helpers shared by the tests: a fake installed distribution carrying a harness plugin, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "harness" / "demo"


def install_fake_plugin(site: Path, module: str, source: str, dist: str, version: str, entry_point: str) -> dict:
    """Write ``module.py`` plus a ``.dist-info`` declaring it under the ``harness`` entry-point group into
    ``site``; return an environment whose PYTHONPATH makes it importable (as `pip install` would)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[harness]\n{entry_point} = {module}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(site), env.get("PYTHONPATH", "")] if p)
    env.pop("HARNESS_LOAD_PLUGINS", None)
    return env


def harness_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 900):
    """Run ``python -m harness.cli ARGS`` and return the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def harness_popen(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def require_base_image_or_mmdebstrap(client) -> None:
    """Skip (fail under ``HARNESS_REQUIRE_DOCKER=1``) when the Debian base image is neither built nor
    buildable here (it is made with mmdebstrap)."""
    import shutil

    import pytest
    from docker.errors import ImageNotFound

    from harness.container.base_image import base_image_tag

    try:
        client.images.get(base_image_tag())
        return
    except ImageNotFound:
        pass
    if shutil.which("mmdebstrap") is None:
        reason = "the base image is not built yet and mmdebstrap is not on PATH (apt-get install mmdebstrap)"
        if os.environ.get("HARNESS_REQUIRE_DOCKER") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

