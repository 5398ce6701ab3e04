"""Retrying until a deadline: the one loop behind connecting to a console, an SSH server or a
QMP socket, and waiting for a process to go.

Deadlines are `time.monotonic()` values, so that a step of the host's clock (NTP) cannot
shorten or stretch a wait.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class TimedOut(Exception):
    """The deadline passed; `last` is the last attempt's error (None: it never ran)."""

    def __init__(self, attempts: int, last: BaseException | None) -> None:
        super().__init__(f"after {attempts} attempts; last error: {last}")
        self.attempts = attempts
        self.last = last


def retry(attempt: Callable[[float], T], deadline: float, *,
          retry_on: tuple[type[BaseException], ...],
          fatal: tuple[type[BaseException], ...] = (),
          between: Callable[[], None] | None = None,
          interval: float = 0.05) -> tuple[T, int]:
    """Call `attempt(seconds_left)` until it returns; (its result, the number of attempts).

    An error in `retry_on` (and not in `fatal`) means "not yet": `between` runs (to fail fast,
    e.g. when the machine behind died), then the next attempt after `interval`. Anything else
    propagates at once. Past the deadline: TimedOut.
    """
    attempts = 0
    last: BaseException | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOut(attempts, last)
        attempts += 1
        try:
            return attempt(left), attempts
        except fatal:
            raise
        except retry_on as e:
            last = e
        if between is not None:
            between()
        time.sleep(min(interval, max(deadline - time.monotonic(), 0)))


class _NotYet(Exception):
    pass


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether `predicate()` became true within `timeout` seconds."""

    def attempt(_left: float) -> None:
        if not predicate():
            raise _NotYet

    try:
        retry(attempt, time.monotonic() + timeout, retry_on=(_NotYet,), interval=interval)
        return True
    except TimedOut:
        return bool(predicate())


def connect_socket(family: int, addr: str | tuple[str, int], deadline: float,
                   between: Callable[[], None] | None = None) -> socket.socket:
    """A stream socket connected to `addr` as soon as something listens there (TimedOut
    otherwise): an emulator's console, QMP or port opens some time after its launch."""

    def attempt(_left: float) -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            raise
        return s

    sock, _ = retry(attempt, deadline, retry_on=(OSError,), between=between, interval=0.02)
    return sock
