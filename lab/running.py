"""Commands on a running lab: `lab up` (start one in the background and wait until it is
up), `lab ssh`, `lab cp`, `lab gdb`, `lab down`; and the supervisor loop behind `lab up`.

These commands run in their own processes: they know the lab only by its record
(RUN/state.json, lab/access.py) and reach its levels the way a person would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lab import access, alerts, playbook, procs, suite
from lab.deadline import wait_until
from lab.driver import Inputs, new_run_dir
from lab.errors import EXIT_INFRA, CommandTimeout, LabError, SSHError, UsageError
from lab.probes import held
from lab.profiles import get_profile
from lab.ssh import SSHSession

if TYPE_CHECKING:
    from lab.lab import Lab

log = logging.getLogger(__name__)
EXIT_SSH = 255  # `lab ssh` could not run the command (as OpenSSH's ssh)


def serve_until_stopped(lab: Lab) -> None:
    """`lab up`'s supervisor, once the lab is up: keep it so until `lab down` (SIGTERM),
    and say in its record what changes meanwhile."""
    lab.record.ready = True  # booted and probes armed: `lab up` may return now
    lab.publish("up")
    log.info(f"lab {lab.id} is up; `lab down --run {lab.run_dir}` stops it")
    while True:
        time.sleep(0.5)
        lab.report_events(settled=2.0)  # reports that have arrived: completed and decoded
        if lab.rig.gdbstub_released():
            log.info("probes finished and detached; `lab gdb` can attach")
        try:
            lab.check()
        except LabError as e:
            # Keep the lab for a person to look at (gdb, consoles); say so in its record.
            # Each kernel event is in the record already (and its alert comes with the next
            # command a person runs on the lab).
            if lab.record.problem is None:
                lab.record.problem = str(e).splitlines()[0]
                lab.publish()
                log.error(f"problem: {e}")
            if lab.vm is None or not lab.vm.alive():
                raise



def up(args: argparse.Namespace) -> int:
    if suite.is_suite(Path(args.playbook)):
        raise UsageError(f"{args.playbook}: a suite runs with `lab run`, not `lab up`")
    pb = playbook.load(Path(args.playbook))  # bad input fails here, before anything starts
    if args.profile:
        get_profile(args.profile)
    run_dir = new_run_dir(args.out, pb.name)
    (run_dir / "state.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lab", "_serve", str(Path(args.playbook).resolve()),
           "--out", str(run_dir)]
    if args.profile:
        cmd += ["--profile", args.profile]
    inputs = Inputs.from_namespace(args)
    inputs.check(pb)
    cmd += inputs.argv()
    if args.hold:
        cmd.append("--hold")
    if args.cold:
        cmd.append("--cold")
    with open(run_dir / "lab.log", "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, cwd=os.getcwd())
    log.info(f"starting the lab in the background (pid {proc.pid}); log: {run_dir}/lab.log")
    last_size = 0
    try:
        while True:
            time.sleep(0.2)
            with contextlib.suppress(OSError):  # relay the supervisor's progress
                data = (run_dir / "lab.log").read_bytes()
                if len(data) > last_size:
                    sys.stderr.write(data[last_size:].decode(errors="replace"))
                    last_size = len(data)
            st = {}
            with contextlib.suppress(UsageError):
                st = access.read_state(run_dir)
            status = st.get("status")
            if args.hold and status == "held":
                break
            if status == "up" and st.get("ready"):
                break
            if proc.poll() is not None or status in ("down", "error"):
                proc.wait()
                err = st.get("error") or {}
                print(f"lab: error: the lab did not come up: {err.get('message', 'see lab.log')}",
                      file=sys.stderr)
                return int(err.get("exit_status", EXIT_INFRA))
    except KeyboardInterrupt:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        return EXIT_INFRA
    print(f"lab is up: {run_dir}")
    for name, lv in st["levels"].items():
        print(f"  {name}: lab ssh {name}    or    ssh -F {run_dir}/ssh_config {name}"
              + (f"  (via {lv['via']})" if lv.get("via") else ""))
    print(f"  consoles: {run_dir}/<level>.console.log")
    if st.get("gdb_socket"):
        print(f"  gdb:      lab gdb    or    gdb -x {run_dir}/gdbinit   (L0's gdbstub, "
              f"unix socket {st.get('gdb_socket')})")
    else:
        print(f"  gdb:      none: profile {st.get('profile')} has no gdbstub (probes trace "
              "inside L0)")
    if status == "held":
        print("  L0's CPUs are held: `continue` in gdb boots it")
    print(f"  stop:     lab down --run {run_dir}")
    return 0


def gdb(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    st = access.read_state(run_dir)
    alerts.tell(run_dir, st)
    if st.get("status") not in ("up", "held", "booting"):
        raise UsageError(f"{run_dir}: the lab is {st.get('status')}, not up")
    if st.get("gdbstub_owner") == "probes" and st.get("held"):
        try:
            return held.client(Path(str(st["sock_dir"])) / "gdb-console")
        except held.NotServing as e:
            raise UsageError(f"{run_dir}: L0 is held but its gdb console does not answer: "
                             f"{e}") from None
    if st.get("gdbstub_owner") == "probes":
        # QEMU's gdbstub takes one debugger at a time.
        raise UsageError(f"{run_dir}: L0's gdbstub is held by the playbook's probes until they "
                         f"finish; try again when `lab` reports them detached")
    if not st.get("gdb_socket"):
        raise UsageError(f"{run_dir}: profile {st.get('profile')} has no gdbstub to attach "
                         "to (its probes trace inside L0: probe_backend tracefs)")
    if not (run_dir / "gdbinit").exists():
        raise UsageError(f"{run_dir}: no gdbinit (the image has no debug symbols)")
    extra = args.gdb_args[1:] if args.gdb_args[:1] == ["--"] else args.gdb_args
    os.execvp("gdb", ["gdb", "-q", "-x", str(run_dir / "gdbinit"), *extra])
    return 0  # not reached


def down(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    st = access.read_state(run_dir)
    owner = int(st.get("owner_pid") or 0)
    # Only the process that runs this lab: its pid and its start time, as it recorded them
    # (a pid alone may belong to someone else's process by now).
    if owner and procs.alive(owner) and st.get("owner_start") is not None \
            and procs.start_time(owner) == st.get("owner_start"):
        os.kill(owner, signal.SIGTERM)
        if not wait_until(lambda: not procs.alive(owner), 60):
            os.kill(owner, signal.SIGKILL)  # QEMU dies with it (parent-death signal)
            wait_until(lambda: not procs.alive(owner), 10)
    qpid = st.get("qemu_pid")
    if qpid and procs.alive(int(qpid)) and any(st.get("sock_dir", "//") in a
                                              for a in procs.cmdline(int(qpid))):
        os.kill(int(qpid), signal.SIGKILL)
    for line in procs.Registry().reap():
        log.info(line)
    print(f"lab {run_dir} is down")
    return 0


# -- reaching a running lab ------------------------------------------------------------------
def _sessions(run_dir: Path, level: str) -> list[SSHSession]:
    st = access.read_state(run_dir)
    alerts.tell(run_dir, st)
    if st.get("status") not in ("up", "booting"):
        raise UsageError(f"{run_dir}: the lab is {st.get('status')}, not up")
    levels = st["levels"]
    if level not in levels:
        raise UsageError(f"level {level!r} is not in this lab (expected one of "
                         f"{', '.join(levels)})")
    dead = alerts.crashed(st, level)
    if dead:
        raise SSHError(f"{dead}; see {run_dir}/{level}.console.log and `lab status`",
                       level=level)
    sessions: list[SSHSession] = []
    for name in reversed(access.chain(levels, level)):
        lv = levels[name]
        s = SSHSession(name, int(lv["port"]), Path(st["key_file"]), lv["host_key"],
                       via=sessions[-1] if sessions else None)
        s.connect(time.monotonic() + 30)
        sessions.append(s)
    return sessions


def ssh(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    cmd = [c for c in args.command if c != "--"] if args.command else []
    if not cmd:
        # An interactive shell wants the real OpenSSH client and a terminal.
        os.execvp("ssh", ["ssh", "-F", str(run_dir / "ssh_config"), args.level])
    try:
        sessions = _sessions(run_dir, args.level)
        try:
            # Output goes out as it comes, byte for byte (binary included), nothing kept.
            r = sessions[-1].run(" ".join(cmd), timeout=args.timeout, keep=0,
                                 sinks=(sys.stdout.buffer, sys.stderr.buffer))
        finally:
            sys.stdout.buffer.flush()
            sys.stderr.buffer.flush()
            for s in reversed(sessions):
                s.close()
    except (SSHError, CommandTimeout) as e:
        # Our own failure, told apart from the command's status as ssh does: 255.
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_SSH
    return int(r.exit_status)


def status(args: argparse.Namespace) -> int:
    """`lab status`: the lab's levels and every kernel event so far (alerts first)."""
    run_dir = access.find_run(args.run)
    st = access.read_state(run_dir)
    if args.json:
        print(json.dumps({k: st.get(k) for k in ("id", "status", "playbook", "profile",
                                                 "problem", "levels", "events")}, indent=1))
        return 0
    alerts.tell(run_dir, st)
    print(alerts.status_text(run_dir, st))
    return 0


