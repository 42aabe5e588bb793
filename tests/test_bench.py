"""`harness bench`: variants parsed, timed side by side, compared with the faithful masks, tabled.

Timings are never asserted (machines are noisy); what is checked is that every figure the tables
show is computed from the runs it claims to come from.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from harness import SegmenterSpec, hookimpl
from harness.benchmark import BenchConfig, Variant, multibox_case, run_bench
from harness.cases import load_case
from harness.pluginmanager import HarnessPlugins
from harness.plugin_api import ENGINE_CHOICES
from helpers import DEMO
from models.hardware import cpu_bf16_support
from models.inference.pipelines import LITEMEDSAM_CVPR24
from models.inference.segmenters import TorchSegmenter
from test_inference_pipelines import _StubSAM

CASES = ("2DBox_US_hc18-158.npz", "3DBox_CT_sts025.npz")


def test_variant_names_round_trip_and_bad_parts_are_named():
    for text in ("faithful", "fast", "fast+bf16", "fast+openvino+b1", "faithful+onnxruntime", "fast+b4+d8"):
        assert Variant.parse(text).name == text
    assert Variant.parse("fast+b2+bf16") == Variant(path="fast", precision="bf16", encoder_batch=2)
    assert Variant.parse("fast+d35") == Variant(path="fast", decoder_batch=35)
    with pytest.raises(ValueError, match="must start with a path"):
        Variant.parse("bf16")
    with pytest.raises(ValueError, match="unknown part 'fp16'"):
        Variant.parse("fast+fp16")


def test_default_variants_list_only_backends_that_can_export_and_run(monkeypatch):
    """A backend whose runtime is installed but whose exporter is not would only fail at load."""
    import harness.choices as choices
    import models.hardware as hardware
    from harness.benchmark import default_variants

    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: False)
    monkeypatch.setattr(choices, "missing_packages", lambda b: ["onnxscript"] if b == "openvino" else [])
    assert [v.name for v in default_variants()] == ["faithful", "fast", "fast+onnxruntime"]
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: True)
    monkeypatch.setattr(choices, "missing_packages", lambda b: [])
    assert [v.name for v in default_variants()] == ["faithful", "fast", "fast+bf16", "fast+onnxruntime",
                                                    "fast+openvino"]


def test_multibox_case_puts_overlapping_boxes_inside_the_volume():
    case = load_case(DEMO / "imgs" / "3DBox_CT_sts025.npz")
    many = multibox_case(case, 6)
    depth, height, width = case.imgs.shape
    assert many.boxes.shape == (6, 6) and many.imgs is case.imgs
    assert (many.boxes[:, [0, 3]] < width).all() and (many.boxes[:, [1, 4]] < height).all()
    assert (many.boxes[:, 5] < depth).all() and (many.boxes[:, 2] < many.boxes[:, 5]).all()
    ranges = [set(range(b[2], b[5] + 1)) for b in many.boxes]
    assert all(ranges[i] & ranges[i + 1] for i in range(5))  # z-ranges overlap: the cache has work
    with pytest.raises(ValueError, match="3D volume"):
        multibox_case(load_case(DEMO / "imgs" / CASES[0]), 3)


class _Plugin:
    def __init__(self):
        self.loaded = []

    @hookimpl
    def harness_segmenters(self):
        def load(options):
            self.loaded.append((options.path, options.precision))
            model = _StubSAM()
            model.image_encoder.weight = nn.Parameter(torch.zeros(1))  # something to count and fold
            return TorchSegmenter("stub", model, LITEMEDSAM_CVPR24, "none", path=options.path,
                                  precision=options.precision)

        return [SegmenterSpec(name="stub", title="Stub", family="test", load=load, choices=ENGINE_CHOICES)]


@pytest.mark.slow  # every variant of LiteMedSAM on every demo case
def test_bench_runs_every_variant_on_every_case_and_tables_the_ratios(tmp_path, two_threads):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for name in CASES:
        shutil.copy(DEMO / "imgs" / name, data / "imgs" / name)
    plugin = _Plugin()
    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(plugin, "stub")
    variants = [Variant(), Variant(path="fast"), Variant(path="fast", encoder_batch=1)]
    if cpu_bf16_support():
        variants.append(Variant(path="fast", precision="bf16"))
    out = tmp_path / "bench"
    result = run_bench(BenchConfig(models=["stub"], data_dir=data, out_dir=out, variants=variants, repeat=2,
                                   multibox=4, threads=2), plugins, log=lambda _: None)

    assert not result["notes"], result["notes"]
    assert [p for p, _ in plugin.loaded] == [v.path for v in variants]
    rows = result["rows"]
    kinds = {r["case"]: r["kind"] for r in rows}
    assert kinds == {CASES[0]: "2D", CASES[1]: "3D", "3DBox_CT_sts025-4boxes.npz": "3D multi-box"}
    assert len(rows) == 3 * len(variants)
    for r in rows:
        assert len(r["seconds"]) == 2 and r["median_s"] == pytest.approx(float(np.median(r["seconds"])))
        assert r["peak_rss_mb"] > 0 and r["case_mb"] >= 0
        faithful = next(x for x in rows if x["case"] == r["case"] and x["variant"] == "faithful")
        assert r["speedup_vs_faithful"] == pytest.approx(faithful["median_s"] / r["median_s"])
        if r["variant"] == "faithful":
            assert r["min_dice_vs_faithful"] is None
        else:  # the stub is exact: every variant gives the faithful masks
            assert r["min_dice_vs_faithful"] == 1.0
    multi = {r["variant"]: r for r in rows if r["kind"] == "3D multi-box"}
    # the fast path encodes each slice of the case once; the faithful path once per box and slice
    assert multi["fast"]["images_encoded"] < multi["faithful"]["images_encoded"]
    assert multi["fast"]["images_encoded"] == multi["fast+b1"]["images_encoded"] <= 15

    saved = json.loads((out / "bench.json").read_text())
    assert saved["variants"] == [v.name for v in variants] and len(saved["rows"]) == len(rows)
    board = (out / "bench.md").read_text()
    assert "## stub" in board and "| 3DBox_CT_sts025-4boxes (3D multi-box)" in board
    assert "matmul peak" in board and "min Dice vs faithful" in board


def test_bench_cli_rejects_a_bad_variant(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit, match="unknown part"):
        main(["bench", "--models", "boxfill", "--variants", "fast+fp16"])


def test_bench_cli_takes_the_model_sources_run_takes(tmp_path, monkeypatch):
    """--weights, --weights-dir, --allow-pickle and --threads reach the bench as they reach a run."""
    import harness.benchmark as benchmark
    from harness.cli import main

    seen = []

    def fake_bench(config):
        seen.append(config)
        return {}

    monkeypatch.setattr(benchmark, "run_bench", fake_bench)
    monkeypatch.setattr(benchmark, "render_markdown", lambda result: "")
    weights = tmp_path / "l0.pth"
    assert main(["bench", "--models", "l0", "--variants", "faithful", "--weights", f"l0={weights}",
                 "--weights-dir", str(tmp_path), "--allow-pickle", "--threads", "1"]) == 0
    config = seen[0]
    assert (config.weights, config.weights_dir, config.allow_pickle, config.threads) == (
        {"l0": weights}, tmp_path, True, 1)
    with pytest.raises(SystemExit, match=r"harness bench: --weights-dir .*absent: no such folder"):
        main(["bench", "--models", "l0", "--weights-dir", str(tmp_path / "absent")])


def test_unreadable_cases_are_left_out_of_a_bench_and_named(tmp_path):
    from harness.benchmark import BenchConfig, _cases

    (tmp_path / "imgs").mkdir()
    shutil.copy(DEMO / "imgs" / "2DBox_US_hc18-158.npz", tmp_path / "imgs")
    (tmp_path / "imgs" / "2DBox_US_dangling.npz").symlink_to(tmp_path / "nowhere.npz")
    said = []
    cases = _cases(BenchConfig(models=["boxfill"], data_dir=tmp_path, out_dir=tmp_path / "out", multibox=0), said.append)
    assert [c.name for c, _ in cases] == ["2DBox_US_hc18-158.npz"]
    assert len(said) == 1 and "2DBox_US_dangling.npz" in said[0] and "dangling" in said[0]
