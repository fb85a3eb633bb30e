"""Default values of the configs in `configs/`: one place, so the methods share their keys.

Config files call these and change what their method needs; every value is plain data.
"""

from __future__ import annotations

from ml_collections import config_dict


def train_defaults(**overrides) -> config_dict.ConfigDict:
  """AdamW fine-tuning budget and logging (`config.train`, and `config.teacher.train`)."""
  train = config_dict.ConfigDict()
  train.batch_size = 32
  train.eval_batch_size = 128
  train.num_epochs = 3.0
  train.num_train_steps = -1  # >0 overrides num_epochs.
  train.learning_rate = 5e-5
  train.warmup_ratio = 0.1
  train.weight_decay = 0.01
  train.adam_b1 = 0.9
  train.adam_b2 = 0.999
  train.adam_eps = 1e-6
  train.max_grad_norm = 1.0
  train.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).
  train.remat = False
  # Devices that split each encoder matrix between them (Megatron-style, `train/sharding.py`);
  # the devices / model_parallel groups of them are data parallel. 1: data parallelism alone.
  train.model_parallel = 1
  train.log_every_steps = 50
  train.eval_every_steps = 0  # 0: evaluate at the end of every epoch.
  train.update(overrides)
  return train


def finetune_config() -> config_dict.ConfigDict:
  """Full-precision fine-tuning (`configs/finetune.py`)."""
  config = config_dict.ConfigDict()
  config.method = "finetune"
  config.task = "mrpc"
  config.model = "minilm"  # 'minilm' (embedded), a local checkpoint directory, or a hub name.
  # >0: only the checkpoint's first N encoder layers (e.g. BERT-base cut to 6, as SensiMix's
  # authors start; the notebooks' CI smoke budget runs MiniLM cut to 2). 0: every layer.
  config.model_layers = 0
  config.seed = 0

  config.data = config_dict.ConfigDict()
  config.data.glue_dir = config_dict.placeholder(str)  # None: $MPQBERT_GLUE_DIR, else the hub.
  config.data.max_seq_length = 128
  config.data.pad_multiple = 32  # Batches pad to a multiple of this: few shapes, few recompiles.
  config.data.train_subset = 0  # >0: train on the first N examples of a seeded shuffle.
  # Training batches draw batch_size / shards rows from each shard (example i % shards); each
  # process tokenizes only its shards. 0: one per process. Fix it to compare process counts.
  config.data.shards = 0
  # Read the training split as a stream (hub `datasets` streaming, or the local TSV row by row):
  # for tasks too large to tokenize in memory. Shuffles within windows of 50 batches.
  config.data.streaming = False

  config.train = train_defaults()

  config.checkpoint = config_dict.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  return config


def _teacher_and_qat(method: str) -> config_dict.ConfigDict:
  """Keys every compression method shares: the teacher and the quantization-aware training."""
  config = finetune_config()
  config.method = method

  # The full-precision teacher: a finished configs/finetune.py run, or fine-tuned here first.
  config.teacher = config_dict.ConfigDict()
  config.teacher.workdir = config_dict.placeholder(str)
  config.teacher.train = train_defaults()

  # Quantization-aware fine-tuning of every quantized model (the same budget for all methods).
  config.train = train_defaults(num_epochs=1.0, learning_rate=2e-5)
  config.train.distill_alpha = 0.5  # Weight of the teacher's soft logits (1 - it: the labels).
  config.train.distill_hidden_weight = 1.0  # Weight of the layer-output MSE to the teacher.
  config.train.distill_temperature = 1.0
  return config


