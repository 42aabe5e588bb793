"""Weights: checkpoint formats (:mod:`.checkpoints`) and the lookup that loads each built-in model from
the weights files users hold (:mod:`.zoo`)."""
