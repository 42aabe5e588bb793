"""The runners room: a third-party runner installed like a package, the torch-free core, the import graph of
``harness/``, and ``--backend auto``'s fallback through the command line."""
from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import DEMO, PROJECT, harness_cli, install_fake_plugin

# A runner a third party ships: every case runs natively, twice, and the faster time is kept ("best of 2").
BEST_OF_TWO = textwrap.dedent(
    '''
    from harness import hookimpl
    from harness.choices import entry_name, variant_tags
    from harness.results import update_models
    from harness.runners.base import FunctionSession, Runner, Target
    from harness.runners.case import load_options, model_info
    from harness.runners.native import run_case


    class BestOfTwo(Runner):
        name = "besttwo"
        timing_mode = "in-process"
        label = "best of 2"
        order = 5
        description = "in this process, each case segmented twice, the faster run kept"

        def targets(self, specs, config, plugins, threads, log=print):
            out = []
            for spec in specs:
                entry = entry_name(spec, config)

                def open_(spec=spec, entry=entry):
                    segmenter = spec.load(load_options(spec, config, threads))
                    update_models(config.out_dir, entry, model_info(spec, segmenter.describe(), plugins,
                                                                    variant_tags(spec, config)))

                    def one(case_path):
                        first = run_case(segmenter, entry, spec, case_path, config, threads)
                        second = run_case(segmenter, entry, spec, case_path, config, threads)
                        best = min((first, second), key=lambda r: r["seconds"] or 0)
                        best["runner"] = self.name
                        return best

                    return FunctionSession(one)

                out.append(Target(entry, open_, runner=self.name, timing_mode=self.timing_mode))
            return out


    @hookimpl
    def harness_runners():
        return [BestOfTwo()]
    '''
)


@pytest.fixture()
def runner_env(tmp_path):
    return install_fake_plugin(tmp_path / "site", "besttwo_runner", BEST_OF_TWO, "besttwo-runner", "0.3.0", "besttwo")


@pytest.mark.slow  # 5-10 s on 2 cores: out of the fast set (durations, 2026-12-07)
def test_third_party_runner_is_listed_runs_and_appears_in_every_table(tmp_path, runner_env):
    listing = harness_cli(["plugins"], runner_env, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "besttwo  besttwo-runner 0.3.0" in listing.stdout
    assert "runner besttwo" in listing.stdout and "runner native" in listing.stdout

    out = tmp_path / "out"
    common = ["--models", "boxfill", "--data", str(DEMO), "--out", str(out), "--limit", "3", "--no-progress",
              "--bootstrap", "100"]
    for runner in ("native", "besttwo"):
        result = harness_cli(["run", *common, "--runner", runner], runner_env, tmp_path)
        assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"boxfill", "boxfill[besttwo]"} and len(records) == 6
    assert all(r["status"] == "ok" for r in records)
    board = (out / "leaderboard.md").read_text()
    # the main table, the overhead table (labelled and placed as the plugin says), the paired and ranking tables
    assert "| Box fill (baseline) [besttwo]" in board
    overhead = board.split("## Runner overhead", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in overhead.splitlines() if line.startswith("| Method"))
    assert header.index("in-process") < header.index("best of 2")  # order 5 after native's 0
    assert "best of 2 - in-process" in header
    assert "`boxfill[besttwo]`" in board.split("## Paired comparisons", 1)[1]
    assert "`boxfill[besttwo]`" in board.split("## Challenge-style ranking", 1)[1]

    unknown = harness_cli(["run", *common, "--runner", "slurm"], runner_env, tmp_path)
    assert unknown.returncode == 2 and "unknown runner 'slurm'" in unknown.stderr and "besttwo" in unknown.stderr


def test_two_runners_with_one_name_are_an_error():
    from harness import hookimpl
    from harness.pluginmanager import HarnessPlugins, PluginError
    from harness.runners.native import NativeRunner

    class Twin:
        @hookimpl
        def harness_runners(self):
            return [NativeRunner()]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Twin(), "twin")
    with pytest.raises(PluginError, match="two runners are named 'native'"):
        plugins.runners()


# --------------------------------------------------------------------------- the core stays light
NO_TORCH = textwrap.dedent(
    """
    import sys


    class NoTorch:  # torch cannot be imported in this process
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None


    sys.meta_path.insert(0, NoTorch())
    """
)


def _torchless_env(tmp_path: Path) -> dict:
    """An environment whose interpreter cannot import torch (a sitecustomize blocks it)."""
    site = tmp_path / "notorch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(site), env.get("PYTHONPATH", "")] if p)
    env.pop("HARNESS_LOAD_PLUGINS", None)
    return env


