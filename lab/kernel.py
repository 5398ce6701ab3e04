"""Where a lab kernel comes from: a Debian package (default) or a developer's build tree.

Both give the same things: a bzImage, the kernel release, a directory to find modules in, and
the debug symbols (vmlinux and module objects) that the probes need on the host. Neither ever
puts the debug symbols into an image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lab.cache import file_sha256, locked
from lab.elfinfo import modinfo
from lab.errors import LabError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelFiles:
    release: str  # `uname -r`
    label: str  # what to show a person: "debian linux-image-...=6.1.192-2" or "tree /path"
    bzimage: Path
    module_root: Path  # searched for *.ko
    identity: str  # content identity, for cache keys


@dataclass(frozen=True)
class DebugFiles:
    vmlinux: Path
    module_root: Path  # searched for *.ko with DWARF
    system_map: Path | None


class KernelSource(Protocol):
    def identity(self) -> str:
        """A cheap string that changes whenever the kernel's content does."""

    def fetch(self, cache: Path) -> KernelFiles: ...

    def fetch_debug(self, cache: Path) -> DebugFiles: ...

    def fetch_build_dir(self, cache: Path) -> Path:
        """Where `make -C DIR M=...` builds an out-of-tree module for this kernel."""
        ...


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=1800)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]} is not installed") from None
    if p.returncode != 0:
        raise LabError(f"{what}: `{' '.join(cmd)}` failed: {p.stderr.strip()[-500:]}")
    return p.stdout


@dataclass(frozen=True)
class AptPackage:
    name: str
    version: str
    sha256: str
    size: int = 0  # bytes of the .deb, as apt records it (0: unknown)


def apt_show(name: str, version: str | None = None) -> AptPackage:
    """The candidate (or a given) version of a package, as apt knows it."""
    out = _run(["apt-cache", "show", f"{name}={version}" if version else name],
               f"resolving {name} through apt")
    records = [r for r in out.split("\n\n") if r.strip()]
    if not records:
        raise LabError(f"apt knows no package {name}")
    if version is None:
        policy = _run(["apt-cache", "policy", name], f"resolving {name} through apt")
        m = re.search(r"Candidate:\s*(\S+)", policy)
        cand = m.group(1) if m else None
        records = [r for r in records if re.search(rf"^Version: {re.escape(cand or '')}$",
                                                   r, re.M)] or records
    rec = records[0]
    fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", rec, re.M))
    return AptPackage(name, fields["Version"], fields.get("SHA256", ""),
                      int(fields.get("Size", "0") or 0))


def apt_resolve_image(meta: str) -> str:
    """Follow a metapackage (linux-image-cloud-amd64) to the versioned image package."""
    if re.match(r"linux-image-\d", meta):
        return meta
    out = _run(["apt-cache", "depends", meta], f"resolving {meta} through apt")
    for m in re.finditer(r"Depends: (linux-image-\d\S*)", out):
        return m.group(1)
    raise LabError(f"{meta} does not depend on a versioned linux-image package")


APT_LISTS = Path("/var/lib/apt/lists")
_RESOLVE_MEMO: Path | None = None  # set by tests; default inside the cache


def _lists_stamp() -> str:
    """Changes whenever apt's package lists do (apt-get update)."""
    parts = []
    for p in sorted(APT_LISTS.glob("*_Packages*")):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _memo_resolve(package: str, version: str | None) -> AptPackage:
    """apt-cache takes ~0.5 s a call; its answer only changes with the package lists, so
    remember it per lists stamp (a rebuild with nothing changed stays well under a second)."""
    from lab.cache import cache_root

    memo = _RESOLVE_MEMO or cache_root() / "apt-resolve.json"
    key = f"{package}={version or ''}"
    stamp = _lists_stamp()
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    hit = known.get(key)
    if hit and hit.get("stamp") == stamp:
        return AptPackage(hit["name"], hit["version"], hit["sha256"], hit.get("size", 0))
    name = apt_resolve_image(package)
    pkg = apt_show(name, version if name == package else None)
    known[key] = {"stamp": stamp, "name": pkg.name, "version": pkg.version, "sha256": pkg.sha256,
                  "size": pkg.size}
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, memo)
    return pkg


