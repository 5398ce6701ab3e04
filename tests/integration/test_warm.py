"""Warm starts: a lab saved after a cold boot and restored by later runs of any playbook with
the same boot (images, topology, profile, QEMU)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lab.cache import cache_root

from .helpers import ROOT, gone, lab, qemu_pids, report

pytestmark = pytest.mark.integration

L2_CLOCK = """\
extends: %s
name: warm-nested
steps:
  - {name: l2 clock, on: l2, run: "date +%%s"}
"""


def warm_run(playbook: Path | str, out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """Run a playbook so that it starts warm: once more if no saved lab was there yet."""
    r = lab("run", str(playbook), "--out", str(out), *args, timeout=1200)
    rep = report(out)
    if rep["boot"].get("mode") == "cold":
        assert rep["boot"].get("saved"), rep["boot"]
        out = out.with_name(out.name + "-again")
        r = lab("run", str(playbook), "--out", str(out), *args, timeout=1200)
        rep = report(out)
    assert rep["boot"]["mode"] == "warm", (rep["boot"], r.stderr[-2000:])
    return r.returncode, rep


def saved_meta(key: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((cache_root() / "snapshots" / key / "meta.json").read_text())
    return meta


def test_restored_lab_is_the_saved_one(tmp_path: Path) -> None:
    pb = tmp_path / "warm.yaml"
    pb.write_text(L2_CLOCK % (ROOT / "playbooks" / "nested.yaml"))
    code, rep = warm_run(pb, tmp_path / "run")
    assert code == 0, rep
    meta = saved_meta(rep["boot"]["saved"])
    for level in ("l0", "l1", "l2"):
        got, saved = rep["levels"][level]["restored"], meta["levels"][level]
        # The same boot, and its SSH server (a process started at boot, before the save) is
        # the same process, still running.
        assert got["boot_id"] == saved["boot_id"] and got["same_as_saved"], level
        assert (got["sshd_pid"], got["sshd_start"]) == (saved["sshd_pid"], saved["sshd_start"])
    # The guests' clocks were stepped to the host's after the restore.
    l2_time = int(rep["steps"][-1]["stdout"].split()[0])
    assert abs(l2_time - time.time()) < 120
    assert rep["boot"]["restore_s"] > 0 and rep["levels"]["l2"]["timeline"]["ssh_ready"] > 0
    assert "Warm start" in (Path(rep["run_dir"]) / "report.html").read_text()


def test_probes_and_injected_bug_on_a_restored_lab(tmp_path: Path) -> None:
    code, rep = warm_run(ROOT / "playbooks" / "invept-bug-injected.yaml", tmp_path / "run")
    assert code == 1, rep["error"]
    assert rep["injection"] and rep["probes"]
    assert any(h for p in rep["probes"] for h in p["hits"]), "no probe hit on a restored lab"
    svm = rep["steps"][0]
    assert svm["status"] == "failed" and any(c["status"] == "failed" for c in svm["cases"])


def test_two_labs_restored_from_one_saved_lab_side_by_side(tmp_path: Path) -> None:
    warm_run(ROOT / "playbooks" / "nested.yaml", tmp_path / "seed")  # a saved lab is there
    outs = [tmp_path / "a", tmp_path / "b"]
    try:
        with ThreadPoolExecutor(2) as pool:
            ups = list(pool.map(lambda o: lab("up", "playbooks/nested.yaml", "--out", str(o),
                                              timeout=600), outs))
        assert [u.returncode for u in ups] == [0, 0], [u.stderr[-2000:] for u in ups]
        states = [json.loads((o / "state.json").read_text()) for o in outs]
        assert states[0]["levels"]["l0"]["port"] != states[1]["levels"]["l0"]["port"]
        ids = []
        for o in outs:
            r = lab("ssh", "--run", str(o), "l2", "--",
                    "hostname; cat /proc/sys/kernel/random/boot_id", check=True)
            ids.append(r.stdout.split())
        # Both are the saved L2 (the same boot), each running in its own QEMU.
        assert ids[0] == ids[1] and ids[0][0] == "l2"
        # One can go down while the other runs on.
        lab("down", "--run", str(outs[0]), check=True)
        assert gone(states[0]["sock_dir"])
        lab("ssh", "--run", str(outs[1]), "l2", "--", "true", check=True)
    finally:
        for o in outs:
            lab("down", "--run", str(o), timeout=120)
    assert not any(qemu_pids(json.loads((o / "state.json").read_text())["sock_dir"])
                   for o in outs)


L0_ONLY = """\
name: warm-l0
snapshot: %s
topology:
  l0: {memory: 1100}
steps:
  - {name: up, run: "true"}
"""


def test_snapshot_off_and_cold_flag(tmp_path: Path) -> None:
    off = tmp_path / "off.yaml"
    off.write_text(L0_ONLY % "off")
    r = lab("run", str(off), "--out", str(tmp_path / "off"), check=True)
    rep = report(tmp_path / "off")
    assert rep["boot"] == {"mode": "cold", "saved": None,
                           "why_not_saved": "the playbook says snapshot: off"}, r.stderr
    auto = tmp_path / "auto.yaml"
    auto.write_text(L0_ONLY % "auto")
    warm_run(auto, tmp_path / "auto")
    lab("run", str(auto), "--out", str(tmp_path / "cold"), "--cold", check=True)
    cold = report(tmp_path / "cold")
    assert cold["boot"]["mode"] == "cold" and "already there" in cold["boot"]["why_not_saved"]
    assert "init" in cold["levels"]["l0"]["timeline"]


def test_a_broken_saved_lab_is_rebuilt_not_fatal(tmp_path: Path) -> None:
    auto = tmp_path / "auto.yaml"
    auto.write_text(L0_ONLY % "auto")
    _, warm = warm_run(auto, tmp_path / "seed")
    stream = cache_root() / "snapshots" / warm["boot"]["saved"] / "l0.migration"
    with open(stream, "r+b") as f:  # cut short, as by a full disk
        f.truncate(stream.stat().st_size // 2)
    r = lab("run", str(auto), "--out", str(tmp_path / "run"))
    rep = report(tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert rep["boot"]["mode"] == "cold" and rep["boot"]["restore_failed"]
    assert rep["boot"]["saved"] == warm["boot"]["saved"]  # saved again, whole
