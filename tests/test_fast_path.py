"""The engine's fast execution path (``PipelineConfig.fast``, ``harness run --path fast``) against the
faithful one: the same segs, fewer and batched encoder calls, a bounded slice cache of owned copies.

Stub-model tests (milliseconds) pin the call pattern and the equality of segs; the ``slow`` test
runs real models (LiteMedSAM with its released weights, MedficientSAM-L0 with seed-0 weights) on
real validation cases and applies the reference README's end-to-end bars
(:func:`reference.assert_segs_match`): batched encoder and decoder calls may differ from
one-at-a-time calls in the last float bits, so the 2D bar is Dice >= 0.999 per label and the 3D
bar the same labels on every slice and Dice >= 0.99.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.plugin_api import LoadOptions
from models.inference.engine import BoxPromptEngine, EngineStats
from models.inference.pipelines import (
    EXECUTION_PATHS,
    LITEMEDSAM_CVPR24,
    LITEMEDSAM_SRC_INFER,
    MEDFICIENTSAM_DOCKER,
    MEDFICIENTSAM_SRC_INFER,
    PRESETS,
    PipelineConfig,
)
from models.inference.slice_cache import SliceCache
from test_inference_pipelines import _StubDecoder, _StubSAM, _volume

EMBEDDING_BYTES = 256 * 64 * 64 * 4  # one stub / SAM slice embedding, float32

# Stub-sized variants of every preset family (the stub maps boxes through the prompt frame).
CONFIGS = {
    "litemedsam_cvpr24": LITEMEDSAM_CVPR24,
    "litemedsam_src_infer": LITEMEDSAM_SRC_INFER,
    "mfs_docker_256": MEDFICIENTSAM_DOCKER.with_options(input_size=256, prompt_size=256),
    "mfs_src_infer_256": MEDFICIENTSAM_SRC_INFER.with_options(input_size=256, prompt_size=256),
}

# Three boxes with overlapping z ranges, one reaching a blank slice (empty mask -> the given box).
VOLUME_BOXES = np.array([[20, 20, 1, 60, 60, 6], [30, 30, 2, 90, 90, 7], [0, 0, 0, 40, 40, 3]])


class _SliceCounter(BoxPromptEngine):
    """Records which slices were turned into encoder inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoded_slices: list[int] = []

    def slice_tensor(self, z):
        self.encoded_slices.append(int(z) % self._volume.shape[0])
        return super().slice_tensor(z)


def _run(config, imgs, boxes, model=None, engine_cls=BoxPromptEngine):
    model = model or _StubSAM(config.prompt_size)
    engine = engine_cls(model, config)
    return engine.segment(imgs, boxes), engine, model


# ============================================================================ config
def test_faithful_is_the_default_and_fast_variant_changes_only_the_path():
    for preset in PRESETS.values():
        assert preset.fast is False and preset.path == "faithful"
        fast = preset.fast_variant()
        assert fast.fast and fast.path == "fast"
        assert fast.with_options(fast=False) == preset == fast.faithful_variant()
        assert preset.for_path("fast") == fast and preset.for_path("faithful") == preset
    assert EXECUTION_PATHS == ("faithful", "fast")
    assert LITEMEDSAM_CVPR24.fast_variant(encoder_batch=2).encoder_batch == 2
    with pytest.raises(ValueError):
        LITEMEDSAM_CVPR24.for_path("turbo")
    with pytest.raises(ValueError):
        PipelineConfig(encoder_batch=0)
    with pytest.raises(ValueError):
        PipelineConfig(cache_mb=-1)


