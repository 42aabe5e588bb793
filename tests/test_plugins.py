"""Plugin system: built-ins through entry points, listing, duplicates, env filter, a third-party plugin."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from harness import SegmenterSpec, hookimpl
from harness.pluginmanager import HarnessPlugins, PluginError, UnknownSegmenterError
from helpers import DEMO, harness_cli, install_fake_plugin


class _Plugin:
    def __init__(self, *names):
        self.names = names

    @hookimpl
    def harness_segmenters(self):
        return [SegmenterSpec(name=n, title=n.upper(), family="test", load=lambda options: None) for n in self.names]


def test_builtins_come_through_entry_points():
    plugins = HarnessPlugins()
    specs = plugins.segmenters()
    assert {"boxfill", "litemedsam"} <= set(specs)
    info = {p.name: p for p in plugins.plugins()}
    assert info["boxfill"].distribution == "medsam-harness"
    assert info["boxfill"].version
    assert info["litemedsam"].segmenters == ("litemedsam",)
    assert specs["litemedsam"].resolution == 256 and specs["litemedsam"].reported.dsc == pytest.approx(83.23)


def test_duplicate_segmenter_names_name_both_sources():
    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(_Plugin("alpha", "beta"), "first", "dist-one", "1.0")
    plugins.register(_Plugin("beta"), "second", "dist-two", "2.0")
    with pytest.raises(PluginError) as info:
        plugins.segmenters()
    message = str(info.value)
    assert "'beta'" in message and "dist-one 1.0" in message and "dist-two 2.0" in message


def test_duplicate_plugin_names_are_refused():
    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(_Plugin("alpha"), "same")
    with pytest.raises(PluginError, match="two plugins are named 'same'"):
        plugins.register(_Plugin("beta"), "same")


def test_hook_must_return_segmenter_specs():
    class Bad:
        @hookimpl
        def harness_segmenters(self):
            return ["not a spec"]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Bad(), "bad")
    with pytest.raises(PluginError, match="not a SegmenterSpec"):
        plugins.segmenters()


def test_env_var_restricts_plugins(monkeypatch):
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "boxfill")
    plugins = HarnessPlugins()
    assert list(plugins.segmenters()) == ["boxfill"]
    with pytest.raises(UnknownSegmenterError, match="unknown segmenter 'litemedsam'; known: boxfill"):
        plugins.get("litemedsam")
    monkeypatch.setenv("HARNESS_LOAD_PLUGINS", "")
    assert HarnessPlugins().segmenters() == {}


THIRD_PARTY = textwrap.dedent(
    '''
    """A third-party segmenter: fills the central half of each 2D box (3D: of every slice)."""
    import numpy as np
    from harness import SegmenterSpec, hookimpl

    class CentreFill:
        def segment(self, case):
            segs = np.zeros(case.spatial_shape, np.uint16)
            for i, b in enumerate(case.boxes.astype(int)):
                if case.dim == 2:
                    x0, y0, x1, y1 = b
                    z = slice(None)
                else:
                    x0, y0, z0, x1, y1, z1 = b
                    z = slice(z0, z1 + 1)
                cy, cx, hy, hx = (y0 + y1) // 2, (x0 + x1) // 2, (y1 - y0) // 4, (x1 - x0) // 4
                region = (slice(cy - hy, cy + hy + 1), slice(cx - hx, cx + hx + 1))
                segs[(region if case.dim == 2 else (z,) + region)] = i + 1
            return segs

        def describe(self):
            return {"params": 0, "flops": 0, "weights": None}

    @hookimpl
    def harness_segmenters():
        return [SegmenterSpec(name="centrefill", title="Centre fill (third party)", family="baseline",
                              load=lambda options: CentreFill())]
    '''
)


@pytest.fixture()
def third_party_env(tmp_path):
    return install_fake_plugin(tmp_path / "site", "centrefill_plugin", THIRD_PARTY, "centrefill-plugin", "1.2.3",
                               "centrefill")


def test_third_party_plugin_is_listed_and_runs(tmp_path, third_party_env):
    listing = harness_cli(["plugins"], third_party_env, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "centrefill  centrefill-plugin 1.2.3" in listing.stdout
    assert "boxfill" in listing.stdout and "litemedsam" in listing.stdout

    out = tmp_path / "out"
    result = harness_cli(["run", "--models", "centrefill,boxfill", "--data", str(DEMO), "--out", str(out),
                       "--limit", "3", "--no-progress"], third_party_env, tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    centre = {r["case"]: r["dsc"] for r in records if r["model"] == "centrefill"}
    boxfill = {r["case"]: r["dsc"] for r in records if r["model"] == "boxfill"}
    assert set(centre) == set(boxfill) and all(0 < v < 1 for v in centre.values())
    assert centre != boxfill
    assert "Centre fill (third party)" in (out / "leaderboard.md").read_text()


def test_third_party_plugin_can_be_excluded(tmp_path, third_party_env):
    third_party_env["HARNESS_LOAD_PLUGINS"] = "boxfill,litemedsam"
    listing = harness_cli(["plugins"], third_party_env, tmp_path)
    assert listing.returncode == 0 and "centrefill" not in listing.stdout


def test_broken_plugin_is_reported_not_fatal(tmp_path, third_party_env):
    site = Path(third_party_env["PYTHONPATH"].split(os.pathsep)[0])
    (site / "centrefill_plugin.py").write_text("raise ImportError('boom')\n")
    listing = harness_cli(["plugins"], third_party_env, tmp_path)
    assert listing.returncode == 1
    assert "FAILED: plugin 'centrefill'" in listing.stdout and "boom" in listing.stdout
    assert "boxfill" in listing.stdout


def test_trace_env_var_prints_hook_calls(tmp_path):
    env = dict(os.environ, HARNESS_TRACE_PLUGINS="1", HARNESS_LOAD_PLUGINS="boxfill")
    listing = harness_cli(["plugins"], env=env, cwd=tmp_path)
    assert listing.returncode == 0
    assert "harness_segmenters" in listing.stderr and "boxfill" in listing.stdout


def test_a_hook_that_raises_is_reported_and_the_others_still_load():
    class Broken:
        @hookimpl
        def harness_segmenters(self):
            raise RuntimeError("cannot list")

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(_Plugin("alpha"), "good")
    plugins.register(Broken(), "broken", "broken-dist", "0.1")
    with pytest.warns(RuntimeWarning, match="broken-dist 0.1"):
        assert list(plugins.segmenters()) == ["alpha"]
    assert "RuntimeError: cannot list" in plugins.failed["broken"]


def test_two_distributions_with_one_plugin_name_are_reported(tmp_path, third_party_env):
    site = Path(third_party_env["PYTHONPATH"].split(os.pathsep)[0])
    install_fake_plugin(site, "boxfill_clone", "from plugins.boxfill import harness_segmenters\n", "clone-dist",
                        "9.9", "boxfill")
    listing = harness_cli(["plugins"], third_party_env, tmp_path)
    assert listing.returncode == 1
    assert "two plugins are named 'boxfill'" in listing.stdout
    assert "medsam-harness" in listing.stdout and "clone-dist" in listing.stdout


@pytest.mark.slow  # loads LiteMedSAM, counts its FLOPs and segments a case
def test_litemedsam_weights_override(tmp_path):
    """--weights litemedsam=PATH loads that file (here: the seed-0 reference weights) instead of the bundled one."""
    import torch

    from harness import LoadOptions
    from harness.cases import load_case
    from plugins.litemedsam import load
    from reference import make_state_dict

    path = tmp_path / "seed0.pth"
    torch.save(make_state_dict("lite_medsam", 0), path)
    segmenter = load(LoadOptions(weights=path, threads=2, backend="torch"))  # the torch model, as loaded
    info = segmenter.describe()
    assert info["weights"] == str(path) and info["params"] == 9_791_300 and info["pipeline"] == "litemedsam_cvpr24"
    expected = make_state_dict("lite_medsam", 0)["mask_decoder.iou_prediction_head.layers.0.weight"]
    assert torch.equal(segmenter.model.state_dict()["mask_decoder.iou_prediction_head.layers.0.weight"], expected)
    case = load_case(DEMO / "imgs" / "2DBox_US_hc18-158.npz")
    segs = segmenter.segment(case)
    assert segs.shape == case.spatial_shape and segs.dtype.name == "uint16"
