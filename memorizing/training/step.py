"""One training step and its optimizer: `train_step(state, batch, rng) -> (state, metrics)`.

A pure function over TrainState (params, optimizer state, step, carried
state), jitted once by the trainer (memorizing/training/train.py) with
donated state; metrics are sums plus a denominator. Imports the model only
(no data pipeline, no TFDS), so benchmarks can run the trainer's own step on
synthetic batches.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from memorizing.knn_api import KNNBackend
from memorizing.model import signals as signals_lib
from memorizing.model.config import ModelConfig, TrainConfig
from memorizing.model.decoder import CarriedState, Decoder
from memorizing.training import metrics as metrics_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  carried: CarriedState


# --- optimizer ---------------------------------------------------------------------
def learning_rate_schedule(cfg: TrainConfig):
  warmup = max(cfg.warmup_steps, 1)
  if cfg.schedule == "rsqrt":
    def schedule(step):
      step = jnp.maximum(step.astype(jnp.float32) + 1.0, 1.0)
      return cfg.learning_rate * jnp.minimum(1.0, step / warmup) * jax.lax.rsqrt(jnp.maximum(step, warmup))
    return schedule
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                            max(cfg.num_steps, warmup + 1))


def param_path(path) -> str:
  """A pytree key path as "block_4/attention/memory_gate"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def learning_rate_multipliers(params, table) -> Any:
  """The multiplier of every parameter (a pytree like `params`) under `table`."""
  def lookup(path, _):
    name = param_path(path)
    for pattern, mult in table:
      if re.search(pattern, name):
        return float(mult)
    return 1.0
  return jax.tree_util.tree_map_with_path(lookup, params)


def scale_by_multipliers(table) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its multiplier (0 freezes it)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    mults = learning_rate_multipliers(updates, table)
    return jax.tree_util.tree_map(lambda u, m: u if m == 1.0 else u * m, updates, mults), state

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg)
  if cfg.optimizer == "adafactor":
    opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=cfg.weight_decay or None)
  else:
    opt = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay)
  if cfg.learning_rate_multipliers:
    opt = optax.chain(opt, scale_by_multipliers(cfg.learning_rate_multipliers))
  if cfg.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  return opt


# --- the step ----------------------------------------------------------------------
def loss_sums(logits, targets, weights):
  """Sum of weighted token cross-entropy (nats), and the weight sum.

  logits [B,L,V], targets [B,L] int, weights [B,L]. The target's logit is
  picked by a masked sum rather than take_along_axis: the same value, but its
  gradient is a select that XLA fuses into the softmax gradient, where the
  gather's gradient materialised a float32 [B,L,V] zeros array and scattered
  into it (0.6 ms a step for the paper preset on an H200).
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
  target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  nll = lse - target_logit
  return jnp.sum(nll * weights), jnp.sum(weights)


def _tree_select(pred, new, old):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model_config: ModelConfig, optimizer: optax.GradientTransformation,
               skip_nonfinite: bool, memory_signals: bool = False,
               backend: Optional[KNNBackend] = None
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer step on one segment of each row; carries the memory forward.
  `backend` searches the kNN memory (needed when the model has an enabled one)."""
  model = Decoder(model_config, backend)
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    (logits, carried), variables = model.apply(
        {"params": params}, batch["tokens"], state.carried, batch["start_of_document"],
        deterministic=False, train=True, rngs={"dropout": dropout_rng},
        mutable=["signals"] if memory_signals else [])
    loss_sum, weight = loss_sums(logits, batch["targets"], batch["weights"])
    return loss_sum / jnp.maximum(weight, 1.0), (loss_sum, weight, carried,
                                                 signals_lib.collect(variables))

  (_, (loss_sum, weight, carried, sig)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, carried=carried)
  if skip_nonfinite:
    # A skipped step also drops its carried-state update: that already holds its keys.
    new_state = _tree_select(finite, new_state, state.replace(step=state.step + 1))
  metrics = {"loss_sum": loss_sum, "weight_sum": weight, "grad_norm_sum": grad_norm,
             "steps": jnp.ones((), jnp.float32),
             "nonfinite": (~finite).astype(jnp.float32),
             "memory_fill_sum": metrics_lib.memory_fill(new_state.carried)}
  if sig:
    metrics["signals"] = jax.lax.stop_gradient(sig)
  return new_state, metrics
