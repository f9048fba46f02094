"""Atomic writes: every artefact appears whole or not at all (temp file in the same folder, fsync,
rename, fsync of the folder). Never staged in $TMPDIR: a rename across file systems is a copy that a
kill can leave half-written, and a full or missing /tmp must not stop a run whose folder has room.

Unique temp names make two concurrent writers of the same path safe: the last rename wins and
each rename publishes a complete file. `build_lock` makes concurrent runs build a shared cache entry
once: the others wait, then use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cirlab.errors import CirlabError

log = logging.getLogger("cirlab")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else by setting and
    restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure delete it. The file
    gets the mode `open` would give it (mkstemp's is 0600: results a colleague could not read)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError as err:
        raise cannot_write(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise cannot_write(path, err) from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def cannot_write(path: Path, err: OSError) -> CirlabError:
    return CirlabError(
        f"could not write {path}: {err.strerror or err}. Check free disk space and permissions."
    )


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable: until the folder's entry reaches the disk, a power loss can
    bring back the old file (or none). Skipped where folders cannot be opened or synced (Windows, some
    network and FUSE file systems): the rename itself is done."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def build_lock(entry: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `<entry>.lock` while building the shared cache entry `entry`.
    Callers check for the entry again once they hold it: another run may have built it meanwhile.
    The kernel drops the lock when its holder dies, so a killed run never blocks the next one."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent runs may build the entry twice, atomically
        yield
        return
    with open(entry.with_name(entry.name + ".lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run to finish building %s", entry)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    kwargs.setdefault("indent", 2)

    def dump(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, **kwargs)
            fh.write("\n")

    return write_atomic(path, dump)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Safe load (no pickled code); a truncated or foreign file becomes a CirlabError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise CirlabError(f"file not found: {path}") from err
    except Exception as err:  # torch raises several types for corrupt archives
        raise CirlabError(
            f"{path} is not a readable cirlab/torch checkpoint ({type(err).__name__}: {err}). "
            "Delete it or point to another file."
        ) from err


def read_json(path: str | os.PathLike) -> Any:
    """JSON load whose errors name the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"missing file: {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise CirlabError(
            f"malformed JSON in {path} at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
