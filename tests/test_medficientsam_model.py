"""MedficientSAM L0/L1/L2 modules: state_dict layout and numerical parity with upstream.

Parity cases come from ``shared/reference/medficientsam_l{0,1,2}`` (see its README): outputs of
the unmodified upstream model (medficientsam ``BaseSAM`` around EfficientViT-SAM) for synthetic
weights (``make_weights.py``) and inputs (``make_inputs.py``). Tolerances are the README's
suggestion for a float32 re-implementation: max|d| <= 3e-5 * std(ref) for the embedding, every
encoder stage and the logits, |d IoU| <= 5e-6, |d sparse embeddings| <= 1e-5. The bar is tight
enough to catch the smallest known bug class (BatchNorm eps 1e-5 instead of 1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, list_models
from models.nets.efficientvit import LiteMLA
from models.builders import build_efficientvit_encoder, build_medficientsam
from reference import (
    assert_outputs_match,
    IOU_TOL,
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

VARIANTS = ("l0", "l1", "l2")
NUM_PARAMETERS = {"l0": 34_792_784, "l1": 47_650_128, "l2": 61_328_592}
ENCODER_STAGES = tuple(f"backbone.stages.{i}" for i in range(5)) + ("neck", "norm")


def _model_key(variant: str) -> str:
    return f"medficientsam_{variant}"






def _manifest(variant: str) -> dict:
    return json.loads(require_reference(_model_key(variant), "manifest.json").read_text())


def _run_reference_protocol(model, image_u8: np.ndarray, boxes: np.ndarray, stages: dict):
    """The README's module-level computation: one encoder call, one decoder call per box.

    Encoder stage outputs are recorded into ``stages`` by forward hooks.
    """
    image = torch.from_numpy(image_u8.astype(np.float32) / np.float32(255))
    handles = []
    for name in ENCODER_STAGES:
        module = model.image_encoder.get_submodule(name)
        hook = lambda _m, _i, output, name=name: stages.__setitem__(name, output)  # noqa: E731
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            embedding = model.image_encoder(image)
            sparse, masks, ious = [], [], []
            for box in torch.from_numpy(boxes):
                sp, _ = model.prompt_encoder(points=None, boxes=box[None], masks=None)
                low, iou = model.decode_boxes(embedding, box[None])
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


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_manifest(variant):
    manifest = _manifest(variant)
    model = build_model(variant)
    got = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert got == manifest["state_dict"]  # keys, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert manifest["num_parameters"] == NUM_PARAMETERS[variant]
    for part, count in manifest["num_parameters_by_module"].items():
        assert sum(p.numel() for p in getattr(model, part).parameters()) == count
    assert model.info.name == variant
    assert model.info.input_size == 512 and model.info.prompt_size == 512
    assert model.prompt_encoder.input_image_size == (512, 512)
    assert not model.training


@pytest.mark.parametrize("variant", VARIANTS)
def test_encoder_builder_has_checkpoint_keys(variant):
    """The stand-alone encoder's keys are the model's ``image_encoder.`` keys without the prefix."""
    manifest = _manifest(variant)
    expected = [
        [k[len("image_encoder.") :], shape, dtype]
        for k, shape, dtype in manifest["state_dict"]
        if k.startswith("image_encoder.")
    ]
    encoder = build_efficientvit_encoder(variant)
    assert [[k, list(v.shape), str(v.dtype)] for k, v in encoder.state_dict().items()] == expected


def test_registry_and_unknown_variant():
    assert {"l0", "l1", "l2"} <= set(list_models())
    with pytest.raises(ValueError, match="l0, l1, l2"):
        build_efficientvit_encoder("l3")


@pytest.mark.parametrize("variant", VARIANTS)
def test_norm_eps_and_gelu_flavours(variant):
    """eps 1e-6 everywhere (upstream's set_norm_eps), tanh GELU only in the encoder."""
    model = build_model(variant)
    for name, module in model.named_modules():
        if hasattr(module, "eps"):  # BatchNorm2d, nn.LayerNorm, LayerNorm2d
            assert module.eps == 1e-6, name
        if isinstance(module, nn.GELU):
            expected = "tanh" if name.startswith("image_encoder.") else "none"
            assert module.approximate == expected, name
    looser = build_medficientsam(variant, prompt_size=1024, decoder_ln_eps=1e-5)
    assert looser.mask_decoder.transformer.norm_final_attn.eps == 1e-5
    assert looser.info.prompt_size == 1024
    assert looser.prompt_encoder.input_image_size == (1024, 1024)


def test_linear_attention_matches_quadratic_form():
    """The O(N) and O(N^2) evaluations of the ReLU kernel attention agree."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 20, generator=generator, dtype=torch.float64) for _ in range(3))
    q, k = q.relu(), k.relu()
    torch.testing.assert_close(
        LiteMLA._linear_attention(q, k, v), LiteMLA._quadratic_attention(q, k, v)
    )


def test_small_input_runs_quadratic_branch():
    """At 64 px the last stage is 2x2 (4 <= 32 positions): the quadratic branch runs."""
    encoder = build_efficientvit_encoder("l0").eval()
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 256, 64, 64) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", [v if v == "l0" else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def test_parity_with_upstream_synthetic_weights(variant):
    key = _model_key(variant)
    ref = load_npz(key, "case_seed0.npz")
    meta = json.loads(str(ref["meta_json"]))
    image_u8, boxes = make_case_inputs(meta["input_seed"], 512)
    np.testing.assert_array_equal(image_u8, ref["image_u8"])
    np.testing.assert_array_equal(boxes, ref["boxes"])

    model = build_model(variant).train()
    model.load_state_dict(make_state_dict(key, meta["weights_seed"]), strict=True)
    model.eval()  # load, then eval: the upstream order
    stages: dict[str, torch.Tensor] = {}
    outputs = _run_reference_protocol(model, image_u8, boxes, stages)

    assert outputs["image_embedding"].shape == ref["image_embedding"].shape
    assert outputs["low_res_masks"].shape == ref["low_res_masks"].shape
    assert outputs["iou_predictions"].shape == ref["iou_predictions"].shape
    assert_outputs_match(outputs, ref)

    for name in ENCODER_STAGES:
        assert_stage_matches(stages[name], ref, name)

    # Batched decoding of all boxes against the single embedding matches per-box decoding.
    with torch.no_grad():
        low, iou = model.decode_boxes(outputs["image_embedding"], torch.from_numpy(boxes))
    assert rel_dev(low, ref["low_res_masks"]) <= REL_TOL
    assert abs_dev(iou, ref["iou_predictions"]) <= IOU_TOL
