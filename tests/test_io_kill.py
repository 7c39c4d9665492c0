"""A re-save killed (SIGKILL), interrupted (SIGINT), failing (I/O error) or out of space at chosen
file operations: save_directory holds exactly the old or exactly the new checkpoint, and the next
save finishes the job and leaves nothing behind. One harness process (tests/kill_harness.py)
forks a child per case; its results are checked here, case by case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("kill_harness.py")
# the harness forks, and its "exchange" mode is renameat2: Linux (the CI) only
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork and renameat2: Linux only")
MODES = ("exchange", "into-mount", "into-no-exchange")
KINDS = ("sigkill", "sigint", "error", "enospc")


@pytest.fixture(scope="module")
def kill_cases(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("kills")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(HARNESS), str(work), str(work / "result.json")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if os.environ.get("FASTSAVE_KILL_REPORT"):
        Path(os.environ["FASTSAVE_KILL_REPORT"]).write_text((work / "result.json").read_text())
    return json.loads((work / "result.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_the_directory_holds_the_old_or_the_new_checkpoint(kill_cases, mode, kind):
    cases = [c for c in kill_cases["cases"] if c["mode"] == mode and c["kind"] == kind]
    # every planned fault point ran, and the plan hits both the writing and the switch
    assert [c["at"] for c in cases] == kill_cases["planned"][mode][kind]
    assert {c["phase"] for c in cases} == {"write", "switch"}, cases
    for case in cases:
        where = f"{kind} at file operation {case['at']} ({case['op']}, {case['phase']} phase)"
        assert case["state"] in ("old", "new"), (where, case)
        outcome = case["outcome"]
        if kind == "sigkill":
            assert outcome == {"signal": 9}, (where, outcome)
            if mode == "exchange":
                assert "recovered" not in case, where  # never mid-switch: nothing to recover
        else:
            assert "signal" not in outcome, (where, outcome)
            if "raised" not in outcome:
                assert case["state"] == "new", (where, case)  # success is only reported when published
            elif kind != "sigint":
                assert case["state"] == "old", (where, case)  # an error is only reported when nothing was
            # the save cleaned up after itself, unless the fault hit the removal of its lock file
            assert all(".fastsave-lock" in e for e in case["left_after_fault"]), (where, case)
        for states in case.get("recovery_killed", [])[1:]:
            assert states in ("old", "new"), (where, case["recovery_killed"])
        # the next save recognises what was left, finishes or undoes it, and writes the new checkpoint
        assert case["next"] == {}, (where, case["next"])
        assert case["next_state"] == "new" and case["left_after_next"] == [], (where, case)
        if any(".fastsave-staging" in e for e in case["left_after_fault"]) and not case.get("recovered"):
            assert "removed" in case["next_log"], (where, case["next_log"])


@pytest.mark.parametrize("mode", MODES)
def test_the_kill_points_cover_both_sides_of_the_switch(kill_cases, mode):
    killed = [c for c in kill_cases["cases"] if c["mode"] == mode and c["kind"] == "sigkill"]
    assert {"old", "new"} <= {c["state"] for c in killed}
    assert {"write", "switch"} <= {c["phase"] for c in killed}
    switch_ops = {c["op"] for c in killed if c["phase"] == "switch"}
    if mode == "exchange":
        assert "renameat2" in switch_ops
        exchange_at = next(c["at"] for c in killed if c["op"] == "renameat2" and c["phase"] == "switch")
        assert any(c["at"] == exchange_at + 1 for c in killed)  # just after the exchange
    else:
        assert "rename" in switch_ops
        recovered = {c["recovered"].split()[0] for c in killed if c.get("recovered")}
        assert recovered == {"rolled", "completed"}, recovered  # both ways out of a journal
        phases = {c["recovery_killed"][0] for c in killed if c.get("recovery_killed")}
        assert phases == {"switching", "switched"}  # recovery itself killed, in both directions
