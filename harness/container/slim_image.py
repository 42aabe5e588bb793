"""Slim model images: the torch-free runtime (the ``runtime`` package) on a model's exported OpenVINO graphs.

Three layers, each built once and reused while its inputs are unchanged:

* **slim deps** (``medsam-harness/slim-deps-cv:<hash>``, or ``medsam-harness/slim-deps:<hash>`` for the
  pipelines that never call OpenCV, e.g. MedficientSAM's and MedSAM's): the Debian base image plus
  ``/opt/venv`` with numpy, the OpenVINO runtime and, where the model's pipeline needs it (LiteMedSAM's
  INTER_AREA letterbox), OpenCV headless, installed offline from the wheelhouse. Trimmed:
  OpenVINO's GPU and NPU plugins, its model-conversion tools and every frontend but the IR reader
  (the graphs are IR already), its C++ headers and GPU tuning cache; numpy's test suites and OpenCV's
  Haar cascades. No torch, no compiler, no pip (the venv is made without it) and no pip cache; a
  non-root user ``harness`` (uid 1000) and ``/workspace``.
* **slim runtime** (``medsam-harness/slim-runtime[-cv]:<version>-<hash>``): the ``runtime`` package copied
  into the venv and byte-compiled; the hash covers its source files.
* **the model** (``medsam-harness/<model>:<version>-slim``): the graphs the harness exported for the model
  (``--backend openvino``, fast path) in ``/opt/graphs`` with the model's ``pipeline.json``, optionally an
  OpenVINO compiled-model cache made at build time in ``/opt/ov-cache`` (read-only at run time: a blob
  that does not match the machine is recompiled in memory), and ``/workspace/predict.sh`` running
  ``python -m runtime.predict`` on ``/workspace/inputs`` -> ``/workspace/outputs``.

:func:`build_model_image` is what ``harness build`` and ``harness export`` call: ``runtime="slim"`` builds
this image, ``"full"`` today's (:func:`harness.container.model_image.build_image`: torch, the whole
harness, ``harness predict``), and ``"auto"`` (the default) the slim image for the models that run on
exported OpenVINO graphs and the full one for the others (third-party plugins, the boxfill baseline).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping

from harness import __version__
from harness.container.common import (
    LABEL, RECIPE_VERSION, UID, USER, VENV, WORKSPACE, ImageBuildError, ImageInfo, Log,
    cache_dir, file_sha256, image_exists, locked, mb, normalize_tag, recipe_digest,
)

SLIM_DEPS_REPOSITORY = "medsam-harness/slim-deps"
SLIM_RUNTIME_REPOSITORY = "medsam-harness/slim-runtime"
SLIM_PACKAGES = ("numpy", "openvino")
OPENCV_PACKAGE = "opencv-python-headless"
GRAPHS_DIR = "/opt/graphs"
COMPILE_CACHE_DIR = "/opt/ov-cache"
RUNTIMES = ("auto", "slim", "full")
# Bump when a slim recipe changes in a way its hash does not see.
SLIM_RECIPE_VERSION = 1


class SlimUnavailable(ValueError):
    """The model does not run on exported OpenVINO graphs here, so it has no slim image."""


_PIP_SETUP = """\
set -e
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore
PIP="{venv}/bin/python $(ls /usr/share/python-wheels/pip-*.whl | head -n1)/pip"
"""

SLIM_TRIM = r"""
sp=$(echo {venv}/lib/python3*/site-packages)
ov="$sp/openvino"
rm -rf "$ov/include" "$ov/tools" "$ov/libs/cache.json" "$ov/libs/libopenvino_intel_gpu_plugin.so" \
       "$ov/libs/libopenvino_intel_npu_plugin.so"
for f in "$ov"/libs/libopenvino_*_frontend.so*; do
  case "$f" in *libopenvino_ir_frontend.so*) ;; *) rm -f "$f" ;; esac
