"""Hook specifications of medsam-harness (pluggy project name ``harness``).

Plugins are modules or objects registered through the ``harness`` entry-point group, the
built-in ones included::

    # pyproject.toml of a third-party package
    [project.entry-points.harness]
    mymodel = "mymodel_harness.plugin"

and implement any of the hooks below with :data:`hookimpl`.
"""
from __future__ import annotations

import pluggy

from typing import TYPE_CHECKING

from harness.plugin_api import SegmenterSpec

if TYPE_CHECKING:
    from harness.runners.base import Runner

PROJECT = "harness"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def harness_segmenters() -> list[SegmenterSpec]:
    """Return the segmenters this plugin provides.

    Example::

        from harness import hookimpl, SegmenterSpec

        @hookimpl
        def harness_segmenters():
            return [SegmenterSpec(name="mymodel", title="My Model", family="sam",
                                  resolution=512, load=load_my_model)]
    """


@hookspec
def harness_runners() -> list["Runner"]:
    """Return the runners (``--runner NAME``) this plugin provides: instances of
    :class:`harness.runners.base.Runner` subclasses. The built-ins (native, subprocess, docker, ray)
    register through this hook too (:mod:`harness.runners.builtin`, always loaded).

    Example::

        from harness import hookimpl
        from harness.runners.base import Runner

        class SlurmRunner(Runner):
            name, timing_mode, label = "slurm", "end-to-end", "slurm job"
            def targets(self, specs, config, plugins, threads, log=print): ...

        @hookimpl
        def harness_runners():
            return [SlurmRunner()]
    """
