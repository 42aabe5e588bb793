"""Challenge-style images against a real Docker engine (``harness.container``).

Skipped without an engine (the ``docker_client`` fixture says why), failed when HARNESS_REQUIRE_DOCKER=1.
The first run on a machine builds the base image (mmdebstrap), the wheelhouse and the dependencies
image; later runs reuse them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from harness import __version__
from harness.cli import main
from harness.container.client import EngineUnavailable, connect
from harness.container.archives import export_image, load_image
from harness.container.base_image import ensure_base_image
from harness.container.common import ImageArchiveError
from helpers import require_base_image_or_mmdebstrap

pytestmark = pytest.mark.docker

DEMO = Path(__file__).resolve().parents[1] / "harness" / "demo"
NOWHERE = "unix:///nonexistent/medsam-harness-test/docker.sock"
LABEL = "org.medsam-harness."


def test_engine_unavailable_says_what_was_tried_and_how_to_start_one(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    with pytest.raises(EngineUnavailable) as info:
        connect()
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert f"DOCKER_HOST={NOWHERE}" in message
    assert "dockerd-local.sh start" in message and "export DOCKER_HOST=unix://" in message


def test_cli_exits_2_without_engine(monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", NOWHERE)
    assert main(["build", "--models", "boxfill"]) == 2
    err = capsys.readouterr().err
    assert "harness build: no Docker engine answers" in err and NOWHERE in err


def test_parallel_gzip_writes_one_readable_gzip_file():
    from harness.container.archives import _gzip_parallel

    data = np.random.default_rng(0).integers(0, 4, 3_000_000, dtype=np.uint8).tobytes()
    chunks = [data[i:i + 70_001] for i in range(0, len(data), 70_001)]
    out = io.BytesIO()
    _gzip_parallel(chunks, out, compresslevel=1, block=1 << 20)
    assert out.getvalue()[:2] == b"\x1f\x8b" and len(out.getvalue()) < len(data)
    assert gzip.decompress(out.getvalue()) == data
    empty = io.BytesIO()
    _gzip_parallel([], empty, compresslevel=1)
    assert gzip.decompress(empty.getvalue()) == b""


def test_engine_found(docker_client):
    assert docker_client.ping()
    assert docker_client.version()["ApiVersion"]


@pytest.fixture(scope="module")
def base_tag(docker_client):
    require_base_image_or_mmdebstrap(docker_client)
    return ensure_base_image(docker_client)


def test_base_image_is_built_once(docker_client, base_tag):
    first = docker_client.images.get(base_tag)
    messages: list[str] = []
    started = time.monotonic()
    again = ensure_base_image(docker_client, log=messages.append)
    elapsed = time.monotonic() - started
    assert again == base_tag and docker_client.images.get(again).id == first.id
    assert messages == [] and elapsed < 5, (messages, elapsed)
    out = docker_client.containers.run(
        base_tag, ["/bin/sh", "-c", "python3 -c 'import ssl, sqlite3, venv, sys; print(sys.version_info[:2])'; "
                                    "find /usr/share/man /usr/share/locale /usr/share/doc -type f "
                                    "! -name copyright | wc -l"],
        network_mode="none", remove=True).decode()
    assert out.split() == ["(3,", "11)", "0"], out


@pytest.fixture(scope="module")
def images(harness_images):
    return harness_images


def test_model_images_carry_labels_user_and_predict_sh(docker_client, images):
    from models.weights.checkpoints import default_litemedsam_checkpoint

    bundled_sha = hashlib.sha256(default_litemedsam_checkpoint().read_bytes()).hexdigest()
    for model, info in images.items():
        assert info.tag == f"medsam-harness/{model}:{__version__}" and info.model == model
        attrs = docker_client.images.get(info.tag).attrs
        assert attrs["Id"] == info.id and attrs["Size"] == info.size_bytes
        config = attrs["Config"]
        labels = config["Labels"]
        assert labels[LABEL + "model"] == model and labels[LABEL + "version"] == __version__
        assert labels[LABEL + "weights-sha256"] == (bundled_sha if model == "litemedsam" else "none")
        assert config["User"] == "harness" and config["WorkingDir"] == "/workspace"
        assert not config.get("Volumes"), config.get("Volumes")  # no anonymous volume per container
        assert 0.3e9 < info.size_bytes < 1.8e9, f"{info.tag}: {info.size_bytes / 1e6:.0f} MB"
    # the backend `harness run` picks here (auto: openvino where installed): its graphs are baked in
    from harness.choices import choice_defaults

    backend = choice_defaults()["backend"]
    labels = {m: docker_client.images.get(info.tag).labels for m, info in images.items()}
    assert labels["litemedsam"][LABEL + "backend"] == backend and labels["boxfill"][LABEL + "backend"] == "none"
    script = docker_client.containers.run(images["litemedsam"].tag, ["cat", "predict.sh"], network_mode="none",
                                          remove=True).decode()
    assert "harness predict --model litemedsam" in script and f"--backend {backend}" in script
    assert "-i /workspace/inputs -o /workspace/outputs" in script
    baked = docker_client.containers.run(
        images["litemedsam"].tag, ["/bin/sh", "-c", "echo $HARNESS_CACHE_DIR; ls /opt/harness-cache/exports/*/ "
                                   "2>/dev/null; python -c 'import onnx' 2>/dev/null && echo has-exporter || echo "
                                   "no-exporter"], network_mode="none", remove=True).decode().split()
    if backend == "openvino":  # the host's export, found by key and fingerprint: nothing to export in a case
        assert baked[0] == "/opt/harness-cache" and baked[1].startswith("openvino-256px-"), baked
    else:
        assert baked[0] != "/opt/harness-cache", baked
    assert baked[-1] == "no-exporter", baked


def test_image_runs_as_non_root_without_network(docker_client, images):
    out = docker_client.containers.run(
        images["litemedsam"].tag,
        ["/bin/sh", "-c", "id -u; ls /sys/class/net; harness plugins; "
                          "python -c 'import pip' 2>/dev/null && echo has-pip || echo no-pip; "
                          "ls /opt/venv/lib/python3.11/site-packages/torch/include 2>/dev/null | wc -l"],
        network_mode="none", remove=True).decode()
    lines = out.splitlines()
    assert lines[0] == "1000" and lines[1] == "lo", out
    assert "litemedsam" in out and "boxfill" in out and "FAILED" not in out
    assert lines[-2:] == ["no-pip", "0"], out


def test_predict_sh_runs_the_challenge_command(docker_client, images, tmp_path):
    """The challenge's `docker container run -m 8G ... sh predict.sh` on one demo case per image."""
    case = "2DBox_US_hc18-158.npz"
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    outputs.chmod(0o777)  # the image runs as uid 1000
    shutil.copy(DEMO / "imgs" / case, inputs / case)
    gts = np.load(DEMO / "gts" / case)["gts"]
    for model in ("boxfill", "litemedsam"):
        docker_client.containers.run(
            images[model].tag, ["/bin/bash", "-c", "sh predict.sh"], mem_limit="8g", network_mode="none",
            volumes={str(inputs): {"bind": "/workspace/inputs/", "mode": "ro"},
                     str(outputs): {"bind": "/workspace/outputs/", "mode": "rw"}},
            remove=True)
        segs = np.load(outputs / case)["segs"]
        assert segs.dtype == np.uint16 and segs.shape == gts.shape
        dice = 2 * np.sum((segs > 0) & (gts > 0)) / (np.sum(segs > 0) + np.sum(gts > 0))
        assert dice > 0.8, (model, dice)
        (outputs / case).unlink()


