r"""Q-BERT (Shen et al., AAAI 2020) at a size target, then QAT with distillation.

  python -m mpqbert.main --config=configs/qbert.py --config.task=sst2 \
      --config.search.target_compression=12 --config.data.glue_dir=../shared/data/glue \
      --workdir=/tmp/mpqbert/qbert_sst2_12x

Sensitivity per encoder layer: |mean| + std over `hessian.num_batches` training batches of the
top eigenvalue of the layer's Hessian block (power iteration on Hessian-vector products). As
published: bits from {2, 3, 4, 8}, nothing pruned. Each sub-group's bits then minimise the
summed `sensitivity * ||Q_b(W_g) - W_g||^2` at or under the target (the exact knapsack every
method shares), where Q-BERT ordered layers by hand. It cannot go below uniform 2-bit, and at
uniform 2-bit's size it is uniform 2-bit. All keys and defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  config = defaults.compression_config("qbert")
  config.quant.bit_choices = (2, 3, 4, 8)
  return config
