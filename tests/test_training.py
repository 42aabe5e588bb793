"""The training package end to end, small and on CPU: distillation lowers the embedding MSE,
fine-tuning lowers its loss, a resumed run equals an uninterrupted one, two torchrun processes
(gloo) stay in step, and the weights it writes run in ``harness run``.

Runs use the bundled demo cases (real images, expert masks), batch 1-2, fp32 and no loader
workers so that they are deterministic; each step costs about 2-4 s on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.plugin_api import LoadOptions
from helpers import DEMO, PROJECT, harness_cli
from training.config import PRESETS, TrainConfig
from training.run import train

SMALL = dict(batch_size=1, num_workers=0, precision="fp32", log_every=1, ckpt_every=1000, lr=1e-3,
             schedule="constant", limit_items=None)


def _distill_cfg(**changes) -> TrainConfig:
    return PRESETS["distill_l0"].override(**{**SMALL, **changes})


def _log(out: Path) -> list[dict]:
    with (out / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def one_case(module_tmp) -> Path:
    """A data folder with one 2D demo case, so every step sees the same image (a learning signal
    that a few steps can show)."""
    root = module_tmp / "one_case"
    root.mkdir()
    for sub in ("imgs", "gts"):
        (root / sub).mkdir()
        name = "2DBox_Endoscopy_kvasir-cju0rx1ida.npz"
        (root / sub / name).write_bytes((DEMO / sub / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def distilled(one_case, module_tmp) -> Path:
    out = module_tmp / "distill"
    train(_distill_cfg(steps=6, augment="none"), [one_case], out, progress=False, log=lambda _m: None)
    return out


@pytest.mark.slow  # the `distilled` fixture trains L0 against LiteMedSAM for 6 steps
def test_distillation_lowers_embedding_mse(distilled):
    losses = [float(r["loss"]) for r in _log(distilled)]
    assert len(losses) == 6
    assert losses[-1] < 0.9 * losses[0], losses
    config = json.loads((distilled / "config.json").read_text())
    assert config["teacher"] == "litemedsam" and config["bf16"] is False


@pytest.mark.slow  # needs the `distilled` training run
def test_distilled_weights_complete_with_the_teacher(distilled):
    from models.weights.checkpoints import read_checkpoint
    from models.weights.zoo import load_medficientsam

    ckpt = read_checkpoint(distilled / "model.pt")
    assert ckpt.format == "harness" and ckpt.encoder_only and ckpt.meta["decoder_from"] == "litemedsam"
    segmenter = load_medficientsam("l0", LoadOptions(weights=distilled / "model.pt", backend="torch"))
    assert segmenter.model.info.prompt_size == 256  # LiteMedSAM's prompt encoder and decoder


@pytest.mark.slow  # a distillation, a fine-tuning and a `harness run`
def test_finetuning_lowers_loss_and_runs_in_harness(distilled, one_case, tmp_path):
    out = tmp_path / "finetune"
    cfg = PRESETS["finetune_l0"].override(**{**SMALL, "lr": 1e-4, "steps": 4, "mask_num": 2, "augment": "none",
                                             "init": str(distilled / "model.pt")})
    weights = train(cfg, [one_case], out, progress=False, log=lambda _m: None)
    rows = _log(out)
    assert {"dice", "focal", "iou"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]), [r["loss"] for r in rows]
    # on torch: a fresh weights file would cost an OpenVINO export here (tests/test_zoo_e2e.py holds
    # OpenVINO's L0 masks to the upstream references)
    result = harness_cli(["run", "--models", "l0", "--weights", f"l0={weights}", "--data", str(one_case),
                          "--out", str(tmp_path / "eval"), "--no-progress", "--threads", "2", "--backend", "torch"],
                         timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "eval" / "results.jsonl").read_text().splitlines()[0])
    assert record["status"] == "ok" and 0.0 <= record["dsc"] <= 1.0
    models = json.loads((tmp_path / "eval" / "models.json").read_text())
    (entry,) = models  # l0, or l0[torch] where openvino is the default backend
    assert models[entry]["checkpoint_format"] == "harness" and models[entry]["pipeline"] == "medficientsam_docker"


@pytest.mark.slow  # three L0 distillation runs on the demo set
def test_resume_equals_uninterrupted(tmp_path):
    """4 steps straight == 2 steps, stop, --resume, 2 more (same weights within 1e-6)."""
    cfg = _distill_cfg(steps=4, batch_size=1, augment="flips")
    data = [DEMO]
    straight = tmp_path / "straight"
    train(cfg, data, straight, progress=False, log=lambda _m: None)
    halves = tmp_path / "halves"
    train(cfg.override(steps=2), data, halves, progress=False, log=lambda _m: None)
    train(cfg, data, halves, resume=True, progress=False, log=lambda _m: None)
    a = torch.load(straight / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(halves / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= 1e-6, worst
    assert [r["loss"] for r in _log(straight)] == [r["loss"] for r in _log(halves)]


@pytest.mark.slow  # two torchrun processes, each importing torch and building L0
def test_torchrun_two_processes_agree(one_case, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.cli", "distill", "--student", "l0", "--data", str(DEMO), "--out", str(out),
           "--steps", "2", "--batch-size", "1", "--lr", "1e-3", "--precision", "fp32", "--no-progress",
           "--set", "num_workers=0", "--set", "log_every=1", "--set", "limit_items=None"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 ranks hold identical weights after step 2" in result.stdout + result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert (out / "model.pt").is_file() and len(_log(out)) == 2


def test_cli_presets_and_overrides(tmp_path):
    result = harness_cli(["train", "finetune", "--model", "l1", "--init", "x.pt", "--data", str(DEMO), "--out",
                          str(tmp_path), "--no-augment", "--set", "grad_accum=4", "--print-config"])
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert (cfg["model"], cfg["augment"], cfg["grad_accum"], cfg["lr"], cfg["t_max"]) == ("l1", "flips", 4, 2e-6,
                                                                                          345000)
    bad = harness_cli(["train", "distill", "--data", str(DEMO), "--out", str(tmp_path), "--set", "lr_max=1",
                       "--print-config"])
    assert bad.returncode == 2 and "--set expects KEY=VALUE" in bad.stderr and "lr_max" in bad.stderr
    upstream = PRESETS["distill_l2"]
    assert (upstream.lr, upstream.weight_decay, upstream.batch_size, upstream.steps, upstream.gamma,
            upstream.limit_items, upstream.augment) == (0.075, 5e-4, 8, 400_000, 0.5, 400_000, "flips")


def test_exclude_keeps_evaluation_cases_out(tmp_path):
    from training.data import build_index
    from training.run import exclude_cases

    items = build_index([DEMO], cache_dir=tmp_path, log=lambda _m: None)
    held_out = tmp_path / "held_out" / "imgs"
    held_out.mkdir(parents=True)
    (held_out / "3DBox_CT_sts025.npz").touch()
    kept = exclude_cases(items, [held_out.parent])
    assert kept and all("3DBox_CT_sts025" not in item.path for item in kept)
    assert len(kept) < len(items) and any("3DBox_CT_sts025" in item.path for item in items)
