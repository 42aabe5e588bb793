"""Unit tests of the torch-free runtime (``runtime/``): its transforms against torch's, the slice
cache of its 3D path, case checks, the predict CLI's errors, and that it never imports torch.

End-to-end parity with the harness's fast path lives in tests/test_runtime_parity.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime import preprocess as pp
from runtime.cases import CaseError, load_case, save_segs
from runtime.engine import Segmenter
from runtime.pipelines import MODEL_PIPELINES, PRESETS, Pipeline, z_plan
from runtime.predict import main as predict_main, resolve_pipeline


# ------------------------------------------------------------------------------------- torch-free
def test_importing_the_runtime_loads_no_torch():
    """Nor OpenCV, which only LiteMedSAM's letterbox needs (imported at its first call)."""
    code = ("import sys, runtime, runtime.predict, runtime.engine, runtime.graphs, runtime.cases, runtime.preprocess, "
            "runtime.pipelines, openvino; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'onnx', 'onnxscript', 'harness', 'cv2')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("shape, out", [((3, 30, 20), (26, 17)), ((3, 10, 7), (25, 18)), ((1, 9, 9), (9, 4)),
                                        ((3, 528, 617), (438, 512)), ((3, 256, 256), (512, 512)),
                                        ((3, 2604, 1726), (512, 339)), ((3, 29, 28), (512, 494))])
def test_uint8_bilinear_equals_torch(shape, out):
    """medficientsam's letterbox: torch's CPU uint8 bilinear, bit for bit."""
    x = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(x)[None], out, mode="bilinear", align_corners=False)[0].numpy()
    got = pp.resize_bilinear_u8(x, *out)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_uint8_bilinear_keeps_an_unchanged_size():
    x = np.zeros((3, 8, 5), np.uint8)
    assert pp.resize_bilinear_u8(x, 8, 5) is x
    with pytest.raises(TypeError):
        pp.resize_bilinear_u8(x.astype(np.float32), 4, 4)


@pytest.mark.parametrize("resize", ["area", "bilinear_u8"])
def test_preprocess_layout_and_normalisation(resize):
    img = np.random.default_rng(0).integers(5, 200, (50, 20, 3), dtype=np.uint8)
    tensor, new_size = pp.preprocess_image(img, 64, resize)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    assert new_size == (64, 26)
    assert tensor[..., :64, :26].min() == 0 and tensor[..., :64, :26].max() == 1
    assert not tensor[..., 26:].any()  # zero pad on the right
    if resize == "bilinear_u8":  # float32 min-max of torch's resize
        small = F.interpolate(torch.from_numpy(img.transpose(2, 0, 1).copy())[None], (64, 26), mode="bilinear",
                              align_corners=False).float()
        expected = (small - small.min()) / (small.max() - small.min())
        np.testing.assert_array_equal(tensor[..., :26], expected.numpy())


@pytest.mark.parametrize("mode, new, original", [("crop_resize", (256, 170), (1024, 680)),
                                                 ("crop_resize", (200, 256), (100, 128)),
                                                 ("upsample_crop_resize", (512, 340), (2604, 1726)),
                                                 ("upsample_crop_resize", (494, 512), (29, 28))])
def test_postprocess_matches_torch_bilinear(mode, new, original):
    logits = np.random.default_rng(3).normal(0, 4, (256, 256)).astype(np.float32)
    x = torch.from_numpy(logits)[None, None]
    if mode == "crop_resize":
        x = x[..., : new[0], : new[1]]
    else:
        side = max(new)
        x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False)[..., : new[0], : new[1]]
    expected = F.interpolate(x, original, mode="bilinear", align_corners=False)[0, 0].numpy()
    got = pp.postprocess_logits(logits, new, original, mode)
    assert got.shape == tuple(original)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert ((got > 0) != (expected > 0)).mean() < 1e-4


def test_sigmoid_threshold_is_literal():
    """``torch.sigmoid(x) > 0.5`` in float32 for every float32 logit around the rounding edge."""
    bits = np.arange(np.float32(1e-9).view(np.int32), np.float32(3e-7).view(np.int32), 97, dtype=np.int32)
    edge = np.float32(8.940697e-08).view(np.int32)
    logits = np.concatenate([bits.view(np.float32), np.arange(edge - 3, edge + 4, dtype=np.int32).view(np.float32),
                             np.array([-1.0, 0.0, -1e-8, 1e-3, 3.0], np.float32)])
    expected = (torch.sigmoid(torch.from_numpy(logits)) > 0.5).numpy()
    np.testing.assert_array_equal(pp.logits_to_mask(logits, "sigmoid"), expected)
    np.testing.assert_array_equal(pp.logits_to_mask(logits, "logit"), logits > 0)


