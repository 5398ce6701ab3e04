"""Saved-lab keys and entries, and the host speed factor (no VM: files and arithmetic)."""

from __future__ import annotations

import json
from pathlib import Path

from lab import hostspeed, snapshot
from lab.machines.qemu import VMSpec, build_command
from lab.profiles import PROFILES


def test_key_changes_with_every_input_and_only_with_them() -> None:
    base = {"profile": "tcg-svm", "qemu": "QEMU 7.2", "l0": ["-m", "3072"], "images": {"l0": "a"}}
    k = snapshot.key_of(base)
    assert snapshot.key_of(dict(base)) == k
    for field, value in (("profile", "kvm-svm"), ("qemu", "QEMU 8.0"), ("l0", ["-m", "2048"]),
                         ("images", {"l0": "b"})):
        assert snapshot.key_of({**base, field: value}) != k, field


def _entry(cache: Path, key: str, meta: dict[str, object], stream: bool = True) -> Path:
    d = snapshot.root(cache) / key
    d.mkdir(parents=True)
    (d / snapshot.META).write_text(json.dumps(meta))
    if stream:
        (d / snapshot.STREAM).write_bytes(b"x")
    return d


def test_find_takes_a_complete_entry(tmp_path: Path) -> None:
    _entry(tmp_path, "k1", {"format": snapshot.FORMAT, "levels": {}})
    saved = snapshot.find(tmp_path, "k1")
    assert saved is not None and saved.key == "k1" and saved.stream.exists()
    assert snapshot.find(tmp_path, "absent") is None


def test_unreadable_or_incomplete_entries_are_dropped_not_fatal(tmp_path: Path) -> None:
    d1 = _entry(tmp_path, "nostream", {"format": snapshot.FORMAT}, stream=False)
    d2 = _entry(tmp_path, "oldformat", {"format": snapshot.FORMAT - 1})
    d3 = snapshot.root(tmp_path) / "garbage"
    d3.mkdir()
    (d3 / snapshot.META).write_text("{not json")
    for d in (d1, d2, d3):
        assert snapshot.find(tmp_path, d.name) is None
        assert not d.exists()


def test_prune_keeps_the_most_recently_used(tmp_path: Path) -> None:
    import os

    for i in range(6):
        d = _entry(tmp_path, f"k{i}", {"format": snapshot.FORMAT})
        os.utime(d, (1000 + i, 1000 + i))
    gone = snapshot.prune(tmp_path, keep=2, spare="k0")
    assert sorted(gone) == ["k1", "k2", "k3"]
    left = sorted(p.name for p in snapshot.root(tmp_path).iterdir())
    assert left == ["k0", "k4", "k5"]


def test_restoring_qemu_waits_for_the_stream_over_qmp() -> None:
    spec = VMSpec(level="l0", accel="tcg", cpu="max", memory_mb=1024, cpus=1, kernel="/k",
                  initrd="/i", append="", ssh_port=1, qmp="/q", incoming=True)
    cmd = build_command(spec)
    assert cmd[cmd.index("-incoming") + 1] == "defer"  # no path or exec: URI on the command line
    assert "-incoming" not in build_command(VMSpec(**{**spec.__dict__, "incoming": False}))


def test_host_speed_factor_from_recent_l0_boots(tmp_path: Path) -> None:
    assert hostspeed.load(tmp_path, "tcg-svm", 4.0).factor == 1.0  # nothing known yet
    sp = hostspeed.record(tmp_path, "tcg-svm", 4.0, 12.0)
    assert sp.factor == 3.0 and sp.source == "this run"
    # The median of the recent ones: one fluke does not swing it.
    hostspeed.record(tmp_path, "tcg-svm", 4.0, 12.4)
    sp = hostspeed.record(tmp_path, "tcg-svm", 4.0, 80.0)
    assert sp.factor == 3.1 and sp.samples == 3
    assert hostspeed.load(tmp_path, "tcg-svm", 4.0).factor == 3.1
    # Never below 1 (a faster host keeps the written timeouts), never above the cap.
    assert hostspeed.record(tmp_path, "fast", 4.0, 1.0).factor == 1.0
    for _ in range(3):
        sp = hostspeed.record(tmp_path, "broken", 4.0, 400.0)
    assert sp.factor == hostspeed.MAX_FACTOR
    # A profile without a reference is not scaled.
    assert hostspeed.record(tmp_path, "kvm-svm", None, 9.0).factor == 1.0


def test_unreadable_host_speed_file_starts_over(tmp_path: Path) -> None:
    (tmp_path / "host-speed.json").write_text("[broken")
    assert hostspeed.load(tmp_path, "tcg-svm", 4.0).factor == 1.0
    assert hostspeed.record(tmp_path, "tcg-svm", 4.0, 8.0).factor == 2.0


def test_tcg_profile_quiets_the_nested_timers() -> None:
    p = PROFILES["tcg-svm"]
    assert "-no-hpet" in p.nested_qemu_args and "no_timer_check" in p.nested_append
    assert p.reference_l0_init_s
