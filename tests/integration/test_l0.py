"""L0 on this host: smoke playbook, lab up/ssh/cp/down, teardown however the lab ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .helpers import (
    ROOT,
    gone,
    lab,
    qemu_pids,
    report,
    tcp_listeners,
    unix_listeners,
    wait_state,
)

pytestmark = pytest.mark.integration

SLEEPY = """\
name: sleepy
topology:
  l0: {image: %s}
steps:
  - {name: quick, run: "true"}
  - {name: long, run: "sleep 300", timeout: 600}
"""

MIXED = """\
name: mixed
topology:
  l0: {image: %s}
steps:
  - {name: passes, run: "echo fine"}
  - {name: fails, run: "echo bad; exit 3", expect: 0}
  - {name: expected-nonzero, run: "exit 7", expect: 7}
"""


def playbook(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pb.yaml"
    p.write_text(text % (ROOT / "images" / "default.yaml"))
    return p


def skip_on_vmx_host(reason: str) -> None:
    """These tests drive SVM code in L0; a VMX host (kvm-vmx) has none to drive."""
    if json.loads(lab("doctor", "--json").stdout)["profile"] == "kvm-vmx":
        pytest.skip(reason)


def test_doctor_picks_a_profile() -> None:
    r = lab("doctor", "--json", check=True)
    d = json.loads(r.stdout)
    assert d["profile"] in ("kvm-vmx", "kvm-svm", "tcg-svm") and d["can_run"] is True
    if not (d["vmx"] or d["svm"]):
        assert d["profile"] == "tcg-svm" and d["kvm_usable"] is False


def test_image_rebuild_with_nothing_changed_is_a_cache_hit() -> None:
    first = lab("images", "build", "default", check=True).stdout
    second = lab("images", "build", "default", check=True)
    assert first.split()[1] == second.stdout.split()[1]
    assert "building image" not in second.stderr


def test_smoke_playbook(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # --cold: this test is about the boot itself (the other tests here may start warm).
    r = lab("run", "playbooks/smoke.yaml", "--out", str(out), "--cold")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = report(out)
    assert rep["boot"]["mode"] == "cold"
    assert rep["host_speed"]["source"] == "this run" and rep["host_speed"]["factor"] >= 1
    assert rep["status"] == "passed" and [s["status"] for s in rep["steps"]] == ["passed"] * 3
    assert "nested=1" in rep["steps"][1]["stdout"]
    tl = rep["levels"]["l0"]["timeline"]
    assert tl["launch"] < tl["console_first_output"] < tl["init"] < tl["ssh_ready"]
    assert rep["levels"]["l0"]["kernel"]["release"]
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "0"
    assert "LAB-INIT: ready" in (out / "l0.console.log").read_text(errors="replace")
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "down" and not qemu_pids(state["sock_dir"])


def test_failed_step_gives_exit_1_and_runs_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("run", str(playbook(tmp_path, MIXED)), "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    rep = report(out)
    assert [s["status"] for s in rep["steps"]] == ["passed", "failed", "passed"]
    assert rep["steps"][1]["exit_status"] == 3 and "bad" in rep["steps"][1]["stdout"]


FLOOD = """\
name: flood
topology:
  l0: {image: %s}
steps:
  - {name: binary, run: "head -c 20000000 /dev/urandom"}
  - {name: endless, run: "yes", timeout: 5}