def test_run_boxfill_and_score_never_import_torch(tmp_path):
    env = _torchless_env(tmp_path)
    probe = harness_cli(["plugins"], env, tmp_path)  # the plugins load without torch too
    assert probe.returncode == 0, probe.stderr
    out = tmp_path / "out"
    result = harness_cli(["run", "--models", "boxfill", "--out", str(out), "--no-progress", "--bootstrap", "100"],
                         env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "leaderboard.md").is_file()
    scored = harness_cli(["score", "--segs", str(out / "segs" / "boxfill"), "--gts", str(DEMO / "gts"),
                          "-o", str(tmp_path / "m.csv")], env, tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert len((tmp_path / "m.csv").read_text().splitlines()) == 7
    # and the block is real: a model that needs torch fails to load, saying so
    torch_model = harness_cli(["run", "--models", "litemedsam", "--out", str(tmp_path / "o2"), "--limit", "1",
                               "--no-progress"], env, tmp_path)
    assert torch_model.returncode == 1 and "torch" in torch_model.stderr


def test_importing_the_cli_loads_no_torch_pandas_or_ray():
    import subprocess

    code = ("import sys, harness.cli\nharness.cli.build_parser()\n"
            "print(sorted(m for m in ('torch', 'pandas', 'ray', 'docker', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PROJECT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the import graph of harness/
def _module_imports(path: Path, package_root: Path) -> tuple[str, set[str], list[tuple[str, str]]]:
    """(module name, harness modules it imports at module level, (module, name) of private names imported)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    imports, private = set(), []
    for node in tree.body:  # module level only: imports inside functions are deliberate and lazy
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try)) else ():
            if isinstance(sub, ast.Import):
                imports |= {a.name for a in sub.names if a.name.startswith("harness")}
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("harness"):
                for alias in sub.names:
                    full = f"{sub.module}.{alias.name}"
                    is_module = (package_root.parent / Path(*full.split("."))).with_suffix(".py").is_file() or \
                        (package_root.parent / Path(*full.split("."))).is_dir()
                    imports.add(full if is_module else sub.module)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and not is_module:
                        private.append((sub.module, alias.name))
    return module, imports, private


def test_harness_has_no_import_cycle_no_cli_import_and_no_private_imports():
    root = PROJECT / "harness"
    graph, private = {}, []
    every_import = {}
    for path in root.rglob("*.py"):
        module, imports, bad = _module_imports(path, root)
        graph[module] = {m for m in imports if m != module}
        private += [(module, *b) for b in bad]
        every_import[module] = any(  # anywhere in the module, function bodies included
            (isinstance(n, ast.Import) and any(a.name.startswith("harness.cli") for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("harness.cli"))
            or (isinstance(n, ast.ImportFrom) and n.module == "harness" and any(a.name == "cli" for a in n.names))
            for n in ast.walk(ast.parse(path.read_text())))
    assert not private, f"private names imported across modules: {private}"
    assert not [m for m, uses in every_import.items() if uses and m != "harness.cli"], \
        "library modules must not import harness.cli"
    # a cycle among module-level imports (package __init__ counted as importing its submodules' parent)
    seen, stack = {}, []

    def visit(node):
        seen[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            nxt = nxt if nxt in graph else nxt.rsplit(".", 1)[0]
            if nxt not in graph:
                continue
            if seen.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = "done"

    for module in sorted(graph):
        if module not in seen:
            visit(module)


# --------------------------------------------------------------------------- --backend auto falls back
@pytest.fixture()
def broken_export(monkeypatch):
    """Every export fails (as for a third-party model with an operator the exporter lacks), and auto picks
    openvino whatever is installed."""
    import harness.choices as choices
    import models.export.backends as backends

    def broken(*args, **kwargs):
        raise RuntimeError("exporting the encoder to ONNX failed: unsupported operator aten::weird")

    monkeypatch.setattr(choices, "missing_packages", lambda backend: [])
    monkeypatch.setattr(backends, "compile_backend", broken)


def _one_2d_case(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for sub in ("imgs", "gts"):
        (data / sub).mkdir(parents=True)
        shutil.copy(DEMO / sub / "2DBox_US_hc18-158.npz", data / sub)
    return data


@pytest.mark.slow  # `harness run`, `predict` and `build` processes, each loading LiteMedSAM
def test_auto_falls_back_to_torch_under_run_predict_and_build(tmp_path, broken_export, capsys):
    from harness.cli import main
    from harness.container.model_image import check_model  # the host-side load of `harness build`

    data = _one_2d_case(tmp_path)
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="openvino backend is unavailable.*running on torch"):
        assert main(["run", "--models", "litemedsam", "--data", str(data), "--out", str(out), "--no-progress",
                     "--bootstrap", "50"]) == 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["model"] == "litemedsam" and record["status"] == "ok"  # the default entry, untagged
    assert record["backend"] == "torch"  # what ran, not what auto had picked
    info = json.loads((out / "models.json").read_text())["litemedsam"]
    assert info["backend"] == "torch" and "aten::weird" in info["backend_fallback"]

    with pytest.warns(RuntimeWarning, match="running on torch"):
        assert main(["predict", "--model", "litemedsam", "-i", str(data / "imgs"), "-o", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "2DBox_US_hc18-158.npz").is_file()

    with pytest.warns(RuntimeWarning, match="running on torch"):
        _, described = check_model("litemedsam", None, {})
    assert described["backend"] == "torch" and "aten::weird" in described["backend_fallback"]

    # a backend named explicitly fails instead: the model is reported as not run
    assert main(["run", "--models", "litemedsam", "--backend", "openvino", "--data", str(data), "--out",
                 str(tmp_path / "named"), "--no-progress", "--bootstrap", "50"]) == 1
    assert "aten::weird" in capsys.readouterr().err
