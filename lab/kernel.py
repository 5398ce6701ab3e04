"""Where a lab kernel comes from: a Debian package (default) or a developer's build tree.

Both give the same things: a bzImage, the kernel release, a directory to find modules in, and
the debug symbols (vmlinux and module objects) that the probes need on the host. Neither ever
puts the debug symbols into an image.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lab.apt import STALE_S, Apt
from lab.cache import cache_root, file_sha256, locked
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


def apt_show(name: str, version: str | None = None, apt: Apt | None = None) -> AptPackage:
    """The candidate (or a given) version of a package, as apt (the host's, or a suite's root
    in the cache) knows it."""
    apt = apt or Apt(None, cache_root())
    what = f"resolving {name} through apt ({apt.label})"
    out = apt.run(apt.cache_cmd("show", f"{name}={version}" if version else name), what)
    records = [r for r in out.split("\n\n") if r.strip()]
    if not records:
        raise LabError(f"apt ({apt.label}) knows no package {name}")
    if version is None:
        policy = apt.run(apt.cache_cmd("policy", name), what)
        m = re.search(r"Candidate:\s*(\S+)", policy)
        cand = m.group(1) if m else None
        records = [r for r in records if re.search(rf"^Version: {re.escape(cand or '')}$",
                                                   r, re.M)] or records
    fields = _fields(records[0])
    return AptPackage(name, fields["Version"], fields.get("SHA256", ""),
                      int(fields.get("Size", "0") or 0))


def _fields(record: str) -> dict[str, str]:
    """One package's record of `apt-cache show` (deb822: continuation lines included)."""
    from debian.deb822 import Deb822

    return dict(Deb822(record.splitlines()))


def _dependencies(pkg: AptPackage, names: str, relations: str, apt: Apt) -> list[AptPackage]:
    """The packages `pkg` depends on whose names start with the pattern `names`, at the
    versions its Depends names them with one of `relations` (`=`, `=|>=`)."""
    out = apt.run(apt.cache_cmd("show", f"{pkg.name}={pkg.version}"),
                  f"reading {pkg.name}'s dependencies through apt ({apt.label})")
    found = []
    for dep in _fields(out.split("\n\n")[0]).get("Depends", "").split(","):
        m = re.match(rf"\s*({names}[\w.+-]+)\s*\((?:{relations})\s*([^)]+)\)", dep)
        if m:
            found.append(apt_show(m.group(1), m.group(2).strip(), apt))
    return found


def apt_resolve_image(meta: str, apt: Apt | None = None) -> str:
    """Follow a metapackage (linux-image-cloud-amd64) to the versioned image package."""
    if re.match(r"linux-image-\d", meta):
        return meta
    apt = apt or Apt(None, cache_root())
    out = apt.run(apt.cache_cmd("depends", meta), f"resolving {meta} through apt ({apt.label})")
    for m in re.finditer(r"Depends: (linux-image-\d\S*)", out):
        return m.group(1)
    raise LabError(f"{meta} does not depend on a versioned linux-image package")


_RESOLVE_MEMO: Path | None = None  # set by tests; default inside the cache


def _memo_resolve(package: str, version: str | None, apt: Apt) -> AptPackage:
    """apt-cache takes ~0.5 s a call; its answer only changes with the package lists, so
    remember it per lists stamp (a rebuild with nothing changed stays well under a second)."""
    memo = _RESOLVE_MEMO or cache_root() / "apt-resolve.json"
    key = f"{package}={version or ''}" + (f"@{apt.suite}" if apt.suite else "")
    apt.ensure()
    stamp = apt.stamp()
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    hit = known.get(key)
    if hit and hit.get("stamp") == stamp:
        return AptPackage(hit["name"], hit["version"], hit["sha256"], hit.get("size", 0))
    name = apt_resolve_image(package, apt)
    pkg = apt_show(name, version if name == package else None, apt)
    known[key] = {"stamp": stamp, "name": pkg.name, "version": pkg.version, "sha256": pkg.sha256,
                  "size": pkg.size}
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, memo)
    return pkg