done
for d in "$ov"/frontend/*/; do rm -rf "$d"; done
find "$sp/numpy" -depth -type d -name tests -exec rm -rf {{}} +
if [ -d "$sp/cv2" ]; then rm -rf "$sp/cv2/data"; fi
"""

SLIM_DEPS_SCRIPT = _PIP_SETUP + """\
python3 -m venv --without-pip {venv}
$PIP install -q --no-compile --find-links /wheels {packages}
{trim}
{venv}/bin/python -m compileall -q -j 0 {venv}/lib >/dev/null || echo "compileall: some files did not compile"
{venv}/bin/python -I -c "import {modules}; assert 'CPU' in openvino.Core().available_devices"
if {venv}/bin/python -I -c "import torch" 2>/dev/null; then echo "torch must not be in the slim image"; exit 1; fi
echo '{user}:x:{uid}:{uid}:medsam-harness:/home/{user}:/bin/bash' >> /etc/passwd
echo '{user}:x:{uid}:' >> /etc/group
mkdir -p /home/{user} {workspace}/inputs {workspace}/outputs
chown -R {uid}:{uid} /home/{user} {workspace}
rm -rf /tmp/* /root/.cache
"""

SLIM_RUNTIME_SCRIPT = """\
set -e
sp=$(echo {venv}/lib/python3*/site-packages)
rm -rf "$sp/runtime"
cp -r /src/runtime "$sp/runtime"
chmod -R a+rX "$sp/runtime"
{venv}/bin/python -m compileall -q "$sp/runtime"
{venv}/bin/python -I -c "import sys, runtime.predict; assert 'torch' not in sys.modules"
rm -rf /tmp/* /root/.cache
"""

COMPILE_SCRIPT = """\
set -e
mkdir -p {cache}
{venv}/bin/python -I -c "from runtime.predict import load_segmenter; load_segmenter('{graphs}', compile_cache='{cache}')"
chmod -R a+rX {cache}
rm -rf /tmp/* /root/.cache
"""


def _runtime_sources() -> list[Path]:
    from harness.container.wheelhouse import project_root

    folder = project_root() / "runtime"
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if not files:
        raise ImageBuildError(f"{folder}: the runtime package is missing from the source tree")
    return files


def _variant(opencv: bool) -> str:
    return "-cv" if opencv else ""


def ensure_slim_deps_image(client, log: Log = print, opencv: bool = True) -> str:
    """The tag of the slim dependencies image (base + numpy, OpenVINO and, with ``opencv``, OpenCV headless),
    built when absent."""
    from harness.container.base_image import ensure_base_image
    from harness.container.layers import _image_conf, prune_stale, run_and_commit
    from harness.container.wheelhouse import wheelhouse

    base = ensure_base_image(client, log)
    wheels = wheelhouse(log)
    packages = SLIM_PACKAGES + ((OPENCV_PACKAGE,) if opencv else ())
    script = SLIM_DEPS_SCRIPT.format(venv=VENV, packages=" ".join(packages), trim=SLIM_TRIM.format(venv=VENV).strip(),
                                     modules="numpy, openvino" + (", cv2" if opencv else ""), user=USER, uid=UID,
                                     workspace=WORKSPACE)
    repository = SLIM_DEPS_REPOSITORY + _variant(opencv)
    digest = recipe_digest({"base": base, "wheelhouse": wheels.name, "script": script, "recipe": RECIPE_VERSION,
                            "slim": SLIM_RECIPE_VERSION})
    tag = f"{repository}:{digest[:12]}"
    if image_exists(client, tag):
        return tag
    with locked(cache_dir() / f"slim-deps{_variant(opencv)}.lock"):
        if image_exists(client, tag):
            return tag
        started = time.monotonic()
        log(f"slim dependencies image: building {tag} from {base} and {wheels} (offline)")
        run_and_commit(client, base, script, {wheels: "/wheels"}, tag,
                       _image_conf({f"{LABEL}base": base, f"{LABEL}wheelhouse": wheels.name}), log,
                       "the slim dependencies image")
        log(f"slim dependencies image: {tag}, {mb(client.images.get(tag).attrs.get('Size', 0))}, "
            f"in {time.monotonic() - started:.0f} s")
        prune_stale(client, repository, keep=tag, log=log)
    return tag


def ensure_slim_runtime_image(client, log: Log = print, opencv: bool = True) -> str:
    """The tag of the slim runtime image (slim deps + the ``runtime`` package), built when absent."""
    from harness.container.layers import _image_conf, prune_stale, run_and_commit

    deps = ensure_slim_deps_image(client, log, opencv)
    repository = SLIM_RUNTIME_REPOSITORY + _variant(opencv)
    files = _runtime_sources()
    source = recipe_digest({p.name: file_sha256(p) for p in files})
    script = SLIM_RUNTIME_SCRIPT.format(venv=VENV)
    digest = recipe_digest({"deps": deps, "source": source, "script": script, "slim": SLIM_RECIPE_VERSION})
    tag = f"{repository}:{__version__}-{digest[:12]}"
    if image_exists(client, tag):
        return tag
    with locked(cache_dir() / f"slim-runtime{_variant(opencv)}.lock"):
        if image_exists(client, tag):
            return tag
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="harness-slim-") as tmp:
            (Path(tmp) / "runtime").mkdir()
            for path in files:
                shutil.copy2(path, Path(tmp) / "runtime" / path.name)
            log(f"slim runtime image: building {tag} from {deps} ({len(files)} runtime files)")
            run_and_commit(client, deps, script, {Path(tmp): "/src"}, tag,
                           _image_conf({f"{LABEL}slim-runtime-digest": digest[:12], f"{LABEL}deps": deps}), log,
                           "the slim runtime image")
        log(f"slim runtime image: {tag}, {mb(client.images.get(tag).attrs.get('Size', 0))}, "
            f"in {time.monotonic() - started:.0f} s")
        prune_stale(client, repository, keep=tag, log=log)
    return tag


def slim_tag(model: str) -> str:
    """``medsam-harness/<model>:<version>-slim`` (the full image keeps ``medsam-harness/<model>:<version>``)."""
    from harness.container.model_image import default_tag

    return normalize_tag(default_tag(model) + "-slim")


def exported_model(model: str, weights: Path | None, extra: Mapping[str, Path]) -> tuple[Path, dict, dict]:
    """Load ``model`` on the host on the OpenVINO backend (fast path), as ``harness run`` does, exporting
    its graphs if they are not cached yet; returns (the export folder, the segmenter's ``describe()``,
    the runtime pipeline's fields). Raises :class:`SlimUnavailable` when the model does not run on
    exported graphs, FileNotFoundError for a missing weights file."""
    from harness.pluginmanager import HarnessPlugins
    from harness.plugin_api import LoadOptions
    from runtime.pipelines import PRESETS

    spec = HarnessPlugins().get(model)
    if "backend" not in (spec.choices or ()):
        raise SlimUnavailable(f"{model} has no --backend choice, so no exported graphs for the slim runtime; "
                              "use --runtime full")
    all_weights = dict(extra)
    if weights is not None:
        all_weights[model] = weights
    for name, path in all_weights.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"weights for {name}: {path}: no such file")
    try:
        segmenter = spec.load(LoadOptions(weights=weights, all_weights=all_weights, path="fast", backend="openvino"))
    except ImportError as error:
        raise SlimUnavailable(f"{model}: the OpenVINO backend is not available here ({error}); "
                              "pip install 'medsam-harness[backends]', or use --runtime full") from error
    described = dict(segmenter.describe() or {})
    export, pipeline = described.get("export"), described.get("pipeline")
    if described.get("backend") != "openvino" or not export or not Path(export).is_dir():
        raise SlimUnavailable(f"{model} did not load on exported OpenVINO graphs; use --runtime full")
    if pipeline not in PRESETS:
        raise SlimUnavailable(f"{model} runs pipeline {pipeline!r}, which the slim runtime does not implement; "
                              "use --runtime full")
    return Path(export), described, PRESETS[pipeline].as_dict()


SLIM_DOCKERFILE = """\
FROM {runtime}
COPY graphs/ {graphs}/
COPY predict.sh {workspace}/predict.sh
LABEL {labels}
USER {user}
WORKDIR {workspace}
"""


def build_slim_image(model: str, tag: str | None = None, weights: Path | None = None, client=None, log: Log = print,
                     extra_weights: Mapping[str, Path] | None = None, compile_cache: bool = True) -> ImageInfo:
    """Build the slim image of ``model``: its exported OpenVINO graphs and ``pipeline.json`` in
    ``/opt/graphs`` on the slim runtime image; ``compile_cache`` adds an OpenVINO compiled-model cache made
    by compiling the graphs once in a container of the image (committed as one more layer; weightless, see
    :class:`runtime.graphs.Graphs`)."""
    from harness.container.client import connect
    from harness.container.layers import prune_untagged, run_and_commit
    from harness.container.model_image import add_bytes, add_file, stream_build

    client = client if client is not None else connect()
    tag = normalize_tag(tag) if tag else slim_tag(model)
    extra = {name: Path(path).expanduser() for name, path in (extra_weights or {}).items() if name != model}
    weights = Path(weights).expanduser() if weights is not None else None
    export, described, pipeline = exported_model(model, weights, extra)
    from runtime.pipelines import Pipeline

    runtime = ensure_slim_runtime_image(client, log, opencv=Pipeline.from_dict(pipeline).needs_opencv)
    cache_arg = f"--compile-cache {COMPILE_CACHE_DIR} " if compile_cache else ""
    predict_sh = (
        "#!/bin/sh\n"
        f"# Segment every case in {WORKSPACE}/inputs into {WORKSPACE}/outputs with {model} on its exported "
        "OpenVINO graphs (the torch-free runtime; the challenge runs `sh predict.sh`).\n"
        f"exec {VENV}/bin/python -I -m runtime.predict --graphs {GRAPHS_DIR} {cache_arg}"
        f"-i {WORKSPACE}/inputs -o {WORKSPACE}/outputs \"$@\"\n"
    )
    labels = {
        "model": model, "version": __version__, "weights-sha256": described.get("weights_sha256") or "none",
        "weights": str(described.get("weights") or "none"), "runtime": runtime, "backend": "openvino",
        "image-runtime": "slim", "pipeline": pipeline["name"], "compile-cache": "yes" if compile_cache else "no",
    }
    dockerfile = SLIM_DOCKERFILE.format(
        runtime=runtime, graphs=GRAPHS_DIR, workspace=WORKSPACE, user=USER,
        labels=" ".join(f"{LABEL}{key}={json.dumps(str(value))}" for key, value in labels.items()),
    )
    started = time.monotonic()
    build_tag = f"{tag}-nocache" if compile_cache else tag
    with tempfile.TemporaryDirectory(prefix="harness-slim-image-") as tmp:
        context = Path(tmp) / "context.tar"
        import tarfile

        with tarfile.open(context, "w") as tar:
            add_bytes(tar, "Dockerfile", dockerfile.encode())
            add_bytes(tar, "predict.sh", predict_sh.encode(), mode=0o755)
            add_bytes(tar, "graphs/pipeline.json", (json.dumps({"model": model, "pipeline": pipeline}, indent=1) + "\n").encode())
            for path in sorted(export.iterdir()):
                if path.is_file():
                    add_file(tar, f"graphs/{path.name}", path)
        log(f"{model}: building {tag} (slim) from {runtime} with the graphs of {export}")
        image_id = stream_build(client, context, build_tag, log, f"the slim {model} image")
    if compile_cache:
        made_from = f"{LABEL}compiled-from"
        current = _labels(client, tag)
        if current.get(made_from) == image_id:  # the same graphs on the same runtime: already compiled
            image_id = client.images.get(tag).id
            log(f"{model}: {tag} already holds the compile cache of these graphs")
        else:
            attrs = client.images.get(image_id).attrs["Config"]
            conf = {"Cmd": attrs.get("Cmd"), "User": USER, "WorkingDir": WORKSPACE, "Env": attrs.get("Env"),
                    "Labels": {**(attrs.get("Labels") or {}), made_from: image_id}}
            script = COMPILE_SCRIPT.format(venv=VENV, graphs=GRAPHS_DIR, cache=COMPILE_CACHE_DIR)
            log(f"{model}: compiling the graphs once into {COMPILE_CACHE_DIR}")
            image_id = run_and_commit(client, build_tag, script, {}, tag, conf, log,
                                      f"the slim {model} image's compile cache")
        client.images.remove(build_tag, noprune=True)
    size = int(client.images.get(image_id).attrs.get("Size", 0))
    log(f"{model}: {tag}  {mb(size)}  ({time.monotonic() - started:.0f} s)")
    prune_untagged(client, log)
    return ImageInfo(tag=tag, id=image_id, size_bytes=size, model=model)


def _labels(client, tag: str) -> dict:
    from docker.errors import ImageNotFound

    try:
        return dict(client.images.get(tag).attrs.get("Config", {}).get("Labels") or {})
    except ImageNotFound:
        return {}


def build_model_image(runtime: str, model: str, tag: str | None = None, weights: Path | None = None, client=None,
                      log: Log = print, extra_weights: Mapping[str, Path] | None = None,
                      compile_cache: bool = True, protocol: str = "standard") -> ImageInfo:
    """``harness build`` / ``harness export``'s image of ``model``: slim, full, or ``"auto"`` (slim where the
    model runs on exported OpenVINO graphs, else full, saying why). ``compile_cache``: see
    :func:`build_slim_image`. ``protocol="interactive"``: the image must take the 2025 protocol's inputs
    (per-class box dicts, clicks, the previous prediction), which only the full image's ``harness predict``
    reads (the slim runtime takes boxes only): ``"auto"`` becomes full, ``"slim"`` is a ValueError, and the
    image is labelled ``org.medsam-harness.protocol=interactive``."""
    from harness.container.model_image import build_image

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}; expected one of {RUNTIMES}")
    if protocol not in ("standard", "interactive"):
        raise ValueError(f"protocol {protocol!r}; expected standard or interactive")
    if protocol == "interactive":
        if runtime == "slim":
            raise ValueError("--protocol interactive needs the full runtime: the slim runtime takes boxes only, not "
                             "the 2025 inputs' clicks and previous prediction (use --runtime full or auto)")
        log(f"{model}: building the full image (--protocol interactive: `harness predict` reads the 2025 inputs)")
        return build_image(model, tag=tag, weights=weights, client=client, log=log, extra_weights=extra_weights,
                           labels={"protocol": "interactive"})
    if runtime != "full":
        try:
            return build_slim_image(model, tag=tag, weights=weights, client=client, log=log, extra_weights=extra_weights,
                                    compile_cache=compile_cache)
        except SlimUnavailable as reason:
            if runtime == "slim":
                raise
            log(f"{model}: building the full image ({reason})")
    return build_image(model, tag=tag, weights=weights, client=client, log=log, extra_weights=extra_weights)
