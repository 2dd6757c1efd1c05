"""CPU regression check: the kNN layer's cost over the baseline training step.

One process, one tiny model, measured as a ratio so the machine's speed cancels:
the median step time with a full 2048-slot memory (device backend, k = 32) over
the median step time of the same model without the kNN layer, steps of the two
interleaved so that load from other processes hits both alike. The whole step
is the trainer's own `train_step` (forward, backward, Adafactor, carried state).

Measured 1.67-1.97 on a shared 2-core CPU (the search over 2048 keys costs about as much as
one of the model's layers); MAX_RATIO is generous so only a real regression (a
dense [B,H,L,N] gradient, a copy of the memory per step, an unfused gather)
trips it (a sort instead of lax.top_k
for the final top k measured 5.6). The H200 numbers and targets are in docs/benchmark_step.md.
"""
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from memorizing import knn
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import init_carried_state, init_params
from memorizing.model.layers import l2_normalize
from memorizing.model.config import TrainConfig
from memorizing.training.train import TrainState, make_optimizer, train_step

MAX_RATIO = 3.0
BATCH = 2
CONFIG = ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                     mlp_dim=256, segment_length=64, memory_layers=(-1,), memory_size=2048,
                     num_neighbors=32, knn_backend="device")


def make_step(config):
  optimizer = make_optimizer(TrainConfig(batch_size=BATCH))
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  if not config.memory_layers:
    params = {k: ({**v, "attention": {a: b for a, b in v["attention"].items()
                                      if a != "memory_gate"}} if k.startswith("block_") else v)
              for k, v in params.items()}
  carried = init_carried_state(config, BATCH)
  carried = carried.replace(memory={
      n: m.replace(keys=l2_normalize(jax.random.normal(jax.random.PRNGKey(1), m.keys.shape)),
                   values=jax.random.normal(jax.random.PRNGKey(2), m.values.shape),
                   count=jnp.full_like(m.count, m.size)) for n, m in carried.memory.items()})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params), carried=carried)
  shape = (BATCH, config.segment_length)
  batch = {"tokens": jax.random.randint(jax.random.PRNGKey(3), shape, 0, config.vocab_size),
           "targets": jax.random.randint(jax.random.PRNGKey(4), shape, 0, config.vocab_size),
           "weights": jnp.ones(shape, jnp.float32), "start_of_document": jnp.zeros((BATCH,), bool)}
  fn = jax.jit(functools.partial(train_step, model_config=config, optimizer=optimizer,
                                 skip_nonfinite=False, backend=knn.make_backend(config)),
               donate_argnums=0)
  rng = jax.random.PRNGKey(5)
  state, _ = fn(state, batch, rng)                     # compile and warm up
  jax.block_until_ready(state)
  holder = [state]

  def step():
    t = time.perf_counter()
    holder[0], m = fn(holder[0], batch, rng)
    jax.block_until_ready((holder[0], m))
    return time.perf_counter() - t
  return step


def test_knn_layer_step_costs_at_most_max_ratio_times_the_baseline_step():
  baseline = make_step(CONFIG.replace(memory_layers=()))
  memory = make_step(CONFIG)
  times_b, times_m = [], []
  for _ in range(3):                                    # warm-up
    baseline(), memory()
  for _ in range(15):
    times_b.append(baseline())
    times_m.append(memory())
  ratio = statistics.median(times_m) / statistics.median(times_b)
  print(f"baseline {1e3 * statistics.median(times_b):.2f} ms, with kNN layer "
        f"{1e3 * statistics.median(times_m):.2f} ms, ratio {ratio:.2f}")
  assert ratio <= MAX_RATIO, (
      f"the kNN layer makes the tiny CPU step {ratio:.2f}x the baseline (limit {MAX_RATIO}x); "
      f"baseline {times_b}, memory {times_m}")
