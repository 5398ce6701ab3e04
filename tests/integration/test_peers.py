"""The peer suites in a real chain (tcg-svm): the lab's kvm-unit-tests stand-in (tests/kut) in L0
and in L1 through the kvm-unit-tests runner, and L0's own KVM selftests, built by the lab from
Debian's linux-source of L0's exact kernel version. One lab for the module."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lab import tap

from .helpers import ROOT, lab, qemu_pids, report

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], int]:
    build = tmp_path_factory.mktemp("kut")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "kut"), f"O={build}"], check=True)
    out = tmp_path_factory.mktemp("peers") / "run"
    r = lab("run", str(ROOT / "tests" / "data" / "peers.yaml"), "--out", str(out),
            "--kvm-unit-tests", str(build), "--tap", timeout=1800)
    assert not qemu_pids(str(out)), "a QEMU of the run outlived it"
    (out / "stdout.tap").write_text(r.stdout)
    return out, report(out), r.returncode


def _steps(rep: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    return {s["name"].removeprefix(prefix): s for s in rep["steps"]
            if s["name"].startswith(prefix)}


def test_kvm_unit_tests_sections_judged_as_run_tests_sh(run: tuple[Path, dict[str, Any],
                                                                   int]) -> None:
    _, rep, code = run
    assert rep["error"] is None and code == 1  # two sections fail on purpose
    kut = _steps(rep, "kut ")
    # Every default section, in the file's order; the nodefault one left out.
    assert list(kut) == ["labkut", "labkut_smp", "labkut_fail", "labkut_skip", "labkut_check",
                         "labkut_arch", "labkut_hang", "labkut_tcg"]
    cases = {n: {c["name"]: c["status"] for c in s["cases"]} for n, s in kut.items()}
    # Under L0's KVM: the program sees KVM's CPUID signature.
    assert kut["labkut"]["status"] == "passed"
    assert cases["labkut"]["labkut: KVM signature"] == "passed"
    assert cases["labkut"]["labkut: multiboot entry"] == "passed"
    fail = kut["labkut_fail"]
    assert fail["status"] == "failed" and cases["labkut_fail"]["labkut: asked to fail"] == "failed"
    assert fail["message"].startswith("FAIL (5 tests, 1 unexpected failures")
    assert kut["labkut_skip"]["status"] == "passed"
    assert set(cases["labkut_skip"].values()) == {"skipped"}
    assert kut["labkut_check"]["cases"][0]["message"] == \
        "(/proc/sys/kernel/labkut_no_such_file not equal to 1)"
    assert kut["labkut_arch"]["cases"][0]["message"] == "(arm64 only)"
    assert kut["labkut_hang"]["status"] == "failed"
    assert "timeout; duration=" in kut["labkut_hang"]["message"]
    # accel = tcg inside the level: QEMU's TCG module was carried, and no KVM signature.
    assert cases["labkut_tcg"]["labkut: no KVM signature under tcg"] == "passed"


def test_kvm_unit_tests_in_l1_run_under_l1s_kvm(run: tuple[Path, dict[str, Any], int]) -> None:
    _, rep, _ = run
    nested = _steps(rep, "kut-nested ")
    assert list(nested) == ["labkut"] and nested["labkut"]["level"] == "l1"
    assert nested["labkut"]["status"] == "passed"
    assert {c["name"]: c["status"] for c in nested["labkut"]["cases"]}[
        "labkut: KVM signature"] == "passed"


def test_selftests_of_l0s_kernel(run: tuple[Path, dict[str, Any], int]) -> None:
    out, rep, _ = run
    st = _steps(rep, "selftests ")
    # The default: the nested SVM tests of this kernel (Debian 6.1 has these seven).
    assert set(st) == {"svm_vmcall_test", "svm_int_ctl_test", "svm_nested_shutdown_test",
                       "svm_nested_soft_inject_test", "nested_exceptions_test", "state_test",
                       "hyperv_svm_test"}
    assert all(s["level"] == "l0" for s in st.values())
    # L0's KVM runs a guest that runs its own nested guest with VMRUN.
    assert st["svm_vmcall_test"]["status"] == "passed"
    for name, s in st.items():
        if s["status"] == "failed":  # a test's own assertion, never a runner's guess
            assert s["message"].startswith("exit status 254: x86_64/"), (name, s["message"])
    junit = ET.parse(out / "junit.xml").getroot()
    names = {tc.get("classname") for tc in junit.iter("testcase")}
    assert "peers.l0.selftests svm_vmcall_test" in names
    assert "peers.l0.kut labkut_fail" in names and "peers.l1.kut-nested labkut" in names


def test_tap_on_stdout_says_what_junit_says(run: tuple[Path, dict[str, Any], int]) -> None:
    out, _, _ = run
    text = (out / "stdout.tap").read_text()
    assert text.startswith("TAP version 13\n1..")  # the summary went to stderr
    parsed = tap.parse(text)
    junit = ET.parse(out / "junit.xml").getroot()
    cases = list(junit.iter("testcase"))
    assert len(parsed.cases) == len(cases) and parsed.planned == len(cases)
    failed = [tc for tc in cases if tc.find("failure") is not None or tc.find("error") is not None]
    assert [c.status for c in parsed.cases].count("failed") == len(failed) > 0
