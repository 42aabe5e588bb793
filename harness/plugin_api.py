"""The plugin API's records: what plugins return (SegmenterSpec, Reported) and are given (LoadOptions), and
the Segmenter protocol a loaded segmenter follows. The hooks themselves are in :mod:`harness.hookspecs`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from harness.cases import Case
from harness.choices import DEFAULT_BACKEND, DEFAULT_PATH, DEFAULT_PRECISION


@dataclass(frozen=True)
class Reported:
    """Figures published for a segmenter (for the leaderboard's "published" columns).

    Percentages for DSC/NSD, seconds per case, MB of peak memory; ``None`` where not published.
    ``dsc_reproduced`` / ``nsd_reproduced`` are a third party's reproduction of the same model
    (the "-R" columns of the seed tables); ``per_modality`` and ``per_modality_reproduced`` map a
    modality name (as :func:`harness.cases.modality_from_name` spells it) to (DSC, NSD).
    """

    source: str
    dsc: float | None = None
    nsd: float | None = None
    dsc_reproduced: float | None = None
    nsd_reproduced: float | None = None
    per_modality: Mapping[str, tuple[float, float]] | None = None
    per_modality_reproduced: Mapping[str, tuple[float, float]] | None = None
    params_m: float | None = None
    gflops: float | None = None
    runtime_2d_s: float | None = None
    runtime_3d_s: float | None = None
    memory_2d_mb: float | None = None
    memory_3d_mb: float | None = None
    hardware: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    """What the runner hands a segmenter's loader.

    ``weights`` is the user's ``--weights NAME=PATH`` for this segmenter (None: the segmenter's
    default, or a file found in ``weights_dir``); ``all_weights`` holds every ``--weights`` entry,
    for segmenters built from parts of others (a distilled student completed with MedSAM's
    decoder); ``weights_dir`` is ``--weights-dir``; ``allow_pickle`` is the user's explicit
    ``--allow-pickle`` for whole-module pickles; ``device`` a torch device string; ``threads`` the
    CPU thread count the run pins; ``path`` the execution path (``--path``, default :data:`DEFAULT_PATH`): ``"faithful"`` (the
    upstream call pattern) or ``"fast"`` (batched and cached model calls, same masks within the
    reference bars), for segmenters that have both (the engine-based ones); ``precision`` the
    numeric precision (``--precision``): ``"fp32"`` or ``"bf16"`` (CPUs with AMX / AVX512-BF16, or
    a GPU); ``backend`` the executor of the model's encoder and decoder (``--backend``):
    ``"torch"``, ``"onnxruntime"`` or ``"openvino"``, or ``"auto"`` (default: :data:`DEFAULT_BACKEND`).  Segmenters without these choices ignore
    them (a baseline) or raise ValueError for a value they cannot honour.
    """

    weights: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    weights_dir: Path | None = None
    all_weights: Mapping[str, Path] = field(default_factory=dict)
    allow_pickle: bool = False
    path: str = DEFAULT_PATH
    precision: str = DEFAULT_PRECISION
    backend: str = DEFAULT_BACKEND


@runtime_checkable
class Segmenter(Protocol):
    """A loaded segmenter: turns a validated case into a uint16 label map of its spatial shape."""

    def segment(self, case: Case) -> np.ndarray:  # pragma: no cover - protocol
        """Return ``segs`` (uint16, ``case.spatial_shape``); box row i -> label i+1, later boxes win."""
        ...

    def describe(self) -> dict[str, Any]:  # pragma: no cover - protocol
        """Facts for the leaderboard: at least ``params`` and ``flops`` (None where not meaningful),
        and ``weights`` (path or description of the weights in use)."""
        ...


ENGINE_CHOICES = ("path", "precision", "backend")
"""The execution choices a segmenter built on :class:`models.inference.engine.BoxPromptEngine` honours."""

PROMPTS = ("box", "points", "mask")
"""The prompts a segmenter may declare in :attr:`SegmenterSpec.prompts`."""


@dataclass(frozen=True)
class SegmenterSpec:
    """A segmenter a plugin provides (returned by the ``harness_segmenters`` hook).

    ``load(options) -> Segmenter`` is called once per run. ``resolution`` is the encoder input size
    in pixels (None for non-learned baselines). ``reference`` names the upstream pipeline reproduced.
    ``choices`` names the execution choices of :class:`LoadOptions` the loader honours (any of
    ``"path"``, ``"precision"``, ``"backend"``); a run that sets one of them away from its default
    (the fast path, fp32, the backend ``auto`` picks) records its results under a tagged name, e.g.
    ``l0[faithful]`` or ``l0[bf16]``, so
    that variants of one segmenter are separate leaderboard rows.  Choices a spec does not name
    are ignored for it.

    ``prompts`` names what the segmenter uses of a case: ``"box"`` (every segmenter), ``"points"``
    (``Case.clicks``, the interactive protocol's foreground/background clicks) and ``"mask"``
    (``Case.prev_segs``, the previous step's segmentation). Default: boxes only; the harness hands such
    a segmenter cases without clicks or previous masks, so it gives the same segs at every step.
    """

    name: str
    title: str
    family: str
    load: Callable[[LoadOptions], Segmenter] = field(repr=False, compare=False)
    resolution: int | None = None
    reported: Reported | None = None
    choices: tuple[str, ...] = ()
    reference: str = ""
    description: str = ""
    prompts: frozenset[str] = frozenset({"box"})