def _download(pkg: AptPackage, dest: Path, apt: Apt) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    deb = dest / f"{pkg.name}_{pkg.version.replace(':', '%3a')}.deb"
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
        what = f"downloading {pkg.name}={pkg.version} ({apt.label})"
        try:
            apt.run(apt.get_cmd("download", "-q", f"{pkg.name}={pkg.version}"), what, cwd=tmp)
        except LabError as e:
            if apt.root is None or apt.age() < STALE_S:
                said = str(e).rsplit("failed:", 1)[-1]
                errs = [ln.strip() for ln in said.splitlines() if ln.startswith("E:")]
                err = " ".join(errs) or re.sub(r"\s+", " ", said).strip()
                raise LabError(f"{what}: {err[-300:]} (a version the archive no longer "
                               "serves? `lab images update` moves a pin)") from None
            apt.update()  # old lists: the pinned version may be in newer ones
            apt.run(apt.get_cmd("download", "-q", f"{pkg.name}={pkg.version}"), what, cwd=tmp)
        log.info(f"downloaded {pkg.name} in {time.monotonic() - t:.1f} s")
        got = next(tmp.glob("*.deb"))
        if file_sha256(got) != pkg.sha256:
            raise LabError(f"{got.name}: SHA256 does not match apt's record")
        got.rename(deb)
        shutil.rmtree(tmp, ignore_errors=True)
    return deb


def fetch_unpacked(pkg: AptPackage | list[AptPackage], cache: Path, dest: Path,
                   patterns: list[str] | None = None, apt: Apt | None = None) -> None:
    """A package (or several, into one tree) unpacked at `dest` (or their members matching
    `patterns`): downloaded only if not unpacked yet, and the .deb not kept once it is (the lab
    reads only what it unpacked; ~1.3 GB per kernel with its debug package)."""
    if dest.exists():
        return
    pkgs = pkg if isinstance(pkg, list) else [pkg]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for one in pkgs:
        deb = _download(one, cache / "downloads", apt or Apt(None, cache))
        t = time.monotonic()
        _extract(deb, tmp, patterns)
        log.info(f"unpacked {deb.name} in {time.monotonic() - t:.1f} s")
        with contextlib.suppress(OSError):
            deb.unlink()
    tmp.rename(dest)


def _extract(deb: Path, into: Path, patterns: list[str] | None = None) -> None:
    """Unpack a .deb (or only its members matching shell patterns, where `*` crosses `/`)
    into a directory; a pattern that matches nothing is no error (layouts differ by kernel)."""
    if patterns is None:
        _run(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}")
        return
    # dpkg-deb streams the data tarball; only what the lab reads is written out, through
    # tarfile's "data" filter (nothing outside `into`, no device files).
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                if not m.isdir() and any(fnmatch.fnmatchcase(m.name, p) for p in patterns):
                    tar.extract(m, into, filter="data")
    except (tarfile.TarError, OSError) as e:
        proc.kill()
        raise LabError(f"unpacking {deb.name}: {e}") from None
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise LabError(f"unpacking {deb.name}: dpkg-deb: {err.strip()[-500:]}")


def _decompress_modules(root: Path) -> None:
    """Newer Debian kernels ship modules as .ko.xz: the lab reads them (modinfo, gdb) and
    puts them into images as plain .ko, so they are decompressed once, here."""
    packed = [str(p) for p in root.rglob("*.ko.xz")]
    for i in range(0, len(packed), 500):
        _run(["xz", "-d", "-T1", *packed[i:i + 500]], "decompressing the kernel's modules")


def _first(*paths: Path) -> Path:
    """The first of the places a file may be in (Debian moved them between releases)."""
    return next((p for p in paths if p.exists() or p.is_symlink()), paths[0])


