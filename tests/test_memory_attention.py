"""The kNN-augmented attention layer against plain references; gradients; gate."""
import jax
import jax.numpy as jnp
import numpy as np

from memorizing import knn
from memorizing.model import memory as memory_lib
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, init_params
from memorizing.model.layers import l2_normalize
from memorizing.model.memory_attention import memory_attention

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                     mlp_dim=64, segment_length=8, memory_layers=(1,), memory_size=64,
                     num_neighbors=8)


def dense_attention(q, keys, values, scale):
  """numpy: q [B,H,Q,D], keys/values [B,H,N,D] -> softmax over all N."""
  logits = np.einsum("bhqd,bhnd->bhqn", q, keys) * scale[None, :, None, None]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqn,bhnd->bhqd", probs / probs.sum(-1, keepdims=True), values)


def test_memory_attention_with_k_equal_stored_equals_dense_attention_over_past_segments():
  b, h, length, d = 2, 3, 6, 8
  backend = knn.create("exact")
  mem = memory_lib.init(b, h, 64, d)
  scale = jnp.array([2.0, 5.0, 9.0])
  past_k, past_v = [], []
  for s in range(4):
    rng = jax.random.split(jax.random.PRNGKey(s), 3)
    q = l2_normalize(jax.random.normal(rng[0], (b, h, length, d)))
    k = l2_normalize(jax.random.normal(rng[1], (b, h, length, d)))
    v = jax.random.normal(rng[2], (b, h, length, d))
    start = jnp.full((b,), s == 0)
    mem = memory_lib.reset(mem, start)
    stored = s * length
    ctx = knn.SearchContext(layer=1, train=False, reset=start, new_keys=k)
    out = memory_attention(q, mem, scale, backend, max(stored, 1), ctx)
    if s == 0:
      np.testing.assert_array_equal(out, 0.0)       # empty memory: zero memory term
    else:
      expected = dense_attention(np.asarray(q), np.concatenate(past_k, 2),
                                 np.concatenate(past_v, 2), np.asarray(scale))
      np.testing.assert_allclose(out, expected, atol=1e-5)
    mem = memory_lib.append(mem, k, v)
    past_k.append(np.asarray(k))
    past_v.append(np.asarray(v))


def apply_fn(config, params):
  return jax.jit(lambda t, st, start: Decoder(config, knn.make_backend(config)).apply({"params": params}, t, st, start))


def tokens(seed, b=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, CONFIG.segment_length), 0, 64)


def with_gate(params, value):
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["block_1"]["attention"]["memory_gate"] = jnp.full((CONFIG.num_heads,), value)
  return params


def test_closed_gate_gives_the_model_without_memory():
  # With the position bias kept in the memory layer (the default drops it), a
  # closed gate leaves exactly the layer of the model without memory.
  config = CONFIG.replace(memory_layer_position_bias=True)
  params = init_params(config, jax.random.PRNGKey(0))
  plain = config.replace(memory_layers=())
  plain_params = {k: v for k, v in params.items()}
  plain_params["block_1"] = dict(params["block_1"])
  plain_params["block_1"]["attention"] = {k: v for k, v in params["block_1"]["attention"].items()
                                          if k != "memory_gate"}
  closed = with_gate(params, -50.0)
  f_mem, f_plain = apply_fn(config, closed), apply_fn(plain, plain_params)
  st_mem, st_plain = init_carried_state(config, 2), init_carried_state(plain, 2)
  for s in range(3):
    start = jnp.full((2,), s == 0)
    a, st_mem = f_mem(tokens(s), st_mem, start)
    b, st_plain = f_plain(tokens(s), st_plain, start)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_memory_disabled_keeps_memory_empty_with_same_parameters():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  disabled = CONFIG.replace(memory_enabled=False)
  st_on, st_off = init_carried_state(CONFIG, 2), init_carried_state(disabled, 2)
  f_on, f_off = apply_fn(CONFIG, params), apply_fn(disabled, params)
  for s in range(3):
    start = jnp.full((2,), s == 0)
    on, st_on = f_on(tokens(s), st_on, start)
    off, st_off = f_off(tokens(s), st_off, start)
    assert int(st_off.memory["layer_1"].count.max()) == 0
    if s == 0:   # empty memory either way: same output
      np.testing.assert_allclose(on, off, atol=1e-5)
    else:        # memory now matters when enabled
      assert np.abs(np.asarray(on - off)).max() > 1e-4
  assert int(st_on.memory["layer_1"].count.min()) == 3 * CONFIG.segment_length


