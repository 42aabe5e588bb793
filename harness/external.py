"""The runners that time a case end to end, outside this process: ``subprocess`` and ``docker``.

For each case, as the challenge's ``CVPR24_time_eval.py`` does: a fresh inputs folder holding that one
case, a fresh outputs folder, then one run of the segmenter over them, timed by the wall clock around
the whole run (timing mode ``end-to-end``: process or container start, imports, model load, reading
the case, inference and writing the output all count). Then ``OUTPUT/<case>.npz`` is read and
checked (present under the case's name, key ``segs``, the case's spatial shape, integer labels) and
saved and scored exactly as the native runner does (:func:`harness.runner.save_and_score`).

* ``subprocess``: ``python -m harness.cli predict --model NAME -i IN -o OUT`` (the same options as
  the run). Peak memory: the child's ``VmHWM`` (its peak resident set), polled from
  ``/proc/<pid>/status`` every few milliseconds until it exits. The kernel keeps that high-water
  mark itself, so peaks between polls count; only growth in the last poll interval before the exit
  can be missed. (``wait4``'s ``ru_maxrss`` is not used: Linux carries the parent's own high-water
  mark over into the child at ``exec``, so it reports at least the parent's peak.)
* ``docker``: the image's ``/workspace/predict.sh``, run through the docker SDK as the challenge runs
  it: ``/bin/bash -c "sh predict.sh"``, ``mem_limit`` (default 8G), the inputs folder mounted
  read-only at ``/workspace/inputs/``, the outputs folder read-write at ``/workspace/outputs/``, no
  network, under a cgroup parent of its own, labelled ``org.medsam-harness.evaluation=<case>``; the
  container and the cgroup are removed after the case (also on Ctrl-C). Peak memory: that cgroup's ``memory.max_usage_in_bytes``
  (cgroup v1) or ``memory.peak`` (v2), read after the container exits: everything the container
  charged, page cache included. The image is the harness's own (built once per model and reused,
  :func:`harness.container.images.build_image`) or any team's (``--image TAG`` or ``team.tar.gz``).

A non-zero exit (with the tail of the log), a kill at the memory limit, a timeout, a missing or
misnamed output and a wrong shape or dtype are each an error record naming the case file; the run
goes on.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from harness.cases import Case, CaseError, load_case, load_segs
from harness.pluginmanager import HarnessPlugins
from harness.specs import SegmenterSpec

TIMING_MODE = "end-to-end"
RUNNERS = ("native", "subprocess", "docker")
CHALLENGE_COMMAND = ["/bin/bash", "-c", "sh predict.sh"]
INPUTS_MOUNT = "/workspace/inputs/"
OUTPUTS_MOUNT = "/workspace/outputs/"
LOG_TAIL_CHARS = 1500
CGROUP_ROOT = Path("/sys/fs/cgroup")
EVALUATION_LABEL = "org.medsam-harness.evaluation"  # on each case's container: the case's file name


class RunnerError(RuntimeError):
    """The runner cannot start at all: bad settings, no docker engine, an image that cannot be built
    or loaded. (Problems of one case are error records instead.)"""


class CaseRunError(CaseError):
    """A case failed outside this process (exit status, memory limit, timeout, bad output)."""


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


def check_config(config) -> None:
    """Refuse settings the chosen runner cannot honour, before any work."""
    from harness.runner import changed_choices, choice_defaults

    if config.runner not in RUNNERS:
        raise RunnerError(f"unknown runner {config.runner!r}; expected one of {', '.join(RUNNERS)}")
    if config.image and config.runner != "docker":
        raise RunnerError(f"--image runs a docker image; it needs --runner docker, not {config.runner}")
    if config.timeout is not None and config.timeout <= 0:
        raise RunnerError(f"--timeout must be positive, got {config.timeout}")
    if config.timeout is not None and config.runner == "native":
        raise RunnerError("--timeout needs --runner subprocess or docker (a native run cannot stop a case "
                          "inside its own process)")
    if config.runner != "docker":
        return
    parse_memory(config.memory)
    changed = [f"--{key} {value}" for key, value in changed_choices(config).items()]
    if changed:
        raise RunnerError(f"--runner docker runs an image's predict.sh as built (the defaults: "
                          f"{', '.join(choice_defaults(config.device).values())}); "
                          f"{', '.join(changed)} cannot be passed into it")
    if config.device != "cpu":
        raise RunnerError("--runner docker runs on the CPU, as the challenge does (no GPUs are passed in)")
    if config.image and len(config.models) > 1:
        raise RunnerError("--image is one image: give at most one --models name for it")


@dataclass
class Outcome:
    """What one external run of one case gave: the timed wall clock, the exit, memory, the log."""

    seconds: float
    exit_code: int | None
    peak_mb: float | None
    memory_method: str | None
    log: str = ""
    problem: str | None = None  # None: it exited 0 in time


def _tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _with_log(problem: str, log: str) -> str:
    tail = _tail(log)
    return f"{problem}; log tail:\n{tail}" if tail else f"{problem} (no log output)"


# --------------------------------------------------------------------------------------------- subprocess

def _vmhwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None  # a zombie has no memory lines


class _ChildPeak(threading.Thread):
    """Poll a child's kernel-kept peak RSS (VmHWM) until stopped; ``kb`` is the last (largest) value."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.kb = pid, interval_s, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            kb = _vmhwm_kb(self.pid)
            if kb is not None:
                self.kb = max(self.kb or 0, kb)
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class SubprocessExecutor:
    """One ``harness predict`` process per case. The child finds the segmenter among the installed
    plugins (entry points), as ``harness run`` on the command line does; a plugin registered only in
    this process (``run(config, plugins=...)``) is unknown to it, and each case fails saying so."""

    runner = "subprocess"
    what = "harness predict"
    memory_method = "VmHWM of the child process, polled every 5 ms"

    def __init__(self, model: str, config, threads: int):
        self.model, self.config, self.threads = model, config, threads

    def command(self, inputs: Path, outputs: Path) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "harness.cli", "predict", "--model", self.model, "-i", str(inputs),
               "-o", str(outputs), "--threads", str(self.threads), "--device", c.device, "--path", c.path,
               "--precision", c.precision, "--backend", c.backend]
        for name, path in c.weights.items():
            cmd += ["--weights", f"{name}={path}"]
        if c.weights_dir is not None:
            cmd += ["--weights-dir", str(c.weights_dir)]
        if c.allow_pickle:
            cmd.append("--allow-pickle")
        return cmd

    def execute(self, inputs: Path, outputs: Path, work: Path) -> Outcome:
        log_path = work / "predict.log"
        timeout = self.config.timeout
        with log_path.open("wb") as log_fh:
            start = time.perf_counter()
            proc = subprocess.Popen(self.command(inputs, outputs), stdin=subprocess.DEVNULL, stdout=log_fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            peak = _ChildPeak(proc.pid)
            peak.start()
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                _killpg(proc.pid)

            timer = threading.Timer(timeout, kill) if timeout else None
            if timer:
                timer.start()
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
                seconds = time.perf_counter() - start
            finally:
                if timer:
                    timer.cancel()
                peak.stop()
                if proc.poll() is None:  # interrupted (Ctrl-C) before it finished: leave nothing behind
                    _killpg(proc.pid)
                    proc.wait()
        code = proc.returncode
        log = log_path.read_text(errors="replace")
        peak_mb = peak.kb / 1024.0 if peak.kb else None
        problem = None
        if timed_out.is_set():
            problem = f"timed out after {timeout:g} s (killed)"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            problem = _with_log(f"{self.what} was killed by {name}"
                                + (" (out of memory?)" if -code == signal.SIGKILL else ""), log)
        elif code != 0:
            problem = _with_log(f"{self.what} exited with status {code}", log)
        return Outcome(seconds, code, peak_mb, self.memory_method if peak_mb else None, log, problem)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------- docker

def _cgroup_version() -> int:
    return 2 if (CGROUP_ROOT / "cgroup.controllers").is_file() else 1


class DockerExecutor:
    """One container per case, started as the challenge starts it, under a cgroup parent of its own."""

    runner = "docker"
    what = "the container"

    def __init__(self, client, image: str, config):
        self.client, self.image, self.config = client, image, config
        self.memory = config.memory
        self.limit_bytes = parse_memory(config.memory)
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
            problem = _with_log(f"out of memory: the container was killed at its {self.memory} memory limit "
                                f"(exit status {code}, OOMKilled)", log)
        elif code == 137:
            problem = _with_log("the container was killed (exit status 137, SIGKILL; out of memory?)", log)
        elif code != 0:
            problem = _with_log(f"the container exited with status {code}", log)
        peak_mb = peak / (1024.0 * 1024.0) if peak is not None else None
        return Outcome(seconds, code, peak_mb, self.memory_method if peak_mb is not None else None, log, problem)


# --------------------------------------------------------------------------------------------- per case

def read_output(outputs: Path, case: Case, case_path: Path, what: str) -> np.ndarray:
    """``OUTPUT/<case>.npz``, checked: present under the case's name, key ``segs``, the case's spatial
    shape, integer labels. Raises :class:`CaseRunError` naming the case file."""
    target = outputs / case.name
    if not target.is_file():
        found = sorted(p.name for p in outputs.iterdir() if not p.name.startswith("."))
        listing = f"it wrote {', '.join(found)}" if found else "the outputs folder is empty"
        raise CaseRunError(case_path, f"{what} wrote no output named {case.name} ({listing})")
    try:
        return load_segs(target, case.spatial_shape)
    except CaseError as exc:
        raise CaseRunError(case_path, f"output {case.name} of {what}: {exc.problem}") from None


def run_external_case(executor, entry: str, segmenter: str, case_path: Path, config, threads: int | None) -> dict:
    """One case through ``executor`` in fresh inputs/outputs folders; saved and scored as the native
    runner does. Never raises for a problem of the case, the model or the image."""
    from harness import runner

    record = runner.new_record(entry, segmenter, case_path, config, threads, timing_mode=TIMING_MODE)
    if executor.runner == "docker":
        record.update(image=executor.image, memory_limit=executor.memory)
    if config.timeout:
        record["timeout_s"] = config.timeout
    stage = runner.Stage()
    try:
        case = load_case(case_path)
        runner.describe_case(record, case)
        stage.name = f"running {executor.what}"
        with tempfile.TemporaryDirectory(prefix="harness-case-", ignore_cleanup_errors=True) as tmp:
            work = Path(tmp)
            inputs, outputs = work / "inputs", work / "outputs"
            inputs.mkdir()
            outputs.mkdir()
            shutil.copyfile(case_path, inputs / case_path.name)
            # an image's non-root user must read the case and write its output
            inputs.chmod(0o755)
            (inputs / case_path.name).chmod(0o644)
            outputs.chmod(0o777)
            outcome = executor.execute(inputs, outputs, work)
            record.update(seconds=outcome.seconds, peak_rss_mb=outcome.peak_mb, memory_method=outcome.memory_method,
                          exit_code=outcome.exit_code)
            if outcome.problem:
                raise CaseRunError(case_path, outcome.problem)
            stage.name = f"reading the output of {executor.what}"
            segs = read_output(outputs, case, case_path, executor.what)
        runner.save_and_score(record, case, segs, case_path, config, stage)
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
        runner.record_error(record, stage, exc, case_path)
    return runner.finish_record(record)


# --------------------------------------------------------------------------------------------- targets

def _describe(spec: SegmenterSpec, config, plugins: HarnessPlugins, threads: int, tags: list[str]) -> dict:
    """The models.json entry of ``spec``: loaded once here, as the native runner does, for its facts
    (parameters, FLOPs, weights and their checksum); the model is freed before any case runs."""
    from harness import runner

    segmenter = spec.load(runner.load_options(spec, config, threads))
    try:
        return runner._model_info(spec, segmenter.describe(), plugins, tags)
    finally:
        del segmenter


def _connect():
    try:
        from harness.container.engine import connect
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
        from harness.container.images import load_image

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
    weights (sha256), else a fresh :func:`~harness.container.images.build_image`. ``info`` is the
    model's models.json entry (its ``weights`` file and checksum, as loaded here)."""
    import docker

    from harness import __version__
    from harness.container import images

    weights = config.weights.get(model)
    described = info.get("weights")
    if weights is None and config.weights_dir is not None and isinstance(described, str) and Path(described).is_file():
        weights = Path(described)  # found through --weights-dir, which the image build does not see
    from harness.cli import _image_parts  # the parts `harness build` bakes in too (a distilled student's donor)

    extra = {name: Path(path) for name, path in _image_parts(model, dict(config.weights)).items()}
    if weights is not None:
        want = images.file_sha256(Path(weights))
    elif info.get("weights_sha256"):
        want = info["weights_sha256"]
    elif isinstance(described, str) and Path(described).is_file():
        want = images.file_sha256(Path(described))
    else:
        want = "none"
    tag = images.default_tag(model)
    try:
        labels = client.images.get(tag).labels or {}
    except docker.errors.ImageNotFound:
        labels = None
    if labels is not None:
        expected = {"model": model, "version": __version__, "weights-sha256": want,
                    "runtime": images.ensure_runtime_image(client, log), "backend": info.get("backend") or "none",
                    **{f"weights-sha256.{name}": images.file_sha256(path) for name, path in extra.items()}}
        stale = [key for key, value in expected.items() if labels.get(images.LABEL + key) != value]
        if not stale:
            log(f"{model}: using the existing image {tag}")
            return tag
        log(f"{model}: rebuilding {tag} (changed: {', '.join(stale)})")
    try:
        return images.build_image(model, weights=weights, client=client, log=log, extra_weights=extra).tag
    except Exception as exc:  # noqa: BLE001 - ImageBuildError, a weights file, the engine
        raise RunnerError(f"{model}: cannot build its image: {type(exc).__name__}: {exc}") from exc


def image_entry_name(tag: str, known: set[str]) -> str:
    """The entry of a foreign image: its repository's last component (``team`` for ``team:latest``);
    ``NAME[docker]`` when that is also a segmenter's name, so that it is never taken for a native run."""
    repo = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", repo.rsplit("/", 1)[-1]) or "image"
    return f"{name}[docker]" if name in known else name


def targets(specs: list[SegmenterSpec], config, plugins: HarnessPlugins, threads: int, log=print) -> list:
    """The entries a subprocess or docker run goes through (see :class:`harness.runner.Target`)."""
    from harness import runner

    def make(entry: str, open_: Callable) -> "runner.Target":
        return runner.Target(entry, open_, runner=config.runner, timing_mode=TIMING_MODE)

    if config.runner == "subprocess":
        out = []
        for spec in specs:
            entry = runner.entry_name(spec, config)

            def open_(spec=spec, entry=entry):
                info = _describe(spec, config, plugins, threads, runner.variant_tags(spec, config))
                from harness.results import update_models

                update_models(config.out_dir, entry, {**info, "runner": "subprocess", "timing_mode": TIMING_MODE})
                executor = SubprocessExecutor(spec.name, config, threads)
                return lambda case_path: run_external_case(executor, entry, spec.name, case_path, config, threads)

            out.append(make(entry, open_))
        return out

    # docker
    from harness.results import update_models

    client = _connect()
    container_threads = runner.default_threads()  # a container sees every CPU (no --cpus), as the challenge's
    if config.image:
        tag = _resolve_image(client, config.image, log)
        if specs:  # the image is one of ours (or claims to be): rank it as that segmenter
            spec = specs[0]
            entry, segmenter_name = runner.entry_name(spec, config), spec.name
            base = lambda: _describe(spec, config, plugins, threads, runner.variant_tags(spec, config))  # noqa: E731
        else:
            entry = image_entry_name(tag, set(plugins.segmenters()))
            segmenter_name = entry
            base = lambda: {"segmenter": entry, "tags": ["docker"], "title": tag, "family": "submission",  # noqa: E731
                            "resolution": None, "reference": "", "plugin": None, "reported": None,
                            "params": None, "flops": None, "weights": None}

        def open_image():
            update_models(config.out_dir, entry, {**base(), **_image_facts(client, tag), "runner": "docker",
                                                  "timing_mode": TIMING_MODE, "memory_limit": config.memory})
            executor = DockerExecutor(client, tag, config)
            return lambda case_path: run_external_case(executor, entry, segmenter_name, case_path, config,
                                                       container_threads)

        return [make(entry, open_image)]

    out = []
    for spec in specs:
        entry = runner.entry_name(spec, config)

        def open_model(spec=spec, entry=entry):
            info = _describe(spec, config, plugins, threads, runner.variant_tags(spec, config))
            tag = harness_image(client, spec.name, config, info, log)
            update_models(config.out_dir, entry, {**info, **_image_facts(client, tag), "runner": "docker",
                                                  "timing_mode": TIMING_MODE, "memory_limit": config.memory})
            executor = DockerExecutor(client, tag, config)
            return lambda case_path: run_external_case(executor, entry, spec.name, case_path, config,
                                                       container_threads)

        out.append(make(entry, open_model))
    return out


__all__ = ["TIMING_MODE", "RUNNERS", "RunnerError", "CaseRunError", "Outcome", "SubprocessExecutor",
           "DockerExecutor", "check_config", "parse_memory", "read_output", "run_external_case", "targets",
           "image_entry_name"]
