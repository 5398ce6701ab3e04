"""`lab cache`: what the cache holds, and pruning what was not used for a while."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lab import cache


def _entry(root: Path, part: str, name: str, size: int, age_days: float) -> Path:
    e = root / part / name
    e.mkdir(parents=True)
    (e / "data").write_bytes(b"x" * size)
    t = time.time() - age_days * 86400
    os.utime(e, (t, t))
    return e


def test_usage_and_prune_keep_what_is_recent_or_not_rebuildable(tmp_path: Path) -> None:
    old_img = _entry(tmp_path, "images", "default-aaa", 1000, 30)
    new_img = _entry(tmp_path, "images", "default-bbb", 2000, 1)
    old_snap = _entry(tmp_path, "snapshots", "k1", 500, 20)
    kernel = _entry(tmp_path, "kernels", "6.1.0-57", 700, 90)  # unpacked: never pruned
    (tmp_path / "images" / ".default.lock").write_text("")
    use = {name: (size, n) for name, size, n, _ in cache.usage(tmp_path)}
    assert use["images"] == (3000, 2) and use["kernels"] == (700, 1)
    would = cache.prune(tmp_path, 14, dry_run=True)
    assert sorted(p.name for p, _ in would) == ["default-aaa", "k1"]
    assert old_img.exists() and old_snap.exists()
    gone = cache.prune(tmp_path, 14)
    assert sum(size for _, size in gone) == 1500
    assert not old_img.exists() and not old_snap.exists()
    assert new_img.exists() and kernel.exists() and (tmp_path / "images" / ".default.lock").exists()
