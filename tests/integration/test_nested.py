"""The nested chain on this host: L0 -> L1 -> L2, each level by SSH, each console watched."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, gone, lab, qemu_pids, report

# The lab's own pytest plugin brings the chain up (lab/pytest_plugin.py). cold: this module is
# about booting the chain (test_warm.py restores it); it still saves the lab when none is
# saved yet.
pytestmark = [pytest.mark.integration,
              pytest.mark.lab(str(ROOT / "playbooks" / "nested.yaml"), cold=True)]


@pytest.fixture(scope="module")
def nested_up(lab: Any) -> tuple[Path, dict[str, Any]]:
    out: Path = lab.run_dir
    return out, json.loads((out / "state.json").read_text())


def test_openssh_reaches_l2_through_proxyjump(nested_up: tuple[Path, dict[str, Any]]) -> None:
    out, _ = nested_up
    r = subprocess.run(["ssh", "-F", str(out / "ssh_config"), "-o", "BatchMode=yes", "l2",
                        "cat /proc/cpuinfo; hostname"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hypervisor" in r.stdout and r.stdout.strip().endswith("l2")


def test_lab_ssh_and_cp_at_every_level(nested_up: tuple[Path, dict[str, Any]],
                                       tmp_path: Path) -> None:
    out, _ = nested_up
    tool = tmp_path / "mytest.sh"
    tool.write_text("#!/bin/sh\necho \"own test on $(hostname), kvm: $(ls /dev/kvm 2>&1)\"\n")
    tool.chmod(0o755)
    for level in ("l0", "l1", "l2"):
        lab("cp", "--run", str(out), str(tool), f"{level}:/root/", check=True)
        r = lab("ssh", "--run", str(out), level, "--", "/root/mytest.sh", check=True)
        assert f"own test on {level}" in r.stdout
    # l0 and l1 run a child, so they have /dev/kvm; their KVM has nested=1
    for level in ("l0", "l1"):
        r = lab("ssh", "--run", str(out), level, "--",
                "cat /sys/module/kvm_amd/parameters/nested /sys/module/kvm_intel/parameters/nested"
                " 2>/dev/null; test -c /dev/kvm", check=True)
        assert r.stdout.split()[0] in ("1", "Y")


def test_boot_timeline_per_level(nested_up: tuple[Path, dict[str, Any]]) -> None:
    _, state = nested_up
    prev_ready = 0.0
    for level in ("l0", "l1", "l2"):
        tl = state["levels"][level]["timeline"]
        assert prev_ready <= tl["launch"] < tl["console_first_output"] <= tl["init"] \
            < tl["ssh_ready"], (level, tl)
        prev_ready = tl["ssh_ready"]
    out = Path(state["run_dir"])
    for level in ("l1", "l2"):
        assert "LAB-INIT: ready" in (out / f"{level}.console.log").read_text(errors="replace")


def test_gdbinit_breaks_in_the_vendor_module(nested_up: tuple[Path, dict[str, Any]]) -> None:
    out, state = nested_up
    fn = "nested_svm_vmexit" if state["profile"] != "kvm-vmx" else "nested_vmx_vmexit"
    assert state["gdbstub_owner"] == "free"
    # The person's route: gdb with the run's gdbinit (here through `lab gdb`, batch mode).
    r = lab("gdb", "--run", str(out), "--", "-batch", "-ex", f"break {fn}", "-ex", "continue",
            "-ex", "bt 1", "-ex", "delete", "-ex", "detach", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Breakpoint 1, {fn}" in r.stdout, r.stdout + r.stderr
    # L0 runs on after the detach: l2 still answers.
    lab("ssh", "--run", str(out), "l2", "--", "true", check=True)


def test_down_leaves_no_qemu(nested_up: tuple[Path, dict[str, Any]]) -> None:
    out, state = nested_up
    assert qemu_pids(state["sock_dir"])
    r = lab("down", "--run", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert gone(state["sock_dir"], timeout=10)


def test_l2_kernel_crash_ends_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = lab("run", str(ROOT / "tests" / "data" / "crash-l2.yaml"), "--out", str(out),
            timeout=900)
    assert r.returncode == 3, r.stdout + r.stderr
    rep = report(out)
    # The same topology as nested.yaml, saved by the fixture above: the crash is caught on a
    # restored lab, whose consoles are watched as after a cold boot.
    assert rep["boot"]["mode"] == "warm", rep["boot"]
    err = rep["error"]
    assert err["kind"] == "crash" and err["level"] == "l2"
    assert "Kernel panic" in err["excerpt"]
    crash_step = rep["steps"][1]
    assert crash_step["status"] == "error" and crash_step["seconds"] < 30
    assert len(rep["steps"]) == 2  # the run stopped at the crash
    assert "Kernel panic" in (out / "l2.console.log").read_text(errors="replace")
    assert time.monotonic() - t0 < 600
    assert not qemu_pids(json.loads((out / "state.json").read_text())["sock_dir"])
