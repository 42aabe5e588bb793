"""``harness export`` and the challenge's reading of the team from the archive's file name."""
from __future__ import annotations

from helpers import harness_cli


def test_export_refuses_a_team_that_differs_from_the_file_name(tmp_path):
    """The organisers' script reads the team from the file name (before the first '.'): ``-o team.tar.gz
    --team teamx`` would export and then fail every case there (``Unable to find image 'team:latest'``)."""
    out = tmp_path / "team.tar.gz"
    done = harness_cli(["export", "--model", "boxfill", "-o", str(out), "--team", "teamx"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--team 'teamx' differs" in done.stderr and "'team.tar.gz'" in done.stderr and "teamx.tar.gz" in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
