"""Inference: pipeline presets (:mod:`.pipelines`), preprocessing (:mod:`.preprocess`), the box-prompt
engine (:mod:`.engine`) with its slice cache (:mod:`.slice_cache`), and the segmenter that wraps a
loaded model for the harness (:mod:`.segmenters`)."""
