"""Kernels from any Debian suite: the mirrors taken from the host's apt sources (one-line and
deb822), the lock file's pins, `--kernel debian:SUITE[/ABI]`, and unpacking what each
Debian release's packages hold where it holds it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab import apt, lock
from lab.errors import LabError, UsageError
from lab.kernel import DebianChoice, _extract, _first, builtin_modules


def test_mirrors_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    (d / "vendor.list").write_text("deb https://vendor.example/apt cloud-sdk-bookworm main\n")
    m = apt.host_mirrors((tmp_path / "sources.list", d))
    assert m == apt.Mirrors("http://mirror.example/debian",
                            "http://mirror.example/debian-security")
    (tmp_path / "sources.list").write_text(
        "# old style\ndeb [arch=amd64] http://old.example/debian bullseye main\n")
    (d / "debian.sources").unlink()
    m = apt.host_mirrors((tmp_path / "sources.list", d))
    assert m.archive == "http://old.example/debian" and m.security is None


def test_no_debian_mirror_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.list").write_text("deb https://vendor.example/apt stable-vendor main\n")
    with pytest.raises(LabError, match="name no Debian archive"):
        apt.host_mirrors((tmp_path / "x.list",))


def test_suite_roots_are_the_labs_own(tmp_path: Path) -> None:
    a = apt.Apt("trixie", tmp_path)
    opts = " ".join(a.options())
    assert f"Dir::State={tmp_path}/apt/trixie/state" in opts
    assert f"Dir::Etc::SourceList={tmp_path}/apt/trixie/sources.list" in opts
    assert "/etc/apt" not in opts and "/var/lib/apt" not in opts
    assert apt.Apt(None, tmp_path).options() == []  # the host's apt, as it is
    assert a.age() == float("inf")


def test_kernel_choice() -> None:
    c = DebianChoice.parse("debian:bookworm/6.1.0-47", "--kernel")
    assert (c.suite, c.abi, c.spec) == ("bookworm", "6.1.0-47", "debian:bookworm/6.1.0-47")
    k = c.kernel_for("linux-image-cloud-amd64")
    assert (k.package, k.suite) == ("linux-image-6.1.0-47-cloud-amd64", "bookworm")
    assert c.kernel_for("linux-image-amd64").package == "linux-image-6.1.0-47-amd64"
    assert DebianChoice.parse("debian:sid", "x").kernel_for("linux-image-amd64").package == \
        "linux-image-amd64"
    for bad in ("debian:buster", "trixie", "debian:sid/7.x", "debian:sid;rm"):
        with pytest.raises(UsageError, match="expected debian:SUITE or debian:SUITE/ABI"):
            DebianChoice.parse(bad, "--kernel")


def test_lock_pins_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "lock.yaml"
    assert lock.read(path) == {}
    pin = lock.Pin("linux-image-cloud-amd64@host", "linux-image-6.1.0-57-cloud-amd64",
                   "6.1.192-3", "a" * 64, 10)
    lock.record(path, "default", pin)
    lock.record(path, "default@debian:trixie", lock.Pin(
        "linux-image-cloud-amd64@trixie", "linux-image-6.12.118+deb13-cloud-amd64",
        "6.12.118-1", "b" * 64))
    assert path.read_text().startswith(lock.HEADER)
    assert path.stat().st_mode & 0o777 == 0o644
    assert lock.pinned(path, "default", "linux-image-cloud-amd64@host") == pin
    # A recipe that asks for something else is not held to the old pin.
    assert lock.pinned(path, "default", "linux-image-amd64@host") is None
    assert set(lock.read(path)) == {"default", "default@debian:trixie"}
    path.write_text(lock.HEADER + "default:\n  request: x\n  package: BAD NAME\n")
    with pytest.raises(UsageError, match=r"lock.yaml:6: default.package: expected a Debian "):
        lock.read(path)
    path.write_text(lock.HEADER)
    assert lock.read(path) == {}


def _deb(tmp_path: Path, files: dict[str, str], links: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target)
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", str(root), str(tmp_path / "t.deb")],
                   check=True, capture_output=True)
    return tmp_path / "t.deb"


def test_extract_keeps_what_matches_and_nothing_else(tmp_path: Path) -> None:
    rel = "7.2.13+deb14-cloud-amd64"
    deb = _deb(tmp_path, {
        f"usr/lib/debug/lib/modules/{rel}/vmlinux": "elf",
        f"usr/lib/debug/lib/modules/{rel}/kernel/arch/x86/kvm/kvm.ko": "ko",
        f"usr/lib/debug/lib/modules/{rel}/kernel/fs/ext4.ko": "no",
    }, {f"usr/lib/debug/boot/vmlinux-{rel}": f"../lib/modules/{rel}/vmlinux"})
    out = tmp_path / "out"
    out.mkdir()
    mods = f"./usr/lib/debug/lib/modules/{rel}"
    # The 6.1 layout's patterns match nothing here: no error, as tar --wildcards would give.
    _extract(deb, out, ["./usr/lib/debug/boot/*", f"{mods}/vmlinux",
                        f"{mods}/kernel/arch/x86/kvm/*", f"{mods}/kernel/virt/*",
                        f"./usr/lib/debug/boot/System.map-{rel}"])
    base = out / "usr/lib/debug"
    assert (base / f"lib/modules/{rel}/vmlinux").read_text() == "elf"
    assert (base / f"lib/modules/{rel}/kernel/arch/x86/kvm/kvm.ko").exists()
    assert not (base / f"lib/modules/{rel}/kernel/fs").exists()
    link = base / f"boot/vmlinux-{rel}"
    assert link.is_symlink() and link.read_text() == "elf"
    assert _first(base / "nope", link) == link


def test_builtin_modules_are_read(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "modules.builtin").write_text("kernel/drivers/net/virtio_net.ko\n"
                                              "kernel/drivers/virtio/virtio-pci.ko\n")
    assert builtin_modules(tmp_path / "kernel") == {"virtio_net", "virtio_pci"}
    assert builtin_modules(tmp_path / "elsewhere" / "kernel") == set()


def test_builtin_modules_of_a_build_tree_are_read_at_its_top(tmp_path: Path) -> None:
    # `make modules` writes modules.builtin at the top of the tree, which is the module root
    (tmp_path / "modules.builtin").write_text("kernel/drivers/acpi/button.ko\n")
    assert builtin_modules(tmp_path) == {"button"}
