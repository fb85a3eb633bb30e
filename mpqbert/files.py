"""Atomic file writes for everything a run puts in its workdir, and the safetensors format.

safetensors (the format the Hugging Face ecosystem reads) is written and read here with NumPy
alone, so the packed checkpoints (`export.save_packed`) take no dependency: an 8-byte
little-endian header length N, N bytes of JSON (per tensor its `dtype`, `shape` and
`data_offsets` [begin, end) into the data; `__metadata__`: str -> str), padded with spaces to a
multiple of 8, then the tensors' little-endian bytes, back to back.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# safetensors' dtype names (the ones NumPy holds; BF16 through ml_dtypes, as JAX).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
                      "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                      "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(t): name for name, t in SAFETENSORS_DTYPES.items()}


def write_atomic(path: str | Path, data: str | bytes | Iterable[bytes]) -> Path:
  """Writes `data` (text, bytes, or bytes in chunks) to `path` through a temporary file and a
  rename.

  A reader never sees half a file: not a resumed run after a kill mid-write, nor another process
  of a multi-host run, where every process writes the same small files to a shared workdir.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.{jax.process_index()}.{os.getpid()}.tmp")
  try:
    if isinstance(data, str):
      temporary.write_text(data)
    elif isinstance(data, bytes):
      temporary.write_bytes(data)
    else:
      with temporary.open("wb") as f:
        for chunk in data:
          f.write(chunk)
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  return path


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
  """`arrays` as one uncompressed .npz, written atomically (`write_atomic`)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
  return write_atomic(path, buffer.getvalue())


def _little_endian(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if value.dtype.newbyteorder("=") not in _DTYPE_NAMES:
    raise ValueError(f"safetensors holds no {value.dtype} tensors; store one of "
                     f"{sorted(str(d) for d in _DTYPE_NAMES)}.")
  return np.asarray(value, value.dtype.newbyteorder("<"), order="C")  # 0-d stays 0-d


def safetensors_header(arrays: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str]) -> tuple[bytes, list[np.ndarray]]:
  """The length prefix and JSON header of `arrays` as one safetensors file, and the arrays in
  the order their bytes follow it: by decreasing item size (each tensor then starts at a
  multiple of its item size, the data at a multiple of 8), otherwise as given."""
  if "__metadata__" in arrays:
    raise ValueError("'__metadata__' names the header's metadata, not a tensor.")
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
    raise ValueError("safetensors metadata maps str to str; encode other values (json.dumps).")
  tensors = {name: _little_endian(v) for name, v in arrays.items()}
  order = sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)
  header, offset = {"__metadata__": dict(metadata)}, 0
  for name in order:
    value = tensors[name]
    header[name] = {"dtype": _DTYPE_NAMES[value.dtype.newbyteorder("=")],
                    "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text, [tensors[name] for name in order]


def write_safetensors(path: str | Path, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str]) -> Path:
  """`arrays` and `metadata` (str -> str) as one safetensors file, written atomically."""
  header, tensors = safetensors_header(arrays, metadata)
  return write_atomic(path, (header, *(t.tobytes() for t in tensors)))


def _check_entry(name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """`(dtype, shape, begin, end)` of one tensor's header entry, checked against itself."""
  try:
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (int(n) for n in entry["data_offsets"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"tensor {name!r}: unreadable header entry {entry!r} ({e!r})") from None
  if min(shape, default=0) < 0 or end - begin != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"tensor {name!r}: data_offsets [{begin}, {end}) do not hold "
                     f"{entry['dtype']} {list(shape)}")
  return dtype, shape, begin, end


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The tensors (read-only NumPy arrays over the file's bytes) and metadata of a safetensors
  file. A torn or truncated file, or a header whose tensors do not cover its data exactly,
  raises ValueError naming the file."""
  path = Path(path)
  raw = path.read_bytes()
  try:
    if len(raw) < 8:
      raise ValueError(f"{len(raw)} bytes, less than the 8-byte header length")
    size = int.from_bytes(raw[:8], "little")
    if 8 + size > len(raw):
      raise ValueError(f"a {size}-byte header in {len(raw)} bytes: truncated")
    try:
      header = json.loads(raw[8:8 + size].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
      raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
      raise ValueError("__metadata__ is not a map of str to str")
    entries = {name: _check_entry(name, entry) for name, entry in header.items()}
    data = memoryview(raw)[8 + size:]
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: item[1][2]):
      if begin != end:
        raise ValueError(f"tensor {name!r} starts at byte {begin} of the data, not {end}")
      end = stop
    if end != len(data):
      raise ValueError(f"the tensors end at byte {end} of the data, which holds {len(data)}: "
                       + ("truncated" if end > len(data) else "trailing bytes"))
  except ValueError as e:
    raise ValueError(f"{path} is not a complete safetensors file: {e}.") from None
  arrays = {name: np.frombuffer(data, dtype, int(np.prod(shape)), begin).reshape(shape)
            for name, (dtype, shape, begin, _) in entries.items()}
  return arrays, dict(metadata)


def safetensors_header_bytes(path: str | Path) -> int:
  """Bytes of a safetensors file before its tensors' data: the length prefix and the header."""
  with Path(path).open("rb") as f:
    return 8 + int.from_bytes(f.read(8), "little")
