"""Table lookups whose gradient is a one-hot matmul (ModelConfig.gather_gradient).

On a GPU, XLA's scatter-add gradient of a lookup serialises on repeated ids, so
a training step on real text ran 2-6x slower than on uniform random ids
(docs/benchmark_step.md). The one-hot form must give the same gradient as the
scatter (the plain `jnp.take`) and leave no scatter-add into the tables.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing.model import layers
from memorizing.model.config import ConfigError, ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, init_params
from memorizing.model.layers import take_rows
from memorizing.tools import protocol, sweep, table4

CONFIG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                     mlp_dim=64, segment_length=16)


def test_one_hot_gradient_equals_the_scatter_gradient_with_repeated_ids():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 5, (3, 7, 4)), jnp.int32)    # many repeats
  table = jax.random.normal(jax.random.PRNGKey(0), (9, 2, 3))     # rows may be any shape
  weights = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 4, 2, 3))
  loss = lambda t, mode: jnp.sum(jnp.tanh(take_rows(t, ids, mode)) * weights)
  np.testing.assert_array_equal(take_rows(table, ids, "one_hot"), table[ids])
  reference = jax.grad(lambda t: jnp.sum(jnp.tanh(t[ids]) * weights))(table)
  np.testing.assert_allclose(jax.grad(loss)(table, "one_hot"), reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.grad(loss)(table, "scatter"), reference, rtol=1e-6)


def test_one_hot_gradient_of_bfloat16_rows_accumulates_in_float32():
  ids = jnp.zeros((4096,), jnp.int32)                  # one row, 4096 contributions
  table = jnp.zeros((3, 1), jnp.bfloat16)
  g = jax.grad(lambda t: jnp.sum(take_rows(t, ids, "one_hot").astype(jnp.float32) * 1.001))(table)
  assert g.dtype == jnp.bfloat16
  assert float(g[0, 0]) == pytest.approx(4096 * 1.001, rel=4e-3)   # bf16 rounding of the sum only
  assert float(g[1, 0]) == 0.0


def scatter_add_targets(fn, *args):
  """Shapes of the arrays that scatter-adds in fn's jaxpr write into."""
  shapes = []
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scatter-add":
        shapes.append(tuple(eqn.invars[0].aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_auto_uses_one_hot_up_to_the_entry_limit(monkeypatch):
  ids = jnp.zeros((10, 10), jnp.int32)
  table = jnp.ones((8, 4))
  # a new function each time: make_jaxpr caches the trace of one function object
  grad = lambda: lambda t: jax.grad(lambda t: jnp.sum(take_rows(t, ids, "auto")))(t)
  assert scatter_add_targets(grad(), table) == []                 # 100 x 8 <= 2**26
  monkeypatch.setattr(layers, "ONE_HOT_GRADIENT_MAX_ENTRIES", 799)
  assert scatter_add_targets(grad(), table) == [(8, 4)]


def test_auto_takes_one_hot_on_a_gpu_beyond_the_cpu_limit(monkeypatch):
  # On a GPU "auto" keeps one-hot up to 2**30 entries, which covers the paper
  # preset's embedding (32 x 512 tokens over 32768 pieces; faster on text-like
  # ids, docs/benchmark_step.md); elsewhere that lookup takes the scatter.
  assert 32 * 512 * 32768 <= layers.one_hot_gradient_limit("gpu")
  assert 32 * 512 * 32768 > layers.one_hot_gradient_limit("cpu")
  ids = jnp.zeros((10, 10), jnp.int32)
  table = jnp.ones((8, 4))
  grad = lambda: lambda t: jax.grad(lambda t: jnp.sum(take_rows(t, ids, "auto")))(t)
  monkeypatch.setattr(layers, "ONE_HOT_GRADIENT_MAX_ENTRIES", 799)   # below 100 x 8
  assert scatter_add_targets(grad(), table) == [(8, 4)]
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert scatter_add_targets(grad(), table) == []


def model_gradient(config, tokens):
  params = init_params(config, jax.random.PRNGKey(0))
  carried = init_carried_state(config, tokens.shape[0])
  start = jnp.ones((tokens.shape[0],), bool)
  def loss(p):
    logits, _ = Decoder(config).apply({"params": p}, tokens, carried, start)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  return jax.grad(loss), params


def test_decoder_gradient_is_the_same_with_either_lookup_gradient():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 4, (2, 16)), jnp.int32)
  grads = {}
  for mode in ("one_hot", "scatter"):
    fn, params = model_gradient(CONFIG.replace(gather_gradient=mode), tokens)
    grads[mode] = fn(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                         grads["one_hot"], grads["scatter"])
  assert float(jnp.abs(grads["one_hot"]["embed"]["embedding"]).sum()) > 0


