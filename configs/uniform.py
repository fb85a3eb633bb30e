r"""Uniform n-bit quantization-aware fine-tuning (every sub-group at `quant.bits`).

  python -m mpqbert.main --config=configs/uniform.py --config.task=sst2 --config.quant.bits=4 \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/uniform4_sst2

All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  return defaults.compression_config("uniform")
