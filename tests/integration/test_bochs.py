"""The bochs-vmx profile for real: L0 under Bochs (emulated VMX with EPT), its kvm_intel
handling INVEPT from a bare-metal L1 and from a Linux L1, probed by kprobe events in L0.

This is how the Intel half of the lab runs on these machines, which have no VMX: nothing here
is skipped, and the checks would fail if L0 left a root behind that an INVEPT named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, lab, report, wait_state

pytestmark = pytest.mark.integration

INVALID = (1 << 64) - 1
KVM_MMU_ROOTS_ALL = (1 << 64) - 1  # ~0UL in arch/x86/include/asm/kvm_host.h
EPTP_PA_MASK = ((1 << 52) - 1) & ~0xFFF


def bochs_pids(marker: str | None = None) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and os.path.basename(args[0]) in (b"bochs", b"bochs-bin") and (
                marker is None or any(marker.encode() in a for a in args)):
            pids.append(int(p.name))
    return pids


def no_bochs_within(marker: str, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not bochs_pids(marker):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def invept_vmx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any, str]]:
    out = tmp_path_factory.mktemp("invept-vmx") / "run"
    r = lab("run", "playbooks/invept-vmx.yaml", "--out", str(out), timeout=1800)
    yield out, r, r.stdout + r.stderr


def test_invept_vmx_passes(invept_vmx: tuple[Path, Any, str]) -> None:
    out, r, text = invept_vmx
    assert r.returncode == 0, text[-4000:]
    rep = report(out)
    assert rep["profile"] == "bochs-vmx" and rep["probe_backend"] == "tracefs"
    assert rep["levels"]["l0"]["kernel"]["release"].endswith("-amd64")
    steps = {s["name"]: s for s in rep["steps"]}
    ept = steps["bare-metal L1 EPT mutation suite (VMX)"]
    cases = {c["name"]: c["status"] for c in ept["cases"]}
    assert {"vmx/remap-invept-single", "vmx/remap-invept-global",
            "vmx/cached-root-single"} <= set(cases), cases
    assert set(cases.values()) == {"passed"}, cases
    # The negative control printed how many cases failed without INVEPT: at least one.
    control = steps["the EPT suite fails without its INVEPTs (negative control)"]
    assert control["status"] == "passed" and int(control["stdout"].split()[-1]) >= 1
    mutate = steps["Linux L1 memory mutation suite"]
    assert mutate["status"] == "passed" and len(mutate["cases"]) >= 5, mutate


def test_handle_invept_hits_carry_type_and_roots(invept_vmx: tuple[Path, Any, str]) -> None:
    out, r, text = invept_vmx
    rep = report(out)
    probes = {p["name"]: p for p in rep["probes"]}
    hi, frees = probes["handle_invept"], probes["invept_free_roots"]
    assert hi["error"] is None and frees["error"] is None, (hi["error"], frees["error"])
    assert "handle_invept+0x" in hi["location"]  # the way out, compiled from DWARF and CFI
    complete = [h for h in hi["hits"] if "return" in h["captures"] and h.get("within")]
    assert complete, json.dumps(hi["hits"][:3], indent=1)[:3000]
    types = set()
    for h in complete:
        before, after = h["captures"]["entry"]["guest_mmu"], h["captures"]["return"]["guest_mmu"]
        for roots in (before, after):
            assert set(roots) >= {"current", "previous", "active"} and roots["previous"]
        inner = [frees["hits"][w["hit"] - 1] for w in h["within"]
                 if w["probe"] == "invept_free_roots"]
        assert inner, h
        for f in inner:
            c = f["captures"]["entry"]
            types.add(c["type"])
            assert c["type"] in (1, 2), c  # VMX_EPT_EXTENT_CONTEXT / _GLOBAL
            if c["type"] == 2:
                assert c["roots_to_free"] == KVM_MMU_ROOTS_ALL
            else:
                assert c["roots_to_free"] not in (0, KVM_MMU_ROOTS_ALL)
            # What the fix is about: after the INVEPT, guest_mmu keeps no root for the
            # EPTP it named (single-context), or none at all that was valid before (global).
            named = c["operand_eptp"] & EPTP_PA_MASK
            left = [x for x in [after["current"], *after["previous"]]
                    if x["valid"] and (c["type"] == 2 or x["pgd"] & EPTP_PA_MASK == named)]
            assert not left, (c, after)
    assert types == {1, 2}, f"expected single-context and global INVEPTs, saw {types}"
    assert not bochs_pids(str(out)), "the run is over; no Bochs may be left"


def test_boot_failure_leaves_no_bochs(tmp_path: Path) -> None:
    pb = tmp_path / "too-short.yaml"
    pb.write_text(f"name: too-short\nprofile: bochs-vmx\ntopology:\n"
                  f"  l0: {{image: {ROOT}/images/bochs-l0.yaml, boot_timeout: 15}}\n"
                  "steps:\n  - run: 'true'\n")
    out = tmp_path / "run"
    r = lab("run", str(pb), "--out", str(out), timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "did not reach" in r.stderr + r.stdout
    assert no_bochs_within(str(out), timeout=5)
    assert not bochs_pids(), "a Bochs outlived its lab"


def test_up_ssh_no_gdb_and_kill_leaves_no_bochs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("up", "playbooks/smoke.yaml", "--profile", "bochs-vmx", "--out", str(out),
            timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no gdbstub" in r.stdout
    st = wait_state(out, "up", 10)
    assert st["profile"] == "bochs-vmx" and st["gdb_port"] is None
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
