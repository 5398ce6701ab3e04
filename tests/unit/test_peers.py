"""The peer-suite runners without a lab: unittests.cfg as kvm-unit-tests writes it, the command
a section becomes, and the verdicts from recorded output of real runs (tests/data/peers: the
lab's multiboot stand-in and a KVM selftest of Debian's 6.1, run in L0 under tcg-svm)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab.errors import UsageError
from lab.peers import kut, selftests

DATA = Path(__file__).resolve().parents[1] / "data" / "peers"
ROOT = Path(__file__).resolve().parents[2]

CFG = '''\
# a comment
[vmx]
file = vmx.flat
extra_params = -cpu max,+vmx -append "-exit_monitor_from_l2_test"
arch = x86_64
groups = vmx nested
timeout = 5m

[svm]
file = svm.flat
smp = 2
test_args = -pause_filter_test
qemu_params = """
  -cpu max,+svm
  -m 4g
"""
groups = svm
check = /sys/module/kvm_amd/parameters/nested=1 /sys/module/kvm/parameters/x=Y

[pmu]
file = pmu.flat
accel = tcg
groups = pmu nodefault
'''


def test_cfg_sections_fields_and_multiline_values() -> None:
    vmx, svm, pmu = kut.parse_cfg(CFG, "unittests.cfg")
    assert (vmx.name, vmx.file, vmx.smp, vmx.arch, vmx.timeout_s) == ("vmx", "vmx.flat", "1",
                                                                        "x86_64", 300.0)
    assert vmx.extra_params == '-cpu max,+vmx -append "-exit_monitor_from_l2_test"'
    assert vmx.groups == ["vmx", "nested"]
    assert svm.qemu_params == "-cpu max,+svm -m 4g" and svm.smp == "2"
    assert svm.check == ["/sys/module/kvm_amd/parameters/nested=1",
                         "/sys/module/kvm/parameters/x=Y"]
    assert svm.timeout_s == kut.DEFAULT_TIMEOUT_S
    assert pmu.accel == "tcg" and "nodefault" in pmu.groups


def test_cfg_errors_name_the_file_and_section() -> None:
    with pytest.raises(UsageError, match=r"^u.cfg:1: \[a\] qemu_params: no closing"):
        kut.parse_cfg('[a]\nqemu_params = """\n-m 1\n', "u.cfg")
    with pytest.raises(UsageError, match=r"^u.cfg:2: \[a\] timeout: 'soon' is not a dur"):
        kut.parse_cfg("[a]\ntimeout = soon\n", "u.cfg")


def test_selection_by_name_group_and_default() -> None:
    b = kut.Build(Path("/x"), {s.name: s for s in kut.parse_cfg(CFG, "c")})
    assert [s.name for s in b.select([], [], "w")] == ["vmx", "svm"]  # nodefault left out
    assert [s.name for s in b.select([], ["pmu"], "w")] == ["pmu"]
    assert [s.name for s in b.select(["svm", "pmu"], [], "w")] == ["svm", "pmu"]
    with pytest.raises(UsageError, match=r"^pb.yaml:3: steps\[0\].kvm_unit_tests.tests: no "
                                         r"section \[nope\]"):
        b.select(["nope"], [], "pb.yaml:3: steps[0].kvm_unit_tests")


def test_command_is_x86_run_under_timeout_with_checks_first() -> None:
    _, svm, pmu = kut.parse_cfg(CFG, "c")
    cmd = kut.command(svm, 90)
    lines = cmd.splitlines()
    assert lines[0] == "cd /tmp/kvm-unit-tests/x86 || exit 2"
    assert "/sys/module/kvm_amd/parameters/nested" in lines[1] and "exit 0" in lines[1]
    assert lines[-1].startswith("timeout -s TERM 90 qemu-system-x86_64 --no-reboot -nodefaults "
                                "-device pc-testdev -device isa-debug-exit,iobase=0xf4")
    assert "-machine accel=kvm -kernel svm.flat -smp 2 -cpu max,+svm -m 4g " \
           "-append -pause_filter_test </dev/null" in lines[-1]
    assert "-machine accel=tcg" in kut.command(pmu, 10)
    other = kut.Section("a64", 1, file="x.flat", arch="arm64")
    assert "(arm64 only)" in kut.command(other, 10) and "qemu" not in kut.command(other, 10)


