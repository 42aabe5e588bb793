"""The ``docker`` runner: one container per case, started as the challenge starts it, timed end to end.

The image's ``/workspace/predict.sh``, run through the docker SDK as the challenge runs it:
``/bin/bash -c "sh predict.sh"``, ``mem_limit`` (default 8G), the inputs folder mounted read-only at
``/workspace/inputs/``, the outputs folder read-write at ``/workspace/outputs/``, no network, under a
cgroup parent of its own, labelled ``org.medsam-harness.evaluation=<case>``; the container and the
cgroup are removed after the case (also on Ctrl-C). Peak memory: that cgroup's
``memory.max_usage_in_bytes`` (cgroup v1) or ``memory.peak`` (v2), read after the container exits:
everything the container charged, page cache included. The image is the harness's own (built once per
model and reused, :func:`harness.container.model_image.build_image`) or any team's (``--image TAG`` or
``team.tar.gz``). See :mod:`harness.runners.external` for what is timed and checked. With ``--protocol
interactive`` each step of a case is one such container, ``mem_limit`` 32G by default (the 2025
evaluator's; :mod:`harness.interactive.external`).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

from harness.choices import changed_choices, choice_defaults, entry_name, variant_tags
from harness.results import update_models
from harness.runners.base import FunctionSession, Runner, RunnerError, Target
from harness.runners.external import TIMING_MODE, Outcome, describe_model, run_external_case, with_log
from harness.runners.subprocess import check_timeout

CHALLENGE_COMMAND = ["/bin/bash", "-c", "sh predict.sh"]
INPUTS_MOUNT = "/workspace/inputs/"
OUTPUTS_MOUNT = "/workspace/outputs/"
CGROUP_ROOT = Path("/sys/fs/cgroup")
EVALUATION_LABEL = "org.medsam-harness.evaluation"  # on each case's container: the case's file name
DEFAULT_MEMORY = "8G"  # the challenge's limit, when --memory is not given


def parse_memory(text: str) -> int:
    """Bytes of a docker-style memory size: ``8G``, ``64m``, ``512MB``, ``1.5g``, ``1048576``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise RunnerError(f"--memory {text!r}: expected a size such as 8G, 512m or 1048576")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = int(number * 1024 ** " kmgt".index(unit or " "))
    if value < 6 * 1024 * 1024:
        raise RunnerError(f"--memory {text!r}: docker needs at least 6 MiB")
    return value


def _cgroup_version() -> int:
    return 2 if (CGROUP_ROOT / "cgroup.controllers").is_file() else 1


class DockerExecutor:
    """One container per case, started as the challenge starts it, under a cgroup parent of its own."""

    runner = "docker"
    what = "the container"

    def __init__(self, client, image: str, config, default_memory: str = DEFAULT_MEMORY):
        self.client, self.image, self.config = client, image, config
        self.memory = config.memory or default_memory
        self.limit_bytes = parse_memory(self.memory)
        self.systemd = (client.info().get("CgroupDriver") == "systemd")
        self.cgroup_version = _cgroup_version()
        self.memory_method = (f"cgroup v{self.cgroup_version} "
                              + ("memory.peak" if self.cgroup_version == 2 else "memory.max_usage_in_bytes")
                              + " of the container's cgroup parent (page cache included)")

    def _parent(self) -> str:
        name = f"medsamharness{os.getpid()}x{uuid.uuid4().hex[:12]}"  # no '-': systemd nests slices at dashes
        return f"{name}.slice" if self.systemd else f"/{name}"

    def _peak_bytes(self, parent: str) -> int | None:
        rel = parent.strip("/")
        path = (CGROUP_ROOT / rel / "memory.peak" if self.cgroup_version == 2
                else CGROUP_ROOT / "memory" / rel / "memory.max_usage_in_bytes")
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _remove_cgroup(self, parent: str) -> None:
        rel = parent.strip("/")
        roots = [CGROUP_ROOT] if self.cgroup_version == 2 else [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
        for root in roots:
            folder = root / rel
            if not folder.is_dir():
                continue
            for _ in range(50):  # the container's own cgroup below it goes away shortly after removal
                try:
                    for child in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
                        child.rmdir()
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)

    def _remove_container(self, container, case_name: str, parent: str) -> None:
        """Remove the case's container; when ``run`` failed half-way (created, not started: an image
        without /bin/bash, or Ctrl-C), find it by its label and cgroup parent."""
        try:
            if container is None:
                found = self.client.containers.list(all=True, filters={"label": f"{EVALUATION_LABEL}={case_name}"})
                container = next((c for c in found if c.attrs.get("HostConfig", {}).get("CgroupParent") == parent),
                                 None)
            if container is not None:
                container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone, or the engine went away: nothing more to do here
            pass

    def execute(self, inputs: Path, outputs: Path, work: Path) -> Outcome:
        import docker
        import requests

        case_name = next((p.name for p in inputs.iterdir()), "")
        parent = self._parent()
        timeout = self.config.timeout
        container = None
        try:
            start = time.perf_counter()
            container = self.client.containers.run(
                self.image, CHALLENGE_COMMAND, mem_limit=self.memory,
                volumes={str(inputs): {"bind": INPUTS_MOUNT, "mode": "ro"},
                         str(outputs): {"bind": OUTPUTS_MOUNT, "mode": "rw"}},
                network_mode="none", detach=True, cgroup_parent=parent,
                labels={EVALUATION_LABEL: case_name})
            timed_out = False
            try:
                status = container.wait(timeout=timeout) if timeout else container.wait()
                seconds = time.perf_counter() - start
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                seconds = time.perf_counter() - start
                timed_out = True
                try:
                    container.kill()
                except docker.errors.APIError:  # it exited in the meantime
                    pass
                status = container.wait(timeout=60)
            code = status.get("StatusCode")
            container.reload()
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
            log = container.logs(stdout=True, stderr=True).decode(errors="replace")
            peak = self._peak_bytes(parent)
        finally:
            self._remove_container(container, case_name, parent)
            self._remove_cgroup(parent)
        problem = None
        if timed_out:
            problem = f"timed out after {timeout:g} s (container killed)"
        elif oom:
            problem = with_log(f"out of memory: the container was killed at its {self.memory} memory limit "
                                f"(exit status {code}, OOMKilled)", log)
        elif code == 137:
            problem = with_log("the container was killed (exit status 137, SIGKILL; the engine did not report it "
                               "OOMKilled)", log)
        elif code != 0:
            problem = with_log(f"the container exited with status {code}", log)
        peak_mb = peak / (1024.0 * 1024.0) if peak is not None else None
        return Outcome(seconds, code, peak_mb, self.memory_method if peak_mb is not None else None, log, problem)


