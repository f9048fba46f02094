"""Gallery embeddings on disk, written and read in chunks (out-of-core galleries).

A `.npy` file read with explicit seeks, not a memory map: mapped pages would stay resident and
count as process memory, while chunked reads keep peak memory at one chunk whatever the gallery
size (web-scale galleries of millions of images). `exact_search` accepts it like an array.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from cirlab.io import atomic_path


class EmbeddingFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        assert not fortran and len(shape) == 2
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "EmbeddingFile reads contiguous row ranges"
        d = self.shape[1]
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * d * self.dtype.itemsize)
            return np.fromfile(fh, dtype=self.dtype, count=(stop - start) * d).reshape(-1, d)

    @classmethod
    def write(cls, path: str | Path, chunks: Iterable[np.ndarray], n: int, dim: int,
              dtype=np.float32) -> "EmbeddingFile":
        """Write `n` rows arriving in chunks (e.g. while encoding); atomic like every cirlab file."""
        with atomic_path(path) as tmp:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": (n, dim)}
            written = 0
            with open(tmp, "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    fh.write(chunk.tobytes())
                    written += len(chunk)
            if written != n:
                raise ValueError(f"expected {n} rows, got {written}")
        return cls(path)
