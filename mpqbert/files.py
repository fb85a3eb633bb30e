"""Atomic file writes for everything a run puts in its workdir."""

from __future__ import annotations

import os
from pathlib import Path

import jax


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
