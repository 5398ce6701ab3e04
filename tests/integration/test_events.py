"""Kernel events while a lab is up (issue 17): a real WARNING on every level of the real
chain, from a real module (lab/guest/inject/lab_warn.c built for the images' kernel), must
reach the person at once (alerts on the next command, `lab status`), refuse nothing it need
not, and end the session's report in error, decoded to file:line, unless expected."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import kmod
from lab.cache import cache_root
from lab.image import load_recipe

from .helpers import ROOT, lab, report

pytestmark = pytest.mark.integration
LEVELS = ("l0", "l1", "l2")


@pytest.fixture(scope="module")
def warn_ko() -> Path:
    # The images' own kernel (Debian's cloud kernel), its headers fetched and cached.
    kernel = load_recipe(ROOT / "images" / "default.yaml").kernel
    return kmod.build("lab_warn", kernel.fetch_build_dir(cache_root()), cache_root())


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("events") / "run"
    r = lab("up", str(ROOT / "tests" / "data" / "warn-expected.yaml"), "--out", str(out),
            timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    yield out
    lab("down", "--run", str(out), timeout=120)


def _state(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "state.json").read_text())
    return data


def _wait_event(out: Path, level: str, kind: str = "WARNING",
                timeout: float = 120) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        evs = [e for e in _state(out).get("events", [])
               if e["level"] == level and e["kind"] == kind]
        if evs:
            return evs[0]
        time.sleep(0.3)
    raise AssertionError(f"no {kind} on {level} reached {out}/state.json")


def test_a_warning_on_every_level_is_told_at_once_listed_and_fails_the_session(
        chain: Path, warn_ko: Path) -> None:
    out = chain
    for level in LEVELS:
        lab("cp", "--run", str(out), str(warn_ko), f"{level}:/root/", check=True)
        r = lab("ssh", "--run", str(out), level, "--", "insmod /root/lab_warn.ko", check=True)
        ev = _wait_event(out, level)
        assert ev["kind"] == "WARNING" and ev["module"] == "lab_warn", ev
        assert ev["function"].startswith("lab_warn_fire+") and "lab_warn.c:" in ev["file_line"]
        assert ev["expected"] is (level == "l1")
        # The next command on the lab tells of it, once, on stderr, naming level and event.
        r = lab("ssh", "--run", str(out), "l0", "--", "true", check=True)
        alerts = [ln for ln in r.stderr.splitlines() if ln.startswith("lab: alert: ")]
        assert len(alerts) == 1 and alerts[0].startswith(f"lab: alert: {level}: kernel event #")
        assert "WARNING: lab_warn: lab_warn.c:" in alerts[0]
        assert ("expected by playbook" in alerts[0]) is (level == "l1")
        r = lab("ssh", "--run", str(out), "l0", "--", "true", check=True)
        assert "lab: alert:" not in r.stderr  # once per event
    # A WARNING leaves the level up: it is reachable and says so.
    st = _state(out)
    assert {n: lv["state"] for n, lv in st["levels"].items()} == dict.fromkeys(LEVELS, "up")
    r = lab("status", "--run", str(out), check=True)
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("  #")]
    assert len(rows) == 3, r.stdout
    assert [("UNEXPECTED" in ln, "expected by playbook" in ln) for ln in rows] == \
        [(True, False), (False, True), (True, False)]
    assert "kernel events: 3" in r.stdout
    j = json.loads(lab("status", "--run", str(out), "--json", check=True).stdout)
    assert [e["level"] for e in j["events"]] == list(LEVELS)


def test_a_crashed_level_is_refused_at_once_and_its_parent_is_not(chain: Path) -> None:
    out = chain
    # L2's kernel panics; its QEMU inside L1 exits with it (panic=-1, -no-reboot).
    lab("ssh", "--run", str(out), "l2", "--", "echo c > /proc/sysrq-trigger", timeout=120)
    ev = _wait_event(out, "l2", "panic")
    assert ev["fatal"] and "sysrq triggered crash" in ev["line"]
    t = time.monotonic()
    r = lab("ssh", "--run", str(out), "l2", "--", "true", timeout=120)
    assert r.returncode == 255 and time.monotonic() - t < 20, r.stderr
    assert "l2's kernel crashed: kernel event #" in r.stderr and "panic" in r.stderr
    r = lab("ssh", "--run", str(out), "l1", "--", "true", check=True)
    st = _state(out)
    assert st["levels"]["l2"]["state"] == "crashed" and st["levels"]["l1"]["state"] == "up"
    assert "  l2: crashed via l1" in lab("status", "--run", str(out), check=True).stdout


def test_the_sessions_report_is_an_error_with_every_event_decoded(chain: Path) -> None:
    out = chain
    r = lab("down", "--run", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    rep = report(out)
    # Never "passed" after a session in which a kernel warned unexpectedly.
    assert rep["status"] == "error" and rep["exit_status"] == 3
    assert rep["error"]["kind"] == "kernel-event" and rep["error"]["level"] == "l0"
    # l0's and l2's WARNINGs and l2's panic; l1's WARNING was expected
    assert "(and 2 more)" in rep["error"]["message"]
    assert [(e["level"], e["kind"]) for e in rep["events"]][:3] == \
        [(lv, "WARNING") for lv in LEVELS]
    assert any(e["level"] == "l2" and e["kind"] == "panic" for e in rep["events"][3:])
    for e in rep["events"][:3]:
        # Decoded from the module's own debug info to file:line, with the source line.
        d = e["decoded"]
        assert d["object"] == "lab_warn.ko" and d["function"] == "lab_warn_fire", d
        assert d["file_line"].endswith(e["file_line"].rsplit("/", 1)[-1]), (d, e)
        assert d["source"] and "WARN(" in d["source"], d
        assert "lab_warn: warning 1, on purpose" in e["excerpt"]
    page = (out / "report.html").read_text()
    assert f"Kernel events ({len(rep['events'])})" in page and "unexpected" in page
