r"""Full-precision fine-tuning of a BERT on one GLUE task.

Launch (embedded MiniLM, local GLUE TSVs):

  python -m mpqbert.main --config=configs/finetune.py --config.task=rte \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/rte

Leave `data.glue_dir` unset (and `MPQBERT_GLUE_DIR` unset) to download `nyu-mll/glue` from the
Hugging Face hub; set `model` to a local checkpoint directory or a hub name to start from another
BERT/DistilBERT.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.method = "finetune"
  config.task = "mrpc"
  config.model = "minilm"  # 'minilm' (embedded), a local checkpoint directory, or a hub name.
  config.seed = 0

  config.data = config_dict.ConfigDict()
  config.data.glue_dir = config_dict.placeholder(str)  # None: $MPQBERT_GLUE_DIR, else the hub.
  config.data.max_seq_length = 128
  config.data.pad_multiple = 32  # Batches pad to a multiple of this: few shapes, few recompiles.
  config.data.train_subset = 0  # >0: train on the first N examples of a seeded shuffle.

  config.train = config_dict.ConfigDict()
  config.train.batch_size = 32
  config.train.eval_batch_size = 128
  config.train.num_epochs = 3.0
  config.train.num_train_steps = -1  # >0 overrides num_epochs.
  config.train.learning_rate = 5e-5
  config.train.warmup_ratio = 0.1
  config.train.weight_decay = 0.01
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.adam_eps = 1e-6
  config.train.max_grad_norm = 1.0
  config.train.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).
  config.train.remat = False
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 0  # 0: evaluate at the end of every epoch.

  config.checkpoint = config_dict.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  return config