def test_command_runs_in_a_shell_as_written(tmp_path: Path) -> None:
    """The check line is real shell: a value that differs skips, one that matches runs on."""
    f = tmp_path / "param"
    f.write_text("Y\n")
    for value, skipped in (("Y", False), ("N", True)):
        s = kut.Section("s", 1, file="t.flat", check=[f"{f}={value}"])
        script = kut.command(s, 5).splitlines()[1] + "\necho ran"
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
        assert (kut.SKIP_MARK in out) == skipped and ("ran" in out) != skipped


def test_status_translation_follows_run_qemu() -> None:
    assert kut.translate(1, "") == 0  # exit(0) through debug-exit
    assert kut.translate(1, "qemu-system-x86_64: warning: host doesn't support x\n") == 0
    assert kut.translate(1, "qemu-system-x86_64: -vnc none: could not read keymap\n") == 1
    assert kut.translate(0, "") == 1  # left without debug-exit
    assert kut.translate(0, "qemu: terminating on signal 15 from pid 9 ()") == 143
    assert kut.translate(3, "") == 3 and kut.translate(77, "") == 77


def _kut(name: str, status: int, section: str = "labkut") -> kut.Verdict:
    out = (DATA / f"kut-{name}.out").read_text()
    err_file = DATA / f"kut-{name}.err"
    err = err_file.read_text() if err_file.exists() else ""
    return kut.judge(kut.Section(section, 1, file="labkut.flat"), status, out, err, 5)


def test_recorded_failing_section_has_its_failed_case() -> None:
    v = _kut("labkut_fail", 3)
    assert v.status == "failed" and v.message == "FAIL (5 tests, 1 unexpected failures, 1 skipped)"
    by = {c["name"]: c["status"] for c in v.cases}
    assert by["labkut: asked to fail"] == "failed" and by["labkut: KVM signature"] == "passed"
    assert [c["status"] for c in v.cases].count("skipped") == 1


def test_recorded_skip_and_timeout() -> None:
    v = _kut("labkut_skip", 77)
    assert v.status == "passed" and v.message.startswith("SKIP")
    assert {c["status"] for c in v.cases} == {"skipped"}
    v = _kut("labkut_hang", 0)  # QEMU ends 0 on SIGTERM; stderr says which signal
    assert v.status == "failed" and v.message == "FAIL (timeout; duration=5s)"


def test_a_check_skip_is_one_skipped_case() -> None:
    v = kut.judge(kut.Section("svm", 1), 0, kut.SKIP_MARK + "(/sys/x not equal to 1)\n", "", 9)
    assert v.status == "passed"
    assert v.cases == [{"number": 1, "name": "svm", "status": "skipped",
                        "message": "(/sys/x not equal to 1)"}]


def test_repeated_result_lines_keep_unique_names() -> None:
    out = "PASS: vmx: a\nPASS: vmx: a\nXFAIL: vmx: b\nXPASS: vmx: c\nSUMMARY: 4 tests\n"
    v = kut.judge(kut.Section("vmx", 1), 3, out, "", 9)
    assert [c["name"] for c in v.cases] == ["vmx: a", "vmx: a #2", "vmx: b", "vmx: c"]
    assert [c["status"] for c in v.cases] == ["passed", "passed", "passed", "failed"]


def test_build_must_be_this_users(tmp_path: Path) -> None:
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text("[t]\nfile = t.flat\n")
    b = kut.load_build(tmp_path)
    with pytest.raises(UsageError, match=r"\[t\] file: t.flat is not a built test"):
        kut.flat_files(b, list(b.sections.values()))
    os.chmod(tmp_path / "x86", 0o777)
    with pytest.raises(UsageError, match="writable by another user"):
        kut.load_build(tmp_path)
    with pytest.raises(UsageError, match=r"no x86/unittests\.cfg there"):
        kut.load_build(tmp_path / "x86")


