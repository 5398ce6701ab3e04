"""SSH keys: one client key per cache (never a password), one host key per image (pinned)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab.cache import locked
from lab.errors import LabError


def client_key(cache: Path) -> tuple[Path, str]:
    """The cache's ed25519 client key: (private key path, public key line)."""
    d = cache / "keys"
    priv, pub = d / "id_ed25519", d / "id_ed25519.pub"
    with locked(d / ".lock"):
        if not priv.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
            line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            tmp = priv.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            pub.write_bytes(line + b" lab-client\n")
            tmp.rename(priv)
    return priv, pub.read_text().strip()


def make_host_key(path: Path) -> str:
    """Generate a dropbear ed25519 host key at `path`; return its OpenSSH public line."""
    try:
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(path)], check=True,
                       capture_output=True, timeout=60)
        out = subprocess.run(["dropbearkey", "-y", "-f", str(path)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError:
        raise LabError("dropbearkey is not installed (apt-get install -y dropbear-bin)") from None
    except subprocess.CalledProcessError as e:
        raise LabError(f"dropbearkey failed: {e.stderr}") from None
    for line in out.splitlines():
        if line.startswith("ssh-ed25519 "):
            return " ".join(line.split()[:2])
    raise LabError(f"dropbearkey printed no ed25519 public key: {out!r}")
