"""AdamW with linear warm-up and linear decay, weight decay only on weight matrices."""

from __future__ import annotations

import re
from typing import Any

import optax
from flax import traverse_util

# Biases, LayerNorm parameters (and, in later methods, quantizer scales) get no weight decay.
_NO_DECAY = re.compile(r"(^|/)(bias|scale)$")


def decay_mask(params: Any) -> Any:
  """True for the leaves that weight decay applies to (kernels and embeddings)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: not _NO_DECAY.search(k) for k in flat}, sep="/")


def learning_rate_schedule(peak: float, num_train_steps: int, warmup_steps: int) -> optax.Schedule:
  """0 -> peak over `warmup_steps`, then linearly back to 0 at `num_train_steps`."""
  warmup_steps = max(0, min(warmup_steps, num_train_steps))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps),
       optax.linear_schedule(peak, 0.0, max(1, num_train_steps - warmup_steps))],
      boundaries=[warmup_steps])


def make_optimizer(train_config, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
  """The optimizer named by `config.train` and its learning-rate schedule."""
  schedule = learning_rate_schedule(train_config.learning_rate, num_train_steps,
                                    int(round(train_config.warmup_ratio * num_train_steps)))
  chain = []
  if train_config.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(train_config.max_grad_norm))
  chain.append(optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                           eps=train_config.adam_eps, weight_decay=train_config.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), schedule
