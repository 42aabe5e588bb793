"""bench/bench_startup.py, the start-up benchmark behind the README's submission figures: its in-process and
fresh-process rows on one real case, the columns it parses out of the children's logs, and its medians.

Only what the script computes is checked (rows present, none failed, start-up = end to end minus the case's
own seconds, the model load read from ``runtime.predict``'s log); its speed figures are not asserted.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("bench_startup")


def test_medians_per_case_and_the_first_failure():
    rows = [dict(kind="k", case="a", own=1.0, e2e=3.0, peak=100.0),
            dict(kind="k", case="a", own=2.0, e2e=3.5, peak=300.0, failed="exit 1"),
            dict(kind="k", case="a", own=3.0, e2e=7.0, peak=200.0),
            dict(kind="k", case="b", own=1.0, e2e=None)]
    merged = _bench()._medians(rows)
    assert [(r["kind"], r["case"]) for r in merged] == [("k", "a"), ("k", "b")]
    a, b = merged
    assert (a["own"], a["e2e"], a["peak"], a["failed"]) == (2.0, 3.5, 200.0, "exit 1")
    assert a["startup"] == 2.0  # median of the repetitions' own differences (2.0, 1.5, 4.0), not 3.5 - 2.0
    assert b["startup"] is None and b["e2e"] is None and b["failed"] is None


@pytest.mark.slow  # loads LiteMedSAM three times and starts six interpreters: about 30-60 s on 2 cores
def test_in_process_and_fresh_process_rows_on_one_case(tmp_path, export_cache_dir, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(export_cache_dir))
    bench = _bench()
    out = tmp_path / "startup.md"
    cases = tmp_path / "imgs"
    cases.mkdir()
    case = "2DBox_Endoscopy_kvasir-cju0rx1ida.npz"
    (cases / case).write_bytes((ROOT / "harness" / "demo" / "imgs" / case).read_bytes())
    try:
        code = bench.main(["--model", "litemedsam", "--cases", str(cases), "--rows", "in-process,subprocess",
                           "--threads", "2", "--out", str(out)])
    except FileNotFoundError as error:  # LiteMedSAM's released weights are not installed
        pytest.skip(str(error))
    assert code == 0
    text = out.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1] == case:
            rows[cells[0]] = cells
    assert sorted(rows) == ["in-process harness", "in-process runtime", "subprocess harness", "subprocess runtime"], text
    number = re.compile(r"^\d+\.\d\d$")
    for kind in ("subprocess harness", "subprocess runtime"):
        _, _, own, e2e, startup, load, peak, _ = rows[kind]
        assert number.match(own) and number.match(e2e) and number.match(startup), rows[kind]
        assert abs(float(e2e) - float(own) - float(startup)) <= 0.011 and float(startup) > 0
        assert peak.isdigit() or peak == ""  # GNU time's peak where /usr/bin/time exists
    assert number.match(rows["subprocess runtime"][5]), "the model load was not read from runtime.predict's log"
    assert number.match(rows["in-process harness"][2]) and rows["in-process harness"][3] == ""
    summary = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
               if line.startswith("| subprocess runtime |")]
    summary = [cells for cells in summary if len(cells) == 4]
    assert len(summary) == 1 and all(number.match(c) for c in summary[0][1:]), summary
    # end to end minus the harness's own in-process seconds for the same case (one case: no mean to take)
    beyond = float(rows["subprocess runtime"][3]) - float(rows["in-process harness"][2])
    assert abs(float(summary[0][3]) - beyond) <= 0.011, (summary, beyond)
