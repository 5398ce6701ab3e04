"""GDB probes on the real L0: KVM's nested code stopped, guest_mmu captured."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import lab, report

pytestmark = pytest.mark.integration


def test_invept_playbook_captures_guest_mmu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("run", "playbooks/invept.yaml", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = report(out)
    assert rep["probe_backend"] == "gdb"
    assert rep["gdb"]["probe_sets"] in (["invalidation/svm"], ["invalidation/vmx"])
    assert {"kvm"} <= set(rep["gdb"]["modules"])
    hits = [(p["name"], h) for p in rep["probes"] for h in p["hits"]]
    assert hits, rep["probes"]
    matching = []
    for _name, h in hits:
        cap = h["captures"].get("entry", {})
        gm = cap.get("guest_mmu", {})
        pointer = cap.get("nested_cr3", cap.get("eptp12"))
        if gm.get("active") and gm["current"]["valid"] and pointer is not None and \
                gm["current"]["pgd"] == pointer & ~0xFFF:
            matching.append(h)
    assert matching, "no hit where guest_mmu is active and shadows L1's nested CR3/EPTP"
    assert all(isinstance(e["hpa"], int) for h in matching
               for e in h["captures"]["entry"]["guest_mmu"]["previous"])
    assert rep["probe_timeline"] and rep["probe_timeline"][0]["t"] > 0
    assert (out / "gdb.log").stat().st_size > 0
