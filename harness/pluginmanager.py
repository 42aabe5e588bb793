"""Plugin discovery and the segmenter registry.

Every plugin, built-in or third-party, is found through the ``harness`` entry-point group, except the
built-in runners (:mod:`harness.runners.builtin`), which are always loaded so that a run always has its
default runner. Plugins provide segmenters (``harness_segmenters``) and runners (``harness_runners``).

Environment:

* ``HARNESS_LOAD_PLUGINS=a,b`` loads only the named plugins (entry-point names); an empty value
  loads none. Unset: all installed plugins load.
* ``HARNESS_TRACE_PLUGINS=1`` prints every hook call and its result to stderr.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import warnings

import pluggy

from harness import hookspecs
from harness.plugin_api import SegmenterSpec

if TYPE_CHECKING:
    from harness.runners.base import Runner

ENTRY_POINT_GROUP = "harness"
ENV_LOAD = "HARNESS_LOAD_PLUGINS"
ENV_TRACE = "HARNESS_TRACE_PLUGINS"


class PluginError(RuntimeError):
    """A plugin could not be loaded, or two plugins conflict."""


class UnknownSegmenterError(LookupError):
    """No loaded plugin provides a segmenter of that name."""


class UnknownRunnerError(LookupError):
    """No loaded plugin provides a runner of that name."""


BUILTIN_RUNNERS_PLUGIN = "runners"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its entry-point name, where it comes from, and its segmenters."""

    name: str
    module: str
    distribution: str
    version: str
    segmenters: tuple[str, ...] = field(default=())
    runners: tuple[str, ...] = field(default=())

    @property
    def source(self) -> str:
        return f"plugin '{self.name}' ({self.module}, {self.distribution} {self.version})"


def _own_version() -> str:
    from harness import __version__

    return __version__