def test_boxes_and_propagated_boxes():
    assert pp.scale_box(np.array([10, 20, 300, 400]), (500, 600), 256).tolist() == [4, 8, 128, 170]
    assert pp.scale_box(np.array([10.7, 20, 300, 400], np.float32), (500, 600), 256).dtype == np.float32
    mask = np.zeros((40, 50), np.uint8)
    assert pp.mask_bbox(mask) is None and pp.letterbox_mask_bbox(mask, 256) is None
    mask[5:9, 10:30] = 2
    assert pp.mask_bbox(mask).tolist() == [10, 5, 29, 8]
    box = pp.letterbox_mask_bbox(mask, 256, 3)
    assert box.tolist()[0] < 10 * 256 / 50 and box.tolist()[2] <= 256


def test_z_plans():
    lite, mfs = PRESETS["litemedsam_cvpr24"], PRESETS["medficientsam_docker"]
    assert z_plan(2, 6, 10, lite) == (4, [4, 5, 6], [3, 2])
    assert z_plan(2, 6, 10, mfs) == (4, [4, 5], [3, 2])
    assert z_plan(0, 9, 9, lite)[1][-1] == 8  # clipped to the volume
    assert z_plan(-1, 12, 10, PRESETS["medficientsam_src_infer"])[1][-1] == 9  # clamped


def test_pipelines_resolve_and_refuse(tmp_path):
    assert Pipeline.resolve("l1") is PRESETS["medficientsam_docker"]
    assert Pipeline.resolve("medsam_mfs").input_size == 1024
    assert set(MODEL_PIPELINES.values()) <= set(PRESETS)
    assert PRESETS["litemedsam_cvpr24"].needs_opencv and not PRESETS["medficientsam_docker"].needs_opencv
    assert not PRESETS["medsam_mfs"].needs_opencv and PRESETS["litemedsam_src_infer"].needs_opencv is False
    custom = tmp_path / "p.json"
    custom.write_text(json.dumps({"pipeline": {"name": "x", "input_size": 512, "prompt_size": 1024,
                                               "resize": "bilinear_u8", "postprocess": "upsample_crop_resize",
                                               "threshold": "logit", "propagate_box": "prev_mask_tight"}}))
    assert Pipeline.resolve(str(custom)).prompt_size == 1024
    custom.write_text(json.dumps({"input_sise": 512}))
    with pytest.raises(ValueError, match="unknown pipeline field"):
        Pipeline.resolve(str(custom))
    with pytest.raises(ValueError, match="unknown pipeline 'nope'"):
        Pipeline.resolve("nope")
    with pytest.raises(ValueError, match="crop_resize"):
        Pipeline(input_size=512, prompt_size=512)
    assert resolve_pipeline(tmp_path, {"cache_key": "l0-abc"}) is PRESETS["medficientsam_docker"]
    assert resolve_pipeline(tmp_path, {"cache_key": "litemedsam-abc"}) is PRESETS["litemedsam_cvpr24"]
    with pytest.raises(ValueError, match="--pipeline"):
        resolve_pipeline(tmp_path, {"cache_key": "l0-distilled-abc"})


