"""Signals that unwind the lab (Ctrl-C, SIGTERM, SIGHUP) become exceptions in the main thread,
so that every context manager tears its part down; but never inside a `deferred()` block.

paramiko takes its channel locks as `acquire(); try:`. An exception raised by a signal
handler in between leaves the lock held for good, and the teardown then hangs in
chan.close() (or in transport.close(), which waits for the transport thread, itself stuck on
that lock). Blocking the signal with pthread_sigmask is no help: the kernel hands a
process-directed signal to any thread that does not block it (paramiko's, the consoles'), and
Python runs the handler in the main thread wherever it is. So the handlers ask here first: in
a deferred block the exception waits and is raised when the block ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_depth = 0
_pending: BaseException | None = None


def raise_or_defer(exc: BaseException) -> None:
    """What an unwinding signal handler does: raise `exc` now, or at the end of the
    deferred block the main thread is in (handlers always run in the main thread)."""
    global _pending
    if _depth:
        if _pending is None:
            _pending = exc
        return
    raise exc


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the unwinding signals' exceptions back while the block runs (main thread)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc
