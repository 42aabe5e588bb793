"""The base image (``medsam-harness/base:bookworm-<hash>``): a Debian bookworm root file system made with
``mmdebstrap --variant=essential`` (python3, venv, CA certificates, the C++ and OpenMP runtimes; no
documentation, manual pages or locales) and ``docker import``-ed: no registry is needed. The hash covers
the recipe: suite, packages, excluded paths and apt sources (this machine's Debian entries, or
``$HARNESS_DEBIAN_MIRROR``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable

from harness.container.common import (
    BASE_RECIPE_VERSION, ImageBuildError, Log, cache_dir, image_exists, locked, mb, recipe_digest,
)

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
BASE_REPOSITORY = "medsam-harness/base"


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
    return f"{BASE_REPOSITORY}:{SUITE}-{recipe_digest(base_recipe())[:12]}"


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
    if image_exists(client, tag):
        return tag
    recipe = base_recipe()
    cache = cache_dir() / "base"
    with locked(cache / "base.lock"):
        if image_exists(client, tag):
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
            log(f"base image: root file system {mb(rootfs.stat().st_size)} in {time.monotonic() - started:.0f} s")
        started = time.monotonic()
        repository, name = tag.split(":")
        try:
            client.api.import_image_from_file(
                str(rootfs), repository=repository, tag=name,
                changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8"],
            )
        except Exception as exc:
            raise ImageBuildError(f"importing {rootfs} as {tag} failed: {exc}") from exc
        if not image_exists(client, tag):
            raise ImageBuildError(f"importing {rootfs} as {tag}: the engine reports no such image afterwards")
        log(f"base image: {tag} imported in {time.monotonic() - started:.1f} s")
    return tag
