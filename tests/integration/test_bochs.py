"""The bochs-vmx profile's lifecycle for real: L0 under Bochs, reached by SSH, no gdbstub
offered, and no Bochs left however the lab ends. (invept-vmx itself, probes and VMX suites,
runs once in the nightly suite: tests/integration/test_nightly.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, bochs_pids, gone, lab, wait_state

pytestmark = pytest.mark.integration


def no_bochs_within(marker: str, timeout: float = 15) -> bool:
    return gone(marker, timeout, pids=bochs_pids)


def test_boot_failure_leaves_no_bochs(tmp_path: Path) -> None:
    # kaslr: the bzImage's decompressor randomizes, so this L0 boots the bzImage rather than
    # the PVH entry (the other door of the boot CD, seen here as far as ISOLINUX goes).
    pb = tmp_path / "too-short.yaml"
    pb.write_text(f"name: too-short\nprofile: bochs-vmx\ntopology:\n"
                  f"  l0: {{image: {ROOT}/images/bochs-l0.yaml, boot_timeout: 15, "
                  "kaslr: true}\nsteps:\n  - run: 'true'\n")
    out = tmp_path / "run"
    r = lab("run", str(pb), "--out", str(out), timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "did not reach" in r.stderr + r.stdout
    console = (out / "l0.console.log").read_text(errors="replace")
    assert "Loading /vmlinuz" in console and "pvhboot" not in console
    marker = json.loads((out / "state.json").read_text())["sock_dir"]
    assert no_bochs_within(str(out), timeout=5)
    assert not bochs_pids(marker), "a Bochs outlived its lab"


def test_up_ssh_no_gdb_and_kill_leaves_no_bochs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("up", "playbooks/smoke.yaml", "--profile", "bochs-vmx", "--out", str(out),
            timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no gdbstub" in r.stdout
    st = wait_state(out, "up", 10)
    assert st["profile"] == "bochs-vmx" and st["gdb_socket"] is None
    assert bochs_pids(st["sock_dir"]), "the lab's Bochs should be running"
    r = lab("ssh", "--run", str(out), "l0", "--", "grep -c vmx /proc/cpuinfo; uname -r",
            check=True)
    assert int(r.stdout.split()[0]) >= 1 and r.stdout.split()[1].endswith("-amd64")
    # Listeners: SSH and the consoles on loopback only.
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    mine = [ln for ln in ss.splitlines() if "bochs" in ln]
    assert mine and all("127.0.0.1:" in ln.split()[3] for ln in mine), mine
    r = lab("gdb", "--run", str(out))
    assert r.returncode == 2 and "no gdbstub" in r.stderr
    # The orchestrator dies without a word: its Bochs must go with it.
    os.kill(int(st["owner_pid"]), signal.SIGKILL)
    assert no_bochs_within(st["sock_dir"], timeout=10), "Bochs outlived a SIGKILLed lab"
    lab("down", "--run", str(out), timeout=60)
    assert not bochs_pids(st["sock_dir"])


def test_doctor_reports_bochs_vmx() -> None:
    r = subprocess.run([sys.executable, "-m", "lab", "doctor"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert "bochs-vmx:        can run (Bochs 2.7" in r.stdout, r.stdout


def test_vmx_selftests_in_l0(tmp_path: Path) -> None:
    """L0's own VMX selftests (built by the lab from Debian's source of the generic kernel
    Bochs boots) against its kvm_intel on Bochs's emulated VMX."""
    out = tmp_path / "run"
    r = lab("run", str(ROOT / "tests" / "data" / "selftests-vmx.yaml"), "--out", str(out),
            timeout=1500)
    rep = json.loads((out / "report.json").read_text())
    assert rep["error"] is None, rep["error"]
    st = {s["name"].removeprefix("selftests "): s for s in rep["steps"]}
    assert len(st) == 11 and all(s["level"] == "l0" for s in st.values())
    # These run a nested guest under L0's nested VMX and pass on Bochs 2.7.
    for name in ("vmx_close_while_nested_test", "vmx_msrs_test", "state_test",
                 "nested_exceptions_test"):
        assert st[name]["status"] == "passed" and st[name]["cases"][0]["status"] == "passed", \
            (name, st[name]["message"])
    # A requirement Bochs does not meet is the test's own SKIP, with its reason.
    skip = st["vmx_exception_with_invalid_guest_state"]
    assert skip["status"] == "passed" and skip["cases"][0]["status"] == "skipped"
    assert "Requirement not met" in skip["cases"][0]["message"]
    assert r.returncode == (0 if rep["status"] == "passed" else 1)
