"""A small synchronous QMP client on QEMU's unix socket, with a timeout on every call."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from lab.deadline import TimedOut, connect_socket
from lab.errors import LabError


class QMPError(LabError):
    kind = "qmp"


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    def connect(self, deadline: float) -> None:
        try:
            self.sock = connect_socket(socket.AF_UNIX, self.path, deadline)
        except TimedOut as e:
            raise QMPError(f"QMP socket {self.path} did not answer: {e.last}") from None
        self._read_message()  # greeting
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        assert self.sock is not None
        end = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise QMPError("QMP: no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise QMPError("QMP: connection closed by QEMU")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, *, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Run a command and return its result. `fds` go along as SCM_RIGHTS (for `getfd`)."""
        if self.sock is None:
            raise QMPError("QMP: not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            self.sock.settimeout(self.timeout)
            sent = socket.send_fds(self.sock, [data], fds)
            self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)
        while True:
            reply = self._read_message()
            if "event" in reply:  # asynchronous events interleave with replies
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
