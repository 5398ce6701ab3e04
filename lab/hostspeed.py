"""How fast this host runs the lab, next to the host its timeouts were written on.

The same commit boots the nested chain several times slower on one machine of a kind than on
another, and a timeout sized on a fast host turns a slow host's run into a failure. L0's own
boot (launch to /init) is measured on every cold boot anyway; its ratio to the profile's
reference is the host's factor, and the lab's boot and step timeouts are multiplied by it. The
last few measurements per profile are kept in the cache, so a warm start (which boots nothing)
and L0's own boot budget use what the host showed before; the median keeps one fluke out.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.cache import write_atomic

MAX_FACTOR = 8.0  # beyond this, a host is not slow but broken: let the timeouts say so
KEEP = 5  # measurements kept per profile


@dataclass
class HostSpeed:
    factor: float = 1.0
    l0_init_s: float | None = None  # the median of the recent measurements
    reference_s: float | None = None  # L0 launch to /init on the reference host
    samples: int = 0
    source: str = "default"  # "default" | "cache" | "this run"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _file(cache: Path) -> Path:
    return cache / "host-speed.json"


def _read(cache: Path) -> dict[str, list[float]]:
    try:
        data = json.loads(_file(cache).read_text())
        return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list)}
    except (OSError, ValueError, TypeError):
        return {}  # missing or unreadable: start over, never fatal


def _speed(samples: list[float], reference: float | None, source: str) -> HostSpeed:
    if not samples or not reference:
        return HostSpeed(reference_s=reference)
    med = statistics.median(samples)
    factor = min(max(med / reference, 1.0), MAX_FACTOR)
    return HostSpeed(factor=round(factor, 2), l0_init_s=round(med, 2), reference_s=reference,
                     samples=len(samples), source=source)


def load(cache: Path, profile: str, reference: float | None) -> HostSpeed:
    """What earlier runs of this profile measured (factor 1 when nothing is known)."""
    return _speed(_read(cache).get(profile, []), reference, "cache")


def record(cache: Path, profile: str, reference: float | None, l0_init_s: float) -> HostSpeed:
    """Add this run's measurement and return the factor it gives with the recent ones."""
    data = _read(cache)
    samples = ([*data.get(profile, []), round(l0_init_s, 3)])[-KEEP:]
    data[profile] = samples
    # Two labs finishing at once never leave a torn file; a failed write only loses a sample.
    with contextlib.suppress(OSError):
        write_atomic(_file(cache), json.dumps(data))
    return _speed(samples, reference, "this run")
