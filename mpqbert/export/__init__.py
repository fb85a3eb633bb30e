"""Packed checkpoints of quantized models and inference on them through the kernels.

`packed`: the format, `export_packed`, `load_packed` and `PackedModel.apply`. A finished run's
directory becomes a packed file with `python -m mpqbert.export --workdir=RUN --out=FILE`
(`mpqbert.methods.export_run`, which sits above this package: nothing here imports the runs).
"""

from mpqbert.export.packed import (PackedModel, bit_blocks, export_packed, half_dtype, load_packed,
                                   packed_apply, packed_nbytes, save_packed)

__all__ = ["PackedModel", "bit_blocks", "export_packed", "half_dtype", "load_packed",
           "packed_apply", "packed_nbytes", "save_packed"]
