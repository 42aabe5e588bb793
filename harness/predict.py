"""``harness predict``: segment every case of a folder with one model, as a challenge container does.

``harness predict --model NAME -i IN -o OUT`` loads the segmenter once (the plugins and
:class:`~harness.plugin_api.LoadOptions` of ``harness run``), then for every ``IN/*.npz`` (or
``IN/imgs/*.npz``) in name order loads the case, segments it and writes ``OUT/<same name>`` with
the key ``segs`` (uint16). The segmentation is the native runner's own code path
(:func:`harness.runners.case.timed_segment` and :func:`harness.runners.case.check_segs`). A case that fails is
reported on stderr with its file and the problem, and the others still run; the exit status is
non-zero if any case failed.

2025-format inputs (the interactive protocol, :mod:`harness.interactive`): a file whose ``boxes`` (or
``clicks``) is stored as pickled per-class dicts is read with the restricted reader
(:func:`harness.interactive.safe_npz.read_interactive_input`, never ``np.load(allow_pickle=True)``) and
made a case as ``harness run --protocol interactive`` makes it
(:func:`harness.interactive.run.case_from_input`: box ``i`` labels class ``i + 1``; the clicks, in the
order given, only for a segmenter that declares ``"points"``, the previous prediction only for one that
declares ``"mask"``); its ``segs`` are written under the same file name, as the official evaluator
reads them. Other files are 2024-format cases, read as before.

It is what the images of :mod:`harness.container` run as ``predict.sh``, and what the subprocess
runner starts once per case (once per step with ``--protocol interactive``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.cases import Case, discover_cases, load_case, save_segs
from harness.choices import DEFAULT_BACKEND, DEFAULT_PATH, DEFAULT_PRECISION
from harness.pluginmanager import HarnessPlugins
from harness.profiling import default_threads, pin_threads
from harness.runners.case import check_segs, error_text, load_options, timed_segment


@dataclass
class PredictReport:
    """What one ``harness predict`` did: the cases written and the ones that failed (name -> message)."""

    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def split_weights(items: list[str], model: str, known: set[str]) -> dict[str, Path]:
    """``--weights`` of ``harness predict``: ``PATH`` (the model's weights) or ``NAME=PATH`` (weights
    of segmenter NAME, e.g. a part of a composed model); NAME must be a known segmenter."""
    weights: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name.strip() in known and path:
            weights[name.strip()] = Path(path).expanduser()
        else:
            weights[model] = Path(item).expanduser()
    for name, path in weights.items():
        if not path.is_file():
            raise FileNotFoundError(f"--weights {name}={path}: no such file")
    return weights


def predict(
    model: str,
    inputs: str | Path,
    outputs: str | Path,
    *,
    weights: dict[str, Path] | None = None,
    weights_dir: Path | None = None,
    allow_pickle: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    path: str = DEFAULT_PATH,
    precision: str = DEFAULT_PRECISION,
    backend: str = DEFAULT_BACKEND,
    plugins: HarnessPlugins | None = None,
    log=print,
    max_case_gb: float | None = None,
) -> PredictReport:
    """Segment every case of ``inputs`` with ``model`` into ``outputs``; never raises for one case.

    ``max_case_gb``: a case file whose arrays would take more than this decompressed is refused before
    it is read (default :func:`harness.cases.max_case_bytes`: ``HARNESS_MAX_CASE_GB``, else a quarter of
    physical memory).

    Raises FileNotFoundError for a missing input folder, and whatever the segmenter's loader raises
    when the model cannot load.
    """
    from harness.run import RunConfig

    inputs, outputs = Path(inputs), Path(outputs)
    plugins = plugins or HarnessPlugins()
    spec = plugins.get(model)
    cases = discover_cases(inputs)
    config = RunConfig(models=[model], data_dir=inputs, out_dir=outputs, weights=dict(weights or {}),
                       weights_dir=weights_dir, allow_pickle=allow_pickle, threads=threads, device=device,
                       path=path, precision=precision, backend=backend)
    threads = threads or default_threads()
    pin_threads(threads)
    segmenter = spec.load(load_options(spec, config, threads))
    outputs.mkdir(parents=True, exist_ok=True)
    max_bytes = None if max_case_gb is None else int(max_case_gb * 10**9)
    report = PredictReport()
    for case_path in cases:
        stage = "loading the case"
        try:
            case = _load_any(case_path, max_bytes, spec, segmenter)
            stage = "segmenting"
            segs, seconds, _ = timed_segment(segmenter, case)
            segs = check_segs(segs, case)
            stage = "writing segs"
            save_segs(outputs / case_path.name, segs)
        except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
            message = f"while {stage}: {error_text(exc, case_path)}"
            report.failed[case_path.name] = message
            print(f"harness predict: error: {message}", file=sys.stderr, flush=True)
            continue
        report.written.append(case_path.name)
        log(f"{case_path.name}: {seconds:.3f}s -> {outputs / case_path.name}")
    return report


def _load_any(case_path: Path, max_bytes: int | None, spec, segmenter) -> Case:
    """A 2024-format case (:func:`harness.cases.load_case`), or a 2025-format input made a case as the
    interactive protocol makes it (see the module docstring)."""
    from harness.interactive.safe_npz import is_interactive_input

    if not is_interactive_input(case_path):
        return load_case(case_path, max_bytes)
    from harness.cases import set_max_case_gb
    from harness.interactive.run import accepted_prompts, case_from_input
    from harness.interactive.safe_npz import read_interactive_input

    if max_bytes is not None:  # the restricted reader's limit (this process's setting)
        set_max_case_gb(max_bytes / 10**9)
    return case_from_input(read_interactive_input(case_path), accepted_prompts(spec, segmenter))
