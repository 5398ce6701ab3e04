"""Warm starts, as the lab does them: save the whole chain once it is up, restore it into a
fresh L0 when the very same boot is asked for again, and prove every level is the saved one.

lab/snapshot.py keeps the saved labs (the cache, the QMP migration); this module is the lab's
side: what makes two boots the same (the key), what a restored level must show (its identity),
and what a restore must survive before it counts (the settle check).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import snapshot
from lab.errors import LabError
from lab.machines import nested
from lab.machines.qemu import QemuVM, build_command, l0_spec

if TYPE_CHECKING:
    from lab.lab import Lab

log = logging.getLogger(__name__)

RESTORE_BUDGET = 60.0  # seconds (x host speed factor) for every level to answer after a restore
SETTLE_S = 1.5  # after a restore, every level must still answer this much later

# One command per level: which boot this is (boot_id), and the SSH server init started
# at boot (pid and start time): a restored level must show the very same ones.
_IDENTITY = ("cat /proc/sys/kernel/random/boot_id; for p in $(pidof dropbear); do "
             "echo \"$p $(cut -d' ' -f22 /proc/$p/stat)\"; done | sort -k2n | head -1")


def unavailable(lab: Lab) -> str | None:
    """Why this lab can neither restore nor save a saved lab (None: it can)."""
    if lab.pb.snapshot == "off":
        return "the playbook says snapshot: off"
    if lab.profile.machine != "qemu":
        # Bochs 2.7 saves its state only from its GUI's toolbar or configuration dialog,
        # neither of which can be driven without a display (`-r` restores; nothing saves).
        return f"profile {lab.profile.name}: L0 under Bochs is not saved"
    if lab.hold:
        return "--hold: L0 waits for a debugger"
    return None


def key(lab: Lab) -> str:
    """Everything that shapes the boot, with the parts that differ per run (ports, socket
    paths) left out: equal keys boot the very same chain."""
    req = lab.l0_request()
    req.sock_dir = Path("/SOCK")
    spec = l0_spec(req, ssh_port=0)
    return snapshot.key_of({
        "profile": lab.profile.name,
        "qemu": snapshot.qemu_identity(spec.binary),
        "l0": build_command(spec),
        "nested": {n: build_command(lab.nested_spec(n)) for n in lab.levels if n != "l0"},
        "images": {n: st.image.dir.name for n, st in lab.levels.items() if st.image},
    })


def _identity(lab: Lab, name: str, prefix: str = "") -> dict[str, Any]:
    ssh = lab.levels[name].ssh
    assert ssh is not None
    r = ssh.run(prefix + _IDENTITY, timeout=60, check=lab.check)
    lines = r.stdout.split()
    if r.exit_status != 0 or len(lines) < 3:
        raise snapshot.SnapshotError(f"{name}: cannot read its identity: {r.stdout!r} "
                                     f"{r.stderr!r}", level=name)
    return {"boot_id": lines[0], "sshd_pid": int(lines[1]), "sshd_start": int(lines[2])}


def save(lab: Lab, key: str) -> None:
    """Save L0 whole while every level is up and nothing has run yet, then go on."""
    vm = lab.vm
    assert isinstance(vm, QemuVM) and vm.qmp is not None
    boot = lab.report.boot
    t = time.monotonic()
    ids = {n: _identity(lab, n) for n in lab.levels}
    timelines = {n: dict(st.timeline) for n, st in lab.levels.items()}
    lab.close_sessions()  # no half-open SSH connection goes into the saved lab
    vm.qmp.execute("stop")
    try:
        boot["save_stops"] = stop_halted(vm.qmp)
        saved: snapshot.SavedLab | None = snapshot.save(vm.qmp, lab.cache, key, {
            "levels": ids, "cold_timeline": timelines,
            "playbook": str(lab.pb.path), "profile": lab.profile.name,
            "host_speed": lab.report.host_speed})
    except LabError as e:
        log.warning(f"could not save the lab for a warm start: {e}")
        boot.update(saved=None, why_not_saved=str(e).splitlines()[0])
        saved = None
    finally:
        vm.qmp.execute("cont")
    deadline = time.monotonic() + lab.boot_budget()
    for name in lab.levels:
        lab.connect(name, deadline, record=False)
    if saved is not None:
        boot.update(saved=saved.key, save_s=saved.meta["save_s"], bytes=saved.meta["bytes"],
                    seconds=round(time.monotonic() - t, 3))
        log.info(f"saved the lab as {saved.key} ({saved.meta['bytes'] >> 20} MiB in "
                 f"{saved.meta['save_s']:.1f} s): later runs of this topology start warm")


HALT_TRIES = 60  # 1 to 7 stops were needed in the runs measured; ~4 s in all


def stop_halted(qmp: Any, tries: int = HALT_TRIES) -> int:
    """Leave L0 stopped while its vCPU is halted, and say how many stops that took.

    Under TCG, QEMU saves a vCPU that is running a nested guest (L1 or L2, in SVM's guest
    mode) but cannot load it back ("vCPU set in guest-mode inconsistent with migrated kernel
    nested state": the nested state it checks exists only under KVM). A halted L0 vCPU is in
    its own mode (KVM intercepts its guests' HLT), and an idle chain halts L0 most of the
    time: stop, look, and let it run a moment until it is.
    """
    for attempt in range(tries):
        regs = qmp.execute("human-monitor-command", **{"command-line": "info registers"})
        if re.search(r"\bHLT=1\b", str(regs)):
            return attempt
        qmp.execute("cont")
        time.sleep(0.01 + 0.002 * attempt)
        qmp.execute("stop")
    raise LabError(f"L0's vCPU was never halted in {tries} stops (the chain is busy): a save "
                   "now could not be restored")


def restore(lab: Lab, saved: snapshot.SavedLab) -> None:
    """Start L0's QEMU waiting for the saved stream, feed it, and reach every level."""
    st = lab.levels["l0"]
    t = time.monotonic()
    lab.launch_l0(incoming=True)
    vm = lab.vm
    assert isinstance(vm, QemuVM) and vm.qmp is not None
    restore_s = snapshot.restore(vm.qmp, saved)
    vm.qmp.execute("cont")
    running = lab.now()
    for n, lv in lab.levels.items():
        lv.timeline = {"launch": st.timeline["launch"], "restored": running}
        if n != "l0":
            lv.ssh_port = nested.CHILD_SSH_PORT
    # The guests' clocks stood still while the lab was saved: step them to the host's.
    step = f"date -s @{int(time.time())} >/dev/null 2>&1; "
    # A restored level answers within seconds, or it never will: fail over to a cold
    # boot soon rather than after a whole boot budget.
    deadline = time.monotonic() + RESTORE_BUDGET * lab.speed.factor
    ids: dict[str, dict[str, Any] | Exception] = {}

    def identify(name: str) -> None:
        try:
            ids[name] = _identity(lab, name, prefix=step)
        except Exception as e:  # re-raised below, in this thread
            ids[name] = e

    # Each level's identity check runs while the next level's SSH session opens (one
    # connection, several channels): the chain answers a round trip per level sooner.
    checks = []
    for name in lab.levels:
        lab.connect(name, deadline)
        th = threading.Thread(target=identify, args=(name,), daemon=True)
        th.start()
        checks.append(th)
    for th in checks:
        th.join(timeout=max(deadline - time.monotonic(), 1.0))
    for name in lab.levels:
        got = ids.get(name)
        if isinstance(got, Exception):
            raise got
        want = saved.meta["levels"][name]
        if got is None or got["boot_id"] != want["boot_id"] or \
                got["sshd_start"] != want["sshd_start"]:
            raise snapshot.SnapshotError(f"{name}: not the saved level (boot {got} after "
                                         f"restore, {want} when saved)", level=name)
        lab.report.levels[name]["restored"] = {**got, "same_as_saved": True}
    _settled(lab, deadline)
    lab.report.boot = {"mode": "warm", "saved": saved.key,
                       "saved_at": saved.meta.get("saved"), "restore_s": restore_s,
                       "seconds": round(time.monotonic() - t, 3),
                       "bytes": saved.meta.get("bytes")}
    if saved.meta.get("host_speed") and not lab.report.host_speed:
        lab.report.host_speed = {**saved.meta["host_speed"], "measured": "when saved"}
    log.info(f"restored saved lab {saved.key}: L0 running after {restore_s:.1f} s, every "
             f"level answering {time.monotonic() - t:.1f} s after launch")


def _settled(lab: Lab, deadline: float) -> None:
    """Every level still answers a moment after the restore and the clock steps.

    Seen twice in CI (never alone): right after a restore, L1 spinning for good in
    native_queued_spin_lock_slowpath (1 vCPU, interrupts off: no watchdog line), so that
    its next session never opens. A restore that leaves a level like that is worth no
    more than a cold boot; the saved lab is kept (the next restore of it was fine).
    """
    time.sleep(SETTLE_S)
    for name, st in lab.levels.items():
        assert st.ssh is not None
        try:
            r = st.ssh.run("true", timeout=max(min(deadline - time.monotonic(), 20.0), 5.0)
                           * lab.speed.factor, check=lab.check)
        except LabError as e:
            err = snapshot.SnapshotError(f"{name} stopped answering after the restore: "
                                         f"{str(e).splitlines()[0]}", level=name)
            err.keep = True
            raise err from None
        if r.exit_status != 0:
            raise snapshot.SnapshotError(f"{name}: `true` exited {r.exit_status} after the "
                                         "restore", level=name)


def boot(lab: Lab, cold_boot: Callable[[], None]) -> None:
    """Bring every level up: restored from a saved lab when there is one for exactly this
    boot (warm), else by `cold_boot()` and then saved for the next run."""
    why_not = unavailable(lab)
    saved = None
    k = ""
    if why_not is None:
        k = key(lab)
        saved = snapshot.find(lab.cache, k)
        if saved is not None and lab.cold:
            why_not, saved = f"--cold; saved lab {saved.key} is already there", None
    if saved is not None:
        try:
            restore(lab, saved)
        except LabError as e:
            # A saved lab that does not come back is rebuilt, never fatal.
            keep = getattr(e, "keep", False)
            log.warning(f"saved lab {saved.key} did not restore ({str(e).splitlines()[0]}); "
                        f"{'booting cold' if keep else 'discarding it and booting cold'}")
            if not keep:
                snapshot.discard(saved)
            lab.reset_levels()
            saved = None
            lab.report.boot = {"restore_failed": str(e).splitlines()[0]}
    if saved is None:
        cold_boot()
        lab.report.boot = {"mode": "cold", **lab.report.boot}
        if why_not is None:
            save(lab, k)
        else:
            lab.report.boot.update(saved=None, why_not_saved=why_not)
