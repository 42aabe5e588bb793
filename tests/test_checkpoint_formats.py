"""Checkpoint formats users hold, each built from generated (seed-0) weights, loaded through the
model zoo's loaders as ``harness run`` does: plain state_dicts, medficientsam Lightning
checkpoints (fine-tuned ``model.*``, distilled ``student_encoder.*``), the training package's
own format, and the refused pickled whole module; plus the weights-folder lookup and the
messages for missing or mismatched weights.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from harness.plugin_api import LoadOptions
from models import CheckpointError, build_model
from models.weights.checkpoints import identify, read_checkpoint, save_harness_checkpoint
from models.complexity import count_parameters
from models.weights.zoo import MissingWeightsError, find_weights, load_medficientsam, load_medsam
from reference import make_state_dict
from helpers import DEMO, harness_cli


@pytest.fixture(scope="module")
def l0_state() -> dict:
    return make_state_dict("medficientsam_l0", 0)


@pytest.fixture(scope="module")
def l0_file(module_tmp, l0_state) -> Path:
    path = module_tmp / "l0_state.pth"
    torch.save(l0_state, path)
    return path


@pytest.fixture(scope="module")
def medsam_file(module_tmp) -> Path:
    path = module_tmp / "medsam_vit_b.pth"
    torch.save(make_state_dict("medsam_vit_b", 0), path)
    return path


def _lightning(state: dict, prefix: str, extra: dict | None = None) -> dict:
    """A Lightning-shaped checkpoint: pickled optimiser partials in hyper_parameters, as
    medficientsam's Hydra ``_partial_`` configs produce them."""
    return {
        "epoch": 2,
        "global_step": 345,
        "pytorch-lightning_version": "2.2.2",
        "state_dict": OrderedDict({f"{prefix}{k}": v for k, v in state.items()} | (extra or {})),
        "hyper_parameters": {
            "optimizer": functools.partial(torch.optim.AdamW, lr=2e-6, weight_decay=0.01),
            "scheduler": functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=345000),
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-6, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 2}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_score": torch.tensor(0.25)}},
    }


def _as_loaded(**options) -> LoadOptions:
    """Options for the faithful path, which keeps the model as loaded (the fast path, the default,
    folds BatchNorm into the convs), so its weights can be compared with the file's."""
    return LoadOptions(path="faithful", **options)


def _assert_weights(model: torch.nn.Module, expected: dict, prefix: str = "") -> None:
    own = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[prefix + key], value), key


# --------------------------------------------------------------------------- full models
def test_plain_state_dict(l0_file, l0_state):
    segmenter = load_medficientsam("l0", _as_loaded(weights=l0_file))
    _assert_weights(segmenter.model, l0_state)
    info = segmenter.describe()
    assert info["checkpoint_format"] == "state_dict" and info["pipeline"] == "medficientsam_docker"
    assert info["params"] == 34_792_784


def test_lightning_finetuned(tmp_path, l0_state):
    path = tmp_path / "best.ckpt"
    torch.save(_lightning(l0_state, "model."), path)
    with pytest.raises(Exception):  # what plain weights-only loading makes of it
        torch.load(path, weights_only=True)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "lightning-finetuned" and checkpoint.meta == {"epoch": 2, "global_step": 345}
    segmenter = load_medficientsam("l0", _as_loaded(weights=path))
    _assert_weights(segmenter.model, l0_state)


def test_harness_full_checkpoint(tmp_path, l0_state):
    path = save_harness_checkpoint(tmp_path / "model.pt", "l0", l0_state, step=10)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "harness" and checkpoint.meta["step"] == 10 and not checkpoint.encoder_only
    _assert_weights(load_medficientsam("l0", _as_loaded(weights=path)).model, l0_state)


