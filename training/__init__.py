"""Distillation and fine-tuning of MedficientSAM-L0/L1/L2 (the recipes of hieplpvip/medficientsam, ``configs/experiment/``).

``harness train distill | finetune`` (:mod:`training.cli`) builds a :class:`training.config.TrainConfig`
from an upstream preset, indexes the data (:mod:`training.data`), sets up the task
(:mod:`training.tasks`: distillation MSE or the SAM fine-tuning loss of :mod:`training.losses`) and
runs the resumable, torchrun-ready loop of :mod:`training.loop`. The result, ``OUT/model.pt``, is a
weights file ``harness run`` loads directly.
"""
