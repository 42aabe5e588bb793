"""Distillation and fine-tuning of MedficientSAM-L0/L1/L2 (the training milestone).

Empty for now: this package is reserved in the layout so that the training issue lands its data
pipeline, losses, loop and CLI (`harness train distill|finetune`) here.
"""
