"""On-disk gallery embeddings (eval.gallery_on_disk): a damaged file is an error naming it and how to
rebuild it, never a silent score; an evaluation that raises leaves no temp file or open handle behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fixtures.make_images import materialize

from cirlab.errors import CirlabError
from cirlab.retrieval.embedding_file import EmbeddingFile, EmbeddingWriter


def gallery(path: Path, n: int = 100, d: int = 8) -> np.ndarray:
    rows = np.arange(n * d, dtype=np.float32).reshape(n, d)
    EmbeddingFile.write(path, (rows[i : i + 30] for i in range(0, n, 30)), n, d)
    return rows


def open_handles(folder: Path) -> list[str]:
    """This process's open files under `folder` (Linux)."""
    fds = Path("/proc/self/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            pass
    return [link for link in links if link.startswith(str(folder))]


def test_truncated_gallery_is_an_error_not_stale_rows(tmp_path):
    path = tmp_path / "test-0.npy"
    rows = gallery(path)
    ef = EmbeddingFile(path)
    assert np.array_equal(ef[0:50], rows[:50])  # the reused buffer now holds rows 0-49
    with open(path, "r+b") as fh:  # cut inside row 80
        fh.truncate(os.path.getsize(path) - 20 * 8 * 4 - 4)
    assert np.array_equal(ef[0:50], rows[:50])  # the intact part still reads
    with pytest.raises(CirlabError) as err:
        ef[50:100]
    message = str(err.value)
    assert str(path) in message and "truncated" in message
    assert "delete it and evaluate again" in message and "eval.gallery_on_disk=true" in message


@pytest.mark.parametrize("damage", ["empty", "half header", "not npy"])
def test_unreadable_header_names_the_file(tmp_path, damage):
    path = tmp_path / "g.npy"
    gallery(path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "half header": data[:20], "not npy": b"PK\x03\x04" + data[4:]}[damage])
    with pytest.raises(CirlabError, match="is not a readable .npy file") as err:
        EmbeddingFile(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "array", [np.zeros((4, 3, 2), np.float32), np.asfortranarray(np.zeros((4, 3), np.float32))]
)
def test_wrong_layout_is_an_error_even_under_python_O(tmp_path, array):
    path = tmp_path / "g.npy"
    np.save(path, array)
    with pytest.raises(CirlabError, match="2-D row-major array") as err:
        EmbeddingFile(path)
    assert str(path) in str(err.value)


def test_strided_read_is_refused(tmp_path):
    gallery(tmp_path / "g.npy")
    with pytest.raises(ValueError, match="contiguous row ranges"):
        EmbeddingFile(tmp_path / "g.npy")[0:10:2]


def test_writer_left_by_an_exception_removes_its_temp_file(tmp_path):
    path = tmp_path / "gallery" / "val-0.npy"
    with pytest.raises(RuntimeError, match="encoder failed"):
        with EmbeddingWriter(path, 10) as writer:
            writer.append(np.zeros((4, 3)))
            assert [p.suffix for p in path.parent.iterdir()] == [".tmp"] and open_handles(path.parent)
            raise RuntimeError("encoder failed")
    assert list(path.parent.iterdir()) == [] and open_handles(path.parent) == []
    writer.abort()  # idempotent


def test_evaluation_that_raises_leaves_no_gallery_temp_file(cli, tmp_path, monkeypatch):
    """An exception in the middle of a real evaluation (FashionIQ: one gallery per category): the dress
    gallery written whole but not yet published, the shirt gallery's first batch written. Afterwards the
    stage's gallery folder holds no temp file and the process no handle on it."""
    from cirlab.methods.retrieval_module import RetrievalModule

    stream, seen = RetrievalModule._stream_gallery, []

    def failing(self, dataloader_idx, index, emb):
        stream(self, dataloader_idx, index, emb)
        if dataloader_idx == 2:  # the second category's gallery
            seen.extend(sorted(p.name for p in self.gallery_on_disk.iterdir()))
            raise RuntimeError("injected in the middle of evaluation")

    monkeypatch.setattr(RetrievalModule, "_stream_gallery", failing)
    root = materialize("fashioniq", tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=zeroshot",
        "dataset=fashioniq",
        f"dataset.root={root}",
        "eval.gallery_on_disk=true",
        "method.eval.batch_size=8",
        run_dir=run,
    )
    assert code == 1 and "injected in the middle of evaluation" in err
    assert [n.split(".")[1] for n in seen] == ["val-0", "val-2"] and all(n.endswith(".tmp") for n in seen)
    folder = run / "stages" / "eval" / "gallery"
    assert list(folder.iterdir()) == [] and open_handles(folder) == []
