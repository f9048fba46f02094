"""Gallery embeddings on disk, written and read in chunks (out-of-core galleries).

A `.npy` file read with explicit seeks, not a memory map: mapped pages would stay resident and
count as process memory, while chunked reads keep peak memory at one chunk whatever the gallery
size (web-scale galleries of millions of images). `exact_search` accepts it like an array.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cirlab.io import atomic_path


class EmbeddingFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        assert not fortran and len(shape) == 2
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._buffer = np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows [start, stop) read into one reused buffer (a fresh allocation per chunk fragments the
        heap and peak memory creeps up with the gallery): the result is valid until the next read."""
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "EmbeddingFile reads contiguous row ranges"
        d = self.shape[1]
        count = (stop - start) * d
        if self._buffer.size < count:
            self._buffer = np.empty(count, dtype=self.dtype)
        out = self._buffer[:count]
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * d * self.dtype.itemsize)
            fh.readinto(memoryview(out).cast("B"))
        return out.reshape(-1, d)

    @classmethod
    def write(cls, path: str | Path, chunks: Iterable[np.ndarray], n: int, dim: int) -> EmbeddingFile:
        """Write `n` rows arriving in chunks; atomic like every cirlab file."""
        writer = EmbeddingWriter(path, n)
        for chunk in chunks:
            writer.append(chunk)
        return writer.finish()


class EmbeddingWriter:
    """Appends float32 rows, in gallery order, to a `.npy` of known length (e.g. while encoding),
    so the gallery never has to fit in memory; `finish()` publishes it atomically."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n, self.written = Path(path), n, 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = None

    def append(self, rows) -> None:
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        if self._fh is None:
            self._fh = open(self._tmp, "wb")
            np.lib.format.write_array_header_1_0(
                self._fh, {"descr": "<f4", "fortran_order": False, "shape": (self.n, rows.shape[1])}
            )
        self._fh.write(rows.tobytes())
        self.written += len(rows)

    def finish(self) -> EmbeddingFile:
        if self._fh is not None:
            self._fh.close()
        if self.written != self.n:
            self._ctx.__exit__(ValueError, ValueError(), None)
            raise ValueError(f"{self.path}: expected {self.n} rows, got {self.written}")
        self._ctx.__exit__(None, None, None)
        return EmbeddingFile(self.path)