# ============================================================================ 2D
@pytest.mark.parametrize("name", ["litemedsam_cvpr24", "mfs_docker_256"])
@pytest.mark.parametrize("decoder_batch, calls", [(1, 4), (3, 2), (4, 1), (64, 1)])
def test_2d_fast_decodes_boxes_in_batches_same_segs(name, decoder_batch, calls):
    """The fast path decodes ``decoder_batch`` boxes per call (default 1: fastest on CPU), in order."""
    config = CONFIGS[name]
    img = np.random.default_rng(0).integers(1, 255, (256, 200), dtype=np.uint8)
    boxes = np.array([[10, 10, 100, 100], [50, 50, 150, 150], [0, 120, 60, 250], [70, 20, 90, 40]])
    faithful, f_engine, f_model = _run(config, img, boxes)
    fast, engine, model = _run(config.fast_variant(decoder_batch=decoder_batch), img, boxes)
    np.testing.assert_array_equal(fast, faithful)
    assert f_model.mask_decoder.calls == 4 and model.mask_decoder.calls == calls
    assert engine.stats.decoder_calls == calls and f_engine.stats.decoder_calls == 4
    assert engine.stats.encoder_calls == f_engine.stats.encoder_calls == 1
    assert model.prompt_encoder.seen == f_model.prompt_encoder.seen
    assert _run(config.fast_variant(decoder_batch=decoder_batch), img, np.zeros((0, 4)))[0].max() == 0


def test_decoder_batch_defaults():
    """One box per call on the fast path by default; the faithful path as upstream: all boxes in one
    call for src/infer.py (batch_boxes_2d), one per call for the challenge/Docker scripts."""
    assert LITEMEDSAM_CVPR24.fast_variant().boxes_per_decoder_call(35) == 1
    assert LITEMEDSAM_CVPR24.boxes_per_decoder_call(35) == 1
    assert MEDFICIENTSAM_SRC_INFER.boxes_per_decoder_call(35) == 35
    assert MEDFICIENTSAM_SRC_INFER.fast_variant(decoder_batch=8).boxes_per_decoder_call(35) == 8
    with pytest.raises(ValueError, match="decoder_batch"):
        PipelineConfig(decoder_batch=0)


# ============================================================================ 3D
@pytest.mark.parametrize("name", list(CONFIGS))
def test_3d_fast_same_segs_each_slice_once_batched(name):
    config = CONFIGS[name]
    vol = _volume(depth=9, blank=(5,))
    faithful, f_engine, f_model = _run(config, vol, VOLUME_BOXES)
    fast, engine, model = _run(config.fast_variant(encoder_batch=4), vol, VOLUME_BOXES, engine_cls=_SliceCounter)
    np.testing.assert_array_equal(fast, faithful)
    assert faithful.max() == 3  # every box left a label
    assert model.prompt_encoder.seen == f_model.prompt_encoder.seen  # same propagated prompts
    # every planned slice encoded exactly once, in batches of at most encoder_batch
    union = engine.planned_slices(VOLUME_BOXES, vol.shape[0])
    assert sorted(engine.encoded_slices) == union
    assert engine.stats.images_encoded == len(union) < f_engine.stats.images_encoded
    assert engine.stats.encoder_calls == model.image_encoder.calls < f_engine.stats.encoder_calls
    assert max(engine.stats.encoder_batches) == engine.config.encoder_batch == 4
    assert sum(engine.stats.encoder_batches) == len(union)
    assert engine.stats.cache_hits > 0
    assert 0 < engine.stats.peak_cache_bytes <= config.cache_mb * 2**20


def test_3d_fast_empty_slice_fallback_and_prompts():
    """The blank slice gives an empty mask and the next slice is prompted with the given box, on
    both paths (the stub decoder returns nothing where the embedding is zero)."""
    vol = _volume(depth=6, blank=(3,))
    boxes = np.array([[40, 50, 0, 80, 90, 5]])
    for config in (LITEMEDSAM_CVPR24, CONFIGS["mfs_src_infer_256"]):
        faithful, _, f_model = _run(config, vol, boxes)
        fast, engine, model = _run(config.fast_variant(encoder_batch=2), vol, boxes)
        np.testing.assert_array_equal(fast, faithful)
        assert not (fast[3] > 0).any() and (fast[4] > 0).any()
        assert model.prompt_encoder.seen == f_model.prompt_encoder.seen
        assert max(engine.stats.encoder_batches) <= 2


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_3d_encoder_batch_bound(batch):
    vol = _volume(depth=9, blank=(5,))
    faithful = _run(LITEMEDSAM_CVPR24, vol, VOLUME_BOXES)[0]
    fast, engine, _ = _run(LITEMEDSAM_CVPR24.fast_variant(encoder_batch=batch), vol, VOLUME_BOXES)
    np.testing.assert_array_equal(fast, faithful)
    assert max(engine.stats.encoder_batches) <= batch
    assert engine.stats.images_encoded == len(engine.planned_slices(VOLUME_BOXES, vol.shape[0]))