def cp(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    src, dst = args.src, args.dst

    def remote(s: str) -> tuple[str, str] | None:
        lvl, sep, path = s.partition(":")
        return (lvl, path) if sep and lvl in ("l0", "l1", "l2") else None

    rs, rd = remote(src), remote(dst)
    if bool(rs) == bool(rd):
        raise UsageError("lab cp: exactly one of SRC and DST must be LEVEL:PATH")
    remote_end = rs or rd
    assert remote_end is not None
    level = remote_end[0]
    try:
        sessions = _sessions(run_dir, level)
    except SSHError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_SSH
    try:
        s = sessions[-1]
        if rd:
            local = Path(src)
            if not local.is_file():
                raise UsageError(f"lab cp: {src}: no such file")
            target = rd[1] or f"/root/{local.name}"
            if target.endswith("/"):
                target += local.name
            s.put(local, target)
            print(f"{src} -> {level}:{target}")
        else:
            assert rs is not None
            local_dst = Path(dst)
            if local_dst.is_dir():  # `lab cp l2:/path .`, as cp does
                local_dst = local_dst / Path(rs[1]).name
            s.get(rs[1], local_dst)
            print(f"{level}:{rs[1]} -> {local_dst}")
    finally:
        for x in reversed(sessions):
            x.close()
    return 0
