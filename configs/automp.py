r"""AutoMPQ: search bits per sub-group (0 = pruned) under a size target, then retrain.

  python -m mpqbert.main --config=configs/automp.py --config.task=sst2 \
      --config.search.target_uniform_bits=2 --config.data.glue_dir=../shared/data/glue \
      --workdir=/tmp/mpqbert/automp_sst2_16x

Fine-tunes the full-precision teacher first unless `teacher.workdir` names a finished
configs/finetune.py run. Writes policy.json, bit_map.png and results.json to the workdir.
All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  # No size target by default: name one (search.target_uniform_bits, target_compression or
  # target_size_mb) on the command line, as above.
  return defaults.compression_config("automp")