def loss_fn(params, state, toks, start, config=CONFIG):
  logits, _ = Decoder(config, knn.make_backend(config)).apply({"params": params}, toks, state, start)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


def filled_state(params):
  f = apply_fn(CONFIG, params)
  state = init_carried_state(CONFIG, 2)
  _, state = f(tokens(0), state, jnp.ones((2,), bool))
  _, state = f(tokens(1), state, jnp.zeros((2,), bool))
  return state


def test_no_gradient_reaches_stored_keys_and_values():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  state = filled_state(params)
  mem = state.memory["layer_1"]

  def loss_of_memory(keys, values):
    st = state.replace(memory={"layer_1": mem.replace(keys=keys, values=values)})
    return loss_fn(params, st, tokens(2), jnp.zeros((2,), bool))

  g_keys, g_values = jax.grad(loss_of_memory, argnums=(0, 1))(mem.keys, mem.values)
  np.testing.assert_array_equal(g_keys, 0.0)
  np.testing.assert_array_equal(g_values, 0.0)
  # The memory is used: the loss depends on it (so zero gradient is a stop, not disuse).
  shifted = loss_of_memory(mem.keys, mem.values + 1.0)
  assert abs(float(shifted) - float(loss_of_memory(mem.keys, mem.values))) > 1e-6


def test_gate_and_query_projection_of_memory_layer_get_gradients():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  state = filled_state(params)
  g = jax.grad(loss_fn)(params, state, tokens(2), jnp.zeros((2,), bool))
  att = g["block_1"]["attention"]
  assert np.abs(np.asarray(att["memory_gate"])).min() > 0
  assert np.abs(np.asarray(att["query"]["kernel"])).max() > 0
  # The query reaches memory attention only through retrieved keys: remove the
  # local path's dependence (closed local = open gate) and the query still learns.
  opened = with_gate(params, 50.0)
  g_open = jax.grad(loss_fn)(opened, state, tokens(2), jnp.zeros((2,), bool))
  assert np.abs(np.asarray(g_open["block_1"]["attention"]["query"]["kernel"])).max() > 1e-6


def test_memory_smaller_than_segment_keeps_newest_keys():
  config = CONFIG.replace(memory_size=5, num_neighbors=3)
  params = init_params(config, jax.random.PRNGKey(0))
  f = apply_fn(config, params)
  state = init_carried_state(config, 2)
  logits, state = f(tokens(0), state, jnp.ones((2,), bool))
  _, state = f(tokens(1), state, jnp.zeros((2,), bool))
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(state.memory["layer_1"].count, 5)


def test_fused_retrieved_attention_gives_the_einsum_models_loss_and_gradients():
  # The fused Pallas kernels ("pallas", interpret mode on a CPU) against
  # "einsum", with the memory term in play and the joint softmax, whose loss
  # also depends on the memory's log-sum-exp.
  for combine in ("gate", "joint"):
    base = CONFIG.replace(memory_combine=combine)
    params = init_params(base, jax.random.PRNGKey(0))
    f = apply_fn(base, params)
    state = init_carried_state(base, 2)
    _, state = f(tokens(0), state, jnp.ones((2,), bool))
    _, state = f(tokens(1), state, jnp.zeros((2,), bool))
    loss_e, grad_e, loss_p, grad_p = (
        x for impl in ("einsum", "pallas")
        for x in jax.value_and_grad(loss_fn)(params, state, tokens(2), jnp.zeros((2,), bool),
                                             base.replace(retrieved_attention=impl)))
    np.testing.assert_allclose(loss_p, loss_e, rtol=1e-6, err_msg=combine)
    for a, b in zip(jax.tree_util.tree_leaves(grad_p), jax.tree_util.tree_leaves(grad_e)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=combine)
    # The memory term is in play: its own parameter gets a gradient.
    name = "memory_gate" if combine == "gate" else "memory_bias"
    assert np.abs(np.asarray(grad_e["block_1"]["attention"][name])).min() > 0


