"""Packed checkpoints of quantized models and inference on them (see `packed`)."""

from mpqbert.export.packed import (PackedModel, export_packed, half_dtype, load_packed,
                                   packed_apply, packed_nbytes, save_packed)

__all__ = ["PackedModel", "export_packed", "half_dtype", "load_packed", "packed_apply",
           "packed_nbytes", "save_packed"]
