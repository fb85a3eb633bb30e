r"""HAWQ-V3 style (Yao et al., ICML 2021) at a size target, then QAT with distillation.

  python -m mpqbert.main --config=configs/hawq.py --config.task=sst2 \
      --config.search.target_uniform_bits=2 --config.data.glue_dir=../shared/data/glue \
      --workdir=/tmp/mpqbert/hawq_sst2_16x

Sensitivity per matrix: its Hessian trace by Hutchinson's estimator (`hessian.trace_samples`
Rademacher vectors on each of `hessian.num_batches` batches) over its number of weights; a
negative trace (a teacher not at a minimum of its loss) is priced by its magnitude
(`hessian.negative_traces="abs"`), not as free ("zero"), which pruned whole matrices on CoLA.
The exact knapsack picks each sub-group's bits to minimise the summed
`sensitivity * ||Q_b(W_g) - W_g||^2` at or under the target: HAWQ-V3's integer program,
over AutoMPQ's search space (`quant.bit_choices`, pruning capped by
`search.max_pruned_fraction`) so that both choose from the same options. All keys and
defaults: `mpqbert/defaults.py`.
"""

from mpqbert import defaults


def get_config():
  return defaults.compression_config("hawq")
