"""Built-in segmenter plugins. Each registers through the ``harness`` entry-point group, as a third
party's would (see ``[project.entry-points.harness]`` in pyproject.toml)."""