"""


def test_step_output_is_streamed_to_files_and_capped_in_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("run", str(playbook(tmp_path, FLOOD)), "--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr  # the endless step timed out
    rep = report(out)
    binary, endless = rep["steps"]
    assert binary["status"] == "passed" and binary["stdout_bytes"] == 20_000_000
    assert (out / binary["output_files"][0]).stat().st_size == 20_000_000  # every byte
    assert len(binary["stdout"]) < 300_000 and "bytes not kept here" in binary["stdout"]
    # A step that never stops printing still ends at its timeout (scaled to the host).
    assert endless["status"] == "error" and "did not finish" in endless["message"]
    assert endless["seconds"] < 5 * rep["host_speed"]["factor"] + 30
    assert (out / endless["output_files"][0]).stat().st_size > 0
    assert (out / "report.json").stat().st_size < 2_000_000


def test_two_labs_side_by_side(tmp_path: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda o: lab("run", "playbooks/smoke.yaml", "--out", str(o)),
                                outs))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    ports = {json.loads((o / "state.json").read_text())["levels"]["l0"]["port"] for o in outs}
    assert len(ports) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_qemu_left_however_the_run_ends(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lab", "run",
                             str(playbook(tmp_path, SLEEPY)), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        state = wait_state(out, "up", timeout=180)
        marker = state["sock_dir"]
        assert qemu_pids(marker), "QEMU should be running while the lab is up"
        time.sleep(1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        assert gone(marker, timeout=15), f"QEMU still running after {sig.name}"
        if sig != signal.SIGKILL:
            assert rc == 3
            rep = report(out)
            assert rep["status"] == "error" and rep["error"]["kind"] == "aborted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:
        # The next `lab` command reaps what a killed lab left in its registry.
        lab("doctor")
        from lab.procs import Registry

        assert not [r for r in Registry().records() if r.get("run_dir") == str(out)]


def test_up_ssh_cp_down(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("up", "playbooks/smoke.yaml", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        assert f"ssh -F {out}/ssh_config l0" in r.stdout
        state = json.loads((out / "state.json").read_text())
        assert state["status"] == "up" and qemu_pids(state["sock_dir"])
        # What another local user could reach: QEMU listens on TCP only for the SSH forward
        # (127.0.0.1); its gdbstub, QMP and consoles are unix sockets in a 0700 directory.
        (pid,) = qemu_pids(state["sock_dir"])
        assert tcp_listeners(pid) == [("127.0.0.1", state["levels"]["l0"]["port"])]
        socks = unix_listeners(pid)
        assert state["gdb_socket"] in socks and len(socks) >= 3  # gdb, QMP, consoles
        assert all(p.startswith(state["sock_dir"] + "/") for p in socks), socks
        assert state["gdb_socket"].startswith(state["sock_dir"] + "/")
        assert os.stat(state["sock_dir"]).st_mode & 0o777 == 0o700
        # The real OpenSSH client with the run's ssh_config (pinned host key, no prompts).
        o = subprocess.run(["ssh", "-F", str(out / "ssh_config"), "-o", "BatchMode=yes", "l0",
                            "cat /proc/version"], capture_output=True, text=True, timeout=60)
        assert o.returncode == 0 and "Linux version" in o.stdout, o.stderr
        s = lab("ssh", "--run", str(out), "l0", "--", "echo", "hello-$((6*7))", "&&", "exit 4")
        assert s.returncode == 4 and "hello-42" in s.stdout
        # Binary output byte for byte; `lab ssh`'s own failure (here its timeout) is 255, as
        # ssh's is, never confused with the command's status.
        raw = subprocess.run([sys.executable, "-m", "lab", "ssh", "--run", str(out), "l0", "--",
                              "printf '\\377\\000\\001\\r\\n'"], cwd=ROOT,
                             capture_output=True, timeout=60)
        assert raw.returncode == 0 and raw.stdout == b"\xff\x00\x01\r\n", raw
        t = lab("ssh", "--run", str(out), "--timeout", "2", "l0", "--", "sleep 30")
        assert t.returncode == 255 and "did not finish" in t.stderr, t.stderr
        script = tmp_path / "probe.sh"
        script.write_text("#!/bin/sh\necho uploaded-ran $(hostname)\n")
        script.chmod(0o755)
        lab("cp", "--run", str(out), str(script), "l0:/root/probe.sh", check=True)
        s = lab("ssh", "--run", str(out), "l0", "--", "/root/probe.sh", check=True)
        assert "uploaded-ran l0" in s.stdout
        lab("cp", "--run", str(out), "l0:/proc/cmdline", str(tmp_path / "cmdline"), check=True)
        assert "lab.level=l0" in (tmp_path / "cmdline").read_text()
    finally:
        d = lab("down", "--run", str(out), timeout=120)
    assert d.returncode == 0, d.stderr
    assert gone(state["sock_dir"], timeout=10)
    assert json.loads((out / "state.json").read_text())["status"] == "down"
    bad = lab("ssh", "--run", str(out), "l0", "--", "true")
    assert bad.returncode == 2 and "not up" in bad.stderr


def test_up_hold_waits_for_the_debugger(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("up", "--hold", "playbooks/smoke.yaml", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        state = json.loads((out / "state.json").read_text())
        assert state["status"] == "held" and "gdb -x" in r.stdout + r.stderr
        assert (out / "l0.console.log").read_text() == ""  # no CPU has run yet
        g = subprocess.run(["gdb", "-batch", "-x", str(out / "gdbinit"), "-ex",
                            "hbreak start_kernel", "-ex", "continue", "-ex", "detach"],
                           capture_output=True, text=True, timeout=300)
        assert "start_kernel" in g.stdout, g.stdout + g.stderr
        wait_state(out, "up", timeout=180)
        s = lab("ssh", "--run", str(out), "l0", "--", "uname", "-r", check=True)
        assert s.stdout.strip()
    finally:
        lab("down", "--run", str(out), timeout=120)


HOLD = """\
name: hold
topology:
  l0: {image: %s}
