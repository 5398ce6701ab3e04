"""The held-gdb console: both halves.

A probe with `then: stop` keeps L0 stopped for a person. Detaching the probes' gdb would let
L0 run on (QEMU resumes on detach), and QEMU's gdbstub takes one debugger at a time, so the
probes' own gdb serves the person: `serve` (in the lab, on a unix socket in its private
directory) answers one JSON line per gdb command until `continue`; `client` (in `lab gdb`)
reads commands from the terminal or standard input and prints the replies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTINUE = ("c", "cont", "continue")


def serve(path: Path, held: dict[str, Any], console: Callable[[str], str],
          stopping: threading.Event, error: type[Exception]) -> bool:
    """Answer gdb commands on `path` until one says continue (True) or the lab stops
    (False). `console` runs one gdb command; `error` is what it raises for a refused one."""
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(1)
        srv.settimeout(0.2)
        while not stopping.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn, conn.makefile("rw") as f:
                f.write(json.dumps({"held": held}) + "\n")
                f.flush()
                for line in f:
                    cmd = json.loads(line).get("cmd", "").strip()
                    if cmd in CONTINUE:
                        f.write(json.dumps({"out": "L0 runs on", "released": True}) + "\n")
                        f.flush()
                        return True
                    try:
                        reply = {"out": console(cmd) if cmd else ""}
                    except error as e:
                        reply = {"error": str(e)}
                    f.write(json.dumps(reply) + "\n")
                    f.flush()
        return False
    finally:
        srv.close()
        path.unlink(missing_ok=True)


class NotServing(Exception):
    """The held console does not answer."""


def client(path: Path) -> int:
    """Talk to a held console from this terminal (or standard input) until `continue`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError as e:
        raise NotServing(str(e)) from None
    interactive = sys.stdin.isatty()
    with s, s.makefile("rw") as f:
        held = json.loads(f.readline())["held"]
        print(f"L0 is held at probe {held['probe']} hit {held['hit']} ({held['location']}); "
              f"gdb commands go to the probes' gdb, `continue` lets L0 run on.",
              file=sys.stderr)
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
                out = reply.get("out", "")
                sys.stdout.write(out + ("\n" if out and not out.endswith("\n") else ""))
            if reply.get("released"):
                break
            sys.stdout.flush()
    return 0
