"""The AutoMPQ bilevel step: architecture logits on the search split, weights on the train split.

    min_alpha  L_search(w*(alpha), alpha) + size_loss(E[C](alpha))
    s.t.       w*(alpha) = argmin_w L_train(w, alpha)

solved DARTS-style by alternating one architecture step (on a search-split batch) and one weight
step (on a train-split batch). First order uses the current weights in the architecture step;
second order differentiates through one functional SGD step of the weights. Weights and scales
share one optax optimizer, the logits have their own; all randomness comes from
`fold_in(seed, step)`, so the checkpointed state (with its step) determines the rest of a run.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mpqbert.quant import Plan
from mpqbert.search.size import SizeBand, expected_size_mb, size_loss
from mpqbert.train.compiled import Jit
from mpqbert.train.steps import per_example_loss, weighted_mean

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class SearchState:
  """Everything a resumed search needs: weights, quantizer params, logits, both optimizers."""

  step: Array
  weights: dict[str, Any]  # {"params": model params, "qparams": quantizer params}
  arch: dict[str, Array]  # path -> [G, K] logits
  weight_opt_state: Any
  arch_opt_state: Any

  @classmethod
  def create(cls, params: Any, qparams: Any, arch: dict[str, Array],
             weight_optimizer: optax.GradientTransformation,
             arch_optimizer: optax.GradientTransformation) -> "SearchState":
    weights = {"params": params, "qparams": qparams}
    return cls(step=jnp.zeros((), jnp.int32), weights=weights, arch=arch,
               weight_opt_state=weight_optimizer.init(weights),
               arch_opt_state=arch_optimizer.init(arch))


def temperature(step: Array | int, steps_per_epoch: int, *, tau_start: float, tau_decay: float,
                warmup_epochs: float) -> Array:
  """Gumbel temperature t = t0 * exp(-eta * (epoch - N0)), held at t0 during the N0 warm-up.

  `epoch` is fractional (step / steps_per_epoch), so the temperature decays smoothly.
  """
  epoch = jnp.asarray(step, jnp.float32) / max(1, steps_per_epoch)
  return tau_start * jnp.exp(-tau_decay * jnp.maximum(epoch - warmup_epochs, 0.0))


def arch_entropy(arch: dict[str, Array]) -> Array:
  """Mean entropy (nats) of softmax(logits) over all sub-groups: how undecided the search is."""
  ents = [jnp.sum(-jax.nn.softmax(l) * jax.nn.log_softmax(l), -1) for l in arch.values()]
  return jnp.mean(jnp.concatenate(ents))


def make_search_step(qapply: Callable, *, plan: Plan, band: SizeBand, fixed_bits: int,
                     size_weight: float, weight_optimizer: optax.GradientTransformation,
                     arch_optimizer: optax.GradientTransformation, is_regression: bool,
                     tau_fn: Callable[[Array], Array], arch_start_step: int,
                     second_order: bool = False, inner_lr: float = 0.0, seed: int = 0
                     ) -> Callable[[SearchState, tuple[Batch, Batch]], tuple[SearchState, dict]]:
  """The jitted step `(state, (train_batch, search_batch)) -> (state, metrics)`."""
  base_key = jax.random.key(seed)

  def task_loss(weights, arch, batch, gumbel_key, dropout_key, tau):
    logits = qapply(weights["params"], weights["qparams"], arch, batch["input_ids"],
                    attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                    deterministic=False, rngs={"dropout": dropout_key}, key=gumbel_key, tau=tau)
    return weighted_mean(per_example_loss(logits, batch["labels"], is_regression),
                         batch["weights"])

  def arch_objective(arch, weights, train_batch, search_batch, keys, tau):
    if second_order:  # w' = w - xi * grad_w L_train(w, alpha), differentiated through in alpha.
      grads = jax.grad(task_loss)(weights, arch, train_batch, keys[0], keys[1], tau)
      weights = jax.tree.map(lambda w, g: w - inner_lr * g, weights, grads)
    search_loss = task_loss(weights, arch, search_batch, keys[2], keys[3], tau)
    size = expected_size_mb({p: jax.nn.softmax(l) for p, l in arch.items()}, plan, fixed_bits)
    penalty = size_loss(size, band, size_weight)
    return search_loss + penalty, {"search_loss": search_loss, "size_loss": penalty,
                                   "expected_size_mb": size}

  def step_fn(state: SearchState, batches: tuple[Batch, Batch]):
    train_batch, search_batch = batches
    keys = jax.random.split(jax.random.fold_in(base_key, state.step), 6)
    tau = tau_fn(state.step)

    def arch_update(_):
      grads, aux = jax.grad(arch_objective, has_aux=True)(state.arch, state.weights, train_batch,
                                                          search_batch, keys[:4], tau)
      updates, opt_state = arch_optimizer.update(grads, state.arch_opt_state, state.arch)
      return optax.apply_updates(state.arch, updates), opt_state, aux

    def hold(_):
      size = expected_size_mb({p: jax.nn.softmax(l) for p, l in state.arch.items()}, plan,
                              fixed_bits)
      zero = jnp.zeros((), jnp.float32)
      return state.arch, state.arch_opt_state, {"search_loss": zero, "size_loss": zero,
                                                "expected_size_mb": size}

    arch, arch_opt_state, arch_metrics = jax.lax.cond(state.step >= arch_start_step, arch_update,
                                                      hold, None)
    loss, grads = jax.value_and_grad(task_loss)(state.weights, arch, train_batch, keys[4],
                                                keys[5], tau)
    updates, weight_opt_state = weight_optimizer.update(grads, state.weight_opt_state,
                                                        state.weights)
    new_state = state.replace(step=state.step + 1,
                              weights=optax.apply_updates(state.weights, updates),
                              arch=arch, weight_opt_state=weight_opt_state,
                              arch_opt_state=arch_opt_state)
    return new_state, {"loss": loss, "tau": tau, "arch_entropy": arch_entropy(arch),
                       **arch_metrics}

  return Jit(step_fn, "search_step", donate_argnums=0)
