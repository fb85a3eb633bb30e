"""AdamW with linear warm-up and linear decay, weight decay only on weight matrices."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax
from flax import traverse_util

# Biases and LayerNorm parameters get no weight decay (quantizer parameters: weights_decay_mask).
_NO_DECAY = re.compile(r"(^|/)(bias|scale)$")


def decay_mask(params: Any) -> Any:
  """True for the leaves that weight decay applies to (kernels and embeddings)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: not _NO_DECAY.search(k) for k in flat}, sep="/")


def weights_decay_mask(weights: Any) -> Any:
  """The decay mask of `{"params": ..., "qparams": ...}`: quantizer parameters never decay."""
  return {"params": decay_mask(weights["params"]),
          "qparams": jax.tree.map(lambda _: False, weights["qparams"])}


def learning_rate_schedule(peak: float, num_train_steps: int, warmup_steps: int) -> optax.Schedule:
  """0 -> peak over `warmup_steps`, then linearly back to 0 at `num_train_steps`."""
  warmup_steps = max(0, min(warmup_steps, num_train_steps))
  decay = optax.linear_schedule(peak, 0.0, max(1, num_train_steps - warmup_steps))
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay],
                              boundaries=[warmup_steps])


def make_optimizer(train_config, num_train_steps: int, *, mask: Callable[[Any], Any] = decay_mask,
                   learning_rate: float | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW as `train_config` says (peak `learning_rate` if given) and its schedule.

  `mask` picks the leaves weight decay applies to: `decay_mask` for a params tree,
  `weights_decay_mask` for the {"params", "qparams"} tree of quantized training.
  """
  peak = train_config.learning_rate if learning_rate is None else learning_rate
  schedule = learning_rate_schedule(peak, num_train_steps,
                                    int(round(train_config.warmup_ratio * num_train_steps)))
  chain = []
  if train_config.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(train_config.max_grad_norm))
  chain.append(optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                           eps=train_config.adam_eps, weight_decay=train_config.weight_decay,
                           mask=mask))
  return optax.chain(*chain), schedule
