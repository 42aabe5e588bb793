"""The networks: pure ``nn.Module`` s with the key layouts of the released checkpoints (no weights, no
pre- or post-processing). Assembled into whole models by :mod:`models.builders`."""
