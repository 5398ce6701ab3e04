"""A user's defaults file ($XDG_CONFIG_HOME/lab/config.yaml)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import config, driver
from lab.errors import UsageError


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: Any) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config.load.cache_clear()
    yield tmp_path / "xdg" / "lab" / "config.yaml"
    config.load.cache_clear()


def test_defaults_come_from_the_file(cfg: Path, tmp_path: Path, monkeypatch: Any) -> None:
    assert config.load() == config.Config()
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"profile: bochs-vmx\nruns: {tmp_path}/myruns\ncache: {tmp_path}/c\n")
    cfg.chmod(0o600)
    config.load.cache_clear()
    c = config.load()
    assert c.profile == "bochs-vmx" and c.runs == tmp_path / "myruns"
    monkeypatch.delenv("LAB_CACHE", raising=False)
    from lab.cache import cache_root

    assert cache_root() == (tmp_path / "c").resolve()
    d = driver.new_run_dir(None, "smoke")
    assert d.parent == (tmp_path / "myruns").resolve() and d.name.endswith("-smoke")
    monkeypatch.setattr(driver, "resolve_profile", lambda name: name)
    assert driver.profile_for(None, "auto") == "bochs-vmx"
    assert driver.profile_for(None, "tcg-svm") == "tcg-svm"  # the playbook's own choice
    assert driver.profile_for("kvm-svm", "auto") == "kvm-svm"  # --profile first


def test_a_bad_or_foreign_file_is_refused(cfg: Path) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_text("profile: fast\n")
    cfg.chmod(0o600)
    with pytest.raises(UsageError, match=r"config.yaml:1: profile: expected one of"):
        config.load()
    config.load.cache_clear()
    cfg.write_text("profile: tcg-svm\n")
    cfg.chmod(0o666)
    with pytest.raises(UsageError, match="writable by nobody else"):
        config.load()
