"""The lab's error classes. Each maps to one process exit status (see README)."""

from __future__ import annotations

EXIT_PASSED = 0
EXIT_STEP_FAILED = 1
EXIT_USAGE = 2
EXIT_INFRA = 3


class LabError(Exception):
    """Base class: something the lab could not do. Exit status 3 unless a subclass says."""

    exit_status = EXIT_INFRA
    kind = "infrastructure"

    def __init__(self, message: str, *, level: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.level = level
        self.detail = detail

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "level": self.level, "message": str(self), "detail": self.detail}


class UsageError(LabError):
    """Bad input: a playbook, recipe or command line that cannot be used. Exit 2."""

    exit_status = EXIT_USAGE
    kind = "usage"


class BootError(LabError):
    kind = "boot"


class LaunchError(BootError):
    """QEMU did not start. Carries the command line and what QEMU printed."""

    kind = "launch"

    def __init__(self, message: str, *, command: list[str], output: str,
                 level: str | None = None) -> None:
        super().__init__(message, level=level, detail=output)
        self.command = command
        self.output = output

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["command"] = self.command
        return d


class SSHError(LabError):
    kind = "ssh"


class CommandTimeout(LabError):
    kind = "timeout"


class VMDied(LabError):
    """A QEMU process exited while the lab still needed it."""

    kind = "qemu-exit"


class GuestCrash(LabError):
    """A guest kernel printed a kernel event nobody expected (lab/events.py): a panic, BUG,
    Oops, WARNING, KASAN report, lockup, ..."""

    kind = "crash"

    def __init__(self, level: str, reason: str, excerpt: str, log: str | None = None) -> None:
        # A WARNING is no crash, but it fails the run the same way unless expected.
        what = "kernel warned" if reason.startswith("WARNING") else "kernel crashed"
        super().__init__(f"{level}: {what}: {reason}", level=level, detail=excerpt)
        self.reason = reason
        self.excerpt = excerpt
        self.log = log

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d.update(reason=self.reason, excerpt=self.excerpt, log=self.log)
        return d


class Aborted(LabError):
    """The run was stopped from outside (Ctrl-C, SIGTERM)."""

    kind = "aborted"


def error_dict(e: Exception) -> dict[str, object]:
    """An error as the report records it (any exception: one of ours has its kind and exit
    status, anything else is a bug of ours, exit 3)."""
    if isinstance(e, LabError):
        return {**e.to_dict(), "exit_status": e.exit_status}
    return {"kind": "internal", "message": f"{type(e).__name__}: {e}", "exit_status": EXIT_INFRA,
            "level": None, "detail": ""}
