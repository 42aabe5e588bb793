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


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (the bench folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROJECT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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



# Two real 3D validation cases, converted to the 2025 format by the session fixture `converted` (conftest.py).
INTERACTIVE_CASES = ("3DBox_PET_sts002.npz", "3DBox_PET_sts024.npz")


def plugins_with(name: str, segment, prompts=frozenset({"box"})):
    """A plugin manager holding one in-process segmenter ``name`` whose ``segment(case)`` is ``segment``
    (declaring ``prompts``); entry points are not loaded."""
    from harness import hookimpl
    from harness.plugin_api import SegmenterSpec
    from harness.pluginmanager import HarnessPlugins

    class Segmenter:
        def segment(self, case):
            return segment(case)

        def describe(self):
            return {}

    class Plugin:
        @hookimpl
        def harness_segmenters(self):
            return [SegmenterSpec(name=name, title=name, family="test", load=lambda options: Segmenter(),
                                  prompts=prompts)]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Plugin(), f"test-plugin-{name}")
    return plugins
