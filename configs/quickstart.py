r"""The README's main job: the whole AutoMPQ pipeline on the embedded MiniLM in ~9 CPU minutes.

  python -m mpqbert.main --config=configs/quickstart.py \
      --config.data.glue_dir=../shared/data/glue --workdir=workdirs/quickstart

SST-2 on a 4000-example subset: fine-tunes the full-precision teacher (125 steps), trains a
uniform 4-bit baseline, searches bits per sub-group for 16x compression and retrains under the
searched policy (100 steps each), then prints the size / accuracy table. The architecture
optimizer is Adam: at this budget SGD (lr 0.1) barely moves the logits (see the README).
For a real run use configs/automp.py.
"""

from mpqbert import defaults


def get_config():
  config = defaults.compression_config("automp")
  config.task = "sst2"
  config.data.max_seq_length = 64
  # Batches of length 32 or 64: SST-2 sentences are short (13 tokens on average), so most
  # batches fit 32 and cost half of 64; two compilations per step function.
  config.data.pad_multiple = 32
  config.data.train_subset = 4000
  config.teacher.train.num_epochs = 1.0
  config.train.num_train_steps = 100
  config.search.target_compression = 16.0
  config.search.num_epochs = 1.0  # 100 steps over the 3200-example weight split.
  config.search.warmup_epochs = 0.2
  config.search.tau_decay = 2.0
  config.search.arch_optimizer = "adam"
  config.search.arch_lr = 0.05
  config.compare.uniform_bits = (4,)
  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 1
  return config
