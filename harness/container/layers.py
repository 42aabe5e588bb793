"""The dependency layers: the **deps** image (``medsam-harness/deps:<hash>``: the base plus ``/opt/venv``
with the project's runtime dependencies (CPU torch) installed from the wheelhouse, C++ headers, test
binaries and test suites trimmed, byte-compiled; a non-root user ``harness`` (uid 1000) and
``/workspace``) and the **runtime** image (``medsam-harness/runtime:<version>-<hash>``: deps plus the
project's own wheel, built from the source tree; the hash covers the source files, so an edit rebuilds
only this small layer).

Each is made by running a script in a container with its inputs mounted read-only and the network off,
then committing it: one layer each, no wheels or pip cache inside. The engine must therefore see this
machine's files (a local engine).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import __version__
from harness.container.base_image import ensure_base_image
from harness.container.common import (
    LABEL, RECIPE_VERSION, UID, USER, VENV, WORKSPACE, ImageBuildError, Log, cache_dir, file_sha256,
    image_exists, locked, mb, recipe_digest,
)
from harness.container.wheelhouse import project_root, read_pyproject, wheelhouse

DEPS_REPOSITORY = "medsam-harness/deps"
RUNTIME_REPOSITORY = "medsam-harness/runtime"

# Trimmed from the venv: C++ headers and test binaries of torch (there is no compiler in the image) and
# the test suites of numpy, scipy and pandas.
TRIM_SCRIPT = r"""
sp=$(echo /opt/venv/lib/python3*/site-packages)
rm -rf "$sp/torch/include"
find "$sp/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
for pkg in numpy scipy pandas; do find "$sp/$pkg" -depth -type d -name tests -exec rm -rf {} +; done
"""


def _source_files(root: Path) -> list[Path]:
    """The files the project's wheel is built from: pyproject, README, LICENSE and the packages
    that ``[tool.setuptools.packages.find] include`` names (caches and build leftovers left out)."""
    project = read_pyproject(root)
    includes = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", [])
    tops = sorted({pattern.split(".")[0].rstrip("*") for pattern in includes} - {""})
    files = [root / name for name in ("pyproject.toml", "README.md", "LICENSE") if (root / name).is_file()]
    for top in tops:
        folder = root / top
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root).parts
            if any(part == "__pycache__" or part.endswith(".egg-info") or part.startswith(".") for part in rel):
                continue
            if path.is_file() and path.suffix not in (".pyc", ".pyo"):
                files.append(path)
    return files


def _build_project_wheel(root: Path, files: list[Path], wheels: Path, out: Path, log: Log) -> Path:
    """``pip wheel`` of a clean copy of the source tree, offline (build requirements from the wheelhouse)."""
    src = out / "src"
    for path in files:
        dest = src / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    dist = out / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-index", "--find-links", str(wheels / "build"), "--wheel-dir", str(dist), str(src)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    built = sorted(dist.glob("*.whl"))
    if proc.returncode != 0 or len(built) != 1:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise ImageBuildError(f"building the project wheel from {root} failed (exit {proc.returncode}):\n{tail}")
    return built[0]


# The venv has no pip of its own: Debian's pip wheel (from python3-venv) runs the installs.
_PIP_SETUP = """\
set -e
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_ROOT_USER_ACTION=ignore
PIP="{venv}/bin/python $(ls /usr/share/python-wheels/pip-*.whl | head -n1)/pip"
"""

DEPS_SCRIPT = _PIP_SETUP + """\
python3 -m venv --without-pip {venv}
$PIP install -q --no-compile --find-links /wheels -r /wheels/requirements.txt
if [ -s /wheels/file-only.txt ]; then
  $PIP install -q --no-compile --no-deps --find-links /wheels -r /wheels/file-only.txt
