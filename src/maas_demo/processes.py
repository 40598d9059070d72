"""Child processes, one helper for the demo stack, the benchmarks and the tests' servers.

Every child (our servers, Envoy, kube-apiserver and etcd, redis-server, vLLM) runs in its own
process group (``start_new_session=True``) with its output appended to a log file. This module
starts them that way (:func:`spawn_logged`), picks loopback ports (:func:`free_port`), waits for
them to be ready (:func:`wait_until_ready`, :func:`http_ok`) quoting the end of the log when they
are not (:func:`log_tail`), stops a whole process group (:func:`stop_process_group`), and stops
whatever is still running at interpreter exit (:class:`LiveSet`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

__all__ = [
    "LiveSet",
    "free_port",
    "http_ok",
    "log_tail",
    "spawn_logged",
    "stop_process_group",
    "wait_group_gone",
    "wait_until_ready",
]

_REAP_TIMEOUT = 5.0  # seconds to wait for the group leader after SIGKILL
_MIN_GROUP_GRACE = 2.0  # seconds the rest of the group gets before SIGKILL, at the least
_GROUP_GONE_TIMEOUT = 5.0  # seconds to wait for the group to be gone after SIGKILL

T = TypeVar("T", bound=Hashable)


_EPHEMERAL = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")


def _below_ephemeral() -> range:
    """Ports below the kernel's ephemeral range: no outgoing connection's source port is ever
    taken from there, so a port picked now is still free when a child binds it seconds later
    (port 0 would pick from the ephemeral range, where every readiness poll takes a port)."""
    try:
        low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10_000, low) if low > 12_000 else range(0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    candidates = _below_ephemeral()
    for _ in range(50 if candidates else 0):
        port = random.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of `url` (on loopback) answers 200 now."""
    with (
        contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError),
        urllib.request.urlopen(url, timeout=timeout) as response,  # noqa: S310 - loopback
    ):
        return bool(response.status == 200)
    return False


def log_tail(path: pathlib.Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the file at ``path``, or a note saying why it can't be read."""
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(data[-lines:])


def spawn_logged(
    args: Sequence[str],
    log_file: pathlib.Path,
    *,
    cwd: pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
    banner: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (and so its own process group), stdin from /dev/null.

    Its stdout and stderr are appended to ``log_file``, after a line
    ``===== HH:MM:SS starting: BANNER``; ``banner`` defaults to ``str(list(args))``.
    ``env`` None inherits this process's environment.
    """
    shown = str(list(args)) if banner is None else banner
    with open(log_file, "ab") as fh:
        fh.write(f"\n===== {time.strftime('%H:%M:%S')} starting: {shown}\n".encode())
        fh.flush()
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_ready(
    proc: subprocess.Popen[Any],
    is_ready: Callable[[], bool],
    *,
    name: str,
    log_file: pathlib.Path,
    timeout: float,
    interval: float,
    not_ready: Callable[[], str],
    exited_note: str = "",
    log_lines: int = 40,
    error: type[Exception] = RuntimeError,
) -> None:
    """Call ``is_ready()`` every ``interval`` seconds until it returns True.

    Raise ``error`` (RuntimeError) if ``proc`` exits first (``NAME exited with code
    N<exited_note>``), or if it is not ready after ``timeout`` seconds (``NAME
    <not_ready()>``); either message goes on with ``; LOG_FILE:`` and the last ``log_lines``
    lines of ``log_file``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        returncode = proc.poll()
        if returncode is not None:
            raise error(
                f"{name} exited with code {returncode}{exited_note}; "
                f"{log_file}:\n{log_tail(log_file, log_lines)}"
            )
        if is_ready():
            return
        time.sleep(interval)
    raise error(f"{name} {not_ready()}; {log_file}:\n{log_tail(log_file, log_lines)}")


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process is left in group ``pgid``; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_process_group(
    proc: subprocess.Popen[Any], *, grace: float, wait_for_group: bool = False
) -> None:
    """Stop the process group that ``proc`` leads (it was started with ``start_new_session``).

    If ``proc`` is still running, SIGTERM its group and wait up to ``grace`` seconds for it to
    exit. Then SIGKILL the group, even if the leader already exited (stray children), and reap
    the leader.

    With ``wait_for_group``, also wait for every process in the group to be gone: before the
    SIGKILL for what is left of ``grace`` (at least 2 s), so children that exit on their own
    shortly after the leader get the chance to, and after it for up to 5 s.
    """
    pgid = proc.pid
    deadline = time.monotonic() + grace
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if wait_for_group:
        wait_group_gone(pgid, max(deadline - time.monotonic(), _MIN_GROUP_GRACE))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_REAP_TIMEOUT)
    if wait_for_group:
        wait_group_gone(pgid, _GROUP_GONE_TIMEOUT)


class LiveSet(Generic[T]):
    """A thread-safe set of live objects, each stopped at interpreter exit if still in it.

    At exit, the method named ``at_exit`` (for example ``"stop"``) is called, without
    arguments, on each object still in the set; exceptions are ignored (best effort).
    """

    def __init__(self, at_exit: str) -> None:
        self._at_exit = at_exit
        self._items: set[T] = set()
        self._lock = threading.Lock()
        atexit.register(self._cleanup)

    def add(self, item: T) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: T) -> None:
        with self._lock:
            self._items.discard(item)

    def _cleanup(self) -> None:
        with self._lock:
            items = list(self._items)
        for item in items:
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                getattr(item, self._at_exit)()
