"""Shared fixtures. Helpers for the reference folder live in ``reference.py``, for the CLI in ``helpers.py``."""
from __future__ import annotations

import os
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def two_threads():
    """Run a module's tests with 2 torch threads, the setting the reference vectors were made with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A temporary folder for the files a module's tests share (weights, runs), removed when the module is
    done: the full suite writes several GB of checkpoints and graphs, and keeping each module's files to
    the end of the session (pytest's default) fills a small disk. Fixtures take subfolders of it."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory):
    """A ``HARNESS_CACHE_DIR`` for the exported graphs (``<dir>/exports``) of the seed-0 reference models,
    shared by the modules that export them (test_backends, test_zoo_e2e, test_runtime_parity): each model
    is exported once per session (same cache key and weights fingerprint), into a temporary folder that
    is removed at the end of the session (4-5 GB by then)."""
    path = tmp_path_factory.mktemp("harness-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def export_cache_env(export_cache_dir):
    """``export_cache_dir``, also as HARNESS_CACHE_DIR for the module (TorchSegmenter exports there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE_DIR", str(export_cache_dir))
        yield export_cache_dir


@pytest.fixture(scope="session")
def docker_client():
    """A ``docker.DockerClient`` whose engine answered (``harness.container.client.connect``).

    Without an engine the test is skipped with the reason, unless ``HARNESS_REQUIRE_DOCKER=1`` (set by
    ``.ci/run``, which starts one): then it fails.
    """
    from harness.container.client import EngineUnavailable, connect

    try:
        client = connect()
    except EngineUnavailable as exc:
        if os.environ.get("HARNESS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HARNESS_REQUIRE_DOCKER=1 but {exc}", pytrace=False)
        pytest.skip(f"no Docker engine: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def harness_images(docker_client):
    """The harness's own images of boxfill and litemedsam, ``{model: ImageInfo}``, for every test that
    needs them: made once per session the way ``harness run --runner docker`` makes them
    (:func:`harness.runners.docker.harness_image`: the existing image when its labels match this
    harness, its runtime image and its weights, else a fresh :func:`harness.container.model_image.build_image`)."""
    from pathlib import Path

    from harness.container.common import ImageInfo
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.runners.case import load_options, model_info
    from harness.runners.docker import harness_image
    from helpers import DEMO, require_base_image_or_mmdebstrap

    require_base_image_or_mmdebstrap(docker_client)
    plugins = HarnessPlugins()
    images = {}
    for model in ("boxfill", "litemedsam"):
        spec = plugins.get(model)
        config = RunConfig(models=[model], data_dir=DEMO, out_dir=Path("."), runner="docker")
        info = model_info(spec, spec.load(load_options(spec, config, 2)).describe(), plugins, [])
        tag = harness_image(docker_client, model, config, info, log=lambda _: None)
        image = docker_client.images.get(tag)
        images[model] = ImageInfo(tag=tag, id=image.id, size_bytes=int(image.attrs.get("Size", 0)), model=model)
    return images


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Two real 3D validation cases (PET sts002 and sts024) converted once per session with `harness convert
    --to interactive`: the 2025-format inputs in ``imgs/``, the ground truth in ``gts/``. Read-only for tests:
    a test that changes cases copies the folder first."""
    import shutil

    from harness.interactive.convert import convert_to_interactive
    from helpers import INTERACTIVE_CASES
    from reference import require_data

    data = require_data()
    src = tmp_path_factory.mktemp("src")
    for sub in ("imgs", "gts"):
        (src / sub).mkdir()
        for name in INTERACTIVE_CASES:
            shutil.copy(data / sub / name, src / sub / name)
    out = tmp_path_factory.mktemp("interactive")
    report = convert_to_interactive(src, out)
    assert report.converted == list(INTERACTIVE_CASES) and not report.errors
    return out

