"""The lab as a pytest plugin (registered as `pytest11`: any pytest in the lab's venv has it).

    import pytest

    pytestmark = pytest.mark.lab("playbooks/nested.yaml")   # one lab per test module

    def test_l2_runs_under_l1(lab):
        r = lab.level("l2").run("grep -c hypervisor /proc/cpuinfo")
        assert r.exit_status == 0

The `lab` fixture brings the marker's playbook up (`lab up`: warm where a saved lab fits) once
per module, and down after it; `lab.level(NAME)` gives `run()`, `put()` and `get()` on a level.
A kernel event nobody expected on any level during a test fails that test with the console
excerpt. The `gdb` fixture stops L0 under a gdb with its symbols for one test (and lets it run
on after). Options: `--lab-profile`, `--lab-kernel-tree`, `--lab-kvm-unit-tests`, `--lab-keep`
(a module with a failed test leaves its lab up, and says how to reach it).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

STASH_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("lab", "kvm-nested-lab")
    g.addoption("--lab-profile", help="run every lab under this profile")
    g.addoption("--lab-kernel-tree", help="boot L0 of every lab from this kernel build tree")
    g.addoption("--lab-kvm-unit-tests", metavar="DIR",
                help="your kvm-unit-tests build, for playbooks with kvm_unit_tests steps")
    g.addoption("--lab-keep", action="store_true",
                help="leave a module's lab up when one of its tests failed")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab(playbook, cold=False, events='fail'): the playbook "
                                       "the `lab` fixture brings up for this module (cold: "
                                       "never restore a saved lab; events='ignore': a kernel "
                                       "event does not fail the running test)")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.failed and item.parent is not None:
        item.parent.stash[STASH_FAILED] = True
    return rep


class Level:
    """One level of a running lab, reached over SSH as `lab ssh` reaches it."""

    def __init__(self, run_dir: Path, name: str) -> None:
        from lab.running import _sessions

        self.name = name
        self._sessions = _sessions(run_dir, name)

    def run(self, command: str, timeout: float = 600) -> Any:
        """The command's RunResult: exit_status, stdout, stderr."""
        return self._sessions[-1].run(command, timeout=timeout)

    def put(self, local: Path | str, remote: str) -> None:
        self._sessions[-1].put(Path(local), remote)

    def get(self, remote: str, local: Path | str) -> None:
        self._sessions[-1].get(remote, Path(local))

    def close(self) -> None:
        for s in reversed(self._sessions):
            s.close()


class RunningLab:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._levels: dict[str, Level] = {}
        self.seen = len(self.events())
        self.fail_on_events = True

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "state.json").read_text())
        return data

    def events(self) -> list[dict[str, Any]]:
        return list(self.state().get("events") or [])

    def level(self, name: str) -> Level:
        if name not in self._levels:
            self._levels[name] = Level(self.run_dir, name)
        return self._levels[name]

    def new_unexpected_events(self) -> list[dict[str, Any]]:
        evs = self.events()
        new, self.seen = evs[self.seen:], len(evs)
        return [e for e in new if not e.get("expected")]

    def close(self) -> None:
        for lv in self._levels.values():
            lv.close()
        self._levels = {}


def _lab(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    marker = request.node.get_closest_marker("lab")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid}: the `lab` fixture needs "
                                "pytest.mark.lab(PLAYBOOK) on the module")
    opt = request.config.getoption
    out = tmp_path_factory.mktemp("lab") / "run"
    args = ["up", str(marker.args[0]), "--out", str(out)]
    if marker.kwargs.get("cold"):
        args.append("--cold")
    if opt("--lab-profile"):
        args += ["--profile", opt("--lab-profile")]
    if opt("--lab-kernel-tree"):
        args += ["--kernel-tree", opt("--lab-kernel-tree")]
    if opt("--lab-kvm-unit-tests"):
        args += ["--kvm-unit-tests", opt("--lab-kvm-unit-tests")]
    t = time.monotonic()
    r = _lab(*args)
    if r.returncode != 0:
        _lab("down", "--run", str(out), timeout=120)
        pytest.fail(f"lab up {marker.args[0]} failed (exit {r.returncode}):\n{r.stderr[-3000:]}",
                    pytrace=False)
    running = RunningLab(out)
    running.fail_on_events = marker.kwargs.get("events", "fail") != "ignore"
    running.up_seconds = round(time.monotonic() - t, 1)  # type: ignore[attr-defined]
    yield running
    running.close()
    if opt("--lab-keep") and request.node.stash.get(STASH_FAILED, False):
        sys.stderr.write(f"\nlab: left up after a failed test: {out} (lab ssh --run {out} l0; "
                         f"lab down --run {out})\n")
        return
    _lab("down", "--run", str(out), timeout=120)


@pytest.fixture
def gdb(lab: RunningLab) -> Iterator[Any]:
    """L0 stopped under a gdb of its own for the test, with the kernel's and the KVM modules'
    symbols (the run's gdbinit), in L0's own context (not a nested guest's); detached after
    the test, which lets L0 run on. The object is the lab's GdbSession: `evaluate([EXPR])`
    gives (ok, value) pairs, `console(CMD)` a gdb command's output."""
    from lab.gdb import GdbSession

    st = lab.state()
    if not st.get("gdb_socket"):
        pytest.skip(f"profile {st.get('profile')} has no gdbstub (its probes trace inside L0)")
    if st.get("gdbstub_owner") == "probes":
        pytest.fail("L0's gdbstub is held by the playbook's probes; the gdb fixture needs a "
                    "playbook without gdb probes", pytrace=False)
    session = GdbSession(lab.run_dir / "gdb-fixture.log")
    try:
        session.console(f"source {lab.run_dir / 'gdbinit'}", timeout=300)
        session.stop_in_host("l0")
        yield session
    finally:
        with contextlib.suppress(Exception):  # gdb, or the lab, may be gone already
            session.detach()
        session.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """A test that used the lab fails when a level's kernel had an unexpected event while it
    ran (the event is read from the running lab's record, where the lab puts it at once)."""
    result = yield
    if "lab" not in getattr(item, "fixturenames", ()):
        return result
    running: RunningLab = item._request.getfixturevalue("lab")  # type: ignore[attr-defined]
    bad = running.new_unexpected_events()
    if bad and running.fail_on_events:
        e = bad[0]
        pytest.fail(f"{e['level']}: kernel event #{e['seq']} during the test: {e['summary']}"
                    f"\n{e.get('excerpt') or e.get('line', '')}", pytrace=False)
    return result