def test_retrieved_attention_is_checked_and_the_kernels_say_which_shapes_they_take():
  import pytest
  from memorizing.errors import ConfigError
  from memorizing.model.pallas_retrieved import fused_retrieved_attention
  with pytest.raises(ConfigError, match="retrieved_attention='fused'; choose one of auto"):
    ModelConfig(retrieved_attention="fused")
  q = jnp.zeros((1, 1, 8, 12))                 # head_dim 12: not a power of two
  mem = jnp.zeros((1, 1, 16, 12))
  idx, valid = jnp.zeros((1, 1, 8, 4), jnp.int32), jnp.ones((1, 1, 8, 4), bool)
  with pytest.raises(ConfigError, match="powers of two; got head_dim=12, k=4"):
    fused_retrieved_attention(q, mem, mem, idx, valid, jnp.ones((1,)), interpret=True)


def test_fused_retrieved_attention_matches_gathered_reference_with_empty_queries():
  # The Pallas kernels (interpret mode) against attend_retrieved over gathered
  # rows: outputs, log-sum-exp (NEG_INF where a query has no valid neighbour),
  # similarities, and the gradients of q, scale and bias through out and lse.
  from memorizing.model.memory_attention import attend_retrieved
  from memorizing.model.pallas_retrieved import fused_retrieved_attention
  b, h, length, d, n, k = 2, 3, 16, 16, 40, 8
  r = jax.random.split(jax.random.PRNGKey(0), 6)
  q = l2_normalize(jax.random.normal(r[0], (b, h, length, d)))
  keys = l2_normalize(jax.random.normal(r[1], (b, h, n, d)))
  values = jax.random.normal(r[2], (b, h, n, d))
  idx = jax.random.randint(r[3], (b, h, length, k), 0, n)
  valid = (jax.random.uniform(r[4], (b, h, length, k)) > 0.3).at[0, 0, :3].set(False)
  scale, bias = jnp.array([2.0, 5.0, 9.0]), jnp.array([0.1, -0.3, 0.5])
  w = jax.random.normal(r[5], (b, h, length, d))

  def reference(q, scale, bias):
    out, _, lse = attend_retrieved(q, memory_lib.gather(keys, idx), memory_lib.gather(values, idx),
                                   valid, scale, bias)
    return out, lse

  def fused(q, scale, bias, with_sims=False):
    out, lse, sims = fused_retrieved_attention(q, keys, values, idx, valid, scale, bias,
                                               block_q=8, interpret=True)
    return (out, lse, sims) if with_sims else (out, lse)

  def loss(f):
    def g(q, scale, bias):
      out, lse = f(q, scale, bias)
      return jnp.sum(out * w) + 0.3 * jnp.sum(jnp.where(lse > -1e29, lse, 0.0))
    return g

  (out_r, lse_r), (out_f, lse_f, sims) = reference(q, scale, bias), fused(q, scale, bias, True)
  np.testing.assert_allclose(out_f, out_r, atol=1e-5)
  np.testing.assert_allclose(lse_f, lse_r, rtol=1e-6)
  np.testing.assert_array_equal(out_f[0, 0, :3], 0.0)
  assert (np.asarray(lse_f[0, 0, :3]) < -1e29).all()
  want = np.einsum("bhqd,bhqkd->bhqk", q, memory_lib.gather(keys, idx))
  np.testing.assert_allclose(np.where(valid, sims, 0), np.where(valid, want, 0), atol=1e-5)
  grads_r = jax.grad(loss(reference), argnums=(0, 1, 2))(q, scale, bias)
  grads_f = jax.grad(loss(fused), argnums=(0, 1, 2))(q, scale, bias)
  for a, b_ in zip(grads_f, grads_r):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