def _connect():
    try:
        from harness.container.client import connect
    except ImportError as exc:  # pragma: no cover - the container package is part of the harness
        raise RunnerError(f"the docker runner needs harness.container ({exc})") from None
    try:
        return connect()
    except Exception as exc:  # noqa: BLE001 - EngineUnavailable and the SDK's own errors
        raise RunnerError(f"--runner docker: no docker engine: {exc}") from None


def _image_facts(client, tag: str) -> dict:
    image = client.images.get(tag)
    return {"image": tag, "image_id": image.id, "image_size_bytes": image.attrs.get("Size"),
            "image_labels": image.labels or {}}


def _resolve_image(client, ref: str, log) -> str:
    """A tag to run: ``ref`` itself if the engine has it, or the tag of the submission tarball ``ref``."""
    import docker

    path = Path(ref).expanduser()
    if path.is_file():
        from harness.container.archives import load_image

        log(f"loading the submission {path} into the engine")
        try:
            return load_image(client, path)
        except Exception as exc:  # noqa: BLE001
            raise RunnerError(f"--image {path}: cannot load it: {type(exc).__name__}: {exc}") from None
    if ref.endswith((".tar", ".tar.gz", ".tgz")):
        raise RunnerError(f"--image {ref}: no such file")
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        raise RunnerError(f"--image {ref}: the engine has no such image (and it is not a file)") from None
    return ref


def harness_image(client, model: str, config, info: dict, log=print) -> str:
    """The tag of the harness's own image of ``model``: the existing ``medsam-harness/<model>:<version>``
    when its labels say it holds this harness version on the current runtime image and the same
    weights (sha256), else a fresh :func:`~harness.container.model_image.build_image`. ``info`` is the
    model's models.json entry (its ``weights`` file and checksum, as loaded here)."""
    import docker

    from harness import __version__
    from harness.container import common, layers, model_image

    weights = config.weights.get(model)
    described = info.get("weights")
    if weights is None and config.weights_dir is not None and isinstance(described, str) and Path(described).is_file():
        weights = Path(described)  # found through --weights-dir, which the image build does not see
    extra = {name: Path(path) for name, path in model_image.image_parts(model, dict(config.weights)).items()}
    if weights is not None:
        want = common.file_sha256(Path(weights))
    elif info.get("weights_sha256"):
        want = info["weights_sha256"]
    elif isinstance(described, str) and Path(described).is_file():
        want = common.file_sha256(Path(described))
    else:
        want = "none"
    tag = model_image.default_tag(model)
    try:
        labels = client.images.get(tag).labels or {}
    except docker.errors.ImageNotFound:
        labels = None
    if labels is not None:
        expected = {"model": model, "version": __version__, "weights-sha256": want,
                    "runtime": layers.ensure_runtime_image(client, log), "backend": info.get("backend") or "none",
                    **{f"weights-sha256.{name}": common.file_sha256(path) for name, path in extra.items()}}
        stale = [key for key, value in expected.items() if labels.get(common.LABEL + key) != value]
        if not stale:
            log(f"{model}: using the existing image {tag}")
            return tag
        log(f"{model}: rebuilding {tag} (changed: {', '.join(stale)})")
    try:
        return model_image.build_image(model, weights=weights, client=client, log=log, extra_weights=extra).tag
    except Exception as exc:  # noqa: BLE001 - ImageBuildError, a weights file, the engine
        raise RunnerError(f"{model}: cannot build its image: {type(exc).__name__}: {exc}") from exc