def compression_config(method: str) -> config_dict.ConfigDict:
  """The shared keys of the search-style pipelines (automp, uniform, qbert, hawq)."""
  config = _teacher_and_qat(method)

  config.quant = config_dict.ConfigDict()
  config.quant.groups = 12  # Sub-groups (of output neurons) per matrix: 1, 12 (a head), 128...
  config.quant.bit_choices = (0, 1, 2, 3, 4, 8)  # 0 = pruned; 1 = sign times a learned scale.
  config.quant.bits = 4  # uniform only: the one bit-width.
  config.quant.activation_bits = 8  # Inputs of the quantized matmuls (32: float).
  config.quant.calibration_batches = 4  # Batches that set the activation scales' start.
  config.quant.scale_init = "mse"  # Initial weight step sizes: mse, absmax or lsq.

  # The size target (automp, qbert and hawq): exactly one of
  # target_compression, target_size_mb or target_uniform_bits.
  config.search = config_dict.ConfigDict()
  config.search.target_compression = config_dict.placeholder(float)
  config.search.target_size_mb = config_dict.placeholder(float)
  # The exact size of uniform n-bit quantization over the same sub-groups (its equal-size rival).
  config.search.target_uniform_bits = config_dict.placeholder(int)
  config.search.tolerance = 0.002  # Derived policies land in [(1 - tolerance) V, V] (knapsack).
  config.search.max_pruned_fraction = config_dict.placeholder(float)  # None: no limit.
  config.search.max_pruned_fraction = 0.5  # At most this share of a matrix's groups pruned.
  config.search.size_weight = 5.0  # lambda of the size loss lambda * log(C / V)^2.
  config.search.num_epochs = 2.0  # Over the weight split.
  config.search.train_subset = 0  # >0: the search sees this many training examples (seeded).
  config.search.num_train_steps = -1  # >0 overrides num_epochs.
  config.search.batch_size = 32
  config.search.search_fraction = 0.2  # Share of the training data held out for the logits.
  config.search.warmup_epochs = 0.5  # Weights-only epochs before architecture updates.
  config.search.weight_lr = 2e-5  # AdamW on weights and scales.
  config.search.arch_optimizer = "adam"  # adam or sgd, on the logits (no weight decay).
  config.search.arch_lr = 0.05
  config.search.entropy_weight = 0.0  # beta of the mean entropy of softmax(logits) (decisiveness).
  config.search.hard_sample = True  # Straight-through one-hot Gumbel samples (the retrained model).
  config.search.prior = "fisher"  # Initial logits: fisher (sensitivity prior) or none (zeros).
  config.search.prior_strength = 2.0  # Median gap (nats) between a group's two best choices.
  config.search.prior_batches = 8  # Training batches of the squared-gradient Fisher.
  config.search.carry_scales = True  # The retrain starts from the search's quantizer scales.
  config.search.second_order = False  # DARTS second-order architecture gradient.
  config.search.tau_start = 1.0  # Gumbel temperature t0 * exp(-tau_decay * (epoch - warmup)).
  config.search.tau_decay = 1.0
  config.search.eval_every_steps = 0  # 0: evaluate the argmax policy at the end only.

  # The Hessian baselines (qbert, hawq): curvature of the teacher's task loss on training batches.
  config.hessian = config_dict.ConfigDict()
  config.hessian.batch_size = 32
  config.hessian.num_batches = 10  # Q-BERT: eigenvalues per batch (|mean| + std); HAWQ: averaged.
  config.hessian.power_iterations = 20  # Q-BERT: at most this many products per batch and layer.
  config.hessian.tolerance = 1e-3  # Q-BERT: stop once every eigenvalue changes less than this.
  config.hessian.trace_samples = 32  # HAWQ: Rademacher vectors per batch (Hutchinson).
  config.hessian.per_group_traces = False  # HAWQ: trace per sub-group instead of per matrix.
  # HAWQ: a negative trace priced by its magnitude ("abs") or as free ("zero", the study's rows
  # up to commit 481bbdf): see search.price_negative_traces.
  config.hessian.negative_traces = "abs"
  config.hessian.sensitivity_from = config_dict.placeholder(str)  # Another run's sensitivity.json.

  config.compare = config_dict.ConfigDict()
  config.compare.uniform_bits = ()  # automp also trains these uniform baselines, for its table.
  return config


def sensimix_config() -> config_dict.ConfigDict:
  """SensiMix (`configs/sensimix.py`): 8-bit index / 1-bit value split, ABWR, PT and ILF.

  `config.train` is the whole budget, shared by the PT and ILF stages (the last one
  `sensimix.final_stage_shares` times as much as each other).
  """
  config = _teacher_and_qat("sensimix")
  # The authors' recipe (configs/sensimix.py says which of their choices are defaults and why).
  config.train.num_epochs = 6.0
  config.train.learning_rate = 2.5e-5
  config.train.batch_size = 16
  config.train.distill_alpha = 0.0
  config.train.distill_hidden_weight = 0.0

  config.quant = config_dict.ConfigDict()
  config.quant.weight_bits = 8  # Index quantization of the sensitive parts.
  config.quant.embedding_bits = 8  # Word and position tables, index (32: float).
  config.quant.other_bits = 16  # LayerNorm, biases, token types, pooler, classifier: half.
  config.quant.binary_scale = False  # True: XNOR-Net mean|w| per sub-group on the 1-bit weights.
  config.quant.binary_groups = 1  # Sub-groups of that scale (binary_scale only).
  config.quant.ffn_input_bits = 1  # Inputs of the 1-bit FFNs: 1 (sign, XNOR GEMM) or 2..8.
  # Backward of those sign(x) inputs: None passes the gradient straight through (SensiMix's
  # code); c passes it only where |x| <= c (hard-tanh STE). See quant.QuantSpec.
  config.quant.binary_input_clip = config_dict.placeholder(float)
  config.quant.calibration_batches = 4  # Batches that set the input step sizes (2..8 bits).

  config.sensimix = config_dict.ConfigDict()
  config.sensimix.split = "fixed"  # fixed: num_8bit_layers; auto: by measured sensitivity.
  config.sensimix.num_8bit_layers = 3  # fixed: the first N layers stay all 8-bit.
  # auto: binarize the least sensitive FFNs until size_mb <= the target (default: the size of
  # the fixed split, for an equal-size comparison); at most one of the two.
  config.sensimix.target_size_mb = config_dict.placeholder(float)
  config.sensimix.target_compression = config_dict.placeholder(float)
  config.sensimix.search_fraction = 0.2  # auto: training data held out to measure sensitivity.
  config.sensimix.sensitivity_batches = 8  # auto: batches of that split per measurement.
  config.sensimix.abwr_weight = 1.0  # lambda of the Absolute Binary Weight Regularization.
  config.sensimix.prioritized_training = True  # PT: a first stage with the 1-bit FFNs in float.
  config.sensimix.inverse_layerwise = True  # ILF: binarize top-down, one layer per stage.
  # The last stage (every chosen FFN binary) trains this many times as long as each earlier one;
  # the authors' six-epoch script: one epoch per earlier stage, the last three for the last.
  config.sensimix.final_stage_shares = 3
  config.sensimix.init = "pretrained"  # Start from: pretrained (the authors') or teacher.
  config.sensimix.binarize_inputs_early = True  # Future 1-bit FFNs take sign inputs from PT on.
  config.sensimix.abwr_on_regression = False  # The authors apply ABWR to classification only.
  config.sensimix.binary_input_residual = False  # True: their sign(x) residual (a bug).
  config.sensimix.freeze_binary_signs = False  # True: their final stage's frozen 1-bit weights.
  config.sensimix.one_sided_weight_clip = False  # True: their one-sided weight gradient clip.
  return config
