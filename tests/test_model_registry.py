"""Every model of the registry (``models.builders.MODELS``), timm-style: build, strict load of generated
weights, forward at its input size; and every checkpoint layout users hold.

:func:`test_build_load_forward` needs nothing outside the repository: it writes small seeded weights to a
medsam-harness weights file and loads that into a fresh build. The layout tests use the reference
folder's ``make_weights.py`` (seed 1 here, so nothing depends on the seed-0 vectors). MedSAM (93.7M
parameters, ~10 s per forward at 1024 on 2 cores) is marked slow, and so are L1 and L2 (L0 runs the
same code at the same input size, and the layouts are read by the same code for every model: the
L1/L2 rows cost 3-6 s each to write and read their 190-245 MB files).
"""
from __future__ import annotations

import functools

import pytest
import torch

from models import MODELS, PromptableSAM, build_model, list_models, load_weights
from models.weights.checkpoints import read_checkpoint, save_harness_checkpoint
from reference import make_state_dict

MANIFESTS = {"medsam": "medsam_vit_b", "litemedsam": "lite_medsam", "l0": "medficientsam_l0",
             "l1": "medficientsam_l1", "l2": "medficientsam_l2"}
FORMATS = ("state_dict", "module_prefix", "wrapped", "lightning", "harness", "pickled")


def _slow_large(names):
    """MedSAM, L1 and L2 slow: 10-20 s each to build twice, write, load and run on 2 cores."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in ("medsam", "l1", "l2") else n for n in names]


def test_registry_lists_the_five_builtin_models():
    assert list_models() == sorted(MODELS) == ["l0", "l1", "l2", "litemedsam", "medsam"]
    with pytest.raises(ValueError, match="unknown model 'nope'; known models: l0, l1, l2, litemedsam, medsam"):
        build_model("nope")


def test_every_registered_model_has_a_reference_manifest():
    assert set(list_models()) == set(MANIFESTS)


@functools.lru_cache(maxsize=1)
def _weights(name: str) -> dict:
    return make_state_dict(MANIFESTS[name], 1)


def _small_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights of ``model``'s shapes, small enough that activations stay finite (BatchNorm
    variances positive, integer buffers kept)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = 1.0 + torch.rand(value.shape, generator=gen)
        else:
            state[key] = 0.02 * torch.randn(value.shape, generator=gen)
    return state


@pytest.mark.parametrize("name", _slow_large(sorted(MODELS)))
def test_build_load_forward(name, tmp_path):
    built = build_model(name)
    assert isinstance(built, PromptableSAM) and not built.training
    weights = _small_weights(built, seed=0)
    path = save_harness_checkpoint(tmp_path / f"{name}.pt", name, weights)
    model = load_weights(build_model(name), path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    info = model.info
    assert info.name == name and model.prompt_encoder.input_image_size == (info.prompt_size, info.prompt_size)
    image = torch.rand(1, 3, info.input_size, info.input_size, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[10.0, 20.0, 90.0, 120.0], [0.0, 0.0, 40.0, 40.0]]) * info.prompt_size / 256
    with torch.inference_mode():
        embedding = model.image_encoder(image)
        low_res, iou = model.decode_boxes(embedding, boxes)
    assert embedding.shape == (1, 256, 64, 64)
    assert low_res.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert torch.isfinite(low_res).all() and torch.isfinite(iou).all()
    assert low_res.std() > 0  # the weights reach the output: not a constant map
    with torch.device("meta"):  # identification of checkpoints builds models without memory
        assert list(build_model(name).state_dict()) == list(model.state_dict())


def _write(fmt: str, name: str, state: dict, path):
    if fmt == "state_dict":
        torch.save(state, path)
    elif fmt == "module_prefix":  # DataParallel
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "wrapped":  # LiteMedSAM training checkpoint
        torch.save({"model": state, "epoch": 5, "optimizer": {"state": {}, "param_groups": []}}, path)
    elif fmt == "lightning":  # medficientsam FinetuneLitModule
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1,
                    "hyper_parameters": {"optimizer": functools.partial(torch.optim.AdamW, lr=1e-4)}}, path)
    elif fmt == "harness":
        save_harness_checkpoint(path, name, state)
    else:  # pickled whole module
        model = build_model(name)
        model.load_state_dict(state)
        torch.save(model, path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", _slow_large(sorted(MANIFESTS)))
def test_every_format_loads_strictly(tmp_path, name, fmt):
    state = _weights(name)
    path = tmp_path / "weights.bin"
    _write(fmt, name, state, path)
    allow = fmt == "pickled"
    if allow:
        with pytest.raises(ValueError, match="pickled whole model"):
            read_checkpoint(path)
    model = load_weights(build_model(name), path, allow_pickle=allow)
    own = model.state_dict()
    assert list(own) == list(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())
