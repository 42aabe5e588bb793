"""The built-in runners, registered through the ``harness_runners`` hook as any plugin's would be.
:class:`harness.pluginmanager.HarnessPlugins` always loads this plugin (as ``runners``), also when
``HARNESS_LOAD_PLUGINS`` restricts the others: a run always has its default runner."""
from __future__ import annotations

from harness.hookspecs import hookimpl
from harness.runners.docker import DockerRunner
from harness.runners.native import NativeRunner
from harness.runners.ray import RayRunner
from harness.runners.subprocess import SubprocessRunner


@hookimpl
def harness_runners():
    return [NativeRunner(), SubprocessRunner(), DockerRunner(), RayRunner()]