def _allowed_names() -> set[str] | None:
    raw = os.environ.get(ENV_LOAD)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class HarnessPlugins:
    """The loaded plugin set: a pluggy manager plus where each plugin came from."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        self._segmenters: dict[str, SegmenterSpec] | None = None
        self._runners: dict[str, "Runner"] | None = None
        self.failed: dict[str, str] = {}
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            self.pm.enable_tracing()
        from harness.runners import builtin

        self.register(builtin, BUILTIN_RUNNERS_PLUGIN, "medsam-harness", _own_version())
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        allowed = _allowed_names()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = ep.dist
            if ep.name in self._info:
                origin = f"{ep.value} from {dist.name if dist else '?'}"
                self._fail(ep.name, f"two plugins are named '{ep.name}': {self._info[ep.name].source} and {origin}; "
                                    f"the second is not loaded")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the others down
                origin = dist.name if dist else "?"
                self._fail(ep.name, f"plugin '{ep.name}' ({ep.value}, from {origin}) failed to import: {exc}")
                continue
            self.register(plugin, ep.name, dist.name if dist else "unknown", dist.version if dist else "")

    def _fail(self, name: str, message: str) -> None:
        """Record a plugin that cannot be used; the others go on."""
        self.failed[name] = message
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def register(self, plugin: object, name: str, distribution: str = "local", version: str = "") -> None:
        """Register a plugin object or module (used for entry points, and by tests)."""
        if name in self._info:
            raise PluginError(f"two plugins are named '{name}': {self._info[name].source} and {distribution}")
        self.pm.register(plugin, name=name)
        self._segmenters = None
        self._runners = None
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self._info[name] = PluginInfo(name=name, module=module, distribution=distribution, version=version)

    def segmenters(self) -> dict[str, SegmenterSpec]:
        """All segmenters by name. Two segmenters with one name raise a PluginError naming both sources."""
        if self._segmenters is None:
            self._segmenters = self._collect_segmenters()
        return dict(self._segmenters)

    def _collect_segmenters(self) -> dict[str, SegmenterSpec]:
        found: dict[str, SegmenterSpec] = {}
        owner: dict[str, str] = {}
        per_plugin: dict[str, list[str]] = {}
        for plugin_name, specs in self._per_plugin("harness_segmenters"):
            for spec in specs:
                if not isinstance(spec, SegmenterSpec):
                    raise PluginError(f"{self._source(plugin_name)} returned {type(spec).__name__}, not a SegmenterSpec")
                if spec.name in found:
                    raise PluginError(
                        f"two segmenters are named '{spec.name}': from {self._source(owner[spec.name])} "
                        f"and from {self._source(plugin_name)}"
                    )
                found[spec.name] = spec
                owner[spec.name] = plugin_name
                per_plugin.setdefault(plugin_name, []).append(spec.name)
        for name, names in per_plugin.items():
            info = self._info.get(name)
            if info is not None:
                self._info[name] = dataclasses.replace(info, segmenters=tuple(names))
        return dict(sorted(found.items()))

    def runners(self) -> dict[str, "Runner"]:
        """All runners by name, in table order (``Runner.order``, then name). Two runners with one name
        raise a PluginError naming both sources."""
        if self._runners is None:
            self._runners = self._collect_runners()
        return dict(self._runners)

    def _collect_runners(self) -> dict[str, "Runner"]:
        from harness.runners.base import Runner

        found: dict[str, Runner] = {}
        owner: dict[str, str] = {}
        for plugin_name, results in self._per_plugin("harness_runners"):
            names = []
            for runner in results:
                if not isinstance(runner, Runner) or not getattr(runner, "name", ""):
                    raise PluginError(f"{self._source(plugin_name)} returned {type(runner).__name__}, not a named "
                                      "harness.runners.base.Runner")
                if runner.name in found:
                    raise PluginError(f"two runners are named '{runner.name}': from {self._source(owner[runner.name])} "
                                      f"and from {self._source(plugin_name)}")
                found[runner.name] = runner
                owner[runner.name] = plugin_name
                names.append(runner.name)
            info = self._info.get(plugin_name)
            if info is not None and names:
                self._info[plugin_name] = dataclasses.replace(info, runners=tuple(names))
        return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))

    def _per_plugin(self, hook: str):
        """``(plugin name, its results flattened)`` for each plugin implementing ``hook``; a plugin whose
        hook raises is reported as failed and skipped."""
        plugins = self.pm.get_plugins()
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin)
            others = [p for p in plugins if p is not impl.plugin]
            try:
                results = self.pm.subset_hook_caller(hook, remove_plugins=others)()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the others down
                self._fail(plugin_name, f"{self._source(plugin_name)} failed in {hook}: {type(exc).__name__}: {exc}")
                continue
            yield plugin_name, [item for result in results for item in (result or [])]

    def get_runner(self, name: str) -> "Runner":
        """One runner by name; an unknown name raises UnknownRunnerError listing the known ones."""
        runners = self.runners()
        if name not in runners:
            broken = "".join(f"; {msg}" for msg in self.failed.values())
            raise UnknownRunnerError(f"unknown runner '{name}'; known: {', '.join(runners)}{broken}")
        return runners[name]

    def _source(self, plugin_name: str) -> str:
        info = self._info.get(plugin_name)
        return info.source if info else f"plugin '{plugin_name}'"

    def plugins(self) -> list[PluginInfo]:
        """The loaded plugins (with their segmenters and runners), sorted by name."""
        self.segmenters()
        self.runners()
        return sorted(self._info.values(), key=lambda i: i.name)

    def get(self, name: str) -> SegmenterSpec:
        """One segmenter by name; an unknown name raises UnknownSegmenterError listing the known ones."""
        specs = self.segmenters()
        if name not in specs:
            known = ", ".join(specs) or "none (check HARNESS_LOAD_PLUGINS)"
            broken = "".join(f"; {msg}" for msg in self.failed.values())
            raise UnknownSegmenterError(f"unknown segmenter '{name}'; known: {known}{broken}")
        return specs[name]
