"""Gallery embeddings on disk, written and read in chunks (out-of-core galleries).

A `.npy` file read with explicit seeks, not a memory map: mapped pages would stay resident and
count as process memory, while chunked reads keep peak memory at one chunk whatever the gallery
size (web-scale galleries of millions of images). `exact_search` accepts it like an array.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cirlab.errors import CirlabError
from cirlab.io import atomic_path, cannot_write

REBUILD = (
    "Evaluation with eval.gallery_on_disk=true writes it (stages/<stage>/gallery/<split>-<n>.npy) anew "
    "each time: delete it and evaluate again."
)


class EmbeddingFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                self.offset = fh.tell()
        except FileNotFoundError as err:
            raise CirlabError(f"gallery embeddings file not found: {self.path}") from err
        except ValueError as err:  # numpy's words for a short or foreign header
            raise CirlabError(f"{self.path} is not a readable .npy file ({err}). {REBUILD}") from err
        if fortran or len(shape) != 2:
            order = " in Fortran order" if fortran else ""
            raise CirlabError(
                f"{self.path} holds an array of shape {shape}{order}; gallery embeddings are a 2-D "
                f"row-major array (rows x dim). {REBUILD}"
            )
        self.shape, self.dtype = shape, np.dtype(dtype)
        self._buffer = np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows [start, stop) read into one reused buffer (a fresh allocation per chunk fragments the
        heap and peak memory creeps up with the gallery): the result is valid until the next read."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"EmbeddingFile reads contiguous row ranges, not step {step}")
        d = self.shape[1]
        count = max(stop - start, 0) * d
        if self._buffer.size < count:
            self._buffer = np.empty(count, dtype=self.dtype)
        out = self._buffer[:count]
        wanted = count * self.dtype.itemsize
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * d * self.dtype.itemsize)
            got = fh.readinto(memoryview(out).cast("B"))
        if got != wanted:  # else rows of an earlier chunk, left in the buffer, would be scored
            raise CirlabError(
                f"{self.path} is truncated: rows {start}-{stop} of its {self.shape[0]} need {wanted} bytes, "
                f"the file holds {got} of them (a copy or a disk that filled up cut it short). {REBUILD}"
            )
        return out.reshape(-1, d)

    @classmethod
    def write(cls, path: str | Path, chunks: Iterable[np.ndarray], n: int, dim: int) -> EmbeddingFile:
        """Write `n` rows arriving in chunks; atomic like every cirlab file."""
        with EmbeddingWriter(path, n) as writer:
            for chunk in chunks:
                writer.append(chunk)
            return writer.finish()


class EmbeddingWriter:
    """Appends float32 rows, in gallery order, to a `.npy` of known length (e.g. while encoding),
    so the gallery never has to fit in memory; `finish()` publishes it atomically.
    Until then the rows sit in a temp file beside `path`: `abort()` (or leaving a `with` block
    without `finish()`) closes and deletes it, so an evaluation that raised leaves nothing behind."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n, self.written = Path(path), n, 0
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = None

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # nothing left to do after finish()

    def append(self, rows) -> None:
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        try:
            if self._fh is None:
                self._fh = open(self._tmp, "wb")
                np.lib.format.write_array_header_1_0(
                    self._fh, {"descr": "<f4", "fortran_order": False, "shape": (self.n, rows.shape[1])}
                )
            self._fh.write(rows.tobytes())
        except OSError as err:
            self.abort()
            raise cannot_write(self.path, err) from err
        self.written += len(rows)

    def finish(self) -> EmbeddingFile:
        try:
            self._close()  # flushes the last rows
        except OSError as err:
            self.abort()
            raise cannot_write(self.path, err) from err
        if self.written != self.n:
            self.abort()
            raise ValueError(f"{self.path}: expected {self.n} rows, got {self.written}")
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)
        return EmbeddingFile(self.path)

    def abort(self) -> None:
        """Close and delete the temp file; the published file, if any, is untouched. Idempotent."""
        try:
            self._close()
        except OSError:
            pass  # a failed flush of rows that are being thrown away
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            stop = RuntimeError("gallery file abandoned")
            ctx.__exit__(type(stop), stop, None)  # atomic_path deletes its temp file

    def _close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()
