"""Train state, losses and the jitted train / eval steps of sequence-level fine-tuning."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mpqbert.train.compiled import Jit

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config: step, weights, optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over real rows (weight 1); padding rows (weight 0) do not count."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def per_example_loss(logits: jax.Array, labels: jax.Array, is_regression: bool) -> jax.Array:
  """Cross-entropy for classification, squared error for regression (num_labels == 1)."""
  if is_regression:
    return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))


def _forward(model, params: Any, batch: Batch, deterministic: bool, dropout_key=None) -> jax.Array:
  rngs = None if deterministic else {"dropout": dropout_key}
  return model.apply({"params": params}, batch["input_ids"],
                     attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], deterministic=deterministic,
                     rngs=rngs)


def make_train_step(model, optimizer: optax.GradientTransformation, is_regression: bool,
                    dropout_seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One AdamW step; dropout key = fold_in(seed, step), so a resumed run draws the same masks."""
  base_key = jax.random.key(dropout_seed)

  def loss_fn(params, batch, key):
    logits = _forward(model, params, batch, deterministic=False, dropout_key=key)
    return weighted_mean(per_example_loss(logits, batch["labels"], is_regression),
                         batch["weights"])

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(base_key, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return Jit(train_step, "train_step", donate_argnums=0)


def make_eval_step(model, is_regression: bool) -> Callable[[Any, Batch], dict]:
  """Predictions (class ids, or the regression value) and the summed loss of one batch."""

  def eval_step(params, batch: Batch):
    logits = _forward(model, params, batch, deterministic=True)
    losses = per_example_loss(logits, batch["labels"], is_regression)
    predictions = logits[:, 0] if is_regression else jnp.argmax(logits, axis=-1)
    return {"predictions": predictions, "loss_sum": jnp.sum(losses * batch["weights"])}

  return Jit(eval_step, "eval_step")