probes:
  - name: first-vcpu-run
    at: kvm_arch_vcpu_ioctl_run
    capture: {vcpu_id: vcpu->vcpu_id}
    max_hits: 1
    then: stop
"""


def test_probe_keeps_l0_stopped_for_a_person(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("up", str(playbook(tmp_path, HOLD)), "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        # Anything that runs a KVM guest in L0 hits the probe; the command then waits with L0.
        bg = subprocess.Popen([sys.executable, "-m", "lab", "ssh", "--run", str(out), "l0", "--",
                               "svm-npt-test", "-n", "2", "remap-flush-all"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 120
        state: dict[str, object] = {}
        while time.monotonic() < end and not state.get("held"):
            time.sleep(0.2)
            state = json.loads((out / "state.json").read_text())
        assert state.get("held"), state
        assert bg.poll() is None  # L0 is stopped, so the command cannot finish
        g = subprocess.run([sys.executable, "-m", "lab", "gdb", "--run", str(out)], cwd=ROOT,
                           input="bt 1\nprint vcpu->vcpu_id\ncontinue\n", capture_output=True,
                           text=True, timeout=120)
        assert g.returncode == 0, g.stderr
        assert "kvm_arch_vcpu_ioctl_run" in g.stdout and "= 0" in g.stdout, g.stdout
        assert "L0 runs on" in g.stdout
        o, e = bg.communicate(timeout=120)
        assert bg.returncode == 0 and "ok 1 - svm/remap-flush-all" in o, o + e
        state = json.loads((out / "state.json").read_text())
        assert state.get("held") is None
    finally:
        lab("down", "--run", str(out), timeout=120)
    rep = report(out)
    hits = rep["probes"][0]["hits"]
    assert len(hits) == 1 and hits[0]["captures"]["entry"]["vcpu_id"] == 0


KASLR = """\
name: kaslr
topology:
  l0: {image: %s, kaslr: true}
probes:
  - name: vcpu-run
    at: kvm_arch_vcpu_ioctl_run
    capture: {vcpu_id: vcpu->vcpu_id, text: "(unsigned long)&_text"}
    max_hits: 1
steps:
  - name: run a KVM guest in L0
    run: svm-npt-test -n 2 remap-flush-all; vmx-ept-test -n 2 remap-invept-single
  - name: where the kernel was put
    run: grep -m1 ' _text$' /proc/kallsyms
"""


def test_probes_work_with_kaslr(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = lab("run", str(playbook(tmp_path, KASLR)), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = report(out)
    runtime_text = int(rep["steps"][1]["stdout"].split()[0], 16)
    assert rep["probe_setup"]["kaslr_offset"] == runtime_text - 0xFFFFFFFF81000000
    hits = rep["probes"][0]["hits"]
    assert len(hits) == 1, rep["probes"]
    cap = hits[0]["captures"]["entry"]
    assert cap["vcpu_id"] == 0 and cap["text"] == runtime_text  # gdb's symbols relocated
    gdbinit = (out / "gdbinit").read_text()
    offset = rep["probe_setup"]["kaslr_offset"]
    assert f"-o {offset:#x}" in gdbinit or offset == 0


TRACED = """\
name: traced
probe_backend: tracefs
topology:
  l0: {image: %s}
