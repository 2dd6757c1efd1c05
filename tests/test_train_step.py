"""train_step against simpler equivalents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.training import train as T
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import init_carried_state, init_params

CONFIG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                     mlp_dim=64, segment_length=16)
OPT = T.make_optimizer(T.TrainConfig(optimizer="adamw", schedule="cosine", learning_rate=1e-2,
                                     warmup_steps=1, num_steps=10))


def losses(config, reset_every_step, steps=5):
  return run_losses(config, steps, lambda i: reset_every_step or i == 0)


def run_losses(config, steps, starts_document):
  """Losses of `steps` train steps on random tokens, 2 rows; starts_document(i) -> bool."""
  params = init_params(config, jax.random.PRNGKey(0))
  state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=OPT.init(params),
                       carried=init_carried_state(config, 2))
  step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(1), model_config=config,
                                           optimizer=OPT, skip_nonfinite=False,
                                           backend=knn.make_backend(config)))
  rng, out = np.random.default_rng(0), []
  length = config.segment_length
  for i in range(steps):
    tokens = rng.integers(0, 64, (2, length + 1))
    batch = {"tokens": jnp.asarray(tokens[:, :length], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "weights": jnp.ones((2, length), jnp.float32),
             "start_of_document": jnp.full((2,), starts_document(i))}
    state, m = step(state, batch)
    out.append(float(m["loss_sum"] / m["weight_sum"]))
  return np.array(out)


def test_xl_model_whose_every_segment_starts_a_document_trains_like_no_xl():
  np.testing.assert_allclose(losses(CONFIG.replace(use_xl_cache=True), True),
                             losses(CONFIG.replace(use_xl_cache=False), True), rtol=1e-5)


def test_xl_cache_changes_training_when_documents_continue():
  with_cache = losses(CONFIG.replace(use_xl_cache=True), False)
  without = losses(CONFIG.replace(use_xl_cache=False), False)
  assert np.abs(with_cache[1:] - without[1:]).max() > 1e-4


def _memory_copies(config, signals):
  """Full copies of the memory's keys or values in the compiled, donated train step."""
  params = init_params(config, jax.random.PRNGKey(0))
  state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=OPT.init(params),
                       carried=init_carried_state(config, 2))
  batch = {"tokens": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32),
           "weights": jnp.ones((2, 16), jnp.float32), "start_of_document": jnp.zeros((2,), bool)}
  step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(1), model_config=config,
                                           optimizer=OPT, skip_nonfinite=False,
                                           backend=knn.make_backend(config), memory_signals=signals),
                 donate_argnums=0)
  hlo = step.lower(state, batch).compile().as_text()
  shape = f"f32[2,{config.num_heads},{config.memory_size},{config.head_dim}]"
  return sum(1 for line in hlo.splitlines() if shape in line and " copy(" in line)


def test_memory_append_writes_in_place_after_the_gathers():
  # The step gathers retrieved keys and values from the memory and then appends
  # to it; unless the append is ordered after those reads (memory.after_reads),
  # XLA copies the whole memory every step (4 copies here, 29 ms of a 64K step
  # on the CPU, docs/benchmark_step.md).
  for backend in ("exact", "device"):
    config = CONFIG.replace(memory_layers=(-1,), memory_size=256, knn_backend=backend)
    assert _memory_copies(config, signals=False) == 0, backend
    assert _memory_copies(config, signals=True) == 0, backend


def test_loss_sums_equal_log_softmax_reference_and_its_gradient_has_no_scatter():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 5)), jnp.float32)

  def reference(x):
    logp = jax.nn.log_softmax(x)
    return jnp.sum(-jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)

  got = lambda x: T.loss_sums(x, targets, weights)[0]
  np.testing.assert_allclose(got(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(got)(logits), jax.grad(reference)(logits), rtol=1e-5,
                             atol=1e-7)
  assert float(T.loss_sums(logits, targets, weights)[1]) == pytest.approx(float(weights.sum()))
  def prims(f):
    names = set()
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jax.make_jaxpr(jax.grad(f))(logits).jaxpr)
    return names
  assert "scatter-add" in prims(reference)        # what the take_along_axis gradient does
  assert not {"scatter-add", "scatter", "gather"} & prims(got)


def test_search_kernel_state_float_trains_exactly_like_offset():
  """The default packed="float" search state (bias only in partly valid blocks,
  empty blocks skipped) gives the losses of packed="offset" while the memory
  fills (Pallas kernel in interpret mode, float32)."""
  def run(packed):
    config = CONFIG.replace(segment_length=32, memory_layers=(-1,), memory_size=256,
                            num_neighbors=32, knn_backend="device",
                            knn_options=(("impl", "pallas"), ("interpret", True),
                                         ("num_buckets", 32), ("block_q", 16), ("packed", packed)))
    return run_losses(config, 6, lambda i: i == 0)
  a, b = run("float"), run("offset")
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == len(a)          # the steps really differ