def _download(pkg: AptPackage, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    deb = dest / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_amd64.deb"
    if not pkg.sha256:
        # apt always records one: without it nothing would check what was downloaded.
        raise LabError(f"{pkg.name}={pkg.version}: apt has no SHA256 for it; refusing to use "
                       "an unchecked download")
    with locked(dest / f"{pkg.name}.lock"):
        if deb.exists() and file_sha256(deb) == pkg.sha256:
            return deb
        tmp = dest / f".tmp-{pkg.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        t = time.monotonic()
        mb = f", {pkg.size / 2**20:.0f} MB" if pkg.size else ""
        log.info(f"downloading {pkg.name}={pkg.version}{mb} (once per kernel)")
        _run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"],
             f"downloading {pkg.name}", cwd=tmp)
        log.info(f"downloaded {pkg.name} in {time.monotonic() - t:.1f} s")
        got = next(tmp.glob("*.deb"))
        if file_sha256(got) != pkg.sha256:
            raise LabError(f"{got.name}: SHA256 does not match apt's record")
        got.rename(deb)
        shutil.rmtree(tmp, ignore_errors=True)
    return deb


def fetch_unpacked(pkg: AptPackage, cache: Path, dest: Path,
                    patterns: list[str] | None = None) -> None:
    """A package unpacked at `dest` (or its members matching `patterns`): downloaded only if
    it is not unpacked yet, and the .deb not kept once it is (the lab reads only what it
    unpacked; ~1.3 GB per kernel with its debug package)."""
    if dest.exists():
        return
    deb = _download(pkg, cache / "downloads")
    t = time.monotonic()
    _extract(deb, dest, patterns)
    log.info(f"unpacked {deb.name} in {time.monotonic() - t:.1f} s")
    with contextlib.suppress(OSError):
        deb.unlink()


def _extract(deb: Path, dest: Path, patterns: list[str] | None = None) -> None:
    """Unpack a .deb (or only the members matching shell patterns) into dest, atomically."""
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if patterns is None:
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
    else:
        # dpkg-deb streams the data tarball; tar keeps only what the probes need.
        cmd = (f"dpkg-deb --fsys-tarfile '{deb}' | tar -x -C '{tmp}' --wildcards "
               + " ".join(f"'{p}'" for p in patterns))
        p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(f"unpacking {deb.name}: {p.stderr.strip()[-500:]}")
    tmp.rename(dest)


