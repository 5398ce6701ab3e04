"""The kernel's own KVM selftests (tools/testing/selftests/kvm), built by the lab for the kernel a
level runs and run inside that level.

The source is the kernel's: Debian's `linux-source-X.Y` of the image's exact version, or the
`--kernel-tree` itself. The lab installs the tree's UAPI headers and builds every x86_64 KVM
selftest statically on the host, once per kernel (cached by the kernel's identity), with make's
-k: a test that does not build in a given tree (Debian's 6.1 backports break dirty_log_test, for
one) is recorded as such and the others are kept. A selftests step copies the tests it asks for
into the level and runs each as the kselftest runner would (the directory's `settings` timeout;
exit 4 is a skip with the test's own reason), each a testcase with its KTAP subtests as cases.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import steps, tap
from lab.cache import locked
from lab.errors import LabError, UsageError
from lab.kernel import DebianKernel, KernelSource, TreeKernel, apt_show, fetch_unpacked
from lab.playbook import Step
from lab.report import StepResult
from lab.ssh import SSHSession
from lab.steps import Verdict

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the build below changes for the same kernel
GUEST_DIR = "/tmp/selftests"
KSFT_SKIP = 4
DEFAULT_TIMEOUT_S = 45  # kselftest's runner, when the directory has no `settings`
# Built static: the level's userspace is busybox, with no libc to link against.
MAKE_VARS = ["LDFLAGS=-static -pthread -no-pie"]
# The nested tests of each vendor besides the svm_*/vmx_* ones: they save and restore nested
# state, or deliver exceptions to L2, on both.
NESTED = {"amd": ["nested_exceptions_test", "state_test", "hyperv_svm_test"],
          "intel": ["nested_exceptions_test", "state_test", "evmcs_test"]}
PREFIX = {"amd": "svm_", "intel": "vmx_"}


@dataclass
class Built:
    """The selftests built for one kernel: name -> static binary, and what did not build."""

    dir: Path
    release: str
    tests: dict[str, Path] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    timeout_s: int = DEFAULT_TIMEOUT_S

    def select(self, names: list[str], vendor: str, where: str) -> list[str]:
        """The tests named, or by default the nested tests of `vendor` that built."""
        if not names:
            return sorted(n for n in self.tests
                          if n.startswith(PREFIX[vendor]) or n in NESTED[vendor])
        for n in names:
            if n not in self.tests:
                why = ("did not build from this kernel's source" if n in self.failed
                       else "is not a KVM selftest of this kernel")
                raise UsageError(f"{where}.tests: {n} {why} ({self.release}; "
                                 f"see {self.dir}/build.log)")
        return names


def source_tree(kernel: KernelSource, cache: Path, work: Path) -> Path:
    """The kernel's source tree: unpacked from Debian's linux-source package into `work`, or
    the build tree itself (its headers_install runs there, as `make headers` would; the
    selftests' objects and binaries go to the cache)."""
    if isinstance(kernel, TreeKernel):
        if not (kernel.path / "tools/testing/selftests/kvm/Makefile").is_file():
            raise UsageError(f"{kernel.path}: no tools/testing/selftests/kvm in the tree")
        return kernel.path
    assert isinstance(kernel, DebianKernel)
    version = kernel._resolve().version
    series = ".".join(version.split(".")[:2])  # 6.1.192-3 -> 6.1
    pkg = apt_show(f"linux-source-{series}", version, kernel.apt)
    unpacked = work / "deb"
    fetch_unpacked(pkg, cache, unpacked, ["./usr/src/linux-source-*.tar.xz"], apt=kernel.apt)
    tarball = next((unpacked / "usr/src").glob("linux-source-*.tar.xz"))
    t = time.monotonic()
    _make(["tar", "-xf", str(tarball), "-C", str(work)], "unpacking the kernel source",
          work / "unpack.log")
    log.info(f"unpacked {tarball.name} in {time.monotonic() - t:.1f} s")
    shutil.rmtree(unpacked)
    return work / tarball.name.removesuffix(".tar.xz")


def _make(cmd: list[str], what: str, logfile: Path, ok: tuple[int, ...] = (0,)) -> int:
    with open(logfile, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
        except FileNotFoundError:
            raise LabError(f"{what}: {cmd[0]} is not installed") from None
    if rc not in ok:
        raise LabError(f"{what} failed (exit {rc}); see {logfile}")
    return rc


def _source_identity(kernel: KernelSource) -> tuple[str, str]:
    """(a name, an identity) of the source the selftests come from: Debian's flavours of one
    version (cloud for QEMU, generic for Bochs) share one source, and so one build."""
    if isinstance(kernel, DebianKernel):
        version = kernel._resolve().version
        return f"debian-{version}", f"linux-source={version}"
    return "tree", kernel.identity()


def build(kernel: KernelSource, cache: Path) -> Built:
    """The KVM selftests of `kernel`'s source, built once and cached."""
    release = kernel.fetch(cache).release
    name, identity = _source_identity(kernel)
    key = hashlib.sha256(json.dumps([FORMAT, identity, MAKE_VARS,
                                     shutil.which("gcc")]).encode()).hexdigest()[:16]
    out = cache / "selftests" / f"{name}-{key}"
    with locked(cache / "selftests" / f".{name}-{key}.lock"):
        if not (out / "manifest.json").exists():
            _build(kernel, cache, out, release)
        os.utime(out)  # most recently used (`lab cache prune`)
    m = json.loads((out / "manifest.json").read_text())
    return Built(dir=out, release=release,
                 tests={n: out / "x86_64" / n for n in m["tests"]}, failed=m["failed"],
                 timeout_s=m["timeout_s"])


def _build(kernel: KernelSource, cache: Path, out: Path, release: str) -> None:
    t0 = time.monotonic()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "x86_64").mkdir(parents=True)
    work = cache / "selftests" / f".work-{out.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logfile = tmp / "build.log"
    try:
        src = source_tree(kernel, cache, work)
        log.info(f"building the KVM selftests of {release} (once per kernel)")
        hdr = work / "usr"
        _make(["make", "-s", "-C", str(src), f"INSTALL_HDR_PATH={hdr}", "headers_install"],
              "installing the kernel's UAPI headers", logfile)
        objs = work / "kvm"
        kvm = src / "tools/testing/selftests/kvm"
        # -k: one test that does not build must not cost the others.
        _make(["make", "-k", "-C", str(kvm), f"-j{os.cpu_count() or 1}", f"OUTPUT={objs}",
               f"INSTALL_HDR_PATH={hdr}", f"KHDR_INCLUDES=-isystem {hdr}/include", *MAKE_VARS],
              "building the KVM selftests", logfile, ok=(0, 2))
        wanted = _x86_tests(kvm / "Makefile")
        built, failed = [], []
        for name in wanted:
            binary = objs / "x86_64" / name
            if binary.is_file() and os.access(binary, os.X_OK):
                shutil.copy2(binary, tmp / "x86_64" / name)
                built.append(name)
            else:
                failed.append(name)
        if not built:
            raise LabError(f"no KVM selftest of {release} built; see {logfile}")
        manifest = {"release": release, "tests": built, "failed": failed,
                    "timeout_s": _timeout(kvm / "settings"),
                    "build_seconds": round(time.monotonic() - t0, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tmp.rename(out)
        log.info(f"built {len(built)} KVM selftests of {release} in "
                 f"{manifest['build_seconds']} s"
                 f"{f'; {len(failed)} did not build: ' + ', '.join(failed) if failed else ''}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


_GEN = re.compile(r"^TEST_GEN_PROGS_x86_64\s*\+?=\s*x86_64/(\S+)", re.M)


def _x86_tests(makefile: Path) -> list[str]:
    """The x86_64 tests the Makefile generates (TEST_GEN_PROGS_x86_64 += x86_64/NAME)."""
    return _GEN.findall(makefile.read_text())


def _timeout(settings: Path) -> int:
    """The per-test timeout kselftest's runner takes from the directory's `settings`."""
    try:
        m = re.search(r"^timeout=(\d+)", settings.read_text(), re.M)
    except OSError:
        return DEFAULT_TIMEOUT_S
    return int(m.group(1)) if m else DEFAULT_TIMEOUT_S


def command(name: str, timeout_s: float) -> str:
    return f"cd {GUEST_DIR} && timeout -s TERM {max(1, round(timeout_s))} ./{name}"


def judge(name: str, exit_status: int, stdout: str, stderr: str, timeout_s: float) -> Verdict:
    """One selftest's verdict: its KTAP subtests as cases where it prints them, else one case;
    exit 4 is a skip with the test's own reason, 143 the runner's timeout."""
    parsed = tap.parse(stdout)
    cases: list[dict[str, Any]] = [c.to_dict() for c in parsed.cases]
    text = (stdout + "\n" + stderr).strip().splitlines()
    last = next((ln.strip() for ln in reversed(text) if ln.strip()), "")
    if exit_status == KSFT_SKIP:
        why = parsed.skip_all or last
        return Verdict("passed", f"SKIP {why}",
                       cases or [{"number": 1, "name": name, "status": "skipped",
                                  "message": why}])
    if exit_status == 0:
        if not cases:
            cases = [{"number": 1, "name": name, "status": "passed", "message": ""}]
        return Verdict("passed", "PASS", cases)
    if exit_status == 128 + 15:  # `timeout -s TERM`; a selftest does not catch SIGTERM
        msg = f"timeout ({round(timeout_s)} s)"
    else:  # 254: a failed TEST_ASSERT
        msg = f"exit status {exit_status}: {_assertion(text) or last[:300]}"
    if not any(c["status"] == "failed" for c in cases):
        cases.append({"number": len(cases) + 1, "name": name, "status": "failed",
                      "message": msg})
    return Verdict("failed", msg, cases)


def _assertion(lines: list[str]) -> str:
    """What a failed TEST_ASSERT says: the `file:line: expression` and the message after it."""
    for i, ln in enumerate(lines):
        if "Test Assertion Failure" in ln:
            rest = [x.strip() for x in lines[i + 1:] if x.strip()
                    and not x.strip().startswith(("pid=", "sh: addr2line"))]
            return "; ".join(rest[:2])[:300]
    return ""


def run(step: Step, index: int, ssh: SSHSession, steps_dir: Path, speed_factor: float,
        check: Callable[[], None], into: list[StepResult],
        missing_events: Callable[[], list[str]], built: tuple[Built, str]) -> None:
    """A selftests step: each test copied into the level and run, a step of its own in the
    report (`STEP TEST`). `built`: the level kernel's selftests and the profile's vendor."""
    assert step.selftests is not None
    sel, vendor = built
    names = sel.select(step.selftests.tests, vendor, step.selftests.where)
    ssh.run(f"mkdir -p {GUEST_DIR}", timeout=30, check=check)
    log.info(f"[{step.on}] KVM selftests of {sel.release}: {', '.join(names)}")
    for name in names:
        ssh.put(sel.tests[name], f"{GUEST_DIR}/{name}", mode=0o755)
        timeout_s = sel.timeout_s * speed_factor
        steps.run_part(step, name, command(name, timeout_s), sel.timeout_s + 60,
                       functools.partial(judge, name, timeout_s=timeout_s), index, ssh,
                       steps_dir, speed_factor, check, into, missing_events)
        ssh.run(f"rm -f {GUEST_DIR}/{name}", timeout=30, check=check)  # the level's RAM