@pytest.mark.parametrize("slots", [0, 1, 2])
def test_3d_tiny_cache_budget_same_segs_encoded_on_demand(slots):
    """A budget for 0, 1 or 2 embeddings: never exceeded, slices that found no room encoded again at
    their next visit (never more often than on the faithful path), same segs."""
    vol = _volume(depth=9, blank=(5,))
    cache_mb = slots * EMBEDDING_BYTES / 2**20
    faithful, f_engine, _ = _run(LITEMEDSAM_CVPR24, vol, VOLUME_BOXES)
    fast, engine, _ = _run(LITEMEDSAM_CVPR24.fast_variant(cache_mb=cache_mb), vol, VOLUME_BOXES)
    np.testing.assert_array_equal(fast, faithful)
    assert engine.stats.peak_cache_bytes <= slots * EMBEDDING_BYTES
    union = len(engine.planned_slices(VOLUME_BOXES, vol.shape[0]))
    assert union < engine.stats.images_encoded <= f_engine.stats.images_encoded
    if slots == 0:
        assert engine.stats.encoder_batches == [1] * f_engine.stats.images_encoded  # faithful pattern


def test_3d_unclamped_negative_z_and_out_of_range_like_faithful():
    vol = _volume(depth=5)
    docker = CONFIGS["mfs_docker_256"]
    box = np.array([[20, 20, -1, 60, 60, 3]])  # z = -1 reads the last slice, as upstream
    np.testing.assert_array_equal(_run(docker.fast_variant(), vol, box)[0], _run(docker, vol, box)[0])
    with pytest.raises(IndexError):
        _run(docker.fast_variant(), vol, np.array([[20, 20, 2, 60, 60, 9]]))


class _MutatingDecoder(_StubDecoder):
    """Zeroes the image embedding it was given, after using it (a decoder that works in place)."""

    def forward(self, image_embeddings, *args, **kwargs):
        out = super().forward(image_embeddings, *args, **kwargs)
        image_embeddings.zero_()
        return out


def test_cache_entries_are_owned_copies():
    """A caller that modifies the embedding it got cannot change what a later box or slice sees:
    with an in-place decoder the fast path still equals the faithful path (which encodes afresh)."""
    vol = _volume(depth=9, blank=(5,))
    results = {}
    for path in EXECUTION_PATHS:
        model = _StubSAM()
        model.mask_decoder = _MutatingDecoder(256)
        config = LITEMEDSAM_CVPR24.for_path(path)
        results[path] = BoxPromptEngine(model, config).segment(vol, VOLUME_BOXES)
    np.testing.assert_array_equal(results["fast"], results["faithful"])
    assert results["fast"].max() == 3

    stats = EngineStats()
    cache = SliceCache(3 * 16, stats)
    source = torch.ones(1, 4)
    batch = torch.arange(8.0).reshape(2, 4)
    assert cache.put(0, source) and cache.put(1, batch[1:2])
    source.zero_()
    batch.zero_()
    got = cache.get(0)
    assert got.sum() == 4 and cache.get(1).sum() == 4 + 5 + 6 + 7
    got.zero_()
    assert cache.get(0).sum() == 4
    assert cache.put(2, torch.ones(1, 4)) and cache.bytes == 48  # full
    assert not cache.put(3, torch.ones(1, 4)) and 3 not in cache  # no room: not stored, nothing evicted
    assert 0 in cache and 1 in cache and 2 in cache and cache.bytes == 48
    assert cache.pop(1).sum() == 4 + 5 + 6 + 7 and cache.bytes == 32 and 1 not in cache
    assert not cache.put(5, torch.ones(1, 13))  # larger than the whole budget
    assert stats.peak_cache_bytes == 48


