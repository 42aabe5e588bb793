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

from harness.specs import SegmenterSpec

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
