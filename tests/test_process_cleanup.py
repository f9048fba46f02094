"""The helpers that start the tests' and the benches' subprocesses stop everything those start: a child
that hangs after starting a grandchild (a DDP launcher and its ranks, a demo and its server) is gone with
its grandchild once the timeout expires, and a grandchild a finished child left behind is stopped too.
`subprocess.run(timeout=...)` kills the child only, `communicate(timeout=...)` nothing."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import conftest
import pytest
from conftest import ROOT

# The child starts a grandchild that ignores SIGTERM (only the SIGKILL that follows stops it) and, if it
# hangs ($2 = hang), a second one in a session of its own (as torchrun starts its ranks: found as the
# child's child; once orphaned nothing links it to the test any more); it writes the pids to $1/pids, then
# hangs or exits. A shell: Python start-ups would cost seconds.
CHILD = """
(trap "" TERM; exec sleep 600) &
pids="$$ $!"
if [ "$2" = hang ]; then
    setsid sleep 600 &
    pids="$pids $!"
fi
echo "$pids" > "$1/pids.tmp" && mv "$1/pids.tmp" "$1/pids"
[ "$2" = hang ] && exec sleep 600
exit 0
"""


def family(folder: Path, mode: str) -> list[str]:
    return ["sh", "-c", CHILD, "sh", str(folder), mode]


def bench_procs():
    spec = importlib.util.spec_from_file_location("bench_procs", ROOT / "bench" / "_procs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELPERS = {"tests": lambda: conftest, "bench": bench_procs}


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def pids(folder: Path) -> list[int]:
    file = folder / "pids"
    assert file.is_file(), "the child did not start its grandchild in time (a very busy machine?)"
    return [int(p) for p in file.read_text().split()]


def kill_leftovers(folder: Path) -> None:
    """Whatever a failing run of these tests left: never leave it running."""
    if (folder / "pids").is_file():
        for pid in pids(folder):
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("helpers", HELPERS)
def test_a_timeout_stops_the_child_and_its_grandchild(helpers, tmp_path):
    procs = HELPERS[helpers]()
    start = time.monotonic()
    try:
        for timeout in (1, 10, 60):  # longer only where a busy machine started the child too late
            with pytest.raises(subprocess.TimeoutExpired):
                procs.run_group(family(tmp_path, "hang"), timeout=timeout, grace=0.2)
            if (tmp_path / "pids").is_file():
                break
        child, *grandchildren = pids(tmp_path)
        assert not running(child)
        assert not any(running(pid) for pid in grandchildren), "a grandchild runs on after the timeout"
        assert time.monotonic() - start < 90  # the timeouts and the grace period, not the 600 s sleep
    finally:
        kill_leftovers(tmp_path)


@pytest.mark.parametrize("helpers", HELPERS)
def test_a_grandchild_left_by_a_finished_child_is_stopped(helpers, tmp_path):
    procs = HELPERS[helpers]()
    try:
        done = procs.run_group(family(tmp_path, "exit"), timeout=60, grace=0.2)
        assert done.returncode == 0
        assert not any(running(pid) for pid in pids(tmp_path)), "an orphan runs on"
    finally:
        kill_leftovers(tmp_path)


def test_a_failed_assertion_in_the_block_stops_the_group(tmp_path):
    try:
        with pytest.raises(AssertionError, match="checked"):
            with conftest.process_group(family(tmp_path, "hang"), grace=0.2):
                deadline = time.monotonic() + 60
                while not (tmp_path / "pids").is_file() and time.monotonic() < deadline:
                    time.sleep(0.05)
                raise AssertionError("checked")
        assert not any(running(pid) for pid in pids(tmp_path))
    finally:
        kill_leftovers(tmp_path)
