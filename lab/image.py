"""Image recipes (images/*.yaml) and the builder that turns them into a kernel + initramfs.

A recipe says which kernel and which modules; the userspace is always the same small one:
busybox, dropbear (with sftp-server) from Debian's packages, the lab's init scripts, the cache's
client key and a per-image host key. A level that runs another one also carries QEMU (with its
libraries and firmware) and its child's kernel and initramfs under /lab/child. Every input goes
into the image's key: nothing changed, nothing rebuilt.
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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lab import lock, schema
from lab.apt import SUITES
from lab.cache import file_sha256, locked, write_atomic
from lab.cpio import Tree
from lab.errors import LabError, UsageError
from lab.kernel import (
    DebianChoice,
    DebianKernel,
    DebugFiles,
    KernelSource,
    TreeKernel,
    builtin_modules,
    resolve_modules,
)
from lab.keys import client_key, make_host_key
from lab.tools import build as build_tools

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the builder's output changes for the same inputs

# Host binaries copied into every image (from Debian's packages; see `lab doctor`).
BASE_BINARIES = {
    "bin/busybox": "/bin/busybox",
    "usr/sbin/dropbear": "/usr/sbin/dropbear",
    # dropbear runs SFTPSERVER_PATH=/usr/lib/sftp-server for the sftp subsystem
    "usr/lib/sftp-server": "/usr/lib/openssh/sftp-server",
}
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
# What a nested QEMU reads with -nodefaults, -kernel and SeaBIOS; multiboot_dma.bin loads a
# multiboot -kernel (kvm-unit-tests' .flat files).
QEMU_FIRMWARE = ["bios-256k.bin", "kvmvapic.bin", "linuxboot.bin", "linuxboot_dma.bin",
                 "multiboot_dma.bin", "keymaps/en-us"]  # -vnc none still reads its keymap
# Debian builds TCG as a loadable module: a level's QEMU with accel=tcg (a kvm-unit-tests
# section may ask for it) needs it.
QEMU_MODULES = {"usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so":
                "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so"}

DEFAULT_MODULES = ["virtio_pci", "virtio_net", "kvm_amd", "kvm_intel", "button", "evdev"]

RECIPE_SPEC = schema.Map({
    "description": schema.Field(schema.Str(), default=""),
    "kernel": schema.Field(schema.Map({
        "debian": schema.Field(schema.Str()),
        "version": schema.Field(schema.Str()),
        # Another Debian suite than the host's, read through the lab's own apt root.
        "suite": schema.Field(schema.Str(choices=tuple(SUITES))),
        "tree": schema.Field(schema.Str()),
    }), required=True),
    "modules": schema.Field(schema.List(schema.Str()), default=None),
})


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    kernel: KernelSource
    modules: list[str]
    text: str  # the recipe file's content: part of the image key

def load_recipe(path: Path, kernel_tree: Path | None = None,
                debian: DebianChoice | None = None, latest: bool = False) -> Recipe:
    """A recipe, its kernel replaced by `kernel_tree` or by `debian` (another suite's, or ABI's,
    Debian kernel of the same flavour) when given. A Debian kernel comes pinned by the lock
    file beside the recipe (and is pinned there on first use), unless `latest`."""
    data = schema.load(path, RECIPE_SPEC)
    k = data["kernel"]
    where = data.where("kernel")
    source: KernelSource
    if kernel_tree is not None:
        source = TreeKernel(kernel_tree.resolve())
    elif debian is not None and not k["debian"]:
        raise UsageError(f"{where}: kernel: --kernel {debian.spec} replaces a Debian kernel, "
                         "and this recipe's is a build tree")
    elif debian is not None:
        source = debian.kernel_for(k["debian"])
        if not latest:
            source.lock = (lock.path_for(path), lock.key(path, debian.spec))
    elif k["tree"] and k["debian"]:
        raise UsageError(f"{where}: kernel: give either `debian` or `tree`, not both")
    elif k["tree"]:
        tree = Path(k["tree"])
        if not tree.is_absolute():
            tree = (path.parent / tree).resolve()
        if not tree.is_dir():
            raise UsageError(f"{where}: kernel.tree: {tree} is not a directory")
        source = TreeKernel(tree)
    elif k["debian"]:
        source = DebianKernel(k["debian"], k["version"], k["suite"])
        if not latest:
            source.lock = (lock.path_for(path), lock.key(path, None))
    else:
        raise UsageError(f"{where}: kernel: expected `debian: PACKAGE` or `tree: PATH`")
    return Recipe(name=path.stem, path=path, description=data["description"], kernel=source,
                  modules=data["modules"] or list(DEFAULT_MODULES), text=path.read_text())


@dataclass
class BuiltImage:
    key: str
    dir: Path
    manifest: dict[str, object] = field(default_factory=dict)

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.cpio"

    @property
    def host_key(self) -> str:
        return str(self.manifest["host_key"])

    @property
    def release(self) -> str:
        return str(self.manifest["kernel"]["release"])  # type: ignore[index]

    @classmethod
    def load(cls, d: Path) -> BuiltImage:
        with contextlib.suppress(OSError):  # images built before it was made private
            os.chmod(d / "initrd.cpio", 0o600)
        m = json.loads((d / "manifest.json").read_text())
        return cls(key=m["key"], dir=d, manifest=m)


def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _resource(name: str) -> bytes:
    return (resources.files("lab") / "guest" / name).read_bytes()


@dataclass
class Plan:
    """Everything that goes into one image, gathered before anything is written."""

    files: dict[str, Path] = field(default_factory=dict)  # dest in image -> host file
    data: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # dest -> (bytes, mode)
    links: dict[str, str] = field(default_factory=dict)
    modules: list[tuple[str, str, list[str]]] = field(default_factory=list)  # name, dest, deps

    def add_binary(self, dest: str, src: str) -> None:
        if not Path(src).exists():
            raise LabError(f"{src} is missing on this host (see `lab doctor`)")
        self.files[dest] = Path(os.path.realpath(src))
        for lib in _ldd(src):
            self.files.setdefault(lib.lstrip("/"), Path(os.path.realpath(lib)))

    def key(self, extra: dict[str, object]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(extra, sort_keys=True).encode())
        for dest in sorted(self.files):
            h.update(f"F {dest} {file_sha256(self.files[dest])}\n".encode())
        for dest in sorted(self.data):
            body, mode = self.data[dest]
            h.update(f"D {dest} {mode:o} {hashlib.sha256(body).hexdigest()}\n".encode())
        for dest in sorted(self.links):
            h.update(f"L {dest} {self.links[dest]}\n".encode())
        return h.hexdigest()[:20]


class Builder:
    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def build(self, recipe: Recipe, child: BuiltImage | None = None,
              with_debug: bool | None = True, qemu: bool = False) -> BuiltImage:
        """Build (or find in the cache) the image for `recipe`, carrying `child` if given,
        and QEMU if it has a child or `qemu` says so. `with_debug`: fetch the kernel's debug
        symbols beside it (None: if the archive serves them; a warning if it does not)."""
        t0 = time.monotonic()
        kernel = recipe.kernel.fetch(self.cache)
        plan = self._plan(recipe, kernel.module_root, kernel.release, child,
                          qemu or child is not None)
        key = plan.key({
            "format": FORMAT, "recipe": recipe.text, "kernel": kernel.identity,
            "child": child.key if child else None,
        })
        out = self.cache / "images" / f"{recipe.name}-{key}"
        with locked(self.cache / "images" / f".{recipe.name}-{key}.lock"):
            if (out / "manifest.json").exists():
                img = BuiltImage.load(out)
                if with_debug is not False and not img.manifest.get("debug"):
                    # Built earlier without: the image is the same, the symbols beside it
                    # are fetched now.
                    debug = self._debug(recipe, with_debug)
                    if debug is not None:
                        img.manifest["debug"] = _debug_manifest(debug)
                        # Whole or not at all: an empty manifest would fail every later run.
                        write_atomic(out / "manifest.json",
                                     json.dumps(img.manifest, indent=1))
                os.utime(out)  # most recently used (`lab cache prune` drops the oldest)
                return img
            log.info(f"building image {recipe.name} ({kernel.label}"
                     f"{', carrying ' + str(child.manifest['recipe']) if child else ''})")
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            host_pub = make_host_key(tmp / "host_key")
            plan.files["etc/dropbear/dropbear_ed25519_host_key"] = tmp / "host_key"
            shutil.copyfile(kernel.bzimage, tmp / "vmlinuz")
            # The image holds its SSH host key's private half: readable by this user only.
            fd = os.open(tmp / "initrd.cpio", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                self._tree(plan).write(f)
            (tmp / "host_key").unlink()  # the private half lives only inside the image
            debug = self._debug(recipe, with_debug)
            manifest = {
                "key": key, "recipe": recipe.name, "recipe_path": str(recipe.path),
                "kernel": {"release": kernel.release, "source": kernel.label,
                           "identity": kernel.identity},
                "modules": [m[0] for m in plan.modules],
                "carries_qemu": qemu or child is not None,
                "child": {"key": child.key, "recipe": child.manifest["recipe"]} if child else None,
                "host_key": host_pub,
                "initrd_bytes": (tmp / "initrd.cpio").stat().st_size,
                "debug": _debug_manifest(debug),
                "build_seconds": round(time.monotonic() - t0, 2),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            tmp.rename(out)
            size = (out / "initrd.cpio").stat().st_size
            log.info(f"built image {out.name}: initrd {size >> 20} MiB "
                     f"in {manifest['build_seconds']} s")
            return BuiltImage.load(out)

    def _debug(self, recipe: Recipe, wanted: bool | None) -> DebugFiles | None:
        from lab.symbols import indexed_vmlinux

        if wanted is False:
            return None
        try:
            debug = recipe.kernel.fetch_debug(self.cache)
        except LabError as e:
            if wanted:
                raise
            # Debian's security archive lists -dbg packages it does not serve (bullseye's).
            log.warning(f"{recipe.name}: no debug symbols for this kernel "
                        f"({str(e).splitlines()[0]}); probes, injections and decoded kernel "
                        "events need them")
            return None
        if debug.vmlinux.exists():
            indexed_vmlinux(debug.vmlinux, self.cache)  # once; `lab gdb` starts fast
        return debug

    def _plan(self, recipe: Recipe, module_root: Path, release: str,
              child: BuiltImage | None, qemu: bool) -> Plan:
        plan = Plan()
        for dest, binary in BASE_BINARIES.items():
            plan.add_binary(dest, binary)
        # /init is busybox's init applet (argv[0] basename "init"): it reaps orphans and
        # handles poweroff, which a shell as PID 1 would not.
        plan.links["init"] = "bin/busybox"
        applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True,
                                 text=True).stdout.split()
        for a in applets:
            if a != "busybox":  # a link named busybox would shadow the binary
                plan.links.setdefault(f"bin/{a}", "busybox")
        plan.data["etc/lab/rcS"] = (_resource("rcS"), 0o755)
        plan.data["etc/inittab"] = (_resource("inittab"), 0o644)
        # QMP system_powerdown presses the ACPI power button; busybox acpid maps it here.
        plan.data["etc/acpi/PWRF/00000080"] = (b"#!/bin/sh\npoweroff -f\n", 0o755)
        plan.data["etc/passwd"] = (b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        plan.data["etc/group"] = (b"root:x:0:\ntty:x:5:\n", 0o644)
        plan.data["etc/shells"] = (b"/bin/sh\n", 0o644)
        plan.data["etc/hosts"] = (b"127.0.0.1 localhost\n", 0o644)
        _, pub = client_key(self.cache)
        plan.data["root/.ssh/authorized_keys"] = (pub.encode() + b"\n", 0o600)
        # The guest-side test suites (TAP): svm-npt-test runs as a bare-metal L1 from this
        # level's userspace, kvm-mutate drives this level's KVM from a Linux level.
        for tool, path in build_tools(self.cache).items():
            plan.files[f"usr/local/bin/{tool}"] = path
        for name, ko, deps in resolve_modules(module_root, recipe.modules):
            dest = f"lib/modules/{release}/kernel/{ko.relative_to(module_root)}"
            plan.files[dest] = ko
            plan.modules.append((name, dest, deps))
        plan.data[f"lib/modules/{release}/modules.dep"] = (_modules_dep(plan, release), 0o644)
        # What rcS loads at boot, in the recipe's order (dependencies come through modprobe);
        # a module this kernel has built in needs no loading.
        builtin = builtin_modules(module_root)
        load = [m for m in recipe.modules if m.replace("-", "_") not in builtin]
        plan.data["etc/lab/modules"] = ("\n".join(load).encode() + b"\n", 0o644)
        if qemu:
            plan.add_binary("usr/bin/qemu-system-x86_64", QEMU_BINARY)
            for dest, module in QEMU_MODULES.items():
                plan.add_binary(dest, module)
            for fw in QEMU_FIRMWARE:
                # Debian keeps SeaBIOS in its own package's directory.
                for d in ("/usr/share/qemu", "/usr/share/seabios"):
                    src = Path(d, fw)
                    if src.exists():
                        plan.files[f"usr/share/qemu/{fw}"] = Path(os.path.realpath(src))
                        break
                else:
                    raise LabError(f"QEMU firmware {fw} is missing on this host (see `lab doctor`)")
        if child is not None:
            plan.files["lab/child/vmlinuz"] = child.kernel
            plan.files["lab/child/initrd.cpio"] = child.initrd
        return plan

    @staticmethod
    def _tree(plan: Plan) -> Tree:
        tree = Tree()
        for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc", "var/log", "lab"):
            tree.mkdir(d)
        tree.mkdir("root", 0o700)
        tree.mkdir("root/.ssh", 0o700)
        for dest, src in plan.files.items():
            tree.add_file(dest, src)
        for dest, (body, mode) in plan.data.items():
            tree.add_data(dest, body, mode)
        for dest, target in plan.links.items():
            if dest not in tree:
                tree.symlink(dest, target)
        return tree


def _modules_dep(plan: Plan, release: str) -> bytes:
    """modules.dep as modprobe reads it: every dependency, transitively, listed so that
    loading the list from its end loads each module after the ones it needs."""
    prefix = f"lib/modules/{release}/"
    deps = {name: d for name, _, d in plan.modules}
    path = {name: dest.removeprefix(prefix) for name, dest, _ in plan.modules}
    lines = []
    def closure(n: str, order: list[str]) -> list[str]:
        for d in deps[n]:
            if d not in order:
                closure(d, order)
                order.append(d)
        return order  # dependencies first (post-order)

    for name in deps:
        order = closure(name, [])
        lines.append(f"{path[name]}: {' '.join(path[d] for d in reversed(order))}".rstrip())
    return ("\n".join(lines) + "\n").encode()


def _debug_manifest(debug: DebugFiles | None) -> dict[str, str] | None:
    if debug is None:
        return None
    return {"vmlinux": str(debug.vmlinux), "module_root": str(debug.module_root),
            "system_map": str(debug.system_map) if debug.system_map else ""}
