"""The interactive protocol end to end on two real 3D validation cases with the numpy baseline (issue 18)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.interactive.baseline import baseline_step, box_click_fill
from harness.interactive.clicks import simulate_clicks
from harness.interactive.protocol import InteractiveStepError, run_interactive_case
from harness.interactive.safe_npz import read_interactive_input, write_interactive_input
from harness.interactive.scores import auc, step_scores

from helpers import INTERACTIVE_CASES as CASES


class Recorder:
    """The baseline, keeping a copy of every input it was given (what the segmenter saw)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, input_path, outputs_dir):
        case = read_interactive_input(input_path)
        with np.load(input_path, allow_pickle=True) as npz:
            self.inputs.append((sorted(npz.files), case))
        return box_click_fill(case)


@pytest.mark.parametrize("name", CASES)
def test_six_steps_with_accumulated_clicks(converted, tmp_path, name):
    step = Recorder()
    saved = tmp_path / "segs.npz"
    result = run_interactive_case(converted / "imgs" / name, converted / "gts" / name, step, tmp_path / "work",
                                  save_segs=saved)
    gts = np.load(converted / "gts" / name)["gts"]
    assert [s.step for s in result.steps] == [1, 2, 3, 4, 5, 6] and len(step.inputs) == 6
    keys, first = step.inputs[0]
    assert keys == ["boxes", "imgs", "spacing"] and first.clicks is None  # step 1: the box only, never gts
    with np.load(saved) as npz:
        all_segs = npz["all_segs"]
        assert all_segs.shape == (6,) + gts.shape and np.array_equal(npz["segs"], all_segs[-1])
    for k in range(1, 6):  # the input of step k + 1
        keys, case = step.inputs[k]
        assert keys == ["boxes", "clicks", "clicks_order", "imgs", "prev_pred", "spacing"]
        assert np.array_equal(case.prev_pred, all_segs[k - 1])
        assert len(case.clicks_order[0]) == k
        expected = simulate_clicks(all_segs[k - 1], gts)[0]
        record = result.steps[k].clicks[0]
        if expected is None:
            assert record is None and case.clicks_order[0][-1] is None
        else:
            assert record == expected.to_dict() and case.clicks_order[0][-1] == expected.kind
            assert case.clicks[0][expected.kind][-1] == expected.zyx  # (z, y, x) order
        n_given = sum(1 for kind in case.clicks_order[0] if kind is not None)
        assert len(case.clicks[0]["fg"]) + len(case.clicks[0]["bg"]) == n_given
    spacing = first.spacing
    for record, segs in zip(result.steps, all_segs):
        scores = step_scores(gts, segs, spacing)
        assert record.dsc == pytest.approx(scores.dsc) and record.nsd == pytest.approx(scores.nsd)
        assert record.seconds > 0 and not record.missing_output
    assert result.dsc_auc == pytest.approx(auc(result.dsc_per_step)) and 0 <= result.dsc_auc <= 4
    assert result.nsd_auc == pytest.approx(auc(result.nsd_per_step))
    assert result.dsc_final == result.steps[-1].dsc and result.total_seconds == pytest.approx(sum(result.seconds_per_step))
    assert result.time_cap_seconds == 90.0 and not result.cap_exceeded
    # the clicks help this baseline: the last step is at least as good as the box
    assert result.dsc_final >= result.steps[0].dsc
    assert sorted((tmp_path / "work").iterdir()) == [tmp_path / "work" / "inputs", tmp_path / "work" / "outputs"]


def test_container_style_step_gives_the_same_record(converted, tmp_path):
    name = CASES[0]

    def writes_its_output(input_path, outputs_dir):  # like predict.sh in a container: writes outputs/<name>
        np.savez_compressed(outputs_dir / input_path.name, segs=baseline_step(input_path, outputs_dir).astype(np.uint16))

    a = run_interactive_case(converted / "imgs" / name, converted / "gts" / name, baseline_step, tmp_path / "a")
    b = run_interactive_case(converted / "imgs" / name, converted / "gts" / name, writes_its_output, tmp_path / "b")
    assert [s.clicks for s in a.steps] == [s.clicks for s in b.steps]
    assert a.dsc_per_step == b.dsc_per_step and a.nsd_per_step == b.nsd_per_step


