"""The choice vocabulary of a run, torch-free: execution paths, precisions, backends, runner names, and
how a run's choices name its leaderboard entry.

``--backend auto`` is resolved here, once, without importing torch or the exporters (their packages are
looked up with ``importlib.util.find_spec``): on the fast path on a CPU it is ``openvino`` where
openvino, onnx and onnxscript are installed, else ``torch``; the faithful path always runs on torch.
The segmenter still receives ``"auto"`` (``LoadOptions.backend``), so that an export that fails under
``auto`` falls back to torch with a warning (``backend_fallback`` in models.json) instead of failing.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.run import RunConfig
    from harness.plugin_api import SegmenterSpec

PATHS = ("faithful", "fast")
DEFAULT_PATH = "fast"
"""The execution path runs use unless told otherwise: the fast path, parity-tested for every built-in
model against the upstream references (tests/test_zoo_e2e.py) and never slower than the faithful one
in `harness bench` (README, Performance)."""

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"

AUTO = "auto"
EXPORT_BACKENDS = ("onnxruntime", "openvino")
BACKENDS = (AUTO, "torch", *EXPORT_BACKENDS)
DEFAULT_BACKEND = AUTO
"""The backend runs use unless told otherwise: ``"auto"``, the fastest backend parity-tested for every
built-in model that is installed: openvino on the fast path where ``medsam-harness[backends]`` is
installed, else torch (:func:`resolve_backend`)."""

EXPORTER_PACKAGES = ("onnx", "onnxscript")
BACKEND_PACKAGES = {backend: (backend, *EXPORTER_PACKAGES) for backend in EXPORT_BACKENDS}
"""What each exported backend needs installed: its runtime, and torch's ONNX exporter's packages."""

DEFAULT_RUNNER = "native"
BUILTIN_RUNNERS = ("native", "subprocess", "docker", "ray")


def missing(packages) -> list[str]:
    """Those of ``packages`` that cannot be imported, found without importing them (``find_spec`` also
    counts a module blocked by a None in sys.modules as missing)."""
    out = []
    for name in packages:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a None entry in sys.modules, or a broken package
            found = False
        if not found:
            out.append(name)
    return out


def missing_packages(backend: str) -> list[str]:
    """The packages an exported ``backend`` needs (to export and to run its graphs) that are not installed."""
    return missing(BACKEND_PACKAGES[backend])


def resolve_backend(requested: str, path: str = DEFAULT_PATH, device: str = "cpu") -> str:
    """The backend a run uses: ``requested`` itself, except ``"auto"`` (the default of ``harness run``).

    ``"auto"`` is the fastest backend whose masks are parity-tested for every built-in model
    (tests/test_backends.py, tests/test_zoo_e2e.py): ``"openvino"`` on the fast path on a CPU when
    openvino, onnx and onnxscript are installed (``pip install 'medsam-harness[backends]'``), else
    ``"torch"``.  The faithful path stays on torch: it is the upstream call pattern run by our own
    model code, the reference every other path is compared with.
    """
    if requested != AUTO:
        return requested
    if path == "fast" and str(device).split(":")[0] == "cpu" and not missing_packages("openvino"):
        return "openvino"
    return "torch"


def choice_defaults(device: str = "cpu", path: str = DEFAULT_PATH) -> dict[str, str]:
    """What a run does unless told otherwise, on this machine: the fast path, fp32, and the backend
    ``--backend auto`` picks for ``path``."""
    return {"path": DEFAULT_PATH, "precision": DEFAULT_PRECISION, "backend": resolve_backend(AUTO, path, device)}


def resolved_backend(config: "RunConfig") -> str:
    """The backend ``config`` runs on, ``auto`` resolved for its path and device."""
    return resolve_backend(config.backend, config.path, config.device)


def changed_choices(config: "RunConfig") -> dict[str, str]:
    """The execution choices (path, precision, backend) this run sets away from :func:`choice_defaults`,
    in that order.  The backend is compared with what ``auto`` picks for the run's path, so
    ``--path faithful`` (which runs torch) is one change, not two."""
    chosen = {"path": config.path, "precision": config.precision, "backend": resolved_backend(config)}
    return {key: chosen[key] for key, default in choice_defaults(config.device, config.path).items()
            if chosen[key] != default}


def variant_tags(spec: "SegmenterSpec", config: "RunConfig") -> list[str]:
    """What sets this run of ``spec`` apart from the defaults (:func:`changed_choices`), as short tags:
    only the choices ``spec.choices`` honours, then the runner (the default runner adds none), then
    ``interactive`` for the 2025 interactive protocol (:mod:`harness.interactive.run`), then ``jitter=L``
    for a level of a box-jitter sweep (:mod:`harness.jitter`)."""
    tags = [value for key, value in changed_choices(config).items() if key in spec.choices]
    if config.runner != DEFAULT_RUNNER:
        tags.append(config.runner)
    if getattr(config, "protocol", None) == "interactive":
        tags.append("interactive")
    if getattr(config, "box_jitter", None) is not None:
        tags.append(f"jitter={config.box_jitter}")
    return tags


def entry_name(spec: "SegmenterSpec", config: "RunConfig") -> str:
    """The name a run of ``spec`` is stored and ranked under: ``l0``, ``l0[faithful,bf16]``, ``l0[docker]``."""
    tags = variant_tags(spec, config)
    return f"{spec.name}[{','.join(tags)}]" if tags else spec.name
