"""One process helper for the dev tools: start named child processes with a log file and a pid
file, tell whether a pid is still the process we started, stop it (SIGTERM, wait, SIGKILL), and
find free ports. Pid files let another process (`down`, a crashed run's successor) stop them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> str:
    """The process's argv joined by spaces ('' when gone or not readable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Is `pid` running (not a zombie)? Reaps it first when it is our child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state field follows "(comm)"


def kill(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL (and wait 5 s); reaps our own children."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.1)


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child we hold the Popen of: SIGTERM, wait, SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def running(exe_name: str) -> list[int]:
    """Pids whose argv[0] is exe_name or ends with /exe_name (another node's kubelet, say)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            argv0 = cmdline(int(p.name)).split(" ", 1)[0]
            if argv0 == exe_name or argv0.endswith("/" + exe_name):
                out.append(int(p.name))
    return out


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    """Does GET `url` answer 200?"""
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Processes:
    """Named child processes: `<log_dir>/<name>.log` (appended) and `<pid_dir>/<name><pid_suffix>`.

    A pid read back from a file counts only while that process's command line contains `marker`
    (the process name when None): a pid file that survived a reboot names someone else's process.
    """

    def __init__(self, log_dir: Path, pid_dir: Path, *, pid_suffix: str = "", marker: str | None = None) -> None:
        self.log_dir, self.pid_dir, self.pid_suffix, self.marker = log_dir, pid_dir, pid_suffix, marker
        self.children: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}{self.pid_suffix}"

    def start(
        self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} {shlex.join(argv)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C to the parent must not hit them in the middle of their shutdown order.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        self.children[name] = proc
        self.pid_file(name).write_text(f"{proc.pid}\n")
        return proc

    def pid(self, name: str) -> int | None:
        """The live pid of `name`, from our Popen when we started it (its /proc cmdline is empty for a
        moment after Popen returns), else from its pid file."""
        proc = self.children.get(name)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        try:
            pid = int(self.pid_file(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) and (self.marker or name) in cmdline(pid) else None

    def alive(self, name: str) -> bool:
        return self.pid(name) is not None

    def stop(self, name: str, timeout: float = 15.0) -> None:
        pid = self.pid(name)
        if pid:
            kill(pid, timeout)
        if name in self.children:
            self.children.pop(name).poll()
        self.pid_file(name).unlink(missing_ok=True)

    def exited(self) -> list[str]:
        """Names of the children we started that have exited."""
        return [n for n, p in self.children.items() if p.poll() is not None]

    def tail(self, name: str, lines: int = 40) -> str:
        return tail(self.log_path(name), lines)
