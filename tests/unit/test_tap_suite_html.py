"""TAP parsing, suite expectations and the merged JUnit, report.html rendering."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab import html, suite, tap
from lab.errors import UsageError
from lab.report import Report, StepResult

SVM_TAP = """\
1..3
ok 1 - svm/remap-flush-all: 100 checks in 0.09 s
not ok 2 - svm/unmap: 86 of 100 checks stale or wrong (first at iteration 2: ...)
ok 3 - vmx/invept-single # SKIP this CPU has no VMX
# svm-npt-test: 3 cases
"""


def test_tap_cases() -> None:
    t = tap.parse(SVM_TAP)
    assert [(c.name, c.status) for c in t.cases] == [
        ("svm/remap-flush-all", "passed"), ("svm/unmap", "failed"),
        ("vmx/invept-single", "skipped")]
    assert t.cases[2].message == "this CPU has no VMX"
    assert not t.ok and "svm/unmap" in t.problems()


def test_tap_incomplete_or_bailed_out() -> None:
    assert not tap.parse("1..3\nok 1 - a\n").ok
    t = tap.parse("1..1\nBail out! /dev/kvm: No such file\n")
    assert not t.ok and "/dev/kvm" in t.problems()
    assert tap.parse("1..2\nok 1 - a\nok 2 - b\n").ok


def _report(tmp: Path, name: str, status_cases: list[str]) -> tuple[Path, dict[str, object]]:
    d = tmp / name
    d.mkdir()
    r = Report(playbook=f"{name}.yaml", name=name, run_dir=str(d), profile="tcg-svm")
    cases = [{"number": i + 1, "name": f"svm/c{i}", "status": s, "message": "m"}
             for i, s in enumerate(status_cases)]
    step_status = "failed" if "failed" in status_cases else "passed"
    r.steps = [StepResult(name="suite", level="l0", command="svm-npt-test", expected=0,
                          status=step_status, exit_status=int(step_status == "failed"),
                          cases=cases)]
    r.phases["total"] = 1.0
    r.finish()
    r.write(d)
    return d, r.to_dict()


def test_expected_failure_and_merged_junit(tmp_path: Path) -> None:
    clean_dir, clean = _report(tmp_path, "invept", ["passed", "passed"])
    inj_dir, injected = _report(tmp_path, "injected", ["failed", "passed"])
    s = suite.Suite(tmp_path / "n.yaml", "nightly", "",
                    [suite.Entry(Path("invept.yaml"), "passed"),
                     suite.Entry(Path("injected.yaml"), "failed")])
    runs = [(s.entries[0], clean_dir, clean), (s.entries[1], inj_dir, injected)]
    assert suite.outcome("failed", injected)[0] and "svm/c0" in suite.outcome("failed", injected)[1]
    assert not suite.outcome("failed", clean)[0]
    assert suite.write(s, tmp_path, runs, 3.0) == 0
    root = ET.parse(tmp_path / "junit.xml").getroot()
    suites = root.findall("testsuite")
    assert [x.get("name") for x in suites] == ["invept", "injected"]
    inj = suites[1]
    assert inj.get("failures") == "0"  # caught cases are the point of an expected failure
    skipped = [tc.get("name") for tc in inj.findall("testcase") if tc.find("skipped") is not None]
    assert skipped == ["svm/c1"]  # did not catch the bug
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "passed"
    page = (tmp_path / "report.html").read_text()
    assert "PASSED" in page and "injected/report.html" in page


def test_an_injected_run_that_passes_fails_the_suite(tmp_path: Path) -> None:
    d, rep = _report(tmp_path, "injected", ["passed"])
    s = suite.Suite(tmp_path / "n.yaml", "nightly", "", [suite.Entry(Path("i.yaml"), "failed")])
    assert suite.write(s, tmp_path, [(s.entries[0], d, rep)], 1.0) == 1
    exp = ET.parse(tmp_path / "junit.xml").getroot().find(
        "testsuite/testcase[@classname='nightly.expectations']")
    assert exp is not None and exp.find("failure") is not None


def test_suite_validation(tmp_path: Path, root: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("suite:\n  - playbook: nope.yaml\n")
    with pytest.raises(UsageError, match=r"s.yaml:2: suite\[0\].playbook: no file"):
        suite.load(p)
    s = suite.load(root / "playbooks" / "nightly.yaml")
    assert [e.expect for e in s.entries][-1] == "failed"


def test_report_html_has_verdict_tables_and_links(tmp_path: Path) -> None:
    d, rep = _report(tmp_path, "invept", ["passed", "failed"])
    rep["probes"] = [{"name": "nested_svm_vmexit", "at": "nested_svm_vmexit", "location": "x",
                      "condition": None, "hits": [{}], "error": None}]
    rep["probe_backend"] = "gdb"
    gm = {"kind": "guest_mmu", "current": {"pgd": 0x8000, "hpa": 0x1000, "valid": True},
          "active": True, "previous": [{"pgd": 0x9000, "hpa": 2**64 - 1, "valid": False}]}
    rep["probe_timeline"] = [{"t": 1.5, "probe": "nested_svm_vmexit", "hit": 1, "where": "f",
                              "captures": {"entry": {"guest_mmu": gm, "nested_cr3": 0x8000}}}]
    page = html.render(rep, d)
    assert "FAILED" in page and "svm/c1" in page and "0x8000" in page and "invalid" in page
    assert 'href="junit.xml"' in page
    # the roots are shown by what the value is, whatever the capture is named
    rep["probe_timeline"][0]["captures"]["entry"] = {"roots": gm}
    page = html.render(rep, d)
    assert "roots: active; pgd <code>0x8000</code>" in page and "{&#39;kind&#39;" not in page


def test_a_run_that_ended_before_any_test_is_an_error_not_an_empty_suite(
        tmp_path: Path) -> None:
    # The suite's JUnit is built from each run's report (one writer, lab/junit.py), not from
    # its junit.xml: a run with nothing in it but its error still says so.
    run_dir, rep = _report(tmp_path, "invept", [])
    rep.update(levels={}, steps=[], status="error",
               error={"kind": "boot", "message": "l0: no marker", "detail": "tail"})
    (run_dir / "junit.xml").write_bytes(b"<testsuites><testsuite>\x1b</testsuite>")
    s = suite.Suite(tmp_path / "n.yaml", "nightly", "",
                    [suite.Entry(Path("invept.yaml"), "passed")])
    suite.write(s, tmp_path, [(s.entries[0], run_dir, rep)], 1.0)
    sub = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert sub is not None and sub.get("errors") == "1"
    err = sub.find("testcase/error")
    assert err is not None and "l0: no marker" in err.get("message", "")


def test_suite_name_is_a_plain_name(tmp_path: Path) -> None:
    import pytest

    from lab.errors import UsageError

    p = tmp_path / "s.yaml"
    p.write_text('name: "x/../../escaped"\nsuite: [{playbook: a.yaml}]\n')
    with pytest.raises(UsageError, match="name: expected a name of letters"):
        suite.load(p)
