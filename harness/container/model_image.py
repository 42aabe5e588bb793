"""Model images (``medsam-harness/<model>:<version>``): the runtime image plus the model's weights in
``/opt/weights`` and ``/workspace/predict.sh``, which runs ``harness predict`` on ``/workspace/inputs`` ->
``/workspace/outputs`` as the challenge's ``sh predict.sh`` expects; labels ``org.medsam-harness.*``
record the model, the harness version, the weights' sha256 and the backend. The model runs on the
backend ``harness run`` picks on this machine (``--backend auto``): where that is openvino, the graphs
exported here are baked into ``/opt/harness-cache/exports``, so no container exports anything (the
images carry the openvino runtime, not the exporter), and ``predict.sh`` names the backend.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Mapping

from harness import __version__
from harness.container.common import (
    CACHE_ENV, EXPORTS_CACHE, LABEL, MODEL_REPOSITORY, USER, VENV, WEIGHTS_DIR, WORKSPACE, ImageBuildError,
    ImageInfo, Log, file_sha256, mb, normalize_tag,
)
from harness.container.layers import ensure_runtime_image, prune_untagged


def image_parts(model: str, weights: Mapping[str, Path]) -> dict[str, Path]:
    """Weights of the segmenters a model is built from (a distilled student's decoder donor), baked into
    its image beside its own."""
    from models.weights.zoo import DONORS

    if not model.endswith("-distilled"):
        return {}
    return {name: Path(path) for name, path in weights.items() if name in DONORS and name != model}


def default_tag(model: str) -> str:
    """``medsam-harness/<model>:<version>``, the model name made a valid image name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", model.lower())
    name = re.sub(r"[._-]{2,}", "-", name).strip("._-") or "model"
    return normalize_tag(f"{MODEL_REPOSITORY}/{name}:{__version__}")


def stream_build(client, context: Path, tag: str, log: Log, what: str) -> str:
    """Build the tar build context ``context`` as ``tag`` with the network off; return the image id."""
    tail: list[str] = []
    with open(context, "rb") as handle:
        stream = client.api.build(fileobj=handle, custom_context=True, tag=tag, rm=True, forcerm=True,
                                  network_mode="none", pull=False, decode=True)
        for chunk in stream:
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "")
                context_lines = "\n".join(tail[-15:])
                raise ImageBuildError(f"building {what} ({tag}) failed: {detail.strip()}\n{context_lines}")
            text = chunk.get("stream", "")
            for line in text.splitlines():
                line = line.rstrip()
                if line:
                    tail.append(line)
                    if line.startswith("Step ") or line.startswith("Successfully"):
                        log(f"  {line}")
    image = client.images.get(tag)
    return image.id


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def add_file(tar: tarfile.TarFile, name: str, path: Path, mode: int = 0o644) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = mode, 0, 0, "root", "root", 0
    with open(path, "rb") as handle:
        tar.addfile(info, handle)


MODEL_DOCKERFILE = """\
FROM {runtime}
{copy_weights}{copy_exports}COPY predict.sh {workspace}/predict.sh
LABEL {labels}
USER {user}
WORKDIR {workspace}
"""


def _weights_name(model: str, path: Path) -> str:
    """The file name a weights file gets in /opt/weights: one that ``HARNESS_WEIGHTS_DIR`` lookup finds."""
    suffix = path.suffix.lower() if path.suffix.lower() in (".pt", ".pth", ".ckpt") else ".pt"
    return f"{model}{suffix}"


def check_model(model: str, weights: Path | None, extra: Mapping[str, Path]) -> tuple[Path | None, dict]:
    """Load ``model`` on the host as ``harness predict`` will in the image, so that a missing or unreadable
    weights file fails here, naming the file; returns the weights file used (None: none or bundled) and
    the segmenter's ``describe()``."""
    from harness.pluginmanager import HarnessPlugins
    from harness.plugin_api import LoadOptions

    spec = HarnessPlugins().get(model)
    if weights is None:
        from models.weights.zoo import find_weights

        found = find_weights(model, LoadOptions())
        weights = Path(found) if found else None
    all_weights = dict(extra)
    if weights is not None:
        all_weights[model] = weights
    for name, path in all_weights.items():
        if not path.is_file():
            raise FileNotFoundError(f"weights for {name}: {path}: no such file")
    segmenter = spec.load(LoadOptions(weights=weights, all_weights=all_weights))
    try:
        described = dict(segmenter.describe() or {})
    except Exception:  # describe() is informative only
        described = {}
    return weights, described


