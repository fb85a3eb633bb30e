"""Packed checkpoints of quantized models and inference on them through the kernels.

`packed`: the format, `export_packed`, `load_packed` and `PackedModel.apply`; `from_run`: a
finished run's directory to a packed file (`python -m mpqbert.export --workdir=RUN --out=FILE`).
"""

from mpqbert.export.from_run import export_run, final_stage, spec_from_policy
from mpqbert.export.packed import (PackedModel, bit_blocks, export_packed, half_dtype, load_packed,
                                   packed_apply, packed_nbytes, save_packed)

__all__ = ["PackedModel", "bit_blocks", "export_packed", "export_run", "final_stage",
           "half_dtype", "load_packed", "packed_apply", "packed_nbytes", "save_packed",
           "spec_from_policy"]
