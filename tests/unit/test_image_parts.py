"""Pieces of the image builder that need no download: cpio, modules.dep, .modinfo, keys."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import cpio
from lab.image import Plan, _modules_dep
from lab.keys import client_key


def test_cpio_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    tree = cpio.Tree()
    tree.add_file("bin/x", src, 0o755)
    tree.add_data("etc/y", b"data", 0o600)
    tree.symlink("init", "bin/x")
    buf = io.BytesIO()
    tree.write(buf)
    again = io.BytesIO()
    tree.write(again)
    assert buf.getvalue() == again.getvalue()  # reproducible
    if shutil.which("cpio") is None:
        pytest.skip("cpio(1) is not installed to list the archive")
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=buf.getvalue(),
                         capture_output=True).stdout.decode()
    assert "bin/x" in out and "etc/y" in out and "init -> bin/x" in out


def test_modules_dep_loads_dependencies_first() -> None:
    plan = Plan()
    rel = "6.1.0"
    plan.modules = [
        ("virtio_ring", f"lib/modules/{rel}/kernel/virtio_ring.ko", []),
        ("virtio", f"lib/modules/{rel}/kernel/virtio.ko", ["virtio_ring"]),
        ("virtio_pci", f"lib/modules/{rel}/kernel/virtio_pci.ko", ["virtio_ring", "virtio"]),
    ]
    dep = _modules_dep(plan, rel).decode().splitlines()
    line = next(ln for ln in dep if ln.startswith("kernel/virtio_pci.ko:"))
    listed = line.split(":")[1].split()
    # modprobe loads from the end of the list: virtio_ring must come after virtio in it
    assert listed == ["kernel/virtio.ko", "kernel/virtio_ring.ko"]


def test_client_key_is_made_once_and_private(tmp_path: Path) -> None:
    priv, pub = client_key(tmp_path)
    assert pub.startswith("ssh-ed25519 ") and (priv.stat().st_mode & 0o777) == 0o600
    assert client_key(tmp_path) == (priv, pub)