def image_entry_name(tag: str, known: set[str]) -> str:
    """The entry of a foreign image: its repository's last component (``team`` for ``team:latest``);
    ``NAME[docker]`` when that is also a segmenter's name, so that it is never taken for a native run."""
    repo = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", repo.rsplit("/", 1)[-1]) or "image"
    return f"{name}[docker]" if name in known else name


class DockerRunner(Runner):
    name = "docker"
    timing_mode = TIMING_MODE
    label = "docker"
    order = 20
    description = "one container per case (`sh predict.sh`, as the challenge runs it), timed end to end"
    default_memory = DEFAULT_MEMORY  # a container's memory limit when --memory is not given

    describe_prompts = False  # the models.json facts include the prompts the loaded segmenter takes

    def case_function(self, executor, entry: str, segmenter: str, config, threads: int, spec=None,
                      info: dict | None = None):
        """What runs one case of ``entry`` (the record it returns; ``info``: the entry's models.json facts):
        here one container (:func:`run_external_case`); the interactive protocol's sibling runs its steps
        instead."""
        return lambda case_path: run_external_case(executor, entry, segmenter, case_path, config, threads)

    def entry_facts(self, config, spec=None) -> dict:
        """Fields added to the entry's models.json facts (the interactive protocol's sibling adds its own)."""
        return {}

    def foreign_entry(self, tag: str, known: set[str], config) -> str:
        """The entry of a foreign image (:func:`image_entry_name`)."""
        return image_entry_name(tag, known)

    def check(self, config) -> None:
        check_timeout(config)
        parse_memory(config.memory or self.default_memory)
        changed = [f"--{key} {value}" for key, value in changed_choices(config).items()]
        if changed:
            raise RunnerError(f"--runner docker runs an image's predict.sh as built (the defaults: "
                              f"{', '.join(choice_defaults(config.device).values())}); "
                              f"{', '.join(changed)} cannot be passed into it")
        if config.device != "cpu":
            raise RunnerError("--runner docker runs on the CPU, as the challenge does (no GPUs are passed in)")
        if config.image and len(config.models) > 1:
            raise RunnerError("--image is one image: give at most one --models name for it")

    def targets(self, specs, config, plugins, threads: int, log=print) -> list[Target]:
        from harness.profiling import default_threads

        client = _connect()
        container_threads = default_threads()  # a container sees every CPU (no --cpus), as the challenge's
        facts = {"runner": self.name, "timing_mode": TIMING_MODE, "memory_limit": config.memory or self.default_memory}

        def target(entry: str, segmenter: str, describe, tag_of, spec=None) -> Target:
            def open_() -> FunctionSession:
                info = describe()
                tag = tag_of(info)
                update_models(config.out_dir, entry, {**info, **_image_facts(client, tag), **facts,
                                                      **self.entry_facts(config, spec)})
                executor = DockerExecutor(client, tag, config, default_memory=self.default_memory)
                return FunctionSession(self.case_function(executor, entry, segmenter, config, container_threads,
                                                          spec, info))

            return Target(entry, open_, runner=self.name, timing_mode=TIMING_MODE)

        def described(spec):
            return lambda: describe_model(spec, config, plugins, threads, variant_tags(spec, config),
                                          prompts=self.describe_prompts)

        if config.image:
            tag = _resolve_image(client, config.image, log)
            if specs:  # the image is one of ours (or claims to be): rank it as that segmenter
                spec = specs[0]
                return [target(entry_name(spec, config), spec.name, described(spec), lambda info: tag, spec)]
            entry = self.foreign_entry(tag, set(plugins.segmenters()), config)
            foreign = {"segmenter": entry, "tags": [self.name], "title": tag, "family": "submission",
                       "resolution": None, "reference": "", "plugin": None, "reported": None, "params": None,
                       "flops": None, "weights": None}
            return [target(entry, entry, lambda: dict(foreign), lambda info: tag)]
        return [target(entry_name(spec, config), spec.name, described(spec),
                       lambda info, spec=spec: harness_image(client, spec.name, config, info, log), spec)
                for spec in specs]
