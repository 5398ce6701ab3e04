"""report.json and junit.xml."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lab.errors import GuestCrash, error_dict
from lab.report import Report, StepResult


def report(steps: list[StepResult], error: dict[str, object] | None = None) -> Report:
    r = Report(playbook="p.yaml", name="p", run_dir="/r", profile="tcg-svm")
    r.levels["l0"] = {"timeline": {"launch": 1.0, "console_first_output": 1.5, "init": 3.0,
                                   "ssh_ready": 4.0}}
    r.steps = steps
    r.error = error
    r.phases["total"] = 9.0
    r.finish()
    return r


def step(status: str, code: int) -> StepResult:
    return StepResult(name=f"s{code}", level="l0", command="true", expected=0, status=status,
                      exit_status=code, stdout="out", stderr="err", seconds=0.5,
                      message="" if status == "passed" else f"exit status {code}, expected 0")


def test_statuses_and_exit_codes() -> None:
    assert report([step("passed", 0)]).exit_status == 0
    assert report([step("passed", 0), step("failed", 1)]).status == "failed"
    assert report([step("failed", 1)]).exit_status == 1
    crash = error_dict(GuestCrash("l2", "panic: x", "excerpt"))
    r = report([step("passed", 0)], crash)
    assert r.status == "error" and r.exit_status == 3


def test_write_json_and_junit(tmp_path: Path) -> None:
    r = report([step("passed", 0), step("failed", 1)])
    r.write(tmp_path)
    j = json.loads((tmp_path / "report.json").read_text())
    assert j["status"] == "failed" and j["exit_status"] == 1
    assert j["steps"][1]["exit_status"] == 1 and j["steps"][1]["stdout"] == "out"
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert cases[0].get("name") == "boot l0" and cases[0].get("time") == "3.000"
    assert cases[2].find("failure") is not None
    props = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    assert props["init"] == "3.000"


def test_junit_for_a_boot_failure(tmp_path: Path) -> None:
    r = Report(playbook="p.yaml", name="p", run_dir="/r")
    r.levels["l0"] = {"timeline": {"launch": 1.0}}
    r.error = {"kind": "boot", "message": "l0: no marker", "detail": "tail", "exit_status": 3}
    r.finish()
    r.write(tmp_path)
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("errors") == "1"


def test_control_characters_in_output_leave_junit_valid(tmp_path: Path) -> None:
    s = step("failed", 1)
    s.stdout = "\x1b[31mred\x00nul\x07\n"
    s.message = "bad \x1b byte"
    r = report([s])
    r.write(tmp_path)
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")  # parses
    assert suite is not None
    out = "".join(e.text or "" for e in suite.iter("system-out"))
    assert "\\x1b[31mred\\x00nul\\x07" in out  # kept visible, not dropped
    # report.json keeps the bytes exactly
    assert json.loads((tmp_path / "report.json").read_text())["steps"][0]["stdout"] == s.stdout


def test_capture_keeps_head_and_tail_and_sends_every_byte_on() -> None:
    import io

    from lab.ssh import Capture

    sink = io.BytesIO()
    c = Capture(keep=10, sink=sink)
    for chunk in (b"0123456789abc", b"\x00\xff" * 50, b"THE-END"):
        c.add(chunk)
    assert c.total == 13 + 100 + 7 and sink.getvalue().endswith(b"THE-END")
    assert len(sink.getvalue()) == c.total  # byte-exact, binary included
    t = c.text()
    assert t.startswith("0123456789") and t.endswith("THE-END")
    assert f"[... {c.total - 20} bytes not kept here ...]" in t
    small = Capture(keep=100)
    small.add(b"hello")
    assert small.text() == "hello"


def test_a_suite_runs_a_warm_lab_that_broke_once_more_cold(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a restored lab's infrastructure error is retried, and only once, cold; a verdict
    (a failed step) or a cold boot's error stands."""
    from lab import driver
    from lab.errors import EXIT_INFRA

    calls: list[bool] = []

    def fake_run(pb: Any, run_dir: Path, profile: Any, inputs: Any, cold: bool = False,
                 started: float | None = None) -> Report:
        calls.append(cold)
        (run_dir / "lab.log").write_text("attempt\n")
        rep = Report(playbook="p.yaml", name="p", run_dir=str(run_dir))
        if not cold:  # the restored lab: L1 stopped answering
            rep.boot = {"mode": "warm"}
            rep.error = {"kind": "ssh", "message": "l1: Timeout opening channel.",
                         "exit_status": EXIT_INFRA}
        else:
            rep.boot = {"mode": "cold"}
            rep.status = "passed"
        return rep

    monkeypatch.setattr(driver, "run_playbook", fake_run)
    pb = type("PB", (), {"name": "p"})()
    run_dir = tmp_path / "01-p"
    run_dir.mkdir()
    rep = driver.run_unattended(pb, run_dir, None, None, cold=False)  # type: ignore[arg-type]
    assert calls == [False, True] and rep.exit_status == 0
    assert rep.boot["retried_cold"]["warm_error"] == "l1: Timeout opening channel."
    assert (tmp_path / "01-p.warm-failed" / "lab.log").exists()
    assert json.loads((run_dir / "report.json").read_text())["boot"]["retried_cold"]
    # A cold run's error is the answer.
    calls.clear()
    assert driver.run_unattended(pb, tmp_path / "01-p", None, None,  # type: ignore[arg-type]
                                 cold=True).exit_status == 0 and calls == [True]
