"""Train state and the jitted train / eval steps of sequence-level fine-tuning."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mpqbert.train import losses
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


def apply_to_batch(apply_fn: Callable, variables: tuple, batch: Batch, **kwargs: Any) -> Any:
  """`apply_fn(*variables, input_ids, attention_mask=, token_type_ids=, **kwargs)`: the one call of
  a model on a batch (`model.apply` with `({"params": p},)`, or a quantized apply with
  `(params, qparams, arch)`)."""
  return apply_fn(*variables, batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"], **kwargs)


def make_train_step(model, optimizer: optax.GradientTransformation, is_regression: bool,
                    dropout_seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """One AdamW step; dropout key = fold_in(seed, step), so a resumed run draws the same masks."""
  base_key = jax.random.key(dropout_seed)

  def loss_fn(params, batch, key):
    logits = apply_to_batch(model.apply, ({"params": params},), batch, deterministic=False,
                            rngs={"dropout": key})
    return losses.task_loss(logits, batch, is_regression)

  def train_step(state: TrainState, batch: Batch):
    key = jax.random.fold_in(base_key, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return Jit(train_step, "train_step", donate_argnums=0, returns_state=True)


def make_eval_step(logits_fn: Callable[[Any, Batch], jax.Array], is_regression: bool,
                   name: str = "eval_step") -> Callable[[Any, Batch], dict]:
  """Predictions (class ids, or the regression value) and the summed loss of one batch.

  `logits_fn(variables, batch)`: the model's logits in eval mode, e.g. `model_logits(model)` or
  a quantized or packed model's forward.
  """

  def eval_step(variables, batch: Batch):
    logits = logits_fn(variables, batch)
    per_example = losses.per_example_loss(logits, batch["labels"], is_regression)
    predictions = logits[:, 0] if is_regression else jnp.argmax(logits, axis=-1)
    return {"predictions": predictions, "loss_sum": jnp.sum(per_example * batch["weights"])}

  return Jit(eval_step, name)


def model_logits(model) -> Callable[[Any, Batch], jax.Array]:
  """`logits_fn(params, batch)` of a full-precision model in eval mode."""
  return lambda params, batch: apply_to_batch(model.apply, ({"params": params},), batch,
                                              deterministic=True)
