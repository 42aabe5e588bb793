"""Plugin discovery and the segmenter registry.

Every plugin, built-in or third-party, is found through the ``harness`` entry-point group.

Environment:

* ``HARNESS_LOAD_PLUGINS=a,b`` loads only the named plugins (entry-point names); an empty value
  loads none. Unset: all installed plugins load.
* ``HARNESS_TRACE_PLUGINS=1`` prints every hook call and its result to stderr.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field

import warnings

import pluggy

from harness import hookspecs
from harness.specs import SegmenterSpec

ENTRY_POINT_GROUP = "harness"
ENV_LOAD = "HARNESS_LOAD_PLUGINS"
ENV_TRACE = "HARNESS_TRACE_PLUGINS"


class PluginError(RuntimeError):
    """A plugin could not be loaded, or two plugins conflict."""


class UnknownSegmenterError(LookupError):
    """No loaded plugin provides a segmenter of that name."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its entry-point name, where it comes from, and its segmenters."""

    name: str
    module: str
    distribution: str
    version: str
    segmenters: tuple[str, ...] = field(default=())

    @property
    def source(self) -> str:
        return f"plugin '{self.name}' ({self.module}, {self.distribution} {self.version})"


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
        self.failed: dict[str, str] = {}
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
            self.pm.enable_tracing()
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
        plugins = self.pm.get_plugins()
        for impl in self.pm.hook.harness_segmenters.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin)
            # One plugin at a time (to know whose segmenters these are), still through pluggy's
            # hook caller so that HARNESS_TRACE_PLUGINS sees the call.
            others = [p for p in plugins if p is not impl.plugin]
            try:
                results = self.pm.subset_hook_caller("harness_segmenters", remove_plugins=others)()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the others down
                self._fail(plugin_name, f"{self._source(plugin_name)} failed in harness_segmenters: "
                                        f"{type(exc).__name__}: {exc}")
                continue
            specs = [spec for result in results for spec in (result or [])]
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
                self._info[name] = PluginInfo(info.name, info.module, info.distribution, info.version, tuple(names))
        return dict(sorted(found.items()))

    def _source(self, plugin_name: str) -> str:
        info = self._info.get(plugin_name)
        return info.source if info else f"plugin '{plugin_name}'"

    def plugins(self) -> list[PluginInfo]:
        """The loaded plugins (with their segmenters), sorted by name."""
        self.segmenters()
        return sorted(self._info.values(), key=lambda i: i.name)

    def get(self, name: str) -> SegmenterSpec:
        """One segmenter by name; an unknown name raises UnknownSegmenterError listing the known ones."""
        specs = self.segmenters()
        if name not in specs:
            known = ", ".join(specs) or "none (check HARNESS_LOAD_PLUGINS)"
            broken = "".join(f"; {msg}" for msg in self.failed.values())
            raise UnknownSegmenterError(f"unknown segmenter '{name}'; known: {known}{broken}")
        return specs[name]
