"""What another local user could plant for the lab to act on: runtime directories, lab
records, run directories, caches. Each is refused before anything acts on it (no VM here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import procs

ROOT = Path(__file__).resolve().parents[2]
OTHER_UID = 12345


def lab(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, **env})


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="planting another user's directory "
                                "needs chown, which only root may do")


def test_private_dir_refuses_symlinks_and_open_modes(tmp_path: Path) -> None:
    ok = procs.private_dir(tmp_path / "mine", "x")
    assert ok.stat().st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(procs.UnsafeDirectory, match="mode 755"):
        procs.private_dir(tmp_path / "open", "x")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(procs.UnsafeDirectory, match="symlink"):
        procs.private_dir(tmp_path / "link", "x")


@needs_root
def test_planted_runtime_directory_is_refused_and_its_record_not_acted_on(
        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    planted = tmp_path / "xdg" / "lab"
    (planted / "labs").mkdir(parents=True, mode=0o700)
    (planted / "labs" / "x.json").write_text(json.dumps(
        {"id": "x", "owner_pid": 0, "sock_dir": str(victim), "pids": [1], "run_dir": "/"}))
    for d in (planted, planted / "labs"):
        os.chmod(d, 0o700)
        os.chown(d, OTHER_UID, OTHER_UID)
    r = lab("doctor", env={"XDG_RUNTIME_DIR": str(tmp_path / "xdg"),
                           "LAB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 3 and f"belongs to uid {OTHER_UID}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert (victim / "precious").read_text() == "keep me"


def test_a_record_naming_a_directory_not_ours_is_dropped(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    reg = procs.Registry(procs.private_dir(tmp_path / "rt", "rt") / "labs")
    reg.write("x", {"id": "x", "owner_pid": 0, "sock_dir": str(victim), "pids": []})
    reg.reap()
    assert (victim / "precious").exists() and not reg.records()


@needs_root
def test_run_directory_of_another_user_is_refused_before_anything_boots(
        tmp_path: Path) -> None:
    planted = tmp_path / "run"
    planted.mkdir(mode=0o700)
    os.chown(planted, OTHER_UID, OTHER_UID)
    r = lab("run", "playbooks/smoke.yaml", "--out", str(planted),
            env={"LAB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and f"belongs to uid {OTHER_UID}" in r.stderr, r.stderr
    assert not (planted / "state.json").exists()
    # and `lab ssh --run` will not take ssh_config from such a directory
    (planted / "state.json").write_text("{}")
    r = lab("ssh", "--run", str(planted), "l0", "--", "true",
            env={"LAB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and f"belongs to uid {OTHER_UID}" in r.stderr, r.stderr


def test_new_run_directories_are_private(tmp_path: Path) -> None:
    from lab.driver import new_run_dir

    d = new_run_dir(str(tmp_path / "runs" / "r1"), "x")
    assert d.stat().st_mode & 0o777 == 0o700


@needs_root
def test_cache_of_another_user_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, OTHER_UID, OTHER_UID)
    r = lab("doctor", env={"LAB_CACHE": str(cache)})
    assert r.returncode == 3 and "cache belongs to uid" in r.stderr, r.stderr


def test_down_signals_only_the_owner_it_can_prove(tmp_path: Path) -> None:
    """state.json names a pid; by now that pid may be any process. `lab down` signals it only
    when its start time is the one the lab recorded."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run = procs.private_dir(tmp_path / "run", "run")
        (run / "state.json").write_text(json.dumps({
            "status": "up", "owner_pid": bystander.pid, "owner_start": 1, "qemu_pid": None,
            "sock_dir": "/nonexistent", "levels": {}}))
        r = lab("down", "--run", str(run), env={"LAB_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr
        assert bystander.poll() is None, "lab down killed a process it could not prove"
        # With the right start time it is the owner, and it is stopped.
        st = json.loads((run / "state.json").read_text())
        st["owner_start"] = procs.start_time(bystander.pid)
        (run / "state.json").write_text(json.dumps(st))
        lab("down", "--run", str(run), env={"LAB_CACHE": str(tmp_path / "cache")})
        assert bystander.wait(timeout=30) is not None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_channel_closed_before_it_took_the_command_is_opened_again() -> None:
    """dropbear, right after an SFTP transfer, has closed a fresh channel before answering its
    exec request: the command did not start, so it goes once more on a new channel; any other
    refusal, or a second one, is an error of the session."""
    import paramiko

    from lab.errors import SSHError
    from lab.ssh import SSHSession

    class Chan:
        def __init__(self, fail: str | None) -> None:
            self.fail, self.closed = fail, False

        def exec_command(self, command: str) -> None:
            if self.fail:
                raise paramiko.SSHException(self.fail)

        def close(self) -> None:
            self.closed = True

    def session(*fails: str | None) -> tuple[SSHSession, list[Chan]]:
        s = SSHSession.__new__(SSHSession)
        s.level = "l1"
        chans = [Chan(f) for f in fails]
        it = iter(chans)
        s._open_session = lambda timeout, check: next(it)  # type: ignore[method-assign]
        return s, chans

    s, chans = session("Channel closed.", None)
    assert s._exec("true", 5, None) is chans[1] and chans[0].closed
    s, chans = session("Channel is not open", None)
    assert s._exec("true", 5, None) is chans[1]
    s, _ = session("Channel closed.", "Channel closed.")
    with pytest.raises(SSHError, match="cannot run `true`: Channel closed"):
        s._exec("true", 5, None)
    s, _ = session("Administratively prohibited")
    with pytest.raises(SSHError, match="Administratively prohibited"):
        s._exec("true", 5, None)

    # The same for an SFTP session (its subsystem request), seen after a put() in CI.
    class Sftp:
        def get_channel(self) -> None:
            return None

    client = Sftp()
    answers = iter([paramiko.SSHException("Channel closed."), client])

    def from_transport(t: object) -> object:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    class Transport:
        def is_active(self) -> bool:
            return True

    s = SSHSession.__new__(SSHSession)
    s.level, s.transport = "l2", Transport()  # type: ignore[assignment]
    real = paramiko.SFTPClient.from_transport
    paramiko.SFTPClient.from_transport = from_transport  # type: ignore[assignment]
    try:
        assert s._sftp() is client  # the second request's answer
        answers = iter([paramiko.SSHException("Channel closed.")] * 2)
        with pytest.raises(SSHError, match="cannot open SFTP: Channel closed"):
            s._sftp()
    finally:
        paramiko.SFTPClient.from_transport = real  # type: ignore[method-assign]


def test_ctrl_c_waits_until_paramiko_is_done() -> None:
    # A signal whose handler unwinds (the lab's Ctrl-C, SIGTERM, SIGHUP) must not raise inside
    # paramiko, where it could leave a channel lock held and hang the teardown: inside a
    # deferred block its exception waits, and is raised as soon as the block ends.
    import os
    import signal

    from lab import signals

    class Unwind(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        signals.raise_or_defer(Unwind(signum))

    old = signal.signal(signal.SIGTERM, handler)
    inside_done = False
    try:
        with pytest.raises(Unwind), signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):  # bytecode boundaries where the handler runs
                pass
            inside_done = True
        assert inside_done
        with pytest.raises(Unwind):  # outside a block: at once
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):
                pass
    finally:
        signal.signal(signal.SIGTERM, old)
