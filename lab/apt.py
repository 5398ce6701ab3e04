"""Debian's archive for kernels of any suite, without touching the host's apt configuration.

Recipes that name no suite resolve through the host's apt, as they always did. A recipe (or a
`--kernel debian:SUITE` run) that names one gets an apt root of its own in the cache
(`apt/SUITE/`: its sources, package lists and lock), read with apt's own tools pointed there by
`-o Dir::...` options. Its sources use the mirrors the host's apt is configured with (read from
its sources, one-line or deb822, with python-debian) and the archive keyring the host already
has; `apt-get update` there writes only into the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lab.cache import locked, write_atomic
from lab.errors import LabError

log = logging.getLogger(__name__)

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
HOST_LISTS = Path("/var/lib/apt/lists")

# What each suite the lab knows reads: (which archive, distribution) pairs. The security
# archive carries the kernels' point releases between Debian's own.
SUITES: dict[str, tuple[tuple[str, str], ...]] = {
    "bullseye": (("archive", "bullseye"), ("archive", "bullseye-updates"),
                 ("security", "bullseye-security")),
    "bookworm": (("archive", "bookworm"), ("archive", "bookworm-updates"),
                 ("security", "bookworm-security")),
    "trixie": (("archive", "trixie"), ("archive", "trixie-updates"),
               ("security", "trixie-security")),
    "bookworm-backports": (("archive", "bookworm-backports"),),
    "sid": (("archive", "sid"),),
}
# Codenames a host's sources may name (they tell a Debian mirror from a third party's).
_CODENAMES = {"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid", "unstable",
              "stable", "testing", "oldstable", "experimental"}
_DEBIAN_SUITE = re.compile(r"^([a-z]+)(?:-(?:updates|security|backports|backports-sloppy|"
                           r"proposed-updates)|/updates)?$")
# A suite's lists are refreshed when a pinned version is not in them and they are this old.
STALE_S = 6 * 3600


@dataclass(frozen=True)
class Mirrors:
    archive: str
    security: str | None


def _host_entries(sources: tuple[Path, ...]) -> list[tuple[str, str]]:
    """(URI, suite) of every `deb` entry of the host's apt sources, one-line and deb822."""
    from debian.deb822 import Deb822

    files: list[Path] = []
    for p in sources:
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.suffix in (".list", ".sources"))
        elif p.is_file():
            files.append(p)
    out: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for para in Deb822.iter_paragraphs(text.splitlines()):
                if "deb" not in para.get("Types", "").split() or \
                        para.get("Enabled", "yes").lower() == "no":
                    continue
                for uri in para.get("URIs", "").split():
                    out += [(uri, s) for s in para.get("Suites", "").split()]
            continue
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                out.append((m.group(1), m.group(2)))
    return out


def host_mirrors(sources: tuple[Path, ...] = HOST_SOURCES) -> Mirrors:
    """The Debian archive and security archive the host's apt reads, whatever mirror it uses."""
    archive = security = None
    for uri, suite in _host_entries(sources):
        m = _DEBIAN_SUITE.match(suite)
        if not m or m.group(1) not in _CODENAMES:
            continue  # a third party's repository
        if suite.endswith("-security") or suite.endswith("/updates"):
            security = security or uri
        else:
            archive = archive or uri
    if archive is None:
        where = ", ".join(str(p) for p in sources)
        raise LabError(f"the host's apt sources ({where}) name no Debian archive: the lab "
                       "takes the mirror for other suites from there")
    return Mirrors(archive, security)




class Apt:
    """apt-get and apt-cache for one suite's root in the cache, or for the host (suite None)."""

    def __init__(self, suite: str | None, cache: Path) -> None:
        self.suite = suite
        self.root = cache / "apt" / suite if suite else None

    @property
    def label(self) -> str:
        return self.suite or "host"

    def options(self) -> list[str]:
        if self.root is None:
            return []
        r = self.root
        return ["-o", f"Dir::Etc::SourceList={r}/sources.list",
                "-o", f"Dir::Etc::SourceParts={r}/sources.list.d",
                "-o", f"Dir::Etc::Preferences={r}/preferences",
                "-o", f"Dir::Etc::PreferencesParts={r}/preferences.d",
                "-o", f"Dir::State={r}/state", "-o", f"Dir::Cache={r}/cache",
                "-o", "Dir::State::status=/dev/null",  # nothing is installed from here
                "-o", "APT::Architectures::=amd64", "-o", "Acquire::Languages=none",
                "-o", "APT::Get::List-Cleanup=true"]

    def lists(self) -> Path:
        return self.root / "state" / "lists" if self.root else HOST_LISTS

    def stamp(self) -> str:
        """Changes whenever this root's package lists do."""
        parts = []
        for p in sorted(self.lists().glob("*_Packages*")):
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def age(self) -> float:
        """Seconds since the lists were fetched (infinite: never)."""
        got = [p.stat().st_mtime for p in self.lists().glob("*_Packages*")]
        return time.time() - max(got) if got else float("inf")

    def _write_sources(self) -> None:
        assert self.root is not None and self.suite is not None
        mirrors = host_mirrors()
        lines = [f"# The lab's own apt root for {self.suite} (lab/apt.py); not the host's."]
        for kind, dist in SUITES[self.suite]:
            uri = mirrors.archive if kind == "archive" else mirrors.security
            if uri is None:
                continue  # the host reads no security archive: the main one still has it all
            lines.append(f"deb [signed-by={KEYRING}] {uri} {dist} main")
        for d in ("sources.list.d", "preferences.d", "state/lists/partial",
                  "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / "sources.list", "\n".join(lines) + "\n")

    def update(self) -> None:
        """Fetch this suite's package lists into its root (the host's are not the lab's to
        update: a recipe without a suite uses them as they are)."""
        if self.root is None:
            return
        if not KEYRING.is_file():
            raise LabError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
        with locked(self.root.parent / f".{self.suite}.lock"):
            self._write_sources()
            t = time.monotonic()
            log.info(f"apt: fetching the package lists of {self.suite} (the lab's own root)")
            self.run(["apt-get", "-q", *self.options(), "update"], f"apt-get update "
                      f"({self.suite})")
            log.info(f"apt: {self.suite} lists in {time.monotonic() - t:.1f} s")

    def ensure(self, max_age: float | None = None) -> None:
        """Lists present (and, with `max_age`, no older than that many seconds)."""
        if self.root is None:
            return
        if self.age() == float("inf") or (max_age is not None and self.age() > max_age):
            self.update()

    def cache_cmd(self, *args: str) -> list[str]:
        self.ensure()
        return ["apt-cache", *self.options(), *args]

    def get_cmd(self, *args: str) -> list[str]:
        self.ensure()
        return ["apt-get", *self.options(), *args]

    @staticmethod
    def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=1800,
                               env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError:
            raise LabError(f"{what}: {cmd[0]} is not installed") from None
        if p.returncode != 0:
            raise LabError(f"{what}: `{' '.join(cmd[:1] + cmd[-2:])}` failed: "
                           f"{p.stderr.strip()[-500:]}")
        return p.stdout
