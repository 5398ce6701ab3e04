"""The `lab` command line. Exit statuses: 0 passed, 1 a step failed, 2 bad input or usage,
3 infrastructure failure (boot, SSH, QEMU, crash, timeout)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from lab import access, doctor, playbook, procs, suite
from lab.cache import cache_root
from lab.errors import EXIT_INFRA, EXIT_USAGE, Aborted, LabError, UsageError
from lab.profiles import PROFILES, Profile, get_profile
from lab.report import Report, summary


def _log(msg: str) -> None:
    print(f"[lab {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def _raise_aborted(signum: int, frame: FrameType | None) -> None:
    raise Aborted(f"stopped by signal {signal.Signals(signum).name}")


def _install_signal_handlers() -> None:
    # SIGTERM and SIGHUP unwind like Ctrl-C, so every context manager tears its part down.
    signal.signal(signal.SIGTERM, _raise_aborted)
    signal.signal(signal.SIGHUP, _raise_aborted)


def resolve_profile(name: str) -> Profile:
    if name == "auto":
        rep = doctor.probe(versions=False)
        if rep.profile is None:
            raise LabError(f"no profile can run on this host: {rep.profile_reason}")
        return get_profile(rep.profile)
    profile = get_profile(name)
    if profile.machine == "bochs":
        rep = doctor.probe(versions=False)
        if not rep.bochs_can_run:
            missing = {**rep.missing, **rep.bochs_missing}
            raise LabError(f"profile {name} cannot run on this host: missing "
                           f"{', '.join(sorted(missing))} (apt-get install -y "
                           f"{' '.join(sorted(set(missing.values())))})")
    return profile


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{name}"


def _new_run_dir(out: str | None, name: str) -> Path:
    d = Path(out) if out else default_run_dir(name)
    d = d.resolve()
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Keys, ssh_config and gdbinit go in here and are used from here: this user's only.
        procs.private_dir(d, "the run directory")
    except procs.UnsafeDirectory as e:
        raise UsageError(str(e)) from None
    if (d / "state.json").exists():
        st = access.read_state(d)
        if st.get("status") in ("up", "booting") and procs.alive(int(st.get("owner_pid", 0))):
            raise UsageError(f"--out {d}: a lab is running there; `lab down --run {d}` first")
    return d


# -- doctor / images ---------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    rep = doctor.probe()
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(doctor.format_report(rep))
    return 0 if rep.can_run else EXIT_INFRA


def cmd_images_build(args: argparse.Namespace) -> int:
    from lab.image import Builder, load_recipe

    images = Path(args.images_dir)
    names = args.names or sorted(p.stem for p in images.glob("*.yaml"))
    if not names:
        raise UsageError(f"{images}: no image recipes (*.yaml)")
    builder = Builder(cache_root(), log=_log)
    for name in names:
        # A name from the images directory, or a recipe's path.
        path = Path(name) if name.endswith(".yaml") else images / f"{name}.yaml"
        if not path.exists():
            raise UsageError(f"image {name!r}: no recipe {path}")
        name = path.stem
        tree = Path(args.kernel_tree) if args.kernel_tree else None
        t = time.monotonic()
        img = builder.build(load_recipe(path, kernel_tree=tree), with_debug=not args.no_debug)
        k = img.manifest["kernel"]
        print(f"{name}: {img.dir} (kernel {k['release']}, {k['source']}; "  # type: ignore[index]
              f"{time.monotonic() - t:.2f} s)")
    return 0


# -- run / up / down -----------------------------------------------------------------------
def _kernel_tree(args: argparse.Namespace) -> Path | None:
    tree = Path(args.kernel_tree).resolve() if args.kernel_tree else None
    if tree is not None and not tree.is_dir():
        raise UsageError(f"--kernel-tree {args.kernel_tree}: not a directory")
    return tree


def _execute(args: argparse.Namespace, serve: bool) -> int:
    t0 = time.monotonic()
    path = Path(args.playbook)
    if not serve and suite.is_suite(path):
        return _run_suite(args, path)
    pb = playbook.load(path)
    profile = resolve_profile(args.profile or pb.profile)
    run_dir = Path(args.out).resolve() if serve else _new_run_dir(args.out, pb.name)
    rep = _run_playbook(pb, run_dir, profile, _kernel_tree(args), args, serve, t0)
    print(summary(rep), file=sys.stderr if serve else sys.stdout)
    return rep.exit_status


def _run_suite(args: argparse.Namespace, path: Path) -> int:
    t0 = time.monotonic()
    s = suite.load(path)  # validates every playbook before anything boots
    tree = _kernel_tree(args)
    run_dir = _new_run_dir(args.out, s.name)
    runs = []
    for i, entry in enumerate(s.entries):
        pb = playbook.load(entry.playbook)
        profile = resolve_profile(args.profile or pb.profile)
        sub_dir = run_dir / f"{i + 1:02d}-{pb.name}"
        sub_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _log(f"suite {s.name}: [{i + 1}/{len(s.entries)}] {pb.name} (expect {entry.expect})")
        rep = _run_playbook(pb, sub_dir, profile, tree, args, False, time.monotonic())
        print(summary(rep))
        runs.append((entry, sub_dir, rep.to_dict()))
        if rep.error and rep.error.get("kind") == "aborted":
            break
    code = suite.write(s, run_dir, runs, time.monotonic() - t0)
    for entry, _, r in runs:
        met, why = suite.outcome(entry.expect, r)
        print(f"  {'met ' if met else 'NOT '} {entry.playbook.name}: {why}")
    print(f"{s.name}: {'PASSED' if code == 0 else 'FAILED'} (exit {code}); "
          f"{run_dir}/junit.xml, {run_dir}/report.html")
    return code


def _run_playbook(pb: playbook.Playbook, run_dir: Path, profile: Profile, tree: Path | None,
                  args: argparse.Namespace, serve: bool, t0: float) -> Report:
    from lab.lab import Lab, error_dict

    lab = Lab(pb, run_dir, profile, cache_root(), kernel_tree=tree,
              hold=getattr(args, "hold", False), cold=args.cold, log=_log)
    rep = lab.report
    rep.phases["validate"] = round(time.monotonic() - t0, 3)
    phase = "build"
    try:
        with lab:
            t = time.monotonic()
            lab.build()
            rep.phases["build"] = round(time.monotonic() - t, 3)
            phase, t = "boot", time.monotonic()
            lab.boot()
            rep.phases["boot"] = round(time.monotonic() - t, 3)
            if pb.probes or pb.inject:
                phase, t = "probes", time.monotonic()
                lab.start_probes()
                rep.phases["probes_attach"] = round(time.monotonic() - t, 3)
            if serve:
                phase = "up"
                _serve_until_stopped(lab)
            else:
                phase, t = "steps", time.monotonic()
                lab.run_steps()
                rep.phases["steps"] = round(time.monotonic() - t, 3)
            phase, t = "teardown", time.monotonic()
            lab.stop_probes()
            rep.phases["probes_detach"] = round(time.monotonic() - t, 3)
            t = time.monotonic()
            lab.teardown()
            rep.phases["teardown"] = round(time.monotonic() - t, 3)
    except KeyboardInterrupt:
        rep.error = error_dict(Aborted("interrupted (Ctrl-C)"))
    except Aborted as e:
        rep.error = None if (serve and phase == "up") else error_dict(e)
    except LabError as e:
        rep.error = error_dict(e)
        rep.error["phase"] = phase
    except Exception as e:  # a bug of ours: still tear down and report, never a traceback
        import traceback

        rep.error = error_dict(e)
        rep.error["phase"] = phase
        rep.error["detail"] = traceback.format_exc()
    finally:
        lab.teardown()
        rep.phases["total"] = round(time.monotonic() - t0, 3)
        rep.logs = lab.logs()
        rep.finish()
        rep.write(run_dir)
        if serve:
            st = lab.state("down" if rep.error is None else "error")
            st["error"] = rep.error
            access.write_state(run_dir, st)
    return rep


def _serve_until_stopped(lab: object) -> None:
    from lab.lab import Lab

    assert isinstance(lab, Lab)
    lab.ready = True  # booted and probes armed: `lab up` may return now
    access.write_state(lab.run_dir, lab.state("up"))
    _log(f"lab {lab.id} is up; `lab down --run {lab.run_dir}` stops it")
    reported = False
    while True:
        time.sleep(0.5)
        if lab.probes is not None and lab.probes.detached and lab.gdbstub_owner == "probes":
            # The probes are done with L0's gdbstub: a person's gdb may have it now.
            lab.gdbstub_owner = "free"
            access.write_state(lab.run_dir, lab.state("up"))
            _log("probes finished and detached; `lab gdb` can attach")
        try:
            lab.check()
        except LabError as e:
            # Keep the lab for a person to look at (gdb, consoles); say so in state.json.
            if not reported:
                st = lab.state("up")
                st["problem"] = str(e).splitlines()[0]
                access.write_state(lab.run_dir, st)
                _log(f"problem: {e}")
                reported = True
            if lab.vm is None or lab.vm.proc is None or lab.vm.proc.poll() is not None:
                raise


def cmd_run(args: argparse.Namespace) -> int:
    _install_signal_handlers()
    return _execute(args, serve=False)


def cmd_serve(args: argparse.Namespace) -> int:
    _install_signal_handlers()
    signal.signal(signal.SIGINT, _raise_aborted)
    return _execute(args, serve=True)


def cmd_up(args: argparse.Namespace) -> int:
    if suite.is_suite(Path(args.playbook)):
        raise UsageError(f"{args.playbook}: a suite runs with `lab run`, not `lab up`")
    pb = playbook.load(Path(args.playbook))  # bad input fails here, before anything starts
    if args.profile:
        get_profile(args.profile)
    run_dir = _new_run_dir(args.out, pb.name)
    (run_dir / "state.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lab", "_serve", str(Path(args.playbook).resolve()),
           "--out", str(run_dir)]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.kernel_tree:
        cmd += ["--kernel-tree", str(Path(args.kernel_tree).resolve())]
    if args.hold:
        cmd.append("--hold")
    if args.cold:
        cmd.append("--cold")
    with open(run_dir / "lab.log", "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, cwd=os.getcwd())
    _log(f"starting the lab in the background (pid {proc.pid}); log: {run_dir}/lab.log")
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


def cmd_gdb(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    st = access.read_state(run_dir)
    if st.get("status") not in ("up", "held", "booting"):
        raise UsageError(f"{run_dir}: the lab is {st.get('status')}, not up")
    if st.get("gdbstub_owner") == "probes" and st.get("held"):
        return _held_console(run_dir, st)
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


def _held_console(run_dir: Path, st: dict[str, object]) -> int:
    """L0 is held at a probe hit by the probes' own gdb: talk to that gdb (a detach would let
    L0 run on). Commands come from the terminal or standard input; `continue` releases L0."""
    import socket as _socket

    held = st["held"]
    path = Path(str(st["sock_dir"])) / "gdb-console"
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError as e:
        raise UsageError(f"{run_dir}: L0 is held but its gdb console does not answer: {e}") \
            from None
    interactive = sys.stdin.isatty()
    with s, s.makefile("rw") as f:
        json.loads(f.readline())
        print(f"L0 is held at probe {held['probe']} hit {held['hit']} "  # type: ignore[index]
              f"({held['location']}); gdb commands go to the probes' gdb, "  # type: ignore[index]
              f"`continue` lets L0 run on.", file=sys.stderr)
        while True:
            if interactive:
                try:
                    line = input("(lab-gdb) ")
                except EOFError:
                    break
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            f.write(json.dumps({"cmd": line.strip()}) + "\n")
            f.flush()
            reply = json.loads(f.readline())
            if "error" in reply:
                print(reply["error"], file=sys.stderr)
            else:
                sys.stdout.write(reply.get("out", ""))
                if reply.get("out") and not reply["out"].endswith("\n"):
                    sys.stdout.write("\n")
            if reply.get("released"):
                break
            sys.stdout.flush()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    st = access.read_state(run_dir)
    owner = int(st.get("owner_pid") or 0)
    # Only the process that runs this lab: its pid and its start time, as it recorded them
    # (a pid alone may belong to someone else's process by now).
    if owner and procs.alive(owner) and st.get("owner_start") is not None \
            and procs.start_time(owner) == st.get("owner_start"):
        os.kill(owner, signal.SIGTERM)
        if not procs.wait_until(lambda: not procs.alive(owner), 60):
            os.kill(owner, signal.SIGKILL)  # QEMU dies with it (parent-death signal)
            procs.wait_until(lambda: not procs.alive(owner), 10)
    qpid = st.get("qemu_pid")
    if qpid and procs.alive(int(qpid)) and any(st.get("sock_dir", "//") in a
                                              for a in procs.cmdline(int(qpid))):
        os.kill(int(qpid), signal.SIGKILL)
    for line in procs.Registry().reap():
        _log(line)
    print(f"lab {run_dir} is down")
    return 0


# -- reaching a running lab ------------------------------------------------------------------
def _sessions(run_dir: Path, level: str) -> list[object]:
    from lab.ssh import SSHSession

    st = access.read_state(run_dir)
    if st.get("status") not in ("up", "booting"):
        raise UsageError(f"{run_dir}: the lab is {st.get('status')}, not up")
    levels = st["levels"]
    if level not in levels:
        raise UsageError(f"level {level!r} is not in this lab (expected one of "
                         f"{', '.join(levels)})")
    chain = []
    name: str | None = level
    while name:
        chain.append(name)
        name = levels[name].get("via")
    sessions: list[SSHSession] = []
    for name in reversed(chain):
        lv = levels[name]
        s = SSHSession(name, int(lv["port"]), Path(st["key_file"]), lv["host_key"],
                       via=sessions[-1] if sessions else None)
        s.connect(time.monotonic() + 30)
        sessions.append(s)
    return sessions  # type: ignore[return-value]


def cmd_ssh(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    cmd = [c for c in args.command if c != "--"] if args.command else []
    if not cmd:
        # An interactive shell wants the real OpenSSH client and a terminal.
        os.execvp("ssh", ["ssh", "-F", str(run_dir / "ssh_config"), args.level])
    from lab.errors import CommandTimeout, SSHError

    try:
        sessions = _sessions(run_dir, args.level)
        try:
            # Output goes out as it comes, byte for byte (binary included), nothing kept.
            r = sessions[-1].run(" ".join(cmd), timeout=args.timeout, keep=0,  # type: ignore
                                 sinks=(sys.stdout.buffer, sys.stderr.buffer))
        finally:
            sys.stdout.buffer.flush()
            sys.stderr.buffer.flush()
            for s in reversed(sessions):
                s.close()  # type: ignore[attr-defined]
    except (SSHError, CommandTimeout) as e:
        # Our own failure, told apart from the command's status as ssh does: 255.
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_SSH
    return int(r.exit_status)


EXIT_SSH = 255  # `lab ssh` could not run the command (as OpenSSH's ssh)


def cmd_cp(args: argparse.Namespace) -> int:
    run_dir = access.find_run(args.run)
    src, dst = args.src, args.dst

    def remote(s: str) -> tuple[str, str] | None:
        lvl, sep, path = s.partition(":")
        return (lvl, path) if sep and lvl in ("l0", "l1", "l2") else None

    rs, rd = remote(src), remote(dst)
    if bool(rs) == bool(rd):
        raise UsageError("lab cp: exactly one of SRC and DST must be LEVEL:PATH")
    level = (rs or rd)[0]  # type: ignore[index]
    sessions = _sessions(run_dir, level)
    try:
        s = sessions[-1]
        if rd:
            local = Path(src)
            if not local.is_file():
                raise UsageError(f"lab cp: {src}: no such file")
            target = rd[1] or f"/root/{local.name}"
            if target.endswith("/"):
                target += local.name
            s.put(local, target)  # type: ignore[attr-defined]
            print(f"{src} -> {level}:{target}")
        else:
            assert rs is not None
            local_dst = Path(dst)
            if local_dst.is_dir():  # `lab cp l2:/path .`, as cp does
                local_dst = local_dst / Path(rs[1]).name
            s.get(rs[1], local_dst)  # type: ignore[attr-defined]
            print(f"{level}:{rs[1]} -> {local_dst}")
    finally:
        for x in reversed(sessions):
            x.close()  # type: ignore[attr-defined]
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("doctor", help="what this host can do, and the profile a lab would use")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_doctor)

    im = sub.add_parser("images", help="build images into the cache")
    imsub = im.add_subparsers(dest="images_cmd", required=True, metavar="ACTION")
    b = imsub.add_parser("build", help="build image recipes (default: all in images/)")
    b.add_argument("names", nargs="*", metavar="NAME")
    b.add_argument("--images-dir", default="images")
    b.add_argument("--kernel-tree", help="use this kernel build tree instead of the recipe's")
    b.add_argument("--no-debug", action="store_true", help="skip the debug-symbols package")
    b.set_defaults(func=cmd_images_build)

    profiles = sorted(PROFILES)
    for name, func, helptext in (
            ("run", cmd_run, "boot a playbook's lab, run its steps, tear down, report"),
            ("up", cmd_up, "boot a playbook's lab and leave it running in the background"),
            ("_serve", cmd_serve, argparse.SUPPRESS)):
        r = sub.add_parser(name, help=helptext) if helptext != argparse.SUPPRESS \
            else sub.add_parser(name)
        r.add_argument("playbook")
        r.add_argument("--out", help="run directory (default runs/<time>-<playbook>)")
        r.add_argument("--profile", choices=profiles, help="override the playbook's profile")
        r.add_argument("--kernel-tree", help="boot L0 from this kernel build tree")
        r.add_argument("--cold", action="store_true",
                       help="boot every level, never restore a saved lab (one is still saved "
                            "unless the playbook says snapshot: off)")
        if name != "run":
            r.add_argument("--hold", action="store_true",
                           help="start L0 with its CPUs held until a debugger continues")
        r.set_defaults(func=func)

    s = sub.add_parser("ssh", help="a shell or a command on a level of a running lab")
    s.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the command may run (default 600)")
    s.add_argument("level")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_ssh)

    c = sub.add_parser("cp", help="copy a file to or from a level (LEVEL:PATH)")
    c.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=cmd_cp)

    g = sub.add_parser("gdb", help="the real gdb, attached to a running lab's L0 with symbols")
    g.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    g.add_argument("gdb_args", nargs=argparse.REMAINDER, help="more arguments for gdb")
    g.set_defaults(func=cmd_gdb)

    dn = sub.add_parser("down", help="stop a running lab")
    dn.add_argument("--run", help="run directory (default: the most recent lab that is up)")
    dn.set_defaults(func=cmd_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for line in procs.Registry().reap():
            _log(line)
        return int(args.func(args))
    except UsageError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return EXIT_INFRA
