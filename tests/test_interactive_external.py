"""The 2025 interactive protocol through the end-to-end runners (issue 18, item 3): `harness predict` on
2025-format inputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness import hookimpl
from harness.interactive.safe_npz import is_interactive_input, write_interactive_input
from harness.pluginmanager import HarnessPlugins
from harness.predict import predict
from harness.specs import SegmenterSpec


def plugins_with(name: str, segment, prompts=frozenset({"box"})) -> HarnessPlugins:
    class Segmenter:
        def segment(self, case):
            return segment(case)

        def describe(self):
            return {}

    class Plugin:
        @hookimpl
        def harness_segmenters(self):
            return [SegmenterSpec(name=name, title=name, family="test", load=lambda options: Segmenter(),
                                  prompts=prompts)]

    plugins = HarnessPlugins(load_entry_points=False)
    plugins.register(Plugin(), "interactive-external-test-plugin")
    return plugins


# ------------------------------------------------------------------------------------- harness predict

BOX_A = {"z_min": 1, "z_max": 3, "z_mid": 2, "z_mid_x_min": 2, "z_mid_y_min": 3, "z_mid_x_max": 9, "z_mid_y_max": 10}
BOX_B = {"z_min": 0, "z_max": 4, "z_mid": 2, "z_mid_x_min": 11, "z_mid_y_min": 1, "z_mid_x_max": 14, "z_mid_y_max": 6}


def _step_input(path: Path) -> np.ndarray:
    """A 2025 step input with two classes, three click steps: class 1 fg, bg, fg; class 2 none, fg, none."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (5, 16, 16), dtype=np.uint8)
    prev = np.zeros(imgs.shape, np.uint8)
    prev[1:4, 3:11, 2:10] = 1
    clicks = [{"fg": [[2, 5, 5], [3, 8, 8]], "bg": [[1, 4, 9]]}, {"fg": [[2, 3, 12]], "bg": []}]
    order = [["fg", "bg", "fg"], [None, "fg", None]]
    write_interactive_input(path, imgs, (2.0, 1.0, 1.0), boxes=[BOX_A, BOX_B], clicks=clicks, clicks_order=order,
                            prev_pred=prev)
    return prev


def test_predict_takes_a_2025_input_with_clicks_for_a_point_segmenter(tmp_path):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    prev = _step_input(inputs / "3DBox_CT_step.npz")
    # a 2024-format case in the same folder is read as before
    np.savez_compressed(inputs / "3DBox_CT_old.npz", imgs=np.zeros((3, 8, 8), np.uint8),
                        boxes=np.array([[1, 1, 0, 5, 5, 2]]), spacing=np.array([1.0, 1.0, 1.0]))
    assert is_interactive_input(inputs / "3DBox_CT_step.npz") and not is_interactive_input(inputs / "3DBox_CT_old.npz")
    seen = {}

    def segment(case):
        seen[case.name] = case
        segs = np.zeros(case.spatial_shape, np.uint8)
        for label, clicks in (case.clicks or {}).items():
            for z, y, x, fg in clicks:
                if fg:
                    segs[z, y, x] = label
        return segs

    plugins = plugins_with("clicky", segment, prompts=frozenset({"box", "points", "mask"}))
    report = predict("clicky", inputs, outputs, plugins=plugins, log=lambda _: None)
    assert report.ok and sorted(report.written) == ["3DBox_CT_old.npz", "3DBox_CT_step.npz"]
    case = seen["3DBox_CT_step.npz"]
    # the clicks in the order the simulated user gave them (clicks_order), fg True / bg False
    assert case.clicks == {1: [(2, 5, 5, True), (1, 4, 9, False), (3, 8, 8, True)], 2: [(2, 3, 12, True)]}
    assert np.array_equal(case.prev_segs, prev)
    assert case.boxes.tolist() == [[2, 3, 1, 9, 10, 3], [11, 1, 0, 14, 6, 4]] and case.spacing == (2.0, 1.0, 1.0)
    with np.load(outputs / "3DBox_CT_step.npz") as npz:  # the same name, key segs, as the evaluator reads it
        segs = npz["segs"]
    assert segs.shape == (5, 16, 16) and segs[2, 5, 5] == 1 and segs[3, 8, 8] == 1 and segs[2, 3, 12] == 2
    assert segs[1, 4, 9] == 0
    old = seen["3DBox_CT_old.npz"]
    assert old.clicks is None and old.prev_segs is None and old.boxes.tolist() == [[1, 1, 0, 5, 5, 2]]


def test_predict_gives_a_box_only_segmenter_neither_clicks_nor_the_previous_mask(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _step_input(inputs / "3DBox_CT_step.npz")
    seen = []
    plugins = plugins_with("boxy", lambda case: seen.append(case) or np.zeros(case.spatial_shape, np.uint8))
    assert predict("boxy", inputs, tmp_path / "out", plugins=plugins, log=lambda _: None).ok
    assert len(seen) == 1 and seen[0].clicks is None and seen[0].prev_segs is None and seen[0].n_boxes == 2


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_predict_refuses_a_malicious_pickle_in_a_2025_input_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    boxes = np.empty(1, dtype=object)
    boxes[0] = {"z_min": _Payload()}
    np.savez(inputs / "3DBox_CT_evil.npz", imgs=np.zeros((3, 8, 8), np.uint8), spacing=np.ones(3), boxes=boxes)
    seen = []
    plugins = plugins_with("boxy", lambda case: seen.append(case) or np.zeros(case.spatial_shape, np.uint8))
    report = predict("boxy", inputs, tmp_path / "out", plugins=plugins, log=lambda _: None)
    message = report.failed["3DBox_CT_evil.npz"]
    assert "refused global" in message and "system" in message and "3DBox_CT_evil.npz" in message
    assert not seen and not (tmp_path / "PWNED").exists() and not (tmp_path / "out" / "3DBox_CT_evil.npz").exists()
