"""The lab's guest-side test programs (lab/guest/tools/*.c), built static on the host.

Each binary is cached by the hash of its source and compiler, so an unchanged tool keeps the
same bytes and the images that carry it keep their keys.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from lab.cache import locked
from lab.errors import LabError

CFLAGS = ["-O2", "-static", "-Wall", "-Wextra", "-Werror"]


def _files(suffix: str) -> dict[str, bytes]:
    d = resources.files("lab") / "guest" / "tools"
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name.endswith(suffix)}


def sources() -> dict[str, bytes]:
    """tool name -> C source; each tool is one .c file plus the shared headers."""
    return {name.removesuffix(".c"): src for name, src in _files(".c").items()}


def build(cache: Path) -> dict[str, Path]:
    """name -> static binary, for every tool."""
    cc = shutil.which("gcc")
    if cc is None:
        raise LabError("gcc is not installed (apt-get install -y gcc libc6-dev)")
    out = {}
    headers = _files(".h")
    shared = b"".join(k.encode() + v for k, v in sorted(headers.items()))
    for name, src in sorted(sources().items()):
        h = hashlib.sha256(src + shared + " ".join(CFLAGS).encode() + cc.encode()
                           ).hexdigest()[:16]
        binary = cache / "tools" / f"{name}-{h}" / name
        if not binary.exists():
            with locked(cache / "tools" / f".{name}-{h}.lock"):
                if not binary.exists():
                    tmp = binary.parent.with_name(binary.parent.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    (tmp / f"{name}.c").write_bytes(src)
                    for hname, body in headers.items():
                        (tmp / hname).write_bytes(body)
                    p = subprocess.run([cc, *CFLAGS, "-I", str(tmp), "-o", str(tmp / name),
                                        str(tmp / f"{name}.c")], capture_output=True, text=True)
                    if p.returncode != 0:
                        raise LabError(f"building {name}: {p.stderr.strip()[-1500:]}")
                    tmp.rename(binary.parent)
        out[name] = binary
    return out
