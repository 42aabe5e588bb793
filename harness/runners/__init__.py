"""How the cases of a run are executed: one module per runner, one interface, one set of per-case steps.

* :mod:`harness.runners.base`: the interface (:class:`~harness.runners.base.Runner`,
  :class:`~harness.runners.base.Target`, :class:`~harness.runners.base.Session`) and the runner errors.
* :mod:`harness.runners.case`: the steps every runner shares (the record, the timed segmentation,
  checking, saving and scoring the segs).
* :mod:`harness.runners.native` (the default), :mod:`~harness.runners.subprocess`,
  :mod:`~harness.runners.docker` (end to end, sharing :mod:`~harness.runners.external`) and
  :mod:`~harness.runners.ray` (a Ray cluster).
* :mod:`harness.runners.builtin`: the plugin that registers the built-ins through the ``harness_runners``
  hook; a third-party package registers its own runner the same way
  (``HarnessPlugins().runners()`` lists them all).

The driver that uses them is :func:`harness.run.run`.
"""
from harness.runners.base import CaseRunError, FunctionSession, Runner, RunnerError, Session, Target

__all__ = ["CaseRunError", "FunctionSession", "Runner", "RunnerError", "Session", "Target"]