# ============================================================================ choosing the path
def test_torch_segmenter_applies_and_reports_the_path(monkeypatch):
    import models.inference.segmenters as segmenters
    from models.complexity import Compute
    from models.inference.segmenters import TorchSegmenter

    monkeypatch.setattr(segmenters, "measure_compute", lambda model, size: Compute(flops=0, norm_elements=0))

    model = _StubSAM()
    assert TorchSegmenter("stub", model, LITEMEDSAM_CVPR24, "none").engine.config.path == "faithful"
    seg = TorchSegmenter("stub", model, LITEMEDSAM_CVPR24, "none", path="fast")
    assert seg.config == LITEMEDSAM_CVPR24.fast_variant() and seg.engine.config.fast
    facts = seg.describe()
    assert facts["path"] == "fast" and facts["pipeline"] == "litemedsam_cvpr24"
    assert LoadOptions().path == "fast"  # the harness's default path (harness.plugin_api.DEFAULT_PATH)


def test_litemedsam_plugin_loads_the_chosen_path():
    from plugins.litemedsam import load

    try:
        seg = load(LoadOptions(path="fast", threads=torch.get_num_threads()))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert seg.engine.config == LITEMEDSAM_CVPR24.fast_variant()


def test_runner_passes_the_choices_and_stores_each_variant_as_its_own_tagged_entry(tmp_path):
    from harness import Reported, SegmenterSpec, hookimpl
    from harness.cli import build_parser
    from harness.pluginmanager import HarnessPlugins
    from harness.choices import choice_defaults
    from harness.run import RunConfig, run
    from harness.plugin_api import ENGINE_CHOICES
    from helpers import DEMO
    from leaderboard import render_markdown

    seen = []

    class Fill:
        def __init__(self, options):
            self.options = options

        def segment(self, case):
            return np.zeros(case.spatial_shape, np.uint16)

        def describe(self):
            return {"params": 0, "flops": 0, "weights": None, "path": self.options.path,
                    "precision": self.options.precision}

    class Plugin:
        @hookimpl
        def harness_segmenters(self):
            def load(options):
                seen.append((options.path, options.precision, options.backend))
                return Fill(options)

            published = Reported(source="a paper", dsc=50.0, nsd=40.0)
            return [SegmenterSpec(name="pathy", title="Pathy", family="test", load=load, choices=ENGINE_CHOICES,
                                  reported=published),
                    SegmenterSpec(name="plain", title="Plain", family="test", load=load)]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Plugin(), "pathy")
    out = tmp_path / "out"
    for path, precision in (("faithful", "fp32"), ("fast", "fp32"), ("fast", "bf16")):
        run(RunConfig(models=["pathy", "plain"], data_dir=DEMO, out_dir=out, limit=2, path=path,
                      precision=precision, progress=False), plugins)
    # every variant of pathy ran; plain honours no choices, so its finished cases were not run again.
    # Loaders get --backend auto itself (a segmenter whose export fails under auto falls back to torch);
    # the records name what auto resolves to: torch on the faithful path, on the fast path openvino where
    # installed, else torch; a segmenter without the backend choice (plain) names none
    fast_backend = choice_defaults()["backend"]
    assert seen == [("faithful", "fp32", "auto"), ("faithful", "fp32", "auto"), ("fast", "fp32", "auto"),
                    ("fast", "bf16", "auto")]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_entry = {}
    for r in records:
        by_entry.setdefault(r["model"], set()).add((r["segmenter"], r["path"], r["precision"], r["backend"]))
    assert by_entry == {"pathy[faithful]": {("pathy", "faithful", "fp32", "torch")},
                        "plain": {("plain", "faithful", "fp32", None)},
                        "pathy": {("pathy", "fast", "fp32", fast_backend)},
                        "pathy[bf16]": {("pathy", "fast", "bf16", fast_backend)}}
    models = json.loads((out / "models.json").read_text())
    assert models["pathy[bf16]"]["tags"] == ["bf16"] and models["pathy"]["tags"] == []
    assert (out / "segs" / "pathy[faithful]").is_dir()
    board = render_markdown(out)
    assert "| Pathy [faithful]" in board and "| Pathy [bf16]" in board and "\n| Pathy " in board
    assert "[faithful] the upstream call pattern" in board
    assert board.count("Pathy *(published)*") == 1  # under one row of the segmenter, not under each variant

    assert build_parser().parse_args(["run", "--models", "x"]).path == "fast"
    args = build_parser().parse_args(["run", "--models", "x", "--path", "faithful", "--precision", "bf16"])
    assert (args.path, args.precision, args.backend) == ("faithful", "bf16", "auto")


