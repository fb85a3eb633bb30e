r"""Q-BERT-style Hessian-aware bits per sub-group under a size target, then retrain.

  python -m mpqbert.main --config=configs/hessian.py --config.task=sst2 \
      --config.search.target_uniform_bits=2 --config.data.glue_dir=../shared/data/glue \
      --workdir=/tmp/mpqbert/hessian_sst2_16x

All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  # No size target by default: name one (search.target_uniform_bits, target_compression or
  # target_size_mb) on the command line, as above.
  return defaults.compression_config("hessian")