def build_image(
    model: str,
    tag: str | None = None,
    weights: Path | None = None,
    client=None,
    log: Log = print,
    extra_weights: Mapping[str, Path] | None = None,
    labels: Mapping[str, str] | None = None,
) -> ImageInfo:
    """Build the challenge-style image of segmenter ``model``.

    ``weights``: the model's weights file (default: what ``harness run`` would use: bundled weights, or a
    file found through ``HARNESS_WEIGHTS_DIR``). ``extra_weights``: weights of other segmenters the model
    is built from (``medsam`` for a distilled student completed with MedSAM's decoder). Each file is
    baked into ``/opt/weights`` and passed to ``harness predict`` by ``predict.sh``. The model is loaded
    once on the host first, so a missing or unreadable weights file fails before any image is built.
    ``labels``: more ``org.medsam-harness.*`` labels (``protocol: interactive`` from ``harness build
    --protocol interactive``).
    """
    from harness.container.client import connect

    client = client if client is not None else connect()
    tag = normalize_tag(tag) if tag else default_tag(model)
    extra = {name: Path(path).expanduser() for name, path in (extra_weights or {}).items() if name != model}
    weights = Path(weights).expanduser() if weights is not None else None
    weights, described = check_model(model, weights, extra)
    runtime = ensure_runtime_image(client, log)

    files = dict(extra)
    if weights is not None:
        files[model] = weights
    baked = {name: (path, _weights_name(name, path)) for name, path in sorted(files.items())}
    if weights is not None:
        weights_sha, weights_source = file_sha256(weights), f"{WEIGHTS_DIR}/{baked[model][1]}"
    else:
        bundled = described.get("weights")
        bundled_path = Path(bundled) if isinstance(bundled, (str, Path)) and bundled else None
        if bundled_path is not None and bundled_path.is_file():
            weights_sha, weights_source = file_sha256(bundled_path), f"bundled: {bundled_path.parent.parent.name}/" \
                f"{bundled_path.parent.name}/{bundled_path.name}"
        else:
            weights_sha, weights_source = "none", "none"

    args = " ".join(f"--weights {name}={WEIGHTS_DIR}/{file}" for name, (_, file) in sorted(baked.items()))
    backend = described.get("backend")
    if backend:
        args = f"{args} --backend {backend}".strip()
    export = Path(described["export"]) if backend not in (None, "torch") and described.get("export") else None
    predict_sh = (
        "#!/bin/sh\n"
        f"# Segment every case in {WORKSPACE}/inputs into {WORKSPACE}/outputs with {model} "
        "(the challenge runs `sh predict.sh`).\n"
        f"exec {VENV}/bin/harness predict --model {model} {args + ' ' if args else ''}"
        f"-i {WORKSPACE}/inputs -o {WORKSPACE}/outputs \"$@\"\n"
    )
    extra_labels = dict(labels or {})
    labels = {
        "model": model, "version": __version__, "weights-sha256": weights_sha, "weights": weights_source,
        "runtime": runtime, "backend": backend or "none",
        **{f"weights-sha256.{name}": file_sha256(path) for name, (path, _) in extra.items()},
        **extra_labels,
    }
    dockerfile = MODEL_DOCKERFILE.format(
        runtime=runtime, workspace=WORKSPACE, user=USER,
        copy_weights=f"COPY weights/ {WEIGHTS_DIR}/\nENV HARNESS_WEIGHTS_DIR={WEIGHTS_DIR}\n" if baked else "",
        copy_exports=f"COPY exports/ {EXPORTS_CACHE}/exports/\nENV {CACHE_ENV}={EXPORTS_CACHE}\n" if export else "",
        labels=" ".join(f"{LABEL}{key}={json.dumps(str(value))}" for key, value in labels.items()),
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="harness-image-") as tmp:
        context = Path(tmp) / "context.tar"
        with tarfile.open(context, "w") as tar:
            add_bytes(tar, "Dockerfile", dockerfile.encode())
            add_bytes(tar, "predict.sh", predict_sh.encode(), mode=0o755)
            for name, (path, file) in sorted(baked.items()):
                add_file(tar, f"weights/{file}", path)
            if export is not None:  # <cache key>/<openvino folder>/, as models.export.backends looks it up
                for path in sorted(export.iterdir()):
                    add_file(tar, f"exports/{export.parent.name}/{export.name}/{path.name}", path)
        log(f"{model}: building {tag} from {runtime}"
            + (f" with {', '.join(str(p) for p, _ in baked.values())}" if baked else ""))
        image_id = stream_build(client, context, tag, log, f"the {model} image")
    size = int(client.images.get(image_id).attrs.get("Size", 0))
    log(f"{model}: {tag}  {mb(size)}  ({time.monotonic() - started:.0f} s)")
    prune_untagged(client, log)
    return ImageInfo(tag=tag, id=image_id, size_bytes=size, model=model)