def test_pickled_module_refused_unless_allowed(tmp_path, l0_state):
    model = build_model("l0")
    model.load_state_dict(l0_state)
    path = tmp_path / "model.pth"
    torch.save(model, path)  # what medficientsam's export_torch.py writes (with its own classes)
    with pytest.raises(CheckpointError) as info:
        load_medficientsam("l0", _as_loaded(weights=path))
    message = str(info.value)
    assert str(path) in message and "pickled whole model" in message
    # it names the classes outside torch it would run, and suggests nothing that would run them
    assert "models.nets.efficientvit" in message and "run their code" in message and "state_dict" in message
    assert "--allow-pickle" not in message and "weights_only=False" not in message
    segmenter = load_medficientsam("l0", _as_loaded(weights=path, allow_pickle=True))
    assert read_checkpoint(path, allow_pickle=True).format == "pickled-module"
    _assert_weights(segmenter.model, l0_state)


class _Payload:
    """What a malicious 'checkpoint' holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_even_with_allow_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pth"
    torch.save({"model": _Payload(marker), "layer.weight": torch.zeros(2)}, path)
    for allow in (False, True):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path, allow_pickle=allow)
        message = str(info.value)
        assert str(path) in message and "is not a weights file" in message and "posix.system" in message
        assert "would run code" in message and "never loads it" in message
        assert "weights_only=False" not in message and "pass --allow-pickle" not in message
    assert not marker.exists(), "the payload ran"


def test_pickled_module_whose_code_is_missing(tmp_path):
    path = tmp_path / "model.pth"
    script = (
        "import sys, types, torch\n"
        "mod = types.ModuleType('src_models_gone'); sys.modules['src_models_gone'] = mod\n"
        "class BaseSAM(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.image_encoder = torch.nn.Linear(2, 2)\n"
        "BaseSAM.__module__ = 'src_models_gone'; mod.BaseSAM = BaseSAM\n"
        f"torch.save(BaseSAM(), {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(CheckpointError, match="needs the code that saved it"):
        read_checkpoint(path, allow_pickle=True)


# --------------------------------------------------------------------------- distilled students
def test_lightning_distilled_completed_with_medsam(tmp_path, l0_state, medsam_file):
    student = {k[len("image_encoder."):]: v for k, v in l0_state.items() if k.startswith("image_encoder.")}
    teacher = {"teacher_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    path = tmp_path / "step_400000.ckpt"
    torch.save(_lightning(student, "student_encoder.", teacher), path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "lightning-distilled" and checkpoint.encoder_only
    assert checkpoint.meta["teacher_keys"] == 1

    with pytest.raises(MissingWeightsError, match="--weights medsam=PATH"):
        load_medficientsam("l0", _as_loaded(weights=path), distilled_only=True)

    options = _as_loaded(weights=path, all_weights={"l0-distilled": path, "medsam": medsam_file})
    segmenter = load_medficientsam("l0", options, distilled_only=True)
    model = segmenter.model
    assert model.info.prompt_size == 1024 and segmenter.config.prompt_size == 1024
    assert segmenter.config.input_size == 512 and segmenter.config.batch_boxes_2d
    assert model.prompt_encoder.input_image_size == (1024, 1024)
    _assert_weights(model.image_encoder, student)
    medsam = torch.load(medsam_file, weights_only=True)
    for key in ("mask_decoder.iou_token.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        assert torch.equal(model.state_dict()[key], medsam[key])
    # MedSAM's decoder keeps LayerNorm eps 1e-5 (the fine-tuned l0-l2 decoders use 1e-6)
    assert model.mask_decoder.transformer.norm_final_attn.eps == 1e-5
    assert "medsam" in segmenter.describe()["completed_with"]


def test_harness_distilled_from_litemedsam(tmp_path, l0_state):
    encoder = {k: v for k, v in l0_state.items() if k.startswith("image_encoder.")}
    path = save_harness_checkpoint(tmp_path / "model.pt", "l0", encoder, component="image_encoder",
                                   decoder_from="litemedsam")
    # `l0` accepts a distilled student too (what `harness train distill` hands over)
    segmenter = load_medficientsam("l0", _as_loaded(weights=path))
    assert segmenter.model.info.prompt_size == 256 and segmenter.config.prompt_size == 256
    _assert_weights(segmenter.model, encoder)
    assert "litemedsam" in segmenter.describe()["completed_with"]


def test_distilled_segmenter_refuses_full_model(l0_file):
    with pytest.raises(CheckpointError, match=r"holds a full model.*run it as l0"):
        load_medficientsam("l0", _as_loaded(weights=l0_file), distilled_only=True)


# --------------------------------------------------------------------------- mismatches and lookup
def test_wrong_variant_is_named(tmp_path):
    path = tmp_path / "which.pth"
    torch.save(make_state_dict("medficientsam_l1", 0), path)
    with pytest.raises(CheckpointError) as info:
        load_medficientsam("l0", _as_loaded(weights=path))
    message = str(info.value)
    assert "does not match l0" in message and "It looks like a l1 checkpoint" in message
    assert "unexpected keys" in message and "a plain state_dict" in message


def test_identify_every_registered_model():
    for name in ("l0", "l1", "l2", "litemedsam", "medsam"):
        with torch.device("meta"):
            state = build_model(name).state_dict()
        assert identify(state) == [name]
        encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
        assert identify(encoder) == [name]


def test_medsam_loads_plain_state_dict(medsam_file):
    segmenter = load_medsam(_as_loaded(weights=medsam_file))
    assert segmenter.config.name == "medsam_mfs" and segmenter.model.info.input_size == 1024
    assert count_parameters(segmenter.model) == 93_735_472


@pytest.mark.parametrize("name", ["medsam", "l0", "l2-distilled"])
def test_missing_weights_says_how_to_pass_them(name, monkeypatch):
    monkeypatch.delenv("HARNESS_WEIGHTS_DIR", raising=False)
    loader = load_medsam if name == "medsam" else functools.partial(
        load_medficientsam, name[:2], distilled_only=name.endswith("distilled"))
    with pytest.raises(MissingWeightsError) as info:
        loader(LoadOptions())
    message = str(info.value)
    assert f"--weights {name}=PATH" in message and "--weights-dir" in message
    if name != "medsam":
        assert "medficientsam README" in message  # where the released weights are


def test_weights_folder_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_WEIGHTS_DIR", raising=False)
    assert find_weights("l0", LoadOptions(weights_dir=tmp_path)) is None
    upstream = tmp_path / "finetuned-l1-augmented" / "best.ckpt"
    upstream.parent.mkdir()
    upstream.touch()
    assert find_weights("l1", LoadOptions(weights_dir=tmp_path)) == upstream
    trained = tmp_path / "l1" / "model.pt"
    trained.parent.mkdir()
    trained.touch()
    assert find_weights("l1", LoadOptions(weights_dir=tmp_path)) == trained  # our own names first
    for step in (40000, 400000, 120000):
        (tmp_path / "distilled-l2").mkdir(exist_ok=True)
        (tmp_path / "distilled-l2" / f"step_{step:06d}.ckpt").touch()
    assert find_weights("l2-distilled", LoadOptions(weights_dir=tmp_path)).name == "step_400000.ckpt"
    monkeypatch.setenv("HARNESS_WEIGHTS_DIR", str(tmp_path))
    assert find_weights("l1", LoadOptions()) == trained
    explicit = tmp_path / "mine.pth"
    assert find_weights("l1", LoadOptions(weights=explicit, weights_dir=tmp_path)) == explicit


def test_cli_without_weights_fails_only_that_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_WEIGHTS_DIR"}
    result = harness_cli(["run", "--models", "boxfill,l0", "--data", str(DEMO), "--limit", "1",
                          "--out", str(tmp_path / "out"), "--no-progress"], env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "l0: not run:" in result.stderr and "no weights for l0: pass --weights l0=PATH" in result.stderr
    assert "| Box fill" in result.stdout  # the other model ran and its row is there