def test_cli_build_prints_tag_and_size(docker_client, images, capsys):
    assert main(["build", "--models", "boxfill"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"medsam-harness/boxfill:{__version__}  ") and " MB  " in out, out


def test_export_then_load_gives_the_same_image_as_team_latest(docker_client, images, tmp_path):
    from docker.errors import ImageNotFound

    info = images["boxfill"]
    image_id = docker_client.images.get(info.tag).id  # now (a source edit since the fixture rebuilds the image)
    # compresslevel 0: still gzip (stored blocks, one member per 8 MiB), a third of the time of level 1
    archive = export_image(docker_client, info.tag, tmp_path / "MedsamTest.tar.gz", team="MedsamTest",
                           compresslevel=0)
    with open(archive, "rb") as handle:
        assert archive == tmp_path / "MedsamTest.tar.gz" and handle.read(2) == b"\x1f\x8b"
    assert docker_client.images.get("medsamtest:latest").id == image_id
    docker_client.images.remove("medsamtest:latest")  # only the tag: the image stays under info.tag
    with pytest.raises(ImageNotFound):
        docker_client.images.get("medsamtest:latest")
    try:
        tag = load_image(docker_client, archive)
        assert tag == "medsamtest:latest"
        loaded = docker_client.images.get(tag)
        assert loaded.id == image_id
        assert loaded.labels[LABEL + "model"] == "boxfill"
        assert loaded.labels == docker_client.images.get(info.tag).labels
    finally:
        docker_client.images.remove("medsamtest:latest")
        archive.unlink()  # 1.4 GB


def test_load_image_rejects_files_that_are_not_image_archives(docker_client, tmp_path):
    text = tmp_path / "notes.tar.gz"
    text.write_text("not an archive\n" * 100)
    with pytest.raises(ImageArchiveError, match=r"notes\.tar\.gz: not an image archive"):
        load_image(docker_client, text)

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 64)
    with pytest.raises(ImageArchiveError, match=r"broken\.tar\.gz: not an image archive"):
        load_image(docker_client, broken)

    plain = tmp_path / "plain.tar.gz"  # a real tar.gz, but of a text file, not of an image
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"hello\n"
        member = tarfile.TarInfo("hello.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    plain.write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(ImageArchiveError, match=r"plain\.tar\.gz: .*(could not load|holds no image)"):
        load_image(docker_client, plain)

    with pytest.raises(ImageArchiveError, match=r"missing\.tar\.gz: no such file"):
        load_image(docker_client, tmp_path / "missing.tar.gz")
