r"""The README's main job: the whole AutoMPQ pipeline on the embedded MiniLM in ~12 CPU minutes.

  python -m mpqbert.main --config=configs/quickstart.py \
      --config.data.glue_dir=../shared/data/glue --workdir=workdirs/quickstart

SST-2 on a 4000-example subset: fine-tunes the full-precision teacher (125 steps), trains the
uniform 2-bit model, searches bits per sub-group (0, 1, 2, 3, 4 or 8) for a model of at most
uniform 2-bit's exact size (16x) and retrains under the searched policy (100 steps each), then
prints the size / accuracy table: AutoMPQ against uniform quantization at the same size.
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
  config.search.target_uniform_bits = 2
  config.search.num_epochs = 1.0  # 100 steps over the 3200-example weight split.
  config.search.warmup_epochs = 0.2
  config.search.tau_decay = 2.0
  config.compare.uniform_bits = (2,)
  config.checkpoint.every_steps = 50
  config.checkpoint.keep = 1
  return config
