"""What every runner implements: how the cases of one leaderboard entry are executed.

A *runner* (``--runner NAME``) turns the segmenters a run asks for into :class:`Target` objects, one per
leaderboard entry. The driver (:func:`harness.run.run`) opens a target when it has cases left to run,
streams the records its :class:`Session` yields into ``results.jsonl``, and closes it. Runners are plugins:
the built-ins register through the ``harness_runners`` hook (:mod:`harness.runners.builtin`), exactly as
a third-party package would.

The per-case steps every runner shares (load the case, check the segs, save, score, record) are in
:mod:`harness.runners.case`; a runner only decides where and how ``segment`` happens and how it is timed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from harness.cases import CaseError

if TYPE_CHECKING:  # the driver imports the runners, not the other way round
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.plugin_api import SegmenterSpec


class RunnerError(RuntimeError):
    """The runner cannot start at all: bad settings, a missing package or engine, an image that cannot be
    built. (Problems of one case are error records instead.)"""


class CaseRunError(CaseError):
    """A case failed outside this process (exit status, memory limit, timeout, bad output, a lost worker)."""


class Session:
    """An opened target: runs cases and yields one record per case, in any order, as each finishes.

    ``started(case_path)`` is called just before a case begins (or is dispatched), for the driver's
    in-flight markers. The base class runs cases one at a time through :meth:`run_one`.
    """

    def run_one(self, case_path: Path) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, cases: Iterable[Path], started: Callable[[Path], None]) -> Iterator[dict]:
        for case_path in cases:
            started(case_path)
            yield self.run_one(case_path)

    def close(self) -> None:
        """Free what :meth:`Target.open` took (a loaded model, workers)."""


class FunctionSession(Session):
    """A session around a ``case_path -> record`` function (what most runners need)."""

    def __init__(self, run_one: Callable[[Path], dict], close: Callable[[], None] | None = None):
        self._run_one, self._close = run_one, close

    def run_one(self, case_path: Path) -> dict:
        return self._run_one(case_path)

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self._run_one = None  # the loaded model goes with it


@dataclass
class Target:
    """One leaderboard entry to run. ``open()`` prepares it (loads the model, builds an image, starts
    workers), writes its models.json entry and returns a :class:`Session`.

    ``crash_markers``: the driver keeps an in-flight marker per case, so that a case that kills the
    driver's own process twice is recorded as an error instead of blocking every resumed run; runners
    whose cases run in other processes that report their own deaths turn it off.
    """

    entry: str
    open: Callable[[], Session]
    runner: str
    timing_mode: str
    crash_markers: bool = True


class Runner:
    """A way to execute cases, registered through the ``harness_runners`` hook; subclass it.

    ``name`` is the ``--runner`` value and the tag of its entries (``litemedsam[docker]``; the default
    runner's entries are untagged); ``timing_mode`` says what a case's ``seconds`` measures
    (``in-process``: the segmentation alone; ``end-to-end``: process or container start, model load and
    I/O included; ``distributed``: the segmentation on a worker that may share its CPUs with others, never
    compared with the other two); ``label`` names its column in the leaderboard's runner-overhead table;
    ``order`` places it there (lower first; the built-ins use 0, 10, 20 and 30). Options of its own come
    in ``RunConfig.runner_options``.
    """

    name: str = ""
    timing_mode: str = "in-process"
    label: str = ""
    order: int = 100
    description: str = ""

    def check(self, config: "RunConfig") -> None:
        """Raise :class:`RunnerError` for settings this runner cannot honour, before any work."""

    def targets(self, specs: list["SegmenterSpec"], config: "RunConfig", plugins: "HarnessPlugins", threads: int,
                log: Callable[[str], None] = print) -> list[Target]:  # pragma: no cover - interface
        """The entries this run goes through, one per segmenter (or image)."""
        raise NotImplementedError

    def close(self) -> None:
        """Called once when the run ends, also after an error or Ctrl-C: stop what :meth:`targets` or the
        sessions started (a cluster connection, worker processes)."""
