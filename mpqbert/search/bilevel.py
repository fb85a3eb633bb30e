"""The AutoMPQ bilevel step: architecture logits on the search split, weights on the train split.

    min_alpha  L_search(w*(alpha), alpha) + size_loss(C(sample of alpha)) + beta H(alpha)
    s.t.       w*(alpha) = argmin_w L_train(w, alpha)

solved DARTS-style by alternating one architecture step (on a search-split batch) and one weight
step (on a train-split batch). First order uses the current weights in the architecture step;
second order differentiates through one functional SGD step of the weights. The loss is the
caller's (`label_loss`, or the retrain's distillation loss), so search and retrain optimize the
same objective. Weights and scales
share one optax optimizer, the logits have their own; all randomness comes from
`fold_in(seed, step)`, so the checkpointed state (with its step) determines the rest of a run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mpqbert.quant import Plan, sample_probs
from mpqbert.search.size import expected_size_mb, size_loss
from mpqbert.train.compiled import Jit, Phased
from mpqbert.train.losses import task_loss
from mpqbert.train.steps import apply_to_batch

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


def mean_top_probability(arch: dict[str, Array]) -> Array:
  """Mean over sub-groups of the largest bit-choice probability (1: decided)."""
  return jnp.mean(jnp.concatenate([jnp.max(jax.nn.softmax(l), -1) for l in arch.values()]))


def argmax_probs(arch: dict[str, Array]) -> dict[str, Array]:
  """One-hot probabilities of each sub-group's most likely choice."""
  return {p: jax.nn.one_hot(jnp.argmax(l, -1), l.shape[-1]) for p, l in arch.items()}


# loss_fn(weights, arch, batch, dropout_key, gumbel_key, tau, hard, teacher_params)
#   -> (loss, aux): the quantized model's training loss, sampling its bits from `arch`.
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def label_loss(qapply: Callable, is_regression: bool) -> LossFn:
  """A `LossFn` on the labels only (the teacher argument is ignored)."""

  def loss_fn(weights, arch, batch, dropout_key, gumbel_key, tau, hard, teacher_params):
    del teacher_params
    logits = apply_to_batch(qapply, (weights["params"], weights["qparams"], arch), batch,
                            deterministic=False, rngs={"dropout": dropout_key}, key=gumbel_key,
                            tau=tau, hard=hard)
    loss = task_loss(logits, batch, is_regression)
    return loss, {"task_loss": loss}

  return loss_fn


def make_search_step(loss_fn: LossFn, *, plan: Plan, target_mb: float, fixed_bits: int,
                     size_weight: float, weight_optimizer: optax.GradientTransformation,
                     arch_optimizer: optax.GradientTransformation,
                     tau_fn: Callable[[Array], Array], arch_start_step: int,
                     entropy_weight: float = 0.0, hard: bool = False,
                     second_order: bool = False, inner_lr: float = 0.0, seed: int = 0
                     ) -> Phased:
  """The jitted steps `(state, (train_batch, search_batch), teacher_params=None) ->
  (state, metrics)`: `.at(step)` is the weights-only warm-up step below `arch_start_step` and the
  bilevel step from it on (two programs, chosen on the host: no conditional inside the step).

  The architecture objective is `loss_fn` on the search batch + `size_loss` of the size of the
  very bit-choice sample that loss saw (Gumbel-softmax at temperature tau, or its hard
  straight-through one-hot) + `entropy_weight` * the mean entropy of softmax(logits), which
  pushes each sub-group to decide. Metrics: the sampled, expected (softmax) and argmax sizes,
  entropy and mean top probability at every step.
  """
  base_key = jax.random.key(seed)
  size_of = lambda probs: expected_size_mb(probs, plan, fixed_bits)

  def arch_objective(arch, weights, train_batch, search_batch, keys, tau, teacher_params):
    if second_order:  # w' = w - xi * grad_w L_train(w, alpha), differentiated through in alpha.
      grads = jax.grad(lambda w: loss_fn(w, arch, train_batch, keys[0], keys[1], tau, hard,
                                         teacher_params)[0])(weights)
      weights = jax.tree.map(lambda w, g: w - inner_lr * g, weights, grads)
    search_loss, _ = loss_fn(weights, arch, search_batch, keys[3], keys[2], tau, hard,
                             teacher_params)
    sampled_size = size_of(sample_probs(arch, keys[2], tau, hard))
    penalty = size_loss(sampled_size, target_mb, size_weight)
    entropy = arch_entropy(arch)
    return search_loss + penalty + entropy_weight * entropy, {
        "search_loss": search_loss, "size_loss": penalty, "sampled_size_mb": sampled_size}

  def step_fn(state: SearchState, batches: tuple[Batch, Batch], teacher_params: Any = None, *,
              update_arch: bool = True):
    train_batch, search_batch = batches
    keys = jax.random.split(jax.random.fold_in(base_key, state.step), 6)
    tau = tau_fn(state.step)
    arch, arch_opt_state = state.arch, state.arch_opt_state
    if update_arch:
      grads, arch_metrics = jax.grad(arch_objective, has_aux=True)(
          state.arch, state.weights, train_batch, search_batch, keys[:4], tau, teacher_params)
      updates, arch_opt_state = arch_optimizer.update(grads, state.arch_opt_state, state.arch)
      arch = optax.apply_updates(state.arch, updates)
    else:  # Warm-up: the weights train under the initial logits.
      zero = jnp.zeros((), jnp.float32)
      arch_metrics = {"search_loss": zero, "size_loss": zero,
                      "sampled_size_mb": size_of(sample_probs(state.arch, keys[2], tau, hard))}
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.weights, arch, train_batch, keys[5], keys[4], tau, hard, teacher_params)
    updates, weight_opt_state = weight_optimizer.update(grads, state.weight_opt_state,
                                                        state.weights)
    new_state = state.replace(step=state.step + 1,
                              weights=optax.apply_updates(state.weights, updates),
                              arch=arch, weight_opt_state=weight_opt_state,
                              arch_opt_state=arch_opt_state)
    softmax = {p: jax.nn.softmax(l) for p, l in arch.items()}
    return new_state, {"loss": loss, **aux, "tau": tau, "arch_entropy": arch_entropy(arch),
                       "mean_top_prob": mean_top_probability(arch),
                       "expected_size_mb": size_of(softmax),
                       "argmax_size_mb": size_of(argmax_probs(arch)), **arch_metrics}

  warmup = functools.partial(step_fn, update_arch=False)
  return Phased(Jit(warmup, "search_warmup_step", donate_argnums=0, returns_state=True),
                Jit(step_fn, "search_step", donate_argnums=0, returns_state=True),
                arch_start_step)
