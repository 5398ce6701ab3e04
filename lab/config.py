"""A user's defaults: $XDG_CONFIG_HOME/lab/config.yaml (~/.config/lab/config.yaml).

    profile: tcg-svm          # for playbooks that say `auto`, when no --profile is given
    cache: /srv/lab-cache     # the cache (LAB_CACHE, when set, still wins)
    runs: ~/lab-runs          # where run directories go without --out
    kvm_unit_tests: ~/src/kvm-unit-tests   # your build, for kvm_unit_tests steps

The file is trusted like the cache it names (the lab builds and boots what is there): it must
be this user's and writable by nobody else, or it is refused.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from lab import schema
from lab.errors import UsageError
from lab.profiles import PROFILES

SPEC = schema.Map({
    "profile": schema.Field(schema.Str(choices=tuple(PROFILES)), default=None),
    "cache": schema.Field(schema.Str(max_len=4096), default=None),
    "runs": schema.Field(schema.Str(max_len=4096), default=None),
    "kvm_unit_tests": schema.Field(schema.Str(max_len=4096), default=None),
})


@dataclass(frozen=True)
class Config:
    profile: str | None = None
    cache: Path | None = None
    runs: Path | None = None
    kvm_unit_tests: Path | None = None  # a kvm-unit-tests build, for kvm_unit_tests steps


def path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lab" / "config.yaml"


@functools.cache
def load() -> Config:
    p = path()
    if not p.is_file():
        return Config()
    st = p.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UsageError(f"{p}: belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}; "
                         "expected this user's, writable by nobody else")
    data = schema.load(p, SPEC)

    def where(key: str) -> Path | None:
        return Path(data[key]).expanduser() if data[key] else None

    return Config(profile=data["profile"], cache=where("cache"), runs=where("runs"),
                  kvm_unit_tests=where("kvm_unit_tests"))
