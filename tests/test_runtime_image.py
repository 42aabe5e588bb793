"""``harness export``'s team check, and the slim image (``harness.container.slim_image``) run as the challenge
runs a submission.

The slim tests need a Docker engine (the ``docker_client`` fixture skips without one, fails under
HARNESS_REQUIRE_DOCKER=1) and build the LiteMedSAM slim image (a minute once the base image and the
wheelhouse exist; the first build on a machine makes those too).
"""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import harness_cli
from reference import assert_segs_match

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "harness" / "demo" / "imgs"
CASES = ("2DBox_Endoscopy_kvasir-cju0rx1ida.npz", "3DBox_PET_sts024.npz")


def test_export_refuses_a_team_that_differs_from_the_file_name(tmp_path):
    """The organisers' script reads the team from the file name (before the first '.'): ``-o team.tar.gz
    --team teamx`` would export and then fail every case there (``Unable to find image 'team:latest'``)."""
    out = tmp_path / "team.tar.gz"
    done = harness_cli(["export", "--model", "boxfill", "-o", str(out), "--team", "teamx"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--team 'teamx' differs" in done.stderr and "'team.tar.gz'" in done.stderr and "teamx.tar.gz" in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def slim_litemedsam(docker_client):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    from helpers import require_base_image_or_mmdebstrap

    from harness.container.slim_image import build_model_image

    require_base_image_or_mmdebstrap(docker_client)
    try:
        return build_model_image("auto", "litemedsam", client=docker_client, log=lambda line: None)
    except FileNotFoundError as error:  # LiteMedSAM's released weights are not installed
        pytest.skip(str(error))


def _labels(client, tag):
    return client.images.get(tag).attrs["Config"]["Labels"]


@pytest.mark.docker
@pytest.mark.slow
def test_slim_image_runs_the_challenge_command_like_the_native_runtime(docker_client, slim_litemedsam, tmp_path):
    """One 2D and one 3D demo case through ``sh predict.sh`` in a fresh container per case (``-m 8G``, inputs
    and outputs mounted at /workspace/inputs and /workspace/outputs): the segs match the torch-free
    runtime's run natively on the graphs the image holds."""
    from runtime.predict import load_segmenter

    info = slim_litemedsam
    labels = _labels(docker_client, info.tag)
    assert info.tag.endswith("-slim") and labels["org.medsam-harness.image-runtime"] == "slim"
    assert labels["org.medsam-harness.backend"] == "openvino" and labels["org.medsam-harness.pipeline"] == "litemedsam_cvpr24"
    assert info.size_bytes < 800e6  # today's full LiteMedSAM image: 1.6 GB
    container = docker_client.containers.create(info.tag, ["true"])  # the image's graphs, copied out
    try:
        stream, _ = container.get_archive("/opt/graphs")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(tmp_path, filter="data")
    finally:
        container.remove(force=True)
    native = load_segmenter(tmp_path / "graphs", threads=2)
    for case in CASES:
        inputs, outputs = tmp_path / f"in-{case}", tmp_path / f"out-{case}"
        inputs.mkdir()
        outputs.mkdir(mode=0o777)
        outputs.chmod(0o777)  # the image runs as uid 1000
        shutil.copy(DEMO / case, inputs / case)
        docker_client.containers.run(
            info.tag, ["/bin/bash", "-c", "sh predict.sh"], mem_limit="8g", network_mode="none", remove=True,
            volumes={str(inputs): {"bind": "/workspace/inputs/", "mode": "ro"},
                     str(outputs): {"bind": "/workspace/outputs/", "mode": "rw"}})
        with np.load(outputs / case) as written:
            segs = written["segs"]
        with np.load(DEMO / case) as data:
            expected = native.segment(data["imgs"], data["boxes"])
        assert_segs_match(segs, expected)


@pytest.mark.docker
@pytest.mark.slow
def test_slim_image_has_no_torch_no_pip_and_runs_as_a_user(docker_client, slim_litemedsam):
    script = ("import importlib.util as u, os, sys; "
              "print(os.getuid(), [m for m in ('torch', 'pip', 'harness', 'models', 'onnx') if u.find_spec(m)])")
    out = docker_client.containers.run(slim_litemedsam.tag, ["/opt/venv/bin/python", "-I", "-c", script],
                                       remove=True, network_mode="none").decode().strip()
    assert out == "1000 []"
    compilers = docker_client.containers.run(slim_litemedsam.tag, ["/bin/sh", "-c", "command -v gcc cc g++ || true"],
                                             remove=True, network_mode="none").decode().strip()
    assert compilers == ""
