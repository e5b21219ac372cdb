"""Detached server processes: start, find, signal, wait.

Each process the tool starts gets a directory under the state folder with a
``process.json`` (pid, argv, start time) and its own log. A pid alone is not trusted:
the process must still carry its ``marker`` (a path unique to it) on its command line,
so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clearinghouse._invariant import invariant

STOP_GRACE_S = 60.0
KILL_WAIT_S = 10.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 40


class ProcessError(RuntimeError):
    """A server failed to start or stop; the message names it and the log to read."""


@dataclass(frozen=True, slots=True)
class ProcState:
    pid: int | None
    state: str  # "up", "paused", "down"

    @property
    def alive(self) -> bool:
        return self.state in ("up", "paused")


@dataclass(frozen=True, slots=True)
class Managed:
    """One server process the tool manages."""

    kind: str  # "etcd", "cassandra", "switch", "bank"
    name: str  # zone name or bank code
    directory: Path
    log: Path

    @property
    def record(self) -> Path:
        return self.directory / "process.json"

    @property
    def marker(self) -> str:
        return str(self.directory)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def _proc_stat(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The state is the first field after the parenthesised command name.
    return raw[raw.rindex(")") + 2 :].split(" ", 1)[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def read_pid(m: Managed) -> int | None:
    try:
        return int(json.loads(m.record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def state(m: Managed) -> ProcState:
    pid = read_pid(m)
    if pid is None:
        return ProcState(None, "down")
    st = _proc_stat(pid)
    if st is None or st in ("Z", "X") or m.marker not in _cmdline(pid):
        return ProcState(pid, "down")
    return ProcState(pid, "paused" if st in ("T", "t") else "up")


def spawn(m: Managed, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Start ``argv`` detached from this process, output appended to ``m.log``.

    The server is started by a short-lived ``sh`` that backgrounds it and prints its
    pid, so it is re-parented at once and never left as our zombie.
    """
    invariant(m.marker in " ".join(argv), f"{m.label}: argv must carry its marker")
    m.directory.mkdir(parents=True, exist_ok=True)
    m.log.parent.mkdir(parents=True, exist_ok=True)
    with m.log.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {m.label}\n".encode())
    script = 'exec "$@" >>"$LOG" 2>&1 </dev/null & echo $!'
    out = subprocess.run(
        ["sh", "-c", script, "sh", *argv],
        env={**(env or os.environ), "LOG": str(m.log)},
        cwd=m.directory,
        capture_output=True,
        check=True,
        start_new_session=True,
        timeout=10,
    )
    pid = int(out.stdout.decode().strip())
    m.record.write_text(json.dumps({"pid": pid, "argv": list(argv), "started_at": time.time()}))
    return pid


def python_env(root: Path) -> dict[str, str]:
    """The environment for a Python server of this checkout: its ``services/`` first.

    The launcher may run from any interpreter that can import the project; the servers
    it starts must import the same code, whatever the venv's install mode.
    """
    services = str(root / "services")
    current = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{services}{os.pathsep}{current}" if current else services}


def signal_proc(m: Managed, sig: signal.Signals) -> bool:
    """Send ``sig`` if the process is alive; return whether it was."""
    st = state(m)
    if not st.alive or st.pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(st.pid, sig)
    return True


def wait_down(m: Managed, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not state(m).alive:
            return True
        time.sleep(POLL_INTERVAL_S)
    return not state(m).alive


def stop(m: Managed, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (after SIGCONT, so a paused process can act on it), then SIGKILL."""
    if not state(m).alive:
        return
    signal_proc(m, signal.SIGCONT)
    signal_proc(m, signal.SIGTERM)
    if wait_down(m, grace_s):
        return
    signal_proc(m, signal.SIGKILL)
    if not wait_down(m, KILL_WAIT_S):
        raise ProcessError(f"{m.label} (pid {read_pid(m)}) survived SIGKILL; see {m.log}")


def kill(m: Managed) -> None:
    if signal_proc(m, signal.SIGKILL) and not wait_down(m, KILL_WAIT_S):
        raise ProcessError(f"{m.label} (pid {read_pid(m)}) survived SIGKILL; see {m.log}")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    what: str,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    procs: Sequence[Managed] = (),
    logs: Sequence[Path] = (),
    progress: Callable[[str], None] = print,
    every_s: float = 10.0,
) -> float:
    """Poll ``ready`` until true; fail fast if one of ``procs`` died.

    Prints what it is waiting for every ``every_s`` seconds. On failure raises
    :class:`ProcessError` naming the component and carrying the tail of its log.
    Returns the seconds waited.
    """
    start = time.monotonic()
    next_note = start + every_s
    while True:
        if ready():
            return time.monotonic() - start
        now = time.monotonic()
        for m in procs:
            if not state(m).alive:
                raise ProcessError(
                    f"{m.label} exited while waiting for {what}. Log: {m.log}\n"
                    + _tails([m.log, *logs])
                )
        if now - start > timeout_s:
            names = ", ".join(m.label for m in procs) or what
            raise ProcessError(
                f"timed out after {timeout_s:.0f}s waiting for {what} ({names}).\n"
                + _tails([*(m.log for m in procs), *logs])
            )
        if now >= next_note:
            progress(f"  ... still waiting for {what} ({now - start:.0f}s of {timeout_s:.0f}s)")
            next_note = now + every_s
        time.sleep(POLL_INTERVAL_S)


def _tails(paths: Sequence[Path]) -> str:
    seen: list[str] = []
    for p in dict.fromkeys(paths):
        seen.append(f"--- last lines of {p} ---\n{tail(p)}")
    return "\n".join(seen)
