"""images/lock.yaml: the exact Debian kernel package each recipe resolved to.

A recipe names a metapackage (`linux-image-cloud-amd64`) and maybe a suite; what that means moves
whenever Debian publishes a kernel. The lock file, beside the recipes and committed with them,
holds what it meant when it was pinned (package, version, SHA256), and every run uses that until
`lab images update` moves it on purpose (or the recipe's request changes). `--latest` runs what
the archive has now without touching the pins.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from lab import schema
from lab.cache import cache_root, locked, write_atomic

log = logging.getLogger(__name__)

NAME = "lock.yaml"
HEADER = ("# The kernels the image recipes resolved to (lab/lock.py). Written when a recipe is\n"
          "# first resolved and by `lab images update`; every run uses these until then.\n"
          "# Commit it with the recipes.\n")

PIN_SPEC = schema.Map({
    "request": schema.Field(schema.Str(max_len=300), required=True),
    "package": schema.Field(schema.Str(pattern=r"[a-z0-9][a-z0-9.+-]*",
                                       pattern_what="a Debian package name"), required=True),
    "version": schema.Field(schema.Str(pattern=r"[0-9A-Za-z.+~:-]+",
                                       pattern_what="a Debian version"), required=True),
    "sha256": schema.Field(schema.Str(pattern=r"[0-9a-f]{64}", pattern_what="a SHA256"),
                           required=True),
    "size": schema.Field(schema.Int(minimum=0), default=0),
})
LOCK_SPEC = schema.Dict(PIN_SPEC, key_check=lambda k: bool(k) and len(k) < 200,
                        key_what="a recipe name, or NAME@SUITE")


@dataclass(frozen=True)
class Pin:
    request: str  # what the recipe asked for: PACKAGE[=VERSION]@SUITE (host: the host's apt)
    package: str
    version: str
    sha256: str
    size: int = 0


def path_for(recipe: Path) -> Path:
    return recipe.parent / NAME


def key(recipe: Path, suite_override: str | None) -> str:
    """A recipe's entry; a run that gives L0 another suite's kernel pins it on its own."""
    return recipe.stem + (f"@{suite_override}" if suite_override else "")


def read(path: Path) -> dict[str, Pin]:
    try:
        empty = yaml.safe_load(path.read_text()) is None  # no pins yet: comments only
    except FileNotFoundError:
        return {}
    except yaml.YAMLError:
        empty = False  # schema.load says where
    data = {} if empty else schema.load(path, LOCK_SPEC)
    return {k: Pin(**{f: v[f] for f in ("request", "package", "version", "sha256", "size")})
            for k, v in (data or {}).items()}


def pinned(path: Path, entry: str, request: str) -> Pin | None:
    """The pin of `entry`, if it was made for this request (a changed recipe is pinned anew)."""
    pin = read(path).get(entry)
    return pin if pin is not None and pin.request == request else None


def record(path: Path, entry: str, pin: Pin) -> None:
    """Write (or move) one pin; the others stay as they are. Runs in parallel agree through a
    lock in the cache (the lock file is read, changed and written whole)."""
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    with locked(cache_root() / "run" / f".lockfile-{tag}.lock"):
        pins = read(path)
        old = pins.get(entry)
        if old == pin:
            return
        pins[entry] = pin
        body = {k: asdict(v) for k, v in sorted(pins.items())}
        write_atomic(path, HEADER + yaml.safe_dump(body, sort_keys=False, width=100))
        os.chmod(path, 0o644)  # a file of the repository, like the recipes beside it
    was = f" (was {old.package}={old.version})" if old else ""
    log.info(f"{path}: {entry} pinned to {pin.package}={pin.version}{was}")
