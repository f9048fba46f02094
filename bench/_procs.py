"""The benches' subprocesses, each in a process group of its own that is stopped as a whole: on a
timeout, a failure or Ctrl-C nothing they started (DataLoader workers, a demo's server) runs on; and a
free port for the servers they start.
tests/conftest.py imports them too: one implementation for tests and benches."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def family(proc: subprocess.Popen) -> list[int]:
    """The running processes of `proc`'s group and their descendants (torchrun starts each rank in a
    session of its own); zombies do not count (init reaps orphans, here up to 2 s later). `proc` itself is
    reaped here once it has exited."""
    proc.poll()
    if not os.path.isdir("/proc"):  # no process table to read (macOS): the group alone
        try:
            os.killpg(proc.pid, 0)  # the group id is the leader's pid, reserved while any member lives
        except ProcessLookupError:
            return []
        return [-proc.pid]  # os.kill(-pgid, ...) signals the whole group
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        table[int(stat.parent.name)] = (state, int(ppid), int(group))
    found = {pid for pid, (_, _, group) in table.items() if group == proc.pid}
    while more := {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found:
        found |= more
    return [pid for pid in found if table[pid][0] not in ("Z", "X")]


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop `proc` and everything it started: SIGTERM to its whole group and their descendants, SIGKILL to
    whatever is left after `grace` seconds. `proc.kill()` alone (subprocess.run's timeout; communicate's
    kills nothing) orphans the grandchildren (DDP ranks, torchrun workers, a demo's server), which run on.
    `proc` must lead a session of its own (start_new_session=True, as process_group starts it), else its
    group would be the bench's."""
    if getattr(proc, "group_stopped", False):  # its id may belong to another process group by now
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = family(proc)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while family(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.group_stopped = True


@contextlib.contextmanager
def process_group(cmd: list, grace: float = 10.0, **kwargs):
    """`subprocess.Popen(cmd, **kwargs)` in a session of its own; its whole group is stopped however the
    block ends."""
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            yield proc
        finally:
            kill_group(proc, grace)


def run_group(
    cmd: list, *, timeout: float, check: bool = False, capture_output: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, timeout=...) whose timeout stops the whole process group, not only `cmd`."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with process_group(cmd, **kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
