"""The lab's watch over its kernels: every event on every level's console (lab/events.py),
numbered in order of arrival, judged expected or not (the playbook's `expect_events`, the
running step's), told at once (the log, the running lab's record), and failing the run when
unexpected.

A level whose console shows a fatal event (panic, BUG, Oops, ...) is `crashed`, and so is
every level below it (it runs inside it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from lab.console import Console
from lab.events import Event, Expected
from lab.playbook import PARENT, Playbook, Step

log = logging.getLogger(__name__)


class Watch:
    def __init__(self, pb: Playbook, t0: float,
                 on_event: Callable[[Event], None] = lambda ev: None) -> None:
        self.pb = pb
        self.t0 = t0
        self.on_event = on_event  # after an event is recorded (the lab publishes it)
        self.events: list[Event] = []
        self.consoles: dict[str, Console] = {}
        self.step: Step | None = None  # the step running now: its expectations apply
        self._crashed: Console | None = None  # the first console with an unexpected event
        self._lock = threading.Lock()

    def watch(self, con: Console) -> None:
        """Take a console under watch, before anything is read from it."""
        self.consoles[con.level] = con
        con.t0 = self.t0
        con.accept = self._accept
        con.on_event(self._on_event)

    def forget(self) -> None:
        """A failed restore: its consoles and what they said are gone with it."""
        with self._lock:
            self.events, self.consoles, self._crashed = [], {}, None

    def _accept(self, ev: Event) -> bool:
        """Whether `ev` was expected (marks it so); on the console's reader thread."""
        step = self.step
        candidates = [(e, "playbook") for e in self.pb.expect_events]
        if step is not None:
            candidates += [(e, step.name) for e in step.expect_events]
        for exp, by in candidates:
            if exp.matches(ev):
                ev.expected, ev.expected_by = True, by
                return True
        return False

    def _on_event(self, con: Console, ev: Event) -> None:
        with self._lock:
            ev.seq = len(self.events) + 1
            self.events.append(ev)
            if not ev.expected and self._crashed is None and con.crash is not None:
                self._crashed = con
        if ev.expected:
            log.info(f"{ev.level}: kernel event #{ev.seq} (expected by {ev.expected_by}) at "
                     f"{ev.t:.1f} s: {ev.line[:200]}")
        else:
            log.error(f"{ev.level}: kernel event #{ev.seq} at {ev.t:.1f} s: {ev.line[:200]}")
        self.on_event(ev)

    def raise_if_crashed(self) -> None:
        """Raise the first unexpected event as a GuestCrash (the run ends in error)."""
        if self._crashed is not None:
            raise self._crashed.crash_error()

    def settle(self) -> None:
        """Let reports that are still arriving finish (before judging a step's events)."""
        for con in self.consoles.values():
            con.settle(quiet=0.5, limit=3.0)

    def complete(self, settled: float = 2.0) -> list[Event]:
        """Fill in every event whose report has had time to arrive; those completed now."""
        done: list[Event] = []
        for con in self.consoles.values():
            done += con.complete_events(settled)
        return done

    def missing(self, step: Step) -> list[Expected]:
        """What `step` expected that did not come while it ran."""
        seen = [ev for ev in self.events if ev.expected_by == step.name]
        return [e for e in step.expect_events if not any(e.matches(ev) for ev in seen)]

    def level_states(self, levels: list[str]) -> dict[str, str]:
        """"crashed" for a level with a fatal event or under one that has, else "up"."""
        dead = {ev.level for ev in self.events if ev.fatal}
        out = {}
        for name in levels:
            chain, up = [name], PARENT.get(name)
            while up:
                chain.append(up)
                up = PARENT.get(up)
            out[name] = "crashed" if dead.intersection(chain) else "up"
        return out

    def to_dicts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [ev.to_dict() for ev in self.events]
