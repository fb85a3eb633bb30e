"""The losses every stage shares: the task loss over real rows, and distillation from a teacher.

Fine-tuning, quantization-aware training and the AutoMPQ search all train on
`task_loss(logits, batch, is_regression)`; QAT and the search add `distillation_loss` against the
full-precision teacher's logits and layer outputs (captured with `capture_layers`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from mpqbert import quant
from mpqbert.models.bert import BertLayer

Batch = dict[str, jax.Array]


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over real rows (weight 1); padding rows (weight 0) do not count."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
  """Cross-entropy for classification, squared error for regression (num_labels == 1)."""
  if is_regression:
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def task_loss(logits: jax.Array, batch: Batch, is_regression: bool) -> jax.Array:
  """The mean per-example loss of a batch's real rows."""
  return weighted_mean(per_example_loss(logits, batch["labels"], is_regression), batch["weights"])


def capture_layers(module: Any, method_name: str) -> bool:
  """`capture_intermediates` filter: the output of every `BertLayer`."""
  return isinstance(module, BertLayer) and method_name == "__call__"


def layer_outputs(intermediates: Mapping[str, Any]) -> list[jax.Array]:
  """The captured output of every `BertLayer`, in layer order."""
  flat = quant.flatten_params(intermediates["intermediates"])
  found = sorted((int(path.split("/")[-2]), value[0]) for path, value in flat.items()
                 if path.endswith("/__call__"))
  return [value for _, value in found]


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      student_hidden: list[jax.Array], teacher_hidden: list[jax.Array],
                      batch: Batch, *, is_regression: bool, temperature: float
                      ) -> tuple[jax.Array, jax.Array]:
  """(logit loss, hidden-state loss) of a student against its full-precision teacher.

  Logits: soft cross-entropy at `temperature` (times T^2), or squared error for regression.
  Hidden states: mean squared error of every layer's output over real tokens, averaged.
  """
  if is_regression:
    logit_loss = jnp.square(student_logits[:, 0] - teacher_logits[:, 0])
  else:
    soft = jax.nn.softmax(teacher_logits / temperature)
    logit_loss = -jnp.sum(soft * jax.nn.log_softmax(student_logits / temperature), -1)
    logit_loss = logit_loss * temperature**2
  logit_loss = weighted_mean(logit_loss, batch["weights"])
  mask = batch["attention_mask"].astype(jnp.float32) * batch["weights"][:, None]
  per_layer = [jnp.sum(jnp.mean(jnp.square(s - t), -1) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
               for s, t in zip(student_hidden, teacher_hidden)]
  return logit_loss, sum(per_layer) / max(1, len(per_layer))
