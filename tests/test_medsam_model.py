"""MedSAM ViT-B: state_dict layout and numerical parity with the upstream ``Sam`` model.

Parity cases come from ``shared/reference/medsam_vit_b`` (see its README): outputs of the
unmodified upstream model for synthetic weights (``make_weights.py``) and inputs
(``make_inputs.py``) at 1024 px. Tolerances are the README's suggestion for a float32
re-implementation: max|d| <= 3e-5 * std(ref) for the embedding, every encoder stage and the
low-res logits, |d IoU| <= 5e-6, |d sparse embeddings| <= 1e-5.

A ViT-B forward pass at 1024 px takes about 10 s on two CPU threads, so the encoder runs once
per reference case (a module-scoped fixture) and every parity check reads that one run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import build_model, list_models
from models.builders import build_medsam_prompt_parts
from models.nets.vit import Attention, relative_position_table
from reference import (
    assert_outputs_match,
    IOU_TOL,
    REFERENCE_DIR,
    REL_TOL,
    abs_dev,
    load_npz,
    make_case_inputs,
    make_state_dict,
    rel_dev,
    require_reference,
)

pytestmark = pytest.mark.usefixtures("two_threads")

MODEL_KEY = "medsam_vit_b"
INPUT_SIZE = 1024
ENCODER_STAGES = ("patch_embed", *(f"blocks.{i}" for i in range(12)), "neck")
SEED_CASES = sorted(p.name for p in (REFERENCE_DIR / MODEL_KEY).glob("case_seed*.npz"))






def _summary_hook(store: dict, name: str):
    """Forward hook keeping what the reference records of a stage: shape, first 32 values, stats.

    Summaries instead of whole tensors keep the memory of the 1024 px run small.
    """

    def hook(_module, _inputs, output):
        out = output.detach().double()
        store[name] = {
            "shape": list(out.shape),
            "head32": out.flatten()[:32].numpy(),
            "stats": (out.mean().item(), out.std().item(), out.min().item(), out.max().item()),
        }

    return hook


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(require_reference(MODEL_KEY, "manifest.json").read_text())


@pytest.fixture(scope="module")
def model():
    """One MedSAM model for the whole module (building 94M parameters takes a while)."""
    return build_model("medsam")


@pytest.fixture(scope="module", params=SEED_CASES or ["case_seed0.npz"])
def reference_run(request, model) -> dict:
    """Load the case's synthetic weights, run the README protocol once and keep the results."""
    ref = load_npz(MODEL_KEY, request.param)
    seed = json.loads(str(ref["meta_json"]))["weights_seed"]
    image_u8, boxes = make_case_inputs(seed, INPUT_SIZE)
    np.testing.assert_array_equal(image_u8, ref["image_u8"])
    np.testing.assert_array_equal(boxes, ref["boxes"])

    model.train()
    model.load_state_dict(make_state_dict(MODEL_KEY, seed), strict=True)
    model.eval()  # load, then eval: the upstream order

    stages: dict[str, dict] = {}
    handles = [
        model.image_encoder.get_submodule(name).register_forward_hook(_summary_hook(stages, name))
        for name in ENCODER_STAGES
    ]
    image = torch.from_numpy(image_u8.astype(np.float32) / np.float32(255))
    try:
        with torch.no_grad():
            embedding = model.image_encoder(image)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        sparse, masks, ious = [], [], []
        for box in torch.from_numpy(boxes):
            sp, _ = model.prompt_encoder(points=None, boxes=box[None], masks=None)
            low, iou = model.decode_boxes(embedding, box[None])  # one box per call, as upstream
            sparse.append(sp)
            masks.append(low)
            ious.append(iou)
    return {
        "ref": ref,
        "stages": stages,
        "image_embedding": embedding,
        "sparse_embeddings": torch.cat(sparse),
        "low_res_masks": torch.cat(masks),
        "iou_predictions": torch.cat(ious),
    }


# --------------------------------------------------------------------------- layout


