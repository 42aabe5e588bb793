"""LiteMedSAM modules: state_dict layout, checkpoint loading and numerical parity with upstream.

Parity cases come from ``shared/reference/lite_medsam`` (see its README): outputs of the
unmodified upstream model for synthetic weights (``make_weights.py``) and inputs
(``make_inputs.py``), and for the real checkpoint. Tolerances are the README's suggestion for a
float32 re-implementation: max|d| <= 3e-5 * std(ref) for embeddings, encoder stages and logits,
|d IoU| <= 5e-6, |d sparse embeddings| <= 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import CheckpointError, build_model, list_models, load_weights
from models.weights.checkpoints import default_litemedsam_checkpoint
from reference import (
    assert_outputs_match,
    IOU_TOL,
    REFERENCE_DIR,
    REL_TOL,
    abs_dev,
    assert_stage_matches,
    load_npz,
    make_case_inputs,
    make_state_dict,
    rel_dev,
    require_reference,
)

pytestmark = pytest.mark.usefixtures("two_threads")

MODEL_KEY = "lite_medsam"
ENCODER_STAGES = ("patch_embed", "layers.0", "layers.1", "layers.2", "layers.3", "neck")
SEED_CASES = sorted(p.name for p in (REFERENCE_DIR / MODEL_KEY).glob("case_seed*.npz"))






def _recorder(store: dict, name: str):
    """Forward hook that stores the module output under ``name``."""

    def hook(_module, _inputs, output):
        store[name] = output

    return hook


def _run_reference_protocol(model, image_u8: np.ndarray, boxes: np.ndarray, stages=None):
    """The README's module-level computation: one encoder call, one decoder call per box."""
    image = torch.from_numpy(image_u8.astype(np.float32) / np.float32(255))
    handles = []
    if stages is not None:
        for name in ENCODER_STAGES:
            module = model.image_encoder.get_submodule(name)
            handles.append(module.register_forward_hook(_recorder(stages, name)))
    try:
        with torch.no_grad():
            embedding = model.image_encoder(image)
            pe = model.prompt_encoder.get_dense_pe()
            sparse, masks, ious = [], [], []
            for box in torch.from_numpy(boxes):
                sp, de = model.prompt_encoder(points=None, boxes=box[None], masks=None)
                low, iou = model.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=pe,
                    sparse_prompt_embeddings=sp,
                    dense_prompt_embeddings=de,
                    multimask_output=False,
                )
                sparse.append(sp)
                masks.append(low)
                ious.append(iou)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "image_embedding": embedding,
        "sparse_embeddings": torch.cat(sparse),
        "low_res_masks": torch.cat(masks),
        "iou_predictions": torch.cat(ious),
    }


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(require_reference(MODEL_KEY, "manifest.json").read_text())


@pytest.fixture(scope="module")
def seed0_checkpoint(module_tmp) -> Path:
    path = module_tmp / "seed0.pth"
    torch.save(make_state_dict(MODEL_KEY, 0), path)
    return path


# --------------------------------------------------------------------------- layout


def test_state_dict_matches_manifest(manifest):
    model = build_model("litemedsam")
    got = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert got == manifest["state_dict"]  # keys, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"] == 9_791_300
    for part, count in manifest["num_parameters_by_module"].items():
        assert sum(p.numel() for p in getattr(model, part).parameters()) == count
    assert model.info.input_size == 256 and model.info.prompt_size == 256


def test_nonpersistent_buffers_match_upstream(manifest):
    model = build_model("litemedsam")
    expected = load_npz(MODEL_KEY, "nonpersistent_buffers.npz")
    buffers = dict(model.named_buffers())
    assert sorted(expected) == sorted(k for k, _, _ in manifest["non_persistent_buffers"])
    for key, value in expected.items():
        assert key not in model.state_dict()
        assert buffers[key].dtype == torch.int64
        np.testing.assert_array_equal(buffers[key].numpy(), value)


def test_registry():
    assert "litemedsam" in list_models()
    with pytest.raises(ValueError, match="litemedsam"):
        build_model("no-such-model")


def test_decoder_shapes_for_points_and_multimask():
    model = build_model("litemedsam")
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.tensor([[[30.0, 40.0], [100.0, 120.0]]]).expand(3, -1, -1)
    labels = torch.tensor([[1, 0]]).expand(3, -1)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape == (3, 3, 256)  # two points plus the padding point
        assert dense.shape == (3, 256, 64, 64)
        padding_token = model.prompt_encoder.not_a_point_embed.weight.expand(3, -1)
        torch.testing.assert_close(sparse[:, 2], padding_token)
        masks, iou = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    assert masks.shape == (3, 3, 256, 256) and iou.shape == (3, 3)