probes:
  - name: exits
    at: nested_svm_vmexit
    capture: {nested_cr3: svm->nested.ctl.nested_cr3, roots: guest_mmu(&svm->vcpu)}
    max_hits: 50
  - name: not-traceable
    at: kvm_mmu_sync_roots
    if: vcpu->arch.mmu == &vcpu->arch.guest_mmu
    capture: {roots: guest_mmu(vcpu)}
  - name: one-cr3
    at: nested_svm_vmexit
    if: svm->nested.ctl.nested_cr3 == 0xc000 && svm->vcpu.vcpu_id < 1
    capture: {nested_cr3: svm->nested.ctl.nested_cr3}
    max_hits: 50
steps:
  - {name: bare-metal L1 with two nested CR3s, run: svm-npt-test -n 5 cached-root}
"""


def test_tracefs_probe_backend(tmp_path: Path) -> None:
    skip_on_vmx_host("the traced function is SVM's; this host runs VMX")
    out = tmp_path / "run"
    r = lab("run", str(playbook(tmp_path, TRACED)), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = report(out)
    assert rep["probe_backend"] == "tracefs"
    assert any("+0x" in e for e in rep["probe_setup"]["kprobe_events"])  # offsets from DWARF
    exits, refused, filtered = rep["probes"]
    assert "not two fields" in refused["error"] and not refused["hits"]
    # A condition of a field and a number is the event's filter: only that CR3 comes back.
    assert filtered["error"] is None and filtered["hits"]
    assert {h["captures"]["entry"]["nested_cr3"] for h in filtered["hits"]} == {0xC000}
    assert exits["error"] is None and exits["hits"]
    pgds = set()
    for h in exits["hits"]:
        cap = h["captures"]["entry"]
        assert cap["roots"]["active"] is True
        assert cap["roots"]["current"]["pgd"] == cap["nested_cr3"]
        pgds.add(cap["nested_cr3"])
    assert len(pgds) == 2  # the two nested CR3s of the cached-root case
    # the other root is kept among the previous ones, valid
    assert any(p["valid"] and p["pgd"] in pgds for h in exits["hits"]
               for p in h["captures"]["entry"]["roots"]["previous"])


def test_image_built_without_debug_symbols_gets_them_when_asked(tmp_path: Path) -> None:
    # As if `lab images build --no-debug` had made it: the next build that wants the symbols
    # (every `lab run`) must fetch them rather than hand the probes an image without them.
    out = lab("images", "build", "default", check=True).stdout.split()[1]
    manifest = Path(out) / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["debug"], m
    m["debug"] = None
    manifest.write_text(json.dumps(m))
    r = lab("images", "build", "default", check=True)
    assert r.stdout.split()[1] == out
    m = json.loads(manifest.read_text())
    assert m["debug"] and Path(m["debug"]["vmlinux"]).exists()


CALLER_FRAME = """\
name: caller-frame
topology:
  l0: {image: %s}
probes:
  - name: unload
    at: kvm_mmu_free_roots
    if: $_caller_is("kvm_mmu_unload", 1)
    capture: {roots_to_free: roots_to_free, vcpu_id: vcpu->vcpu_id}
    max_hits: 2
  - name: anywhere
    at: kvm_mmu_free_roots
    capture: {vcpu_id: vcpu->vcpu_id}
    max_hits: 1
steps:
  - {name: a VM comes and goes, run: svm-npt-test -n 2 cached-root}
"""


def test_gdb_probe_captures_the_callers_variables(tmp_path: Path) -> None:
    """A probe on X `if: $_caller_is("F", 1)` may capture F's variables (the VMX set does:
    handle_invept's INVEPT type at its call of kvm_mmu_free_roots); other probes may not."""
    skip_on_vmx_host("svm-npt-test runs no VM on VMX hosts")
    out = tmp_path / "run"
    r = lab("run", str(playbook(tmp_path, CALLER_FRAME)), "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    probes = {p["name"]: p for p in report(out)["probes"]}
    hits = probes["unload"]["hits"]
    assert hits and all(h["captures"]["entry"]["vcpu_id"] == 0 for h in hits)
    assert all(h["captures"]["entry"]["roots_to_free"] == (1 << 64) - 1 for h in hits)
    other = probes["anywhere"]["hits"][0]["captures"]["entry"]["vcpu_id"]
    assert isinstance(other, dict) and "vcpu" in other.get("error", ""), other
