"""Atomic file writes for everything a run puts in its workdir."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import jax
import numpy as np


def write_atomic(path: str | Path, data: str | bytes) -> Path:
  """Writes `data` to `path` through a temporary file and a rename.

  A reader never sees half a file: not a resumed run after a kill mid-write, nor another process
  of a multi-host run, where every process writes the same small files to a shared workdir.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.{jax.process_index()}.{os.getpid()}.tmp")
  if isinstance(data, bytes):
    temporary.write_bytes(data)
  else:
    temporary.write_text(data)
  os.replace(temporary, path)
  return path


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
  """`arrays` as one uncompressed .npz, written atomically (`write_atomic`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
  return write_atomic(path, buffer.getvalue())
