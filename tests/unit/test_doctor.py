"""Profile choice: /dev/kvm alone is no proof of hardware virtualization."""

from __future__ import annotations

from pathlib import Path

from lab import doctor


def fake_host(tmp_path: Path, flags: str, modules: dict[str, str | None],
              dev: bool = True) -> doctor.HostReport:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"vendor_id\t: GenuineIntel\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    sysmod = tmp_path / "module"
    for name, nested in modules.items():
        (sysmod / name / "parameters").mkdir(parents=True)
        if nested is not None:
            (sysmod / name / "parameters" / "nested").write_text(nested + "\n")
    kvm = tmp_path / "kvm"
    if dev:
        kvm.write_text("")
    return doctor.probe(sys_module=sysmod, cpuinfo=cpuinfo, dev_kvm=kvm)


def test_kvm_pvm_is_not_hardware_virtualization(tmp_path: Path) -> None:
    r = fake_host(tmp_path, "fpu sse2 lm", {"kvm": None, "kvm_pvm": None})
    assert not r.kvm_usable and "no vmx/svm" in r.kvm_usable_reason
    assert r.profile in ("tcg-svm", None)


def test_vmx_with_nested(tmp_path: Path) -> None:
    r = fake_host(tmp_path, "fpu vmx lm", {"kvm": None, "kvm_intel": "Y"})
    assert r.kvm_usable and r.profile == "kvm-vmx"


def test_vmx_without_nested_falls_back_to_tcg(tmp_path: Path) -> None:
    r = fake_host(tmp_path, "fpu vmx lm", {"kvm": None, "kvm_intel": "N"})
    if r.qemu_version:
        assert r.profile == "tcg-svm" and "nested=0" in r.profile_reason


def test_svm(tmp_path: Path) -> None:
    r = fake_host(tmp_path, "fpu svm npt", {"kvm": None, "kvm_amd": "1"})
    assert r.profile == "kvm-svm"


def test_missing_tools_give_install_command() -> None:
    r = doctor.HostReport(cpu_vendor="x", cpu_model="y", vmx=False, svm=False,
                          kvm_device=False, kvm_modules=[], kvm_usable=False,
                          kvm_usable_reason="", nested={}, qemu_version=None, gdb_version=None,
                          missing={"gdb": "gdb", "dropbear": "dropbear-bin"})
    assert r.install_command == "apt-get install -y dropbear-bin gdb"
    assert not r.can_run
