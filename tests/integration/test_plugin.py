"""The pytest plugin, used as a KVM developer would (the README's example), on the real chain;
and a kernel event during a test failing that test, seen from an inner pytest run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import kmod
from lab.cache import cache_root
from lab.image import load_recipe

from .helpers import ROOT

pytestmark = [pytest.mark.integration,
              pytest.mark.lab(str(ROOT / "playbooks" / "nested.yaml"))]
# The cache as it is before pytester gives the inner run a HOME of its own (a fresh cache
# there would download and build everything again, and its socket paths would be too long).
CACHE = cache_root()


def test_levels_run_and_copy(lab: object, tmp_path: Path) -> None:
    l2 = lab.level("l2")  # type: ignore[attr-defined]
    r = l2.run("grep -c hypervisor /proc/cpuinfo; hostname")
    assert r.exit_status == 0 and r.stdout.split()[-1] == "l2"
    f = tmp_path / "hello"
    f.write_text("from the host\n")
    l2.put(f, "/root/hello")
    l2.get("/root/hello", tmp_path / "back")
    assert (tmp_path / "back").read_text() == "from the host\n"
    assert lab.level("l1").run("test -c /dev/kvm").exit_status == 0  # type: ignore[attr-defined]


def test_gdb_fixture_stops_l0_with_symbols(gdb: object) -> None:
    (ok, name), (ok2, nested) = gdb.evaluate([  # type: ignore[attr-defined]
        "init_uts_ns.name.nodename", "nested"])
    assert ok and '"l0"' in name  # L0's own context, not a nested guest's
    assert ok2 and nested.strip() == "1", nested  # kvm_amd.ko's, read at its load address


def test_l0_runs_on_after_the_gdb_fixture(lab: object) -> None:
    r = lab.level("l2").run("echo alive")  # type: ignore[attr-defined]
    assert r.exit_status == 0 and r.stdout.strip() == "alive"


def test_a_kernel_warning_fails_the_running_test(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = load_recipe(ROOT / "images" / "default.yaml").kernel
    ko = kmod.build("lab_warn", kernel.fetch_build_dir(CACHE), CACHE)
    monkeypatch.setenv("LAB_CACHE", str(CACHE))
    pytester.makepyfile(test_user=f'''
import pytest

pytestmark = pytest.mark.lab({str(ROOT / "playbooks" / "smoke.yaml")!r})


def test_quiet(lab):
    assert lab.level("l0").run("true").exit_status == 0


def test_warns(lab):
    lab.level("l0").put({str(ko)!r}, "/root/lab_warn.ko")
    assert lab.level("l0").run("insmod /root/lab_warn.ko").exit_status == 0
    import time
    time.sleep(3)  # the WARNING reaches the lab's record
''')
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=600)
    res.assert_outcomes(passed=1, failed=1)  # the warning fails the test that made it
    res.stdout.fnmatch_lines(["*test_warns*", "*l0: kernel event #1 during the test: "
                              "WARNING: lab_warn: lab_warn.c:*"])