def test_case_without_boxes_skips_step_one_and_missing_outputs_are_zeros(converted, tmp_path):
    name = CASES[1]
    case = read_interactive_input(converted / "imgs" / name)
    nobox = tmp_path / name
    write_interactive_input(nobox, case.imgs, case.spacing)
    calls = []

    def writes_nothing(input_path, outputs_dir):
        calls.append(input_path)

    result = run_interactive_case(nobox, converted / "gts" / name, writes_nothing, tmp_path / "work")
    first = result.steps[0]
    assert first.skipped and (first.dsc, first.nsd, first.seconds) == (0.0, 0.0, 0.0)
    assert len(calls) == 5 and all(s.missing_output and s.dsc == 0.0 for s in result.steps[1:])
    # on empty predictions every click is a foreground click, and the same one each time
    clicks = [s.clicks[0] for s in result.steps[1:]]
    assert all(c["kind"] == "fg" for c in clicks) and all(c == clicks[0] for c in clicks)
    assert result.dsc_auc == 0.0 and not math.isnan(result.nsd_auc)


def test_stale_output_is_not_a_previous_step_and_errors_name_the_step(converted, tmp_path):
    name = CASES[0]
    work = tmp_path / "work"
    (work / "outputs").mkdir(parents=True)
    gts = np.load(converted / "gts" / name)["gts"]
    np.savez(work / "outputs" / name, segs=gts)  # a perfect stale output from an interrupted attempt
    seen = []

    def first_step_only(input_path, outputs_dir):
        seen.append(read_interactive_input(input_path).prev_pred)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return box_click_fill(read_interactive_input(input_path))

    with pytest.raises(InteractiveStepError, match=rf"{name}: step 2: the step function failed: RuntimeError: boom"):
        run_interactive_case(converted / "imgs" / name, converted / "gts" / name, first_step_only, work)
    assert seen[0] is None and not np.array_equal(seen[1], gts)

    def wrong_shape(input_path, outputs_dir):
        return np.zeros((2, 2, 2), np.uint8)

    with pytest.raises(InteractiveStepError, match="step 1: segs has shape"):
        run_interactive_case(converted / "imgs" / name, converted / "gts" / name, wrong_shape, tmp_path / "w2")


def test_a_step_that_writes_nothing_rescored_the_previous_output(converted, tmp_path):
    name = CASES[0]
    calls = []

    def only_first_step(input_path, outputs_dir):
        calls.append(1)
        if len(calls) == 1:
            return box_click_fill(read_interactive_input(input_path))
        return None  # later steps write nothing: the step-1 file stays in outputs/

    result = run_interactive_case(converted / "imgs" / name, converted / "gts" / name, only_first_step,
                                  tmp_path / "work")
    assert not result.steps[0].stale_output and all(s.stale_output for s in result.steps[1:])
    assert not any(s.missing_output for s in result.steps)
    assert len(set(result.dsc_per_step)) == 1  # the evaluator scores the stale file again, and so does this


def test_ground_truth_in_the_case_file_never_reaches_the_segmenter(converted, tmp_path):
    name = CASES[0]
    case = read_interactive_input(converted / "imgs" / name)
    gts = np.load(converted / "gts" / name)["gts"]
    leaky = tmp_path / name
    np.savez_compressed(leaky, imgs=case.imgs, spacing=np.asarray(case.spacing), gts=gts,
                        boxes=np.array(case.boxes, dtype=object))
    step = Recorder()
    result = run_interactive_case(leaky, converted / "gts" / name, step, tmp_path / "work", n_clicks=1)
    assert [keys for keys, _ in step.inputs] == [["boxes", "imgs", "spacing"],
                                                 ["boxes", "clicks", "clicks_order", "imgs", "prev_pred", "spacing"]]
    assert step.inputs[0][1].boxes == case.boxes
    assert len(result.steps) == 2 and math.isnan(result.dsc_auc)  # one click step: no area