# ============================================================================ real models
REAL_CASES = ("2DBox_Microscopy_dsb2018-t4", "3DBox_PET_sts002")


def _real_model(name):
    from models import build_model, default_litemedsam_checkpoint, load_weights
    from reference import make_state_dict

    if name == "litemedsam":
        model = build_model("litemedsam")
        load_weights(model, default_litemedsam_checkpoint())
        return model.eval(), LITEMEDSAM_CVPR24
    model = build_model("l0")
    model.load_state_dict(make_state_dict("medficientsam_l0", 0), strict=True)
    return model.eval(), MEDFICIENTSAM_DOCKER


@pytest.mark.slow
@pytest.mark.parametrize("name", ["litemedsam"])  # real weights: real masks; the engine code is shared
def test_real_models_fast_same_masks_as_faithful(name, two_threads, capsys):
    from reference import assert_segs_match, require_data

    data_dir = require_data()
    try:
        model, config = _real_model(name)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    lines = []
    for case in REAL_CASES:
        path = Path(data_dir) / "imgs" / f"{case}.npz"
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        with np.load(path) as npz:
            imgs, boxes = npz["imgs"], npz["boxes"]
        runs = {}
        for label in EXECUTION_PATHS:
            # batches of 4 slices and of all 2D boxes: batched calls must give the same masks as well
            engine = BoxPromptEngine(model, config.for_path(label) if label == "faithful"
                                     else config.fast_variant(encoder_batch=4, decoder_batch=len(boxes)))
            start = time.perf_counter()
            segs = engine.segment(imgs, boxes)
            runs[label] = (segs, engine.stats, time.perf_counter() - start)
        (faithful, f_stats, f_s), (fast, stats, s) = runs["faithful"], runs["fast"]
        assert faithful.max() > 0
        assert_segs_match(fast, faithful)
        if case.startswith("3D"):
            assert stats.images_encoded == f_stats.images_encoded  # one box: each slice once either way
            assert stats.encoder_calls < f_stats.encoder_calls
            assert max(stats.encoder_batches) <= 4
        else:
            assert stats.decoder_calls == 1 < f_stats.decoder_calls == len(boxes)
        lines.append(f"{name} {case}: encoder calls {f_stats.encoder_calls} -> {stats.encoder_calls}, "
                     f"decoder calls {f_stats.decoder_calls} -> {stats.decoder_calls}, "
                     f"seconds {f_s:.2f} -> {s:.2f} (faithful -> fast)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ============================================================================ model rewrites
@pytest.mark.parametrize("model_name,model_key,size", [("litemedsam", "lite_medsam", 256),
                                                        pytest.param("l0", "medficientsam_l0", 512,
                                                                     marks=pytest.mark.slow)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_batchnorm_and_channels_last_keep_the_parity_vectors(model_name, model_key, size, channels_last,
                                                                    two_threads):
    """The fast path's rewrites (BatchNorm folded into convs, channels-last weights) still give the
    upstream embedding and masks of case_seed0 within the parity bars."""
    from models import build_model
    from models.export.optimize import fold_batchnorm, to_channels_last
    from reference import REL_TOL, load_npz, make_case_inputs, make_state_dict, rel_dev

    ref = load_npz(model_key, "case_seed0.npz")
    meta = json.loads(str(ref["meta_json"]))
    image_u8, boxes = make_case_inputs(meta["input_seed"] if "input_seed" in meta else meta["weights_seed"], size)
    np.testing.assert_array_equal(image_u8, ref["image_u8"])
    model = build_model(model_name).train()
    model.load_state_dict(make_state_dict(model_key, meta["weights_seed"]), strict=True)
    model.eval()
    norms_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    assert folded == norms_before > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    image = torch.from_numpy(image_u8.astype(np.float32) / np.float32(255))
    if channels_last:
        to_channels_last(model)
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        embedding = model.image_encoder(image)
        low = torch.cat([model.decode_boxes(embedding, box[None])[0] for box in torch.from_numpy(boxes)])
    assert rel_dev(embedding, ref["image_embedding"]) <= REL_TOL
    assert rel_dev(low, ref["low_res_masks"]) <= REL_TOL


def test_fold_batchnorm_refuses_a_training_model():
    from models import build_model
    from models.export.optimize import fold_batchnorm

    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(build_model("l0").train())
