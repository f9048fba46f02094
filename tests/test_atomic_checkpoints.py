"""Checkpoints are written next to their final name (temp file in the checkpoint folder, fsync, rename,
fsync of the folder), never staged in $TMPDIR: a node-local or full /tmp must neither break checkpointing
nor turn the rename into a copy across file systems that a kill can leave half-written.

Python's tempfile falls back to /tmp when $TMPDIR is unusable; a process whose temp folder itself is
unusable (a full /tmp) is `tempfile.tempdir` pinned to it, as done here with $TMPDIR.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import results
from fixtures.make_images import materialize
from test_corrupt_checkpoint import ARGS  # the shortest run that writes and resumes a checkpoint

from cirlab.checkpoints import SafeCheckpointIO


def unusable_tmpdir(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))


@pytest.mark.parametrize("kind", ["missing", "read-only"])
def test_checkpoint_is_staged_beside_its_final_name(tmp_path, monkeypatch, kind):
    bad = tmp_path / "tmp"
    if kind == "read-only":  # (root writes there anyway: then the staging check below still tells)
        bad.mkdir()
        bad.chmod(0o555)
    unusable_tmpdir(monkeypatch, bad)
    events = []
    mkstemp, fsync, replace = tempfile.mkstemp, os.fsync, os.replace

    def spy_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        events.append(("temp", Path(name).parent))
        return fd, name

    def spy_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("rename", Path(src).parent, Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(tempfile, "mkstemp", spy_mkstemp)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    path = tmp_path / "run" / "stages" / "s" / "checkpoints" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "epoch": 4}, path)
    folder = path.parent
    assert events == [("temp", folder), ("fsync", "file"), ("rename", folder, path), ("fsync", "folder")]
    assert list(folder.iterdir()) == [path]
    assert SafeCheckpointIO().load_checkpoint(path)["epoch"] == 4


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    """Not mkstemp's 0600: results, checkpoints and plots are shared like any other file of the run."""
    from cirlab.io import current_umask, write_json

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json(tmp_path / "results.json", {"a": 1})
        SafeCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(old)
    for name in ("results.json", "last.ckpt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_run_saves_and_resumes_with_tmpdir_missing(cli, tmp_path, monkeypatch):
    import cirlab.pretrain  # noqa: F401  (its imports reach wandb, which makes a temp folder at import)

    root = materialize("fashioniq", tmp_path / "fiq")
    unusable_tmpdir(monkeypatch, tmp_path / "no-such-folder")
    run = tmp_path / "run"
    code, out, err = cli(*ARGS, f"dataset.root={root}", run_dir=run)
    assert code == 0, err
    expected = results(run)["metrics"]
    last = run / "stages" / "combiner" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    # interrupted after its last.ckpt: done.json and results.json not yet written
    (run / "stages" / "combiner" / "done.json").unlink()
    (run / "results.json").unlink()
    code, out, err = cli(*ARGS, f"dataset.root={root}", "resume=true", run_dir=run)
    assert code == 0, err
    assert f"resuming from {last}" in (run / "cli.log").read_text()
    assert results(run)["metrics"] == expected