# --------------------------------------------------------------------------- loading


def test_strict_load_of_seed0_weights(seed0_checkpoint):
    model = load_weights(build_model("litemedsam"), seed0_checkpoint)
    expected = make_state_dict(MODEL_KEY, 0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_loader_reports_missing_unexpected_and_shape_mismatch(tmp_path):
    state = make_state_dict(MODEL_KEY, 0)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(3)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("litemedsam"), path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys" in message and "mask_decoder.iou_token.weight" in message
    assert "1 unexpected keys" in message and "mask_decoder.extra.weight" in message
    assert "prompt_encoder.no_mask_embed.weight: checkpoint (1, 128) vs model (1, 256)" in message


def test_loader_truncates_long_key_lists(tmp_path):
    path = tmp_path / "encoder_only.pth"
    state = make_state_dict(MODEL_KEY, 0)
    torch.save({k: v for k, v in state.items() if k.startswith("image_encoder.")}, path)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*\.\.\. and \d+ more"):
        load_weights(build_model("litemedsam"), path)


def test_loader_rejects_non_mapping(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="tensor.pth"):
        load_weights(build_model("litemedsam"), path)
    with pytest.raises(FileNotFoundError):
        load_weights(build_model("litemedsam"), tmp_path / "absent.pth")


@pytest.mark.parametrize("wrap", ["model", "state_dict_with_prefix"])
def test_loader_unwraps_training_checkpoints(tmp_path, wrap):
    state = make_state_dict(MODEL_KEY, 0)
    if wrap == "model":  # LiteMedSAM training checkpoint layout
        obj = {"model": state, "epoch": 3, "loss": 0.5, "best_loss": 0.4}
    else:  # Lightning layout
        obj = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    model = load_weights(build_model("litemedsam"), path)
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(model.state_dict()[key], state[key])


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case_name", SEED_CASES or ["case_seed0.npz"])
def test_parity_with_upstream_synthetic_weights(case_name):
    ref = load_npz(MODEL_KEY, case_name)
    seed = json.loads(str(ref["meta_json"]))["weights_seed"]
    image_u8, boxes = make_case_inputs(seed, 256)
    np.testing.assert_array_equal(image_u8, ref["image_u8"])
    np.testing.assert_array_equal(boxes, ref["boxes"])

    model = build_model("litemedsam").train()
    model.load_state_dict(make_state_dict(MODEL_KEY, seed), strict=True)
    model.eval()  # load, then eval: the upstream order
    stages: dict[str, torch.Tensor] = {}
    outputs = _run_reference_protocol(model, image_u8, boxes, stages)
    assert_outputs_match(outputs, ref)

    for name in ENCODER_STAGES:
        assert_stage_matches(stages[name], ref, name)

    # Batched decoding of all boxes against the single embedding matches per-box decoding.
    with torch.no_grad():
        low, iou = model.decode_boxes(outputs["image_embedding"], torch.from_numpy(boxes))
    assert rel_dev(low, ref["low_res_masks"]) <= REL_TOL
    assert abs_dev(iou, ref["iou_predictions"]) <= IOU_TOL


def test_eval_before_load_gives_same_result():
    """Upstream TinyViT caches attention biases on eval(); ours must not go stale."""
    ref = load_npz(MODEL_KEY, "case_seed0.npz")
    model = build_model("litemedsam")
    model.train()
    model.eval()  # a cache built here would hold the random initial biases
    model.load_state_dict(make_state_dict(MODEL_KEY, 0), strict=True)
    assert_outputs_match(_run_reference_protocol(model, ref["image_u8"], ref["boxes"]), ref)


def test_parity_with_upstream_real_checkpoint():
    ref = load_npz(MODEL_KEY, "case_real_weights.npz")
    try:
        checkpoint = default_litemedsam_checkpoint()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model = load_weights(build_model("litemedsam"), checkpoint)
    outputs = _run_reference_protocol(model, ref["image_u8"], ref["boxes"])
    assert_outputs_match(outputs, ref)
    assert (outputs["iou_predictions"].flatten() > 0.7).all()  # README: IoU [0.840, 0.766, 0.846]