@dataclass
class DebianKernel:
    """A kernel from Debian's archive, resolved through apt (the metapackage by default): the
    host's, or the lab's own root for `suite`. `pin`: the exact package a lock file recorded,
    used as it is (apt is then asked only to download it)."""

    package: str = "linux-image-cloud-amd64"
    version: str | None = None
    suite: str | None = None
    lock: tuple[Path, str] | None = None  # (lock file, entry): pinned there (None: --latest)

    @property
    def apt(self) -> Apt:
        return Apt(self.suite, cache_root())

    def resolve_latest(self) -> AptPackage:
        """What the request resolves to in the archive now (the lists as they are)."""
        return _memo_resolve(self.package, self.version, self.apt)

    def pinned(self) -> AptPackage | None:
        from lab import lock

        if self.lock is None:
            return None
        pin = lock.pinned(*self.lock, self.request)
        return AptPackage(pin.package, pin.version, pin.sha256, pin.size) if pin else None

    def _resolve(self) -> AptPackage:
        """The pinned package; unpinned, what apt resolves the request to, pinned from now on."""
        from lab import lock

        if not hasattr(self, "_pkg"):
            pkg = self.pinned()
            if pkg is None:
                if self.lock is None:  # --latest: a suite's lists no older than an hour
                    self.apt.ensure(max_age=3600)
                pkg = self.resolve_latest()
                if self.lock is not None:
                    lock.record(*self.lock, lock.Pin(self.request, pkg.name, pkg.version,
                                                     pkg.sha256, pkg.size))
            self._pkg = pkg
        return self._pkg

    @property
    def request(self) -> str:
        """What the recipe asks for, as the lock file records it."""
        return f"{self.package}{'=' + self.version if self.version else ''}" \
               f"@{self.suite or 'host'}"

    def release(self) -> str:
        name = self._resolve().name
        return re.sub(r"-unsigned$", "", name.removeprefix("linux-image-"))

    def identity(self) -> str:
        p = self._resolve()
        return f"debian:{p.name}={p.version}:{p.sha256}"

    def _parts(self, pkg: AptPackage) -> list[AptPackage]:
        """The packages that hold the kernel: the image package itself, and since Debian's
        7.x the linux-binary/-modules/-base packages it depends on (the vmlinuz, the modules
        and System.map are no longer in it)."""
        return [pkg, *_dependencies(pkg, r"linux-(?:binary|modules|base)-", "=", self.apt)]

    def fetch(self, cache: Path) -> KernelFiles:
        pkg = self._resolve()
        rel = self.release()
        root = cache / "kernels" / f"{rel}_{pkg.version}"
        with locked(cache / "kernels" / f"{rel}.lock"):
            if not root.exists():  # apt is asked only the first time
                tmp = root.with_name(root.name + ".parts")
                shutil.rmtree(tmp, ignore_errors=True)
                fetch_unpacked(self._parts(pkg), cache, tmp, apt=self.apt)
                _decompress_modules(tmp)
                tmp.rename(root)
        mods = _first(root / "lib" / "modules" / rel, root / "usr" / "lib" / "modules" / rel)
        return KernelFiles(release=rel, label=f"debian {pkg.name}={pkg.version}",
                           bzimage=_first(root / "boot" / f"vmlinuz-{rel}", mods / "vmlinuz"),
                           module_root=mods / "kernel", identity=self.identity())

    def fetch_debug(self, cache: Path) -> DebugFiles:
        pkg = self._resolve()
        rel = self.release()
        root = cache / "debug" / f"{rel}_{pkg.version}"
        with locked(cache / "debug" / f"{rel}.lock"):
            if not root.exists():  # apt is asked only the first time
                dbg = apt_show(f"linux-image-{rel}-dbg", pkg.version, self.apt)
                # 1.7 GB unpacked in full; vmlinux, System.map and the KVM modules are what
                # the lab uses.
                # Up to 6.12 vmlinux and System.map are in boot/; from 7.x beside the
                # modules' debug files (boot/ has a symlink).
                mods = f"./usr/lib/debug/lib/modules/{rel}"
                fetch_unpacked(dbg, cache, root, apt=self.apt, patterns=[
                    "./usr/lib/debug/boot/*", f"{mods}/vmlinux", f"{mods}/System.map",
                    f"{mods}/kernel/arch/x86/kvm/*", f"{mods}/kernel/virt/*"])
        base = root / "usr" / "lib" / "debug"
        mods_dir = base / "lib" / "modules" / rel
        vmlinux = _first(mods_dir / "vmlinux", base / "boot" / f"vmlinux-{rel}")
        smap = _first(base / "boot" / f"System.map-{rel}", mods_dir / "System.map")
        return DebugFiles(vmlinux=vmlinux, module_root=mods_dir / "kernel",
                          system_map=smap if smap.exists() else None)

    def fetch_build_dir(self, cache: Path) -> Path:
        """Debian's headers for this exact kernel (linux-headers-REL, its -common and
        linux-kbuild), unpacked side by side in the cache: their symlinks are relative, and
        the one absolute include in the Makefile is pointed at the cache."""
        pkg = self._resolve()
        rel = self.release()
        root = cache / "headers" / f"{rel}_{pkg.version}"
        with locked(cache / "headers" / f"{rel}.lock"):
            if not root.exists():  # apt is asked only the first time
                hdr = apt_show(f"linux-headers-{rel}", pkg.version, self.apt)
                wanted = [hdr, *_dependencies(hdr, r"linux-(?:headers|kbuild)-", "=|>=",
                                              self.apt)]
                tmp = root.with_name(root.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                for p in wanted:
                    fetch_unpacked(p, cache, tmp / p.name, apt=self.apt)
                merged = tmp / "root"
                for p in wanted:
                    _run(["cp", "-a", f"{tmp / p.name}/.", str(merged)], "merging headers")
                    shutil.rmtree(tmp / p.name)
                mk = merged / "usr" / "src" / f"linux-headers-{rel}" / "Makefile"
                mk.write_text(mk.read_text().replace("include /usr/src/",
                                                     f"include {root}/root/usr/src/"))
                tmp.rename(root)
        return root / "root" / "usr" / "src" / f"linux-headers-{rel}"


@dataclass(frozen=True)
class DebianChoice:
    """`--kernel debian:SUITE[/ABI]`: L0 boots Debian's kernel of the recipe's flavour from
    SUITE (the lab's own apt root for it), or that exact ABI (`6.1.0-47`) of it."""

    suite: str
    abi: str | None = None

    @property
    def spec(self) -> str:
        return f"debian:{self.suite}" + (f"/{self.abi}" if self.abi else "")

    @classmethod
    def parse(cls, text: str, where: str) -> DebianChoice:
        from lab.apt import SUITES

        m = re.fullmatch(r"debian:([a-z-]+)(?:/(\d+\.\d+\.\d+-\d+))?", text)
        if not m or m.group(1) not in SUITES:
            raise UsageError(f"{where}: {text!r}: expected debian:SUITE or debian:SUITE/ABI "
                             f"(SUITE one of {', '.join(SUITES)}; ABI like 6.1.0-47)")
        return cls(m.group(1), m.group(2))

    def kernel_for(self, package: str) -> DebianKernel:
        """The recipe's package (a flavour's metapackage, or a versioned image) from this
        suite; with an ABI, that ABI's versioned image of the same flavour."""
        if self.abi is None:
            return DebianKernel(package, None, self.suite)
        flavour = re.sub(r"^linux-image-(\d+\.\d+\.\d+-\d+-)?", "", package)
        return DebianKernel(f"linux-image-{self.abi}-{flavour}", None, self.suite)


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


def builtin_modules(root: Path) -> set[str]:
    """Modules built into the kernel (modules.builtin beside a package's `kernel/` tree, or at
    the top of a build tree): a recipe may name them (virtio_net is a module in one kernel,
    built in in another; a defconfig tree's i915 forces ACPI's button in)."""
    for where in (root / "modules.builtin", root.parent / "modules.builtin"):
        try:
            text = where.read_text()
            break
        except OSError:
            continue
    else:
        return set()
    return {Path(ln.strip()).name.split(".ko")[0].replace("-", "_")
            for ln in text.splitlines() if ln.strip()}


def resolve_modules(root: Path, names: list[str]) -> list[tuple[str, Path, list[str]]]:
    """The named modules and everything they depend on: (name, path, depends), deps first;
    those built into the kernel are left out."""
    index = module_index(root)
    builtin = builtin_modules(root)
    names = [n for n in names if n.replace("-", "_") not in builtin]
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


