r"""Full-precision fine-tuning of a BERT on one GLUE task.

Launch (embedded MiniLM, local GLUE TSVs):

  python -m mpqbert.main --config=configs/finetune.py --config.task=rte \
      --config.data.glue_dir=../shared/data/glue --workdir=/tmp/mpqbert/rte

Leave `data.glue_dir` unset (and `MPQBERT_GLUE_DIR` unset) to download `nyu-mll/glue` from the
Hugging Face hub; set `model` to a local checkpoint directory or a hub name to start from another
BERT/DistilBERT. All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  return defaults.finetune_config()
