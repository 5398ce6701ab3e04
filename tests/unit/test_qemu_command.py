"""QEMU command lines for the host's L0 and for nested levels."""

from __future__ import annotations

from lab.machines.qemu import Serial, VMSpec, build_command
from lab.profiles import PROFILES


def l0_spec(**kw: object) -> VMSpec:
    base = dict(level="l0", accel="tcg", cpu="max", memory_mb=1024, cpus=1, kernel="/k",
                initrd="/i", append="console=ttyS0", ssh_port=40000,
                serials=[Serial("l0", "unix", "/s/l0"), Serial("l1", "unix", "/s/l1")],
                qmp="/s/qmp", gdb="tcp:127.0.0.1:40001")
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def arg_after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_l0_command_network_is_restricted_and_loopback_only() -> None:
    cmd = build_command(l0_spec())
    assert arg_after(cmd, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:22"]
    assert arg_after(cmd, "-gdb") == ["tcp:127.0.0.1:40001"]
    assert arg_after(cmd, "-qmp") == ["unix:/s/qmp,server=on,wait=off"]
    assert "-nodefaults" in cmd and "-no-reboot" in cmd and "-S" not in cmd


def test_l0_serials_in_order_on_unix_sockets() -> None:
    cmd = build_command(l0_spec())
    assert arg_after(cmd, "-chardev")[:2] == [
        "socket,id=ser0,path=/s/l0,server=on,wait=off",
        "socket,id=ser1,path=/s/l1,server=on,wait=off"]
    assert arg_after(cmd, "-serial")[:2] == ["chardev:ser0", "chardev:ser1"]


def test_hold_and_unix_gdb() -> None:
    cmd = build_command(l0_spec(hold=True, gdb="/s/gdb"))
    assert "-S" in cmd
    assert "socket,id=gdb0,path=/s/gdb,server=on,wait=off" in arg_after(cmd, "-chardev")
    assert arg_after(cmd, "-gdb") == ["chardev:gdb0"]


def test_nested_command_relays_consoles_to_parent_ttys() -> None:
    p = PROFILES["tcg-svm"]
    spec = VMSpec(level="l1", accel=p.nested_accel(), cpu=p.nested_cpu(), memory_mb=1536,
                  cpus=1, kernel="/lab/child/vmlinuz", initrd="/lab/child/initrd.cpio",
                  append="x", ssh_port=10022,
                  serials=[Serial("l1", "dev", "/dev/ttyS1"), Serial("l2", "dev", "/dev/ttyS2")],
                  pidfile="/run/lab-l1.pid")
    cmd = build_command(spec)
    assert arg_after(cmd, "-accel") == ["kvm"]
    assert arg_after(cmd, "-cpu") == ["host,-xsave"]
    assert arg_after(cmd, "-chardev") == ["serial,id=ser0,path=/dev/ttyS1",
                                          "serial,id=ser1,path=/dev/ttyS2"]
    assert "-qmp" not in cmd and "-gdb" not in cmd
    assert arg_after(cmd, "-pidfile") == ["/run/lab-l1.pid"]


def test_profiles() -> None:
    vmx, svm, tcg = PROFILES["kvm-vmx"], PROFILES["kvm-svm"], PROFILES["tcg-svm"]
    assert (vmx.kvm_module, vmx.tdp_param, vmx.virt_flag) == ("kvm_intel", "ept", "vmx")
    assert (svm.kvm_module, svm.tdp_param, svm.virt_flag) == ("kvm_amd", "npt", "svm")
    assert tcg.accel == "tcg" and tcg.vendor == "amd"
    assert vmx.nested_cpu() == "host" and vmx.l0_cpu == "host"


def test_la57_auto_takes_it_from_an_svm_l0_older_than_6_1_only() -> None:
    svm, vmx, bochs = PROFILES["tcg-svm"], PROFILES["kvm-vmx"], PROFILES["bochs-vmx"]
    on, why = svm.la57_for("auto", "5.10.0-32-cloud-amd64")
    assert not on and "5.10.0-32-cloud-amd64" in why and "--la57 on" in why
    assert svm.la57_for("auto", "6.1.0-57-cloud-amd64") == (True, "")
    assert svm.la57_for("auto", "7.2.13+deb14-cloud-amd64") == (True, "")
    assert svm.la57_for("on", "5.10.0-32-cloud-amd64") == (True, "")  # to see the bug
    assert svm.la57_for("off", "6.1.0-57-cloud-amd64") == (False, "")
    assert vmx.la57_for("auto", "5.10.0-32-amd64") == (True, "")  # EPTP says its depth
    assert svm.la57_for("auto", "not-a-version") == (True, "")
    assert svm.l0_cpu_with(False) == "max,-la57" and svm.l0_cpu_with(True) == "max"
    assert bochs.l0_cpu_with(False) == bochs.l0_cpu  # a Bochs model, no QEMU flags


def test_la57_choice_reaches_lab_up_background_half_and_ci_jobs() -> None:
    from lab.cli import build_parser
    from lab.driver import Inputs

    p = build_parser()
    for cmd in ("run", "up", "_serve"):
        args = p.parse_args([cmd, "playbooks/nested.yaml", "--la57", "on"])
        inputs = Inputs.from_namespace(args)
        assert inputs.la57 == "on" and inputs.argv()[-2:] == ["--la57", "on"]
    auto = Inputs.from_namespace(p.parse_args(["run", "playbooks/nested.yaml"]))
    assert auto.la57 == "auto" and "--la57" not in auto.argv()