fi
{trim}
{venv}/bin/python -m compileall -q -j 0 {venv}/lib >/dev/null || echo "compileall: some files did not compile"
{venv}/bin/python -c "import torch, cv2, scipy.ndimage, pandas, numpy, pluggy, tqdm, tabulate, psutil"
echo '{user}:x:{uid}:{uid}:medsam-harness:/home/{user}:/bin/bash' >> /etc/passwd
echo '{user}:x:{uid}:' >> /etc/group
mkdir -p /home/{user} {workspace}/inputs {workspace}/outputs
chown -R {uid}:{uid} /home/{user} {workspace}
rm -rf /tmp/* /root/.cache
"""

RUNTIME_SCRIPT = _PIP_SETUP + """\
$PIP install -q --no-compile --no-deps /project/*.whl
{venv}/bin/python -m compileall -q -j 0 {venv}/lib >/dev/null || echo "compileall: some files did not compile"
{venv}/bin/harness plugins
rm -rf /tmp/* /root/.cache
"""


def _image_conf(labels: dict[str, str]) -> dict:
    """The configuration committed with the deps and runtime images."""
    return {
        "Cmd": ["/bin/bash"], "User": USER, "WorkingDir": WORKSPACE,
        "Env": [f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"],
        "Labels": {f"{LABEL}version": __version__, **labels},
    }


def run_and_commit(client, image: str, script: str, volumes: dict, tag: str, conf: dict, log: Log, what: str) -> str:
    """Run ``script`` in a container of ``image`` (network off, ``volumes`` read-only) and commit the
    result as ``tag``: one layer with the script's changes only, the mounted inputs not included."""
    from docker.types import Mount

    tail: list[str] = []
    # Bind mounts through `mounts` (host config only): `volumes=` would also declare the paths as
    # VOLUMEs in the container's config, which the commit would keep, and every later container of the
    # image would then create anonymous volumes for them.
    container = client.containers.create(
        image, ["/bin/sh", "-c", script], user="0", network_mode="none",
        mounts=[Mount(target=inside, source=str(host), type="bind", read_only=True) for host, inside in volumes.items()],
    )
    try:
        container.start()
        for raw in container.logs(stream=True, follow=True):
            for line in raw.decode(errors="replace").splitlines():
                if line.strip():
                    tail.append(line.rstrip())
        status = container.wait().get("StatusCode")
        if status != 0:
            raise ImageBuildError(f"building {what} ({tag}) failed: the build script exited with {status}:\n"
                                  + "\n".join(tail[-15:]))
        repository, _, name = tag.rpartition(":")
        image_obj = container.commit(repository=repository, tag=name, conf=conf)
        return image_obj.id
    finally:
        container.remove(force=True)


def ensure_deps_image(client, log: Log = print) -> str:
    """The tag of the dependencies image (base + ``/opt/venv`` with the runtime dependencies + the user),
    built when the engine lacks it."""
    base = ensure_base_image(client, log)
    wheels = wheelhouse(log)
    script = DEPS_SCRIPT.format(venv=VENV, trim=TRIM_SCRIPT.strip(), user=USER, uid=UID, workspace=WORKSPACE)
    digest = recipe_digest({"base": base, "wheelhouse": wheels.name, "script": script, "recipe": RECIPE_VERSION})
    tag = f"{DEPS_REPOSITORY}:{digest[:12]}"
    if image_exists(client, tag):
        return tag
    with locked(cache_dir() / "deps.lock"):
        if image_exists(client, tag):
            return tag
        started = time.monotonic()
        log(f"dependencies image: building {tag} from {base} and {wheels} (offline)")
        run_and_commit(client, base, script, {wheels: "/wheels"}, tag,
                        _image_conf({f"{LABEL}base": base, f"{LABEL}wheelhouse": wheels.name}), log,
                        "the dependencies image")
        size = client.images.get(tag).attrs.get("Size", 0)
        log(f"dependencies image: {tag}, {mb(size)}, in {time.monotonic() - started:.0f} s")
        prune_stale(client, DEPS_REPOSITORY, keep=tag, log=log)
    return tag


def ensure_runtime_image(client, log: Log = print) -> str:
    """The tag of the runtime image (the dependencies image + the project), built when the engine lacks it.

    Each step runs in a container with its inputs (wheelhouse, project wheel) mounted read-only and the
    network off, and is committed as one layer: the images hold no wheels and no pip cache. A change of
    the project's source rebuilds only the small project layer.
    """
    deps = ensure_deps_image(client, log)
    root = project_root()
    files = _source_files(root)
    source = hashlib.sha256()
    for path in files:
        source.update(str(path.relative_to(root)).encode() + b"\0" + file_sha256(path).encode() + b"\0")
    script = RUNTIME_SCRIPT.format(venv=VENV)
    digest = recipe_digest({"deps": deps, "source": source.hexdigest(), "script": script, "recipe": RECIPE_VERSION})
    tag = f"{RUNTIME_REPOSITORY}:{__version__}-{digest[:12]}"
    if image_exists(client, tag):
        return tag
    with locked(cache_dir() / "runtime.lock"):
        if image_exists(client, tag):
            return tag
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="harness-runtime-") as tmp:
            wheel = _build_project_wheel(root, files, wheelhouse(log), Path(tmp), log)
            log(f"runtime image: building {tag} from {deps} ({wheel.name}, {len(files)} source files)")
            run_and_commit(client, deps, script, {wheel.parent: "/project"}, tag,
                            _image_conf({f"{LABEL}runtime-digest": digest[:12], f"{LABEL}deps": deps}), log,
                            "the runtime image")
        size = client.images.get(tag).attrs.get("Size", 0)
        log(f"runtime image: {tag}, {mb(size)}, in {time.monotonic() - started:.0f} s")
        prune_stale(client, RUNTIME_REPOSITORY, keep=tag, log=log)
    return tag


def prune_stale(client, repository: str, keep: str, log: Log) -> None:
    """Drop the other tags of ``repository`` (earlier deps or runtime images), then the untagged images."""
    from docker.errors import APIError

    for image in client.images.list(name=repository):
        for old in image.tags:
            if old != keep and old.startswith(repository + ":"):
                try:
                    client.images.remove(old, noprune=False)
                except APIError:
                    pass
    prune_untagged(client, log)


def prune_untagged(client, log: Log) -> None:
    """Remove the untagged images that earlier medsam-harness builds left (each may hold a ~1 GB venv
    layer). Images still used by a container or by a tagged image stay: the engine keeps them."""
    from docker.errors import APIError

    try:
        freed = client.images.prune(filters={"dangling": True, "label": f"{LABEL}version"}).get("SpaceReclaimed") or 0
    except APIError:
        freed = 0
    if freed >= 1e6:
        log(f"removed earlier medsam-harness images: {mb(freed)} freed")
