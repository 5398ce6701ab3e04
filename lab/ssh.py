"""SSH to a level with paramiko: pinned host keys, deadlines, and jumps through the parent.

A level's SSH server listens on 127.0.0.1 of whoever runs it: the host for L0, L0 for L1, L1
for L2. A child is reached through a `direct-tcpip` channel of its parent's connection, so
nothing is ever exposed beyond loopback. Every call has a timeout; none can hang the lab.
"""

from __future__ import annotations

import base64
import functools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paramiko

from lab.deadline import TimedOut, retry
from lab.errors import CommandTimeout, SSHError
from lab.signals import deferred

# paramiko logs every refused early connection (the guest is still booting) with a traceback;
# the lab reports connection problems itself, so keep paramiko's own log out of the terminal.
log = logging.getLogger(__name__)
_paramiko_log = logging.getLogger("paramiko")
_paramiko_log.addHandler(logging.NullHandler())
_paramiko_log.propagate = False


@dataclass
class RunResult:
    command: str
    exit_status: int
    stdout: str  # all of it, or its head and tail when it was longer than `keep`
    stderr: str
    seconds: float
    stdout_bytes: int = 0  # how much the command printed, whatever was kept
    stderr_bytes: int = 0


class Capture:
    """One output stream of a command: every byte to `sink` (if any), and a bounded head and
    tail in memory, so that a command printing gigabytes costs the lab no more than `keep`."""

    def __init__(self, keep: int, sink: IO[bytes] | None = None) -> None:
        self.keep = keep
        self.sink = sink
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self.sink is not None:
            self.sink.write(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.keep:
                del self.tail[:len(self.tail) - self.keep]

    def text(self) -> str:
        kept = len(self.head) + len(self.tail)
        body = bytes(self.head)
        if self.tail:
            cut = self.total - kept
            body += (f"\n[... {cut} bytes not kept here ...]\n".encode() if cut else b"") \
                + bytes(self.tail)
        return body.decode(errors="replace")


def parse_host_key(line: str) -> paramiko.PKey:
    kind, b64 = line.split()[:2]
    if kind != "ssh-ed25519":
        raise SSHError(f"unexpected host key type {kind}")
    return paramiko.Ed25519Key(data=base64.b64decode(b64))


class HostKeyMismatch(SSHError):
    """The server is not the level's own (never retried)."""


class SSHSession:
    def __init__(self, level: str, port: int, key_file: Path, host_key: str,
                 via: SSHSession | None = None, user: str = "root") -> None:
        self.level = level
        self.port = port
        self.key = paramiko.Ed25519Key.from_private_key_file(str(key_file))
        self.host_key = parse_host_key(host_key)
        self.via = via
        self.user = user
        self.transport: paramiko.Transport | None = None
        self._retired: list[paramiko.Transport] = []  # replaced, still carrying children

    # -- connecting ------------------------------------------------------------------------
    def _sock(self, timeout: float) -> Any:
        if self.via is None:
            return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        parent = self.via.require()
        try:
            return parent.open_channel("direct-tcpip", ("127.0.0.1", self.port),
                                       ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError) as e:
            raise ConnectionError(f"via {self.via.level}: {e}") from None

    def connect_once(self, timeout: float = 10.0) -> None:
        sock = self._sock(timeout)
        t = paramiko.Transport(sock)
        t.banner_timeout = timeout
        t.handshake_timeout = timeout
        t.auth_timeout = timeout
        try:
            t.start_client(timeout=timeout)
            key = t.get_remote_server_key()
            # Pinned: the image's own host key, nothing else (no AutoAdd, no known_hosts).
            if key.get_name() != self.host_key.get_name() or \
                    key.asbytes() != self.host_key.asbytes():
                raise HostKeyMismatch(f"{self.level}: host key mismatch (got "
                                      f"{key.get_base64()[:24]}...)", level=self.level)
            t.auth_publickey(self.user, self.key)
        except BaseException:
            t.close()
            raise
        t.set_keepalive(15)
        self.transport = t

    def connect(self, deadline: float, check: Callable[[], None] | None = None,
                attempt_timeout: float = 10.0) -> int:
        """Retry until connected or `deadline` (monotonic); return the number of attempts.

        `check` runs between attempts (e.g. to fail fast when the VM crashed).
        """
        try:
            _, attempts = retry(
                lambda left: self.connect_once(timeout=min(attempt_timeout, max(left, 1.0))),
                deadline, fatal=(HostKeyMismatch,), between=check, interval=0.25,
                retry_on=(SSHError, OSError, EOFError, ConnectionError, paramiko.SSHException))
        except TimedOut as e:
            raise SSHError(f"{self.level}: SSH did not answer in time ({e})",
                           level=self.level) from None
        return attempts

    def require(self) -> paramiko.Transport:
        if self.transport is None or not self.transport.is_active():
            raise SSHError(f"{self.level}: not connected", level=self.level)
        return self.transport

    def close(self) -> None:
        with deferred():
            for t in [self.transport, *self._retired]:
                if t is not None:
                    t.close()
            self.transport, self._retired = None, []

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------------
    def run(self, command: str, timeout: float = 60.0, stdin: bytes | None = None,
            check: Callable[[], None] | None = None, keep: int = 8 << 20,
            sinks: tuple[IO[bytes], IO[bytes]] | None = None) -> RunResult:
        """Run `command` in the guest's shell; return its status and output.

        Raises CommandTimeout after `timeout` seconds. `check` is called a few times a second
        so that a crash elsewhere in the lab ends the wait at once; both run on every turn of
        the loop, however fast the command prints. Of each stream, at most `keep` bytes of
        head and of tail stay in memory; `sinks` (stdout, stderr) get every byte as it came.
        """
        t0 = time.monotonic()
        chan = self._exec(command, min(timeout, 120), check)
        out = Capture(keep, sinks[0] if sinks else None)
        err = Capture(keep, sinks[1] if sinks else None)
        try:
            with deferred():
                chan.settimeout(0.0)
                if stdin is not None:
                    chan.sendall(stdin)
                chan.shutdown_write()
            while True:
                got = False
                # Ctrl-C and SIGTERM land in select() below, never inside paramiko.
                with deferred():
                    if chan.recv_ready():
                        out.add(chan.recv(65536))
                        got = True
                    if chan.recv_stderr_ready():
                        err.add(chan.recv_stderr(65536))
                        got = True
                    done = not got and chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready()
                if done:
                    break
                if time.monotonic() - t0 > timeout:
                    raise CommandTimeout(f"{self.level}: `{command}` did not finish in "
                                         f"{timeout:g} s", level=self.level,
                                         detail=(out.text() + err.text())[-2000:])
                if not self.require().is_active():
                    raise SSHError(f"{self.level}: connection lost during `{command}`",
                                   level=self.level)
                if check:
                    check()
                if not got:
                    select.select([chan], [], [], 0.1)
            with deferred():
                status = chan.recv_exit_status()
        finally:
            with deferred():
                chan.close()
        return RunResult(command, status, out.text(), err.text(), time.monotonic() - t0,
                         stdout_bytes=out.total, stderr_bytes=err.total)

    def _exec(self, command: str, timeout: float,
              check: Callable[[], None] | None) -> paramiko.Channel:
        """A channel running `command` (once more on a new channel if the server closed the
        first before it answered: see _once_more)."""
        def attempt() -> paramiko.Channel:
            chan = self._open_session(timeout, check)
            try:
                _bounded(functools.partial(chan.exec_command, command), timeout,
                         f"{self.level}: the request to run `{command[:60]}`", chan)
            except paramiko.SSHException:
                chan.close()
                raise
            return chan

        chan: paramiko.Channel = self._once_more(attempt, f"cannot run `{command[:60]}`")
        return chan

    def _once_more(self, attempt: Callable[[], Any], what: str) -> Any:
        """`attempt` (open a channel and make one request on it), once more when the server
        closed the channel before it answered the request: it did not take it. dropbear does
        so right after an SFTP transfer ("Channel is not open", "Channel closed."), for an
        exec and for the next SFTP subsystem request alike."""
        for n in (1, 2):
            try:
                return attempt()
            except paramiko.SSHException as e:
                if n == 2 or not _closed_unanswered(e):
                    raise SSHError(f"{self.level}: {what}: {e}", level=self.level) from None
                log.info(f"{self.level}: the channel closed before it took the request "
                         f"({what}); once more")
        raise AssertionError("not reached")

    def _open_session(self, timeout: float,
                      check: Callable[[], None] | None) -> paramiko.Channel:
        """A session channel; when the open stalls, once more on a fresh connection.

        A nested level under emulation can be slow to answer even a channel open when the
        host is busy (30 s were once not enough for L1 under TCG with L2 up), and a channel
        open has been seen to stall for good on an established connection to L1 while L1
        itself answered a new one: half the time on this connection, half on a new one.
        """
        try:
            return self.require().open_session(timeout=timeout / 2)
        except (paramiko.SSHException, OSError, EOFError) as e:
            first = e
        if check:
            check()
        try:
            # The old connection stays open: a deeper level's connection runs through it.
            old, self.transport = self.transport, None
            if old is not None:
                self._retired.append(old)
            self.connect(time.monotonic() + timeout / 2, check=check)
            return self.require().open_session(timeout=timeout / 2)
        except (SSHError, paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"{self.level}: cannot open a session: {first}; on a new connection:"
                           f" {e}", level=self.level) from None

    def start(self, command: str) -> None:
        """Start a command that outlives this call (its output must be redirected)."""
        res = self.run(f"setsid sh -c {_quote(command)} </dev/null >/dev/null 2>&1 &",
                       timeout=30)
        if res.exit_status != 0:
            raise SSHError(f"{self.level}: could not start `{command}`: {res.stderr}",
                           level=self.level)

    # -- files -----------------------------------------------------------------------------
    def _sftp(self) -> paramiko.SFTPClient:
        """An SFTP session (once more if the server closed the channel before it answered
        the subsystem request: seen in CI for a get() right after a put())."""
        sftp = self._once_more(
            lambda: _bounded(functools.partial(paramiko.SFTPClient.from_transport,
                                               self.require()), 120,
                             f"{self.level}: opening SFTP", None),
            "cannot open SFTP")
        if sftp is None:
            raise SSHError(f"{self.level}: no SFTP subsystem", level=self.level)
        chan = sftp.get_channel()
        if chan is not None:
            chan.settimeout(60)
        return sftp

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        with self._sftp() as sftp:
            sftp.put(str(local), remote)
            sftp.chmod(remote, mode if mode is not None else (local.stat().st_mode & 0o777))

    def get(self, remote: str, local: Path) -> None:
        with self._sftp() as sftp:
            sftp.get(remote, str(local))


def _closed_unanswered(e: Exception) -> bool:
    """paramiko's word for a channel the server closed before it answered a request."""
    return any(w in str(e) for w in ("not open", "Channel closed"))


def _bounded(call: Callable[[], Any], timeout: float, what: str,
             chan: paramiko.Channel | None) -> Any:
    """`call` (a paramiko request that waits for the server's answer with no deadline of its
    own: exec, subsystem) with one: past `timeout` the channel is closed and SSHError raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    th = threading.Thread(target=run, daemon=True, name="ssh-request")
    th.start()
    th.join(timeout)
    if th.is_alive():
        if chan is not None:
            chan.close()
        raise SSHError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"
