"""Out-of-tree kernel modules the lab builds for its kernels (lab/guest/inject/*.c): the
kprobe injection (lab_inject) and a WARNING on demand (lab_warn, for testing the alerts).

Built on the host against the kernel's build directory (Debian's headers for a Debian kernel,
the tree itself for a build tree; KernelSource.fetch_build_dir) and cached by the source, the
build directory and the compiler: nothing changed, nothing rebuilt.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from lab.cache import locked
from lab.errors import LabError


def source(name: str) -> bytes:
    return (resources.files("lab") / "guest" / "inject" / f"{name}.c").read_bytes()


def build(name: str, build_dir: Path, cache: Path) -> Path:
    """lab/guest/inject/NAME.c as NAME.ko for the kernel whose build directory is given."""
    src = source(name)
    h = hashlib.sha256(src)
    h.update(str(build_dir.resolve()).encode())
    for f in ("Module.symvers", ".config"):
        p = build_dir / f
        if p.exists():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    out = cache / "kmod" / f"{name}-{h.hexdigest()[:16]}"
    ko = out / f"{name}.ko"
    with locked(cache / "kmod" / f".{name}.lock"):
        if ko.exists():
            return ko
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / f"{name}.c").write_bytes(src)
        (tmp / "Kbuild").write_text(f"obj-m := {name}.o\n")
        try:
            r = subprocess.run(["make", "-s", "-C", str(build_dir), f"M={tmp}", "modules"],
                               capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise LabError("building a kernel module needs `make` (see `lab doctor`)") from None
        if r.returncode != 0 or not (tmp / f"{name}.ko").exists():
            raise LabError(f"building {name}.ko against {build_dir} failed: "
                           f"{(r.stdout + r.stderr).strip()[-800:]}")
        tmp.rename(out)
    return ko