def test_default_decoder_gradient_has_no_scatter_into_the_embedding_or_bias_table():
  tokens = jnp.zeros((2, 16), jnp.int32)
  embedding = (CONFIG.vocab_size, CONFIG.d_model)
  bias = (CONFIG.relative_position_buckets, CONFIG.num_heads)
  fn, params = model_gradient(CONFIG, tokens)
  targets = scatter_add_targets(fn, params)
  assert embedding not in targets and bias not in targets, targets
  fn, params = model_gradient(CONFIG.replace(gather_gradient="scatter"), tokens)
  targets = scatter_add_targets(fn, params)
  assert embedding in targets and bias in targets, targets      # the check can fail


def test_gather_gradient_is_checked_and_not_part_of_a_recipe(tmp_path):
  with pytest.raises(ConfigError, match="gather_gradient='dense'; choose one of auto"):
    ModelConfig(gather_gradient="dense")
  spec = sweep.load_grid_file(table4.PROTOCOL)
  def recipe(*params):
    jobs = sweep.plan(str(tmp_path), spec["gin_file"], list(params), {}, [0], spec["rows"],
                      spec["evals"])
    return protocol.recipe_and_rows(spec["gin_file"], jobs, 2500)
  assert recipe() == recipe("ModelConfig.gather_gradient = 'scatter'")
  # Nor how the memory layer attends over its retrieved rows (same numbers, another kernel).
  assert recipe() == recipe("ModelConfig.retrieved_attention = 'einsum'")
  assert recipe() != recipe("ModelConfig.num_neighbors = 16")      # the check can fail


def load_benchmark_step():
  import importlib.util, os
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "benchmark_step.py")
  spec = importlib.util.spec_from_file_location("benchmark_step", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_benchmark_step_draws_real_batches_of_a_prepared_data_set(tmp_path):
  bench = load_benchmark_step()
  config = CONFIG.replace(vocab_size=260)
  batches = bench.synthetic_batches(config, 2, 3, "dataset:synthetic", str(tmp_path))
  assert len(batches) == 12
  assert batches[0]["tokens"].shape == (2, 16) and not bool(batches[0]["start_of_document"].any())
  np.testing.assert_array_equal(batches[0]["tokens"][:, 1:], batches[0]["targets"][:, :-1])
  with pytest.raises(ValueError, match="needs vocab_size >= 260"):
    bench.synthetic_batches(CONFIG, 2, 1, "dataset:synthetic", str(tmp_path))


def test_benchmark_step_draws_uniform_zipf_and_constant_ids():
  bench = load_benchmark_step()
  key, shape = jax.random.PRNGKey(0), (64, 512)
  share0 = {kind: float(jnp.mean(bench.synthetic_ids(key, shape, 256, kind) == 0))
            for kind in ("uniform", "zipf", "constant")}
  assert share0["constant"] == 1.0
  assert share0["zipf"] == pytest.approx(1 / sum(1 / i for i in range(1, 257)), rel=0.05)
  assert share0["uniform"] == pytest.approx(1 / 256, rel=0.3)
  with pytest.raises(ValueError, match="choose uniform, zipf or constant"):
    bench.synthetic_ids(key, shape, 256, "text")
