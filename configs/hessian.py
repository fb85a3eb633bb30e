r"""Q-BERT-style Hessian-aware bits per sub-group under a size target, then retrain.

  python -m mpqbert.main --config=configs/hessian.py --config.task=sst2 \
      --config.search.target_compression=16 --config.data.glue_dir=../shared/data/glue \
      --workdir=/tmp/mpqbert/hessian_sst2_16x

All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  config = defaults.compression_config("hessian")
  config.search.target_compression = 16.0
  return config