def test_a_file_outside_the_build_is_refused(tmp_path: Path) -> None:
    (tmp_path / "b" / "x86").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (tmp_path / "b" / "x86" / "unittests.cfg").write_text("[t]\nfile = ../../secret\n")
    b = kut.load_build(tmp_path / "b")
    with pytest.raises(UsageError, match="is not a built test"):
        kut.flat_files(b, list(b.sections.values()))


def test_selftest_assertion_failure_recorded() -> None:
    err = (DATA / "selftest-nested_exceptions_test.err").read_text()
    v = selftests.judge("nested_exceptions_test", 254, "", err, 120)
    assert v.status == "failed"
    assert v.message.startswith("exit status 254: x86_64/nested_exceptions_test.c:186: false; "
                                "Failed guest assert: ctrl->exit_info_1 == error_code")
    assert v.cases[-1]["name"] == "nested_exceptions_test"


def test_selftest_skip_pass_timeout_and_ktap() -> None:
    v = selftests.judge("vmx_msrs_test", 4, "1..0 # SKIP - Requirement not met: VMX\n", "", 120)
    assert v.status == "passed" and v.cases[0]["status"] == "skipped"
    assert "Requirement not met: VMX" in v.cases[0]["message"]
    assert selftests.judge("state_test", 0, "", "", 120).cases[0]["status"] == "passed"
    assert selftests.judge("x", 143, "", "", 120).message == "timeout (120 s)"
    ktap = "TAP version 13\n1..2\nok 1 a\nnot ok 2 b\n"
    v = selftests.judge("hyperv_features", 1, ktap, "", 120)
    assert [(c["name"], c["status"]) for c in v.cases] == [("a", "passed"), ("b", "failed")]


def test_selftests_defaults_are_the_vendors_nested_tests(tmp_path: Path) -> None:
    b = selftests.Built(tmp_path, "6.1", {n: tmp_path / n for n in (
        "svm_vmcall_test", "vmx_msrs_test", "state_test", "cpuid_test", "evmcs_test")},
        failed=["dirty_log_test"])
    assert b.select([], "amd", "w") == ["state_test", "svm_vmcall_test"]
    assert b.select([], "intel", "w") == ["evmcs_test", "state_test", "vmx_msrs_test"]
    with pytest.raises(UsageError, match="dirty_log_test did not build"):
        b.select(["dirty_log_test"], "amd", "pb:1: steps[0].selftests")
    with pytest.raises(UsageError, match="nope is not a KVM selftest"):
        b.select(["nope"], "amd", "pb:1: steps[0].selftests")


def test_makefile_and_settings_read(tmp_path: Path) -> None:
    mk = tmp_path / "Makefile"
    mk.write_text("TEST_GEN_PROGS_x86_64 = x86_64/cpuid_test\n"
                  "TEST_GEN_PROGS_x86_64 += x86_64/svm_vmcall_test\n"
                  "TEST_GEN_PROGS_aarch64 += aarch64/arch_timer\n")
    assert selftests._x86_tests(mk) == ["cpuid_test", "svm_vmcall_test"]
    (tmp_path / "settings").write_text("timeout=120\n")
    assert selftests._timeout(tmp_path / "settings") == 120
    assert selftests._timeout(tmp_path / "none") == selftests.DEFAULT_TIMEOUT_S


def test_the_stand_in_builds(tmp_path: Path) -> None:
    """tests/kut builds into a kvm-unit-tests layout (the integration test boots it)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "kut"), f"O={tmp_path}"],
                   check=True, capture_output=True)
    b = kut.load_build(tmp_path)
    assert "labkut" in b.sections and (tmp_path / "x86" / "labkut.flat").read_bytes()[:4] == \
        b"\x7fELF"
