"""bench/bench_click_rules.py, the comparison of the 3D click rules behind docs/interactive.md: its counts, and
a run on one converted case whose ``resume`` rule gives, step by step, the DSCs of the harness's own
interactive path (the segmenter's ``segment``, no shared embeddings), and whose ``slice`` rule shares the
box step and decodes only the clicked slice again."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helpers import load_bench


def _bench():
    return load_bench("bench_click_rules")


def test_click_effects_count_steps_and_cases():
    results = [("CT", SimpleNamespace(dsc_per_step=[0.5, 0.6, 0.6005, 0.4])),  # up, flat, down; ended lower
               ("MR", SimpleNamespace(dsc_per_step=[0.7, 0.7, 0.71, 0.7051]))]  # flat, up, down; ended higher
    assert _bench()._click_effects(results) == (2, 2, 2, 1, 1, 0)


@pytest.mark.slow  # LiteMedSAM over one 3D PET case, 1 click, three times: about 30-60 s on 2 cores
def test_resume_rule_is_the_harness_path_and_slice_rule_shares_the_box_step(converted, tmp_path):
    from harness.interactive.protocol import run_interactive_case
    from harness.interactive.run import case_from_input
    from harness.interactive.safe_npz import read_interactive_input
    from harness.pluginmanager import HarnessPlugins
    from harness.plugin_api import LoadOptions

    bench = _bench()
    case = sorted((converted / "imgs").glob("*.npz"))[1]  # PET sts024: its first click changes the masks
    options = LoadOptions(threads=2, path="fast", backend="torch")
    try:
        segmenter = HarnessPlugins().get("litemedsam").load(options)
    except FileNotFoundError as error:  # LiteMedSAM's released weights are not installed
        pytest.skip(str(error))
    results = bench.compare_rules(segmenter, [case], converted / "gts", clicks=1)
    resume, alone = results["resume"][0][1], results["slice"][0][1]
    assert results["resume"][0][0] == "PET"
    assert alone.dsc_per_step[0] == resume.dsc_per_step[0]  # the same box step
    assert not hasattr(segmenter.engine, "encode_slice") or "encode_slice" not in vars(segmenter.engine)

    plain = HarnessPlugins().get("litemedsam").load(options)

    def step(input_path, outputs_dir):
        return plain.segment(case_from_input(read_interactive_input(input_path), plain.prompts))

    direct = run_interactive_case(case, converted / "gts" / case.name, step, tmp_path / "direct", n_clicks=1)
    np.testing.assert_allclose(resume.dsc_per_step, direct.dsc_per_step, rtol=0, atol=1e-12)
    assert resume.steps[1].clicks == direct.steps[1].clicks
    assert alone.steps[1].clicks == resume.steps[1].clicks  # the same first click (same box step)
