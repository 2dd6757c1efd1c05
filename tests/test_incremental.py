"""Incremental decoding computes the Decoder's logits, token by token.

Tolerance: float32 with 'highest' matmul precision, atol = rtol = 1e-4 on
logits of order 1 (the two paths sum the same terms in different orders).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, init_params
from memorizing.model.incremental import IncrementalDecoder, Stepper, init_decode_state

jax.config.update("jax_default_matmul_precision", "highest")

L = 8
CONFIG = ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, head_dim=8,
                     mlp_dim=64, segment_length=L, relative_position_max_distance=16,
                     relative_position_buckets=8, memory_layers=(1,), memory_size=12,
                     num_neighbors=4, knn_backend="exact", memory_gate_init=1.0)
TOTAL = 3 * L + 5            # three segment boundaries, the last segment partial
TOL = dict(atol=1e-4, rtol=1e-4)


def decoder_logits(config, params, tokens, backend):
  """Whole segments through the Decoder; the partial last one padded (causal, so
  its first positions are exact). tokens [B, T] -> [B, T, V]."""
  b, total = tokens.shape
  segs = -(-total // L)
  padded = jnp.pad(tokens, ((0, 0), (0, segs * L - total)))
  state = init_carried_state(config, b)
  apply = jax.jit(lambda p, t, st, s: Decoder(config, backend).apply({"params": p}, t, st, s))
  out = []
  for s in range(segs):
    logits, state = apply(params, padded[:, s * L:(s + 1) * L], state,
                          jnp.full((b,), s == 0))
    out.append(logits)
  return jnp.concatenate(out, axis=1)[:, :total]


def incremental_logits(config, params, tokens, backend, full_segments=0):
  """The first `full_segments` through the Decoder, then token by token."""
  b, total = tokens.shape
  carried = init_carried_state(config, b)
  out = []
  for s in range(full_segments):
    logits, carried = Decoder(config, backend).apply(
        {"params": params}, tokens[:, s * L:(s + 1) * L], carried, jnp.full((b,), s == 0))
    out.append(logits)
  state = init_decode_state(config, b, carried)
  stepper = Stepper(config, backend)
  position = 0
  for t in range(full_segments * L, total):
    logits, state = stepper.step(params, tokens[:, t], state, position)
    position = position % L + 1
    out.append(logits[:, None])
  assert stepper._step._cache_size() == 1          # compiled once for every position
  return jnp.concatenate(out, axis=1)


def _backend_config(name):
  if name == "scann":
    pytest.importorskip("scann")
  return CONFIG.replace(knn_backend=name)


@pytest.mark.parametrize("backend_name", ["exact", "device", "scann"])
def test_incremental_logits_equal_decoder_logits(backend_name):
  config = _backend_config(backend_name)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, TOTAL), 0, 64)
  ref_backend, inc_backend = knn.make_backend(config), knn.make_backend(config)
  try:
    expected = decoder_logits(config, params, tokens, ref_backend)
    got = incremental_logits(config, params, tokens, inc_backend)
  finally:
    ref_backend.close()
    inc_backend.close()
  # The memory filled (8), then wrapped (16, 24 entries in 12 slots) before the last tokens.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **TOL)


def test_prompt_segments_through_decoder_then_tokens():
  config = CONFIG
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, TOTAL), 0, 64)
  backend = knn.make_backend(config)
  expected = decoder_logits(config, params, tokens, backend)
  got = incremental_logits(config, params, tokens, backend, full_segments=2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **TOL)


@pytest.mark.parametrize("variant", [dict(use_xl_cache=False), dict(memory_combine="joint"),
                                     dict(memory_layer_position_bias=False)])
def test_incremental_matches_decoder_in_variants(variant):
  config = CONFIG.replace(**variant)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 2 * L + 3), 0, 64)
  backend = knn.make_backend(config)
  np.testing.assert_allclose(np.asarray(incremental_logits(config, params, tokens, backend)),
                             np.asarray(decoder_logits(config, params, tokens, backend)), **TOL)


def test_memory_disabled_matches_until_memory_holds_entries():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 2 * L + 3), 0, 64)
  on = incremental_logits(CONFIG, params, tokens, knn.make_backend(CONFIG))
  off_config = CONFIG.replace(memory_enabled=False)
  off = incremental_logits(off_config, params, tokens, None)
  # First segment: the memory is empty, so both compute the same thing.
  np.testing.assert_allclose(np.asarray(on[:, :L]), np.asarray(off[:, :L]), **TOL)
  # From the second segment on the memory holds the first one.
  diff = np.abs(np.asarray(on[:, L:]) - np.asarray(off[:, L:])).max(axis=-1)
  assert (diff > 1e-3).all(), diff


def test_same_parameter_tree_as_decoder():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  state = init_decode_state(CONFIG.replace(memory_enabled=False), 1)
  inc = IncrementalDecoder(CONFIG.replace(memory_enabled=False)).init(
      jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), state)["params"]
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
  assert shapes(inc) == shapes(params)


def test_decode_step_updates_the_state_in_place_without_copying_the_memory():
  # Without donation every token copied the whole memory (keys and values) into
  # the new state; the step must alias it instead.
  config = CONFIG.replace(memory_size=4096)
  params = init_params(config, jax.random.PRNGKey(0))
  state = init_decode_state(config, 2, init_carried_state(config, 2))
  stepper = Stepper(config, knn.make_backend(config))
  compiled = stepper._step.lower(params, jnp.zeros((2,), jnp.int32), state).compile()
  mem = state.carried.memory["layer_1"]
  memory_bytes = mem.keys.nbytes + mem.values.nbytes
  assert compiled.memory_analysis().alias_size_in_bytes >= memory_bytes
  assert compiled.memory_analysis().temp_size_in_bytes < memory_bytes / 4