@dataclass
class DebianKernel:
    """A kernel from Debian's archive, resolved through apt (the metapackage by default)."""

    package: str = "linux-image-cloud-amd64"
    version: str | None = None

    def _resolve(self) -> AptPackage:
        if not hasattr(self, "_pkg"):
            self._pkg = _memo_resolve(self.package, self.version)
        return self._pkg

    def release(self) -> str:
        name = self._resolve().name
        return re.sub(r"-unsigned$", "", name.removeprefix("linux-image-"))

    def identity(self) -> str:
        p = self._resolve()
        return f"debian:{p.name}={p.version}:{p.sha256}"

    def fetch(self, cache: Path) -> KernelFiles:
        pkg = self._resolve()
        rel = self.release()
        root = cache / "kernels" / f"{rel}_{pkg.version}"
        with locked(cache / "kernels" / f"{rel}.lock"):
            fetch_unpacked(pkg, cache, root)
        return KernelFiles(release=rel, label=f"debian {pkg.name}={pkg.version}",
                           bzimage=root / "boot" / f"vmlinuz-{rel}",
                           module_root=root / "lib" / "modules" / rel / "kernel",
                           identity=self.identity())

    def fetch_debug(self, cache: Path) -> DebugFiles:
        pkg = self._resolve()
        rel = self.release()
        root = cache / "debug" / f"{rel}_{pkg.version}"
        with locked(cache / "debug" / f"{rel}.lock"):
            if not root.exists():  # apt is asked only the first time
                dbg = apt_show(f"linux-image-{rel}-dbg", pkg.version)
                # 1.7 GB unpacked in full; vmlinux, System.map and the KVM modules are what
                # the lab uses.
                fetch_unpacked(dbg, cache, root, [
                    "./usr/lib/debug/boot/*",
                    f"./usr/lib/debug/lib/modules/{rel}/kernel/arch/x86/kvm/*",
                    f"./usr/lib/debug/lib/modules/{rel}/kernel/virt/*"])
        base = root / "usr" / "lib" / "debug"
        return DebugFiles(vmlinux=base / "boot" / f"vmlinux-{rel}",
                          module_root=base / "lib" / "modules" / rel / "kernel",
                          system_map=base / "boot" / f"System.map-{rel}")

    def fetch_build_dir(self, cache: Path) -> Path:
        """Debian's headers for this exact kernel (linux-headers-REL, its -common and
        linux-kbuild), unpacked side by side in the cache: their symlinks are relative, and
        the one absolute include in the Makefile is pointed at the cache."""
        pkg = self._resolve()
        rel = self.release()
        root = cache / "headers" / f"{rel}_{pkg.version}"
        with locked(cache / "headers" / f"{rel}.lock"):
            if not root.exists():  # apt is asked only the first time
                hdr = apt_show(f"linux-headers-{rel}", pkg.version)
                deps = _run(["apt-cache", "show", f"{hdr.name}={hdr.version}"],
                            f"resolving {hdr.name} through apt")
                m = re.search(r"^Depends: (.*)$", deps, re.M)
                wanted = [hdr]
                for dep in (m.group(1).split(",") if m else []):
                    dm = re.match(r"\s*(linux-(?:headers|kbuild)-[\w.+-]+)\s*"
                                  r"\((?:=|>=)\s*([^)]+)\)", dep)
                    if dm:
                        wanted.append(apt_show(dm.group(1), dm.group(2).strip()))
                tmp = root.with_name(root.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                for p in wanted:
                    fetch_unpacked(p, cache, tmp / p.name)
                merged = tmp / "root"
                for p in wanted:
                    _run(["cp", "-a", f"{tmp / p.name}/.", str(merged)], "merging headers")
                    shutil.rmtree(tmp / p.name)
                mk = merged / "usr" / "src" / f"linux-headers-{rel}" / "Makefile"
                mk.write_text(mk.read_text().replace("include /usr/src/",
                                                     f"include {root}/root/usr/src/"))
                tmp.rename(root)
        return root / "root" / "usr" / "src" / f"linux-headers-{rel}"


@dataclass
class TreeKernel:
    """A developer's kernel build tree: arch/x86/boot/bzImage, vmlinux, and *.ko in place."""

    path: Path

    def _check(self) -> None:
        for rel in ("arch/x86/boot/bzImage", "include/config/kernel.release"):
            if not (self.path / rel).exists():
                raise UsageError(f"{self.path}: not a built kernel tree ({rel} is missing)")

    def release(self) -> str:
        self._check()
        return (self.path / "include/config/kernel.release").read_text().strip()

    def identity(self) -> str:
        self._check()
        h = hashlib.sha256()
        h.update(file_sha256(self.path / "arch/x86/boot/bzImage").encode())
        h.update(self.release().encode())
        return f"tree:{self.path}:{h.hexdigest()}"

    def fetch(self, cache: Path) -> KernelFiles:
        return KernelFiles(release=self.release(), label=f"tree {self.path}",
                           bzimage=self.path / "arch/x86/boot/bzImage", module_root=self.path,
                           identity=self.identity())

    def fetch_debug(self, cache: Path) -> DebugFiles:
        vmlinux = self.path / "vmlinux"
        if not vmlinux.exists():
            raise UsageError(f"{self.path}: no vmlinux in the build tree")
        smap = self.path / "System.map"
        return DebugFiles(vmlinux=vmlinux, module_root=self.path,
                          system_map=smap if smap.exists() else None)

    def fetch_build_dir(self, cache: Path) -> Path:
        self._check()
        return self.path


def module_index(root: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> .ko path, for every module under root."""
    index: dict[str, Path] = {}
    for ko in sorted(root.rglob("*.ko")):
        if any(part.startswith(".") for part in ko.relative_to(root).parts):
            continue
        index.setdefault(ko.stem.replace("-", "_"), ko)
    return index


def resolve_modules(root: Path, names: list[str]) -> list[tuple[str, Path, list[str]]]:
    """The named modules and everything they depend on: (name, path, depends), deps first."""
    index = module_index(root)
    order: list[tuple[str, Path, list[str]]] = []
    seen: set[str] = set()

    def visit(name: str, wanted_by: str | None) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in index:
            by = f" (needed by {wanted_by})" if wanted_by else ""
            raise UsageError(f"kernel module {name}{by} is not in {root}")
        seen.add(name)
        ko = index[name]
        deps = [d for d in modinfo(ko).get("depends", "").split(",") if d]
        for d in deps:
            visit(d, name)
        order.append((name, ko, [d.replace("-", "_") for d in deps]))

    for n in names:
        visit(n, None)
    return order