# ------------------------------------------------------------------------------------- engine
class _StubGraphs:
    """Embedding = the image's mean per channel broadcast; logits = +1 inside the prompt box (256 frame)."""

    def __init__(self, size: int):
        self.input_size = size
        self.encoded = 0

    def encode(self, image):
        self.encoded += 1
        return np.broadcast_to(image.mean(axis=(2, 3))[:, :1, None, None], (1, 256, 64, 64)).astype(np.float32)

    def decode(self, embedding, boxes):
        out = np.full((1, 1, 256, 256), -1.0, np.float32)
        x0, y0, x1, y1 = (int(v) * 256 // self.input_size for v in np.asarray(boxes).reshape(4))
        out[0, 0, y0 : y1 + 1, x0 : x1 + 1] = 1.0
        return out


@pytest.mark.parametrize("preset", ["litemedsam_cvpr24", "litemedsam_src_infer"])
def test_3d_encodes_each_slice_once_within_the_budget(preset):
    pipeline = PRESETS[preset]
    volume = np.random.default_rng(0).integers(0, 255, (9, 96, 96), dtype=np.uint8)
    boxes = np.array([[20, 20, 1, 60, 60, 6], [30, 30, 2, 90, 90, 7]])
    graphs = _StubGraphs(pipeline.input_size)
    segs = Segmenter(graphs, pipeline).segment(volume, boxes)
    slices = set(Segmenter(graphs, pipeline).planned_visits(boxes, 9))
    assert graphs.encoded == len(slices)
    no_cache = _StubGraphs(pipeline.input_size)
    segmenter = Segmenter(no_cache, pipeline, cache_mb=0)
    np.testing.assert_array_equal(segmenter.segment(volume, boxes), segs)
    assert no_cache.encoded == len(segmenter.planned_visits(boxes, 9)) > len(slices)
    assert segs.dtype == np.uint16 and set(np.unique(segs)) == {0, 1, 2}


def test_2d_labels_in_box_order():
    graphs = _StubGraphs(256)
    image = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    segs = Segmenter(graphs, PRESETS["litemedsam_cvpr24"]).segment(image, np.array([[10, 10, 80, 80], [50, 50, 120, 120]]))
    assert segs[20, 20] == 1 and segs[60, 60] == 2 and segs[125, 5] == 0
    with pytest.raises(ValueError, match="512px"):
        Segmenter(_StubGraphs(512), PRESETS["litemedsam_cvpr24"])


# ------------------------------------------------------------------------------------- cases, CLI
def test_case_checks(tmp_path):
    np.savez(tmp_path / "2DBox_X.npz", imgs=np.zeros((10, 12), np.float32) + 3.4, boxes=np.array([[-2, 1, 5, 20]]))
    case = load_case(tmp_path / "2DBox_X.npz")
    assert case.imgs.shape == (10, 12, 3) and case.imgs.dtype == np.uint8 and case.imgs.max() == 3
    assert case.boxes.tolist() == [[0, 1, 5, 9]] and len(case.warnings) == 2
    np.savez(tmp_path / "3DBox_Y.npz", imgs=np.zeros((4, 10, 12), np.uint8), boxes=np.array([[1, 1, 3, 5, 5, 1]]))
    with pytest.raises(CaseError, match="3DBox_Y.npz: box 0 is inverted: z_min 3 > z_max 1"):
        load_case(tmp_path / "3DBox_Y.npz")
    np.savez(tmp_path / "2DBox_Z.npz", imgs=np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(CaseError, match="missing key 'boxes'"):
        load_case(tmp_path / "2DBox_Z.npz")
    save_segs(tmp_path / "out" / "a.npz", np.ones((3, 4), np.int64))
    with np.load(tmp_path / "out" / "a.npz") as data:
        assert data["segs"].dtype == np.uint16 and data.files == ["segs"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.npz"]


def test_predict_refuses_bad_arguments(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 2
    assert "--graphs DIR is required" in capsys.readouterr().err
    assert predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--graphs", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    assert predict_main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--graphs", str(tmp_path)]) == 2
    assert "no encoder.xml and decoder.xml" in capsys.readouterr().err
    assert predict_main(["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--graphs", str(tmp_path)]) == 2
    assert "no such input folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- compile cache
class _FakeCompiled:
    outputs = ["out"]

    def create_infer_request(self):
        return None


class _CoreWithoutWeightlessCache:
    """An OpenVINO core of a release before weightless caching: CACHE_MODE is an unknown property."""

    def __init__(self):
        self.configs = []

    def compile_model(self, path, device, config):
        self.configs.append(dict(config))
        if "CACHE_MODE" in config:
            raise RuntimeError("Exception from src/inference/src/core.cpp: Unsupported property CACHE_MODE by CPU plugin")
        return _FakeCompiled()


class _CoreThatFails(_CoreWithoutWeightlessCache):
    def compile_model(self, path, device, config):
        self.configs.append(dict(config))
        raise RuntimeError("Exception from src/core: the graph is broken")


def test_compile_cache_falls_back_to_a_full_blob_without_weightless_caching(tmp_path):
    """An OpenVINO that does not know CACHE_MODE gets the same cache folder without it (full blobs); any
    other compile error is not retried and names the graph file."""
    pytest.importorskip("openvino")
    from runtime.graphs import GraphError, WEIGHTLESS_CACHE, _Graph

    xml = tmp_path / "encoder.xml"
    xml.write_text("<net/>")
    xml.with_suffix(".bin").write_bytes(b"\0" * 16)
    cache = tmp_path / "cache"
    core = _CoreWithoutWeightlessCache()
    _Graph(core, xml, threads=2, cache_dir=cache)
    assert [WEIGHTLESS_CACHE[0] in c for c in core.configs] == [True, False]
    assert all(str(cache) in map(str, c.values()) for c in core.configs)  # still cached, as full blobs
    core = _CoreWithoutWeightlessCache()
    _Graph(core, xml, threads=2, cache_dir=None)
    assert len(core.configs) == 1 and WEIGHTLESS_CACHE[0] not in core.configs[0]  # no cache, nothing to drop
    failing = _CoreThatFails()
    with pytest.raises(GraphError, match=r"encoder\.xml: OpenVINO cannot load this graph .*the graph is broken"):
        _Graph(failing, xml, threads=2, cache_dir=cache)
    assert len(failing.configs) == 1