def test_state_dict_matches_manifest(manifest, model):
    got = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert got == manifest["state_dict"]  # keys, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"] == 93_735_472
    for part, count in manifest["num_parameters_by_module"].items():
        assert sum(p.numel() for p in getattr(model, part).parameters()) == count
    # pixel_mean/pixel_std are unused upstream buffers outside the state_dict; we have none.
    assert not any(name.startswith("pixel_") for name, _ in model.named_buffers())
    assert model.info.name == "medsam"
    assert model.info.input_size == 1024 and model.info.prompt_size == 1024


def test_registry_and_prompt_parts():
    assert "medsam" in list_models()
    prompt_encoder, mask_decoder = build_medsam_prompt_parts()
    assert prompt_encoder.input_image_size == (1024, 1024)
    assert prompt_encoder.image_embedding_size == (64, 64)
    norms = [m for m in mask_decoder.transformer.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    assert sum(p.numel() for p in prompt_encoder.parameters()) == 6_220
    assert sum(p.numel() for p in mask_decoder.parameters()) == 4_058_340


# --------------------------------------------------------------------------- small units


def test_relative_position_table_indexes_offsets():
    size = 3
    rel_pos = torch.arange(2 * size - 1, dtype=torch.float32)[:, None].expand(-1, 2)
    table = relative_position_table(rel_pos, size)
    assert table.shape == (size, size, 2)
    for i in range(size):
        for j in range(size):
            assert table[i, j, 0].item() == i - j + size - 1
    with pytest.raises(ValueError, match="expected 5"):
        relative_position_table(torch.zeros(7, 2), size)


def test_chunked_attention_equals_single_pass(monkeypatch):
    """Processing heads in chunks (the memory bound) does not change the result."""
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, grid_size=6)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.1)
        attn.rel_pos_w.normal_(0, 0.1)
        x = torch.randn(2, 6, 6, 32)
        whole = attn(x)
        monkeypatch.setattr("models.nets.vit._SCORE_BUDGET", 36 * 36 * 3)  # 3 of 8 rows per chunk
        chunked = attn(x)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_encoder_rejects_other_sizes(model):
    with pytest.raises(ValueError, match="1024x1024"):
        model.image_encoder(torch.zeros(1, 3, 512, 512))


# --------------------------------------------------------------------------- parity


@pytest.mark.slow  # MedSAM ViT-B at 1024 px: tens of seconds on 2 cores
def test_embedding_and_decoder_parity(reference_run):
    ref = reference_run["ref"]
    assert_outputs_match(reference_run, ref)


@pytest.mark.slow  # MedSAM ViT-B at 1024 px: tens of seconds on 2 cores
@pytest.mark.parametrize("name", ENCODER_STAGES)
def test_encoder_stage_parity(reference_run, name):
    """patch_embed (before pos_embed) and the blocks are channels-last (1, 64, 64, 768)."""
    ref = reference_run["ref"]
    got = reference_run["stages"][name]
    prefix = f"dbg__image_encoder.{name}__"
    assert got["shape"] == ref[prefix + "shape"].tolist()
    mean, std, low, high = ref[prefix + "stats_mean_std_min_max"]
    assert np.abs(got["head32"] - ref[prefix + "head32"]).max() <= REL_TOL * std
    for value, expected in zip(got["stats"], (mean, std, low, high)):
        assert abs(value - expected) <= REL_TOL * std


@pytest.mark.slow  # MedSAM ViT-B at 1024 px: tens of seconds on 2 cores
def test_batched_decoding_matches_reference(reference_run, model):
    """All boxes decoded against the one embedding in a single call match per-box decoding."""
    ref = reference_run["ref"]
    with torch.no_grad():
        low, iou = model.decode_boxes(
            reference_run["image_embedding"], torch.from_numpy(ref["boxes"])
        )
    assert rel_dev(low, ref["low_res_masks"]) <= REL_TOL
    assert abs_dev(iou, ref["iou_predictions"]) <= IOU_TOL
