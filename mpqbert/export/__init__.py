"""Packed checkpoints of quantized models and inference on them through the kernels.

`packed`: the format, `export_packed`, `load_packed` and `PackedModel.apply`. `integer`: a packed
model laid out once for int8 x int8 -> int32 matmuls on the CPU (`lay_out(packed, "int8")`);
`lay_out_for_kernels` lays a packed model's words out in whole kernel tiles for GPUs and TPUs. A
finished run's directory becomes a packed safetensors file with `python -m mpqbert.export
--workdir=RUN --out=FILE.safetensors` (`mpqbert.methods.export_run`, which sits above this
package: nothing here imports the runs).
"""

from mpqbert.export.packed import (PackedModel, bit_blocks, export_packed, half_dtype,
                                   lay_out_for_kernels, load_packed, packed_apply, packed_nbytes,
                                   save_packed)
from mpqbert.export.integer import IntegerModel, input_kinds, lay_out, sign_matmuls

__all__ = ["IntegerModel", "PackedModel", "bit_blocks", "export_packed", "half_dtype",
           "input_kinds", "lay_out", "lay_out_for_kernels", "load_packed", "packed_apply", "packed_nbytes", "save_packed",
           "sign_matmuls"]
