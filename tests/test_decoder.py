"""The decoder: XL-cache equivalence, reset at document starts, dtypes, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.model.config import ConfigError, ModelConfig
from memorizing.model.decoder import Decoder, count_params, init_carried_state, init_params
from tests import reference

jax.config.update("jax_default_matmul_precision", "highest")

TINY = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                   mlp_dim=64, segment_length=8, relative_position_max_distance=16,
                   relative_position_buckets=8)


def run_segments(config, params, tokens, starts):
  """tokens [B, S*L], starts [S, B] -> logits [B, S*L, V] through the carried state."""
  b, total = tokens.shape
  length = config.segment_length
  state = init_carried_state(config, b)
  apply = jax.jit(lambda p, t, st, start: Decoder(config, knn.make_backend(config)).apply({"params": p}, t, st, start))
  out = []
  for s in range(total // length):
    logits, state = apply(params, tokens[:, s * length:(s + 1) * length], state, starts[s])
    out.append(logits)
  return jnp.concatenate(out, axis=1), state


def test_segments_with_xl_cache_match_one_pass_with_window_mask():
  params = init_params(TINY, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 4 * TINY.segment_length), 0, 64)
  starts = np.array([[True], [False], [False], [False]])
  logits, _ = run_segments(TINY, params, tokens, starts)
  params64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  window = reference.xl_window(tokens.shape[1], TINY.segment_length)
  expected = reference.forward(params64, TINY, np.asarray(tokens[0]), window)
  # float32 model vs float64 reference.
  np.testing.assert_allclose(np.asarray(logits[0]), expected, atol=2e-4, rtol=2e-4)


def test_without_xl_cache_each_segment_sees_only_itself():
  config = TINY.replace(use_xl_cache=False)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 2 * config.segment_length), 0, 64)
  logits, _ = run_segments(config, params, tokens, np.array([[True], [False]]))
  t = np.arange(tokens.shape[1])
  window = (t[None] <= t[:, None]) & (t[None] // 8 == t[:, None] // 8)
  params64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  expected = reference.forward(params64, config, np.asarray(tokens[0]), window)
  np.testing.assert_allclose(np.asarray(logits[0]), expected, atol=2e-4, rtol=2e-4)


def test_document_start_clears_xl_cache_of_that_row_only():
  config = TINY.replace(memory_layers=(1,), memory_size=32, num_neighbors=4)
  params = init_params(config, jax.random.PRNGKey(0), batch=2)
  seg = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 64)
  other = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, 64)
  apply = jax.jit(lambda t, start, st: Decoder(config, knn.make_backend(config)).apply({"params": params}, t, st, start))
  fresh_logits, _ = apply(seg, jnp.array([True, True]), init_carried_state(config, 2))
  _, state = apply(other, jnp.array([True, True]), init_carried_state(config, 2))
  # Row 0 starts a new document: it must behave exactly as from an empty state.
  logits, _ = apply(seg, jnp.array([True, False]), state)
  np.testing.assert_allclose(logits[0], fresh_logits[0], atol=1e-5)
  # Row 1 continues: its past changes its output.
  assert np.abs(np.asarray(logits[1] - fresh_logits[1])).max() > 1e-3


def test_bfloat16_compute_keeps_float32_logits_and_is_close_to_float32():
  config = TINY.replace(memory_layers=(-1,), memory_size=16, num_neighbors=4)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 3 * 8), 0, 64)
  starts = np.array([[True], [False], [False]])
  ref, _ = run_segments(config, params, tokens, starts)
  bf16 = config.replace(dtype="bfloat16")
  logits, state = run_segments(bf16, params, tokens, starts)
  assert logits.dtype == jnp.float32
  assert state.memory["layer_1"].keys.dtype == jnp.bfloat16
  assert state.xl["layer_0"].keys.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits, ref, atol=0.1)


def test_untied_output_embedding_has_its_own_projection():
  params = init_params(TINY.replace(tie_embeddings=False), jax.random.PRNGKey(0))
  assert params["logits"]["kernel"].shape == (TINY.d_model, TINY.vocab_size)
  assert "logits" not in init_params(TINY, jax.random.PRNGKey(0))


def test_paper_size_parameter_count():
  config = ModelConfig.paper()
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  total = count_params(shapes)
  embeddings = config.vocab_size * config.d_model
  # About 151M without embeddings (docs/design.md), about 184M with a tied 32K vocab.
  assert 150e6 < total - embeddings < 152e6, total - embeddings
  assert 183e6 < total < 186e6, total


@pytest.mark.parametrize("changes, field", [
    (dict(memory_layers=(2,)), "memory_layers"),
    (dict(memory_layers=(-3,)), "memory_layers"),
    (dict(memory_layers=(1,), num_neighbors=0), "num_neighbors"),
    (dict(memory_layers=(1,), num_neighbors=64, memory_size=32), "num_neighbors"),
    (dict(num_heads=5), "num_heads"),
    (dict(d_model=0), "d_model"),
    (dict(dtype="float8"), "dtype"),
    (dict(attention="flash"), "attention"),
])
def test_bad_config_raises_one_error_naming_the_field(changes, field):
  with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
    TINY.replace(**changes)


def test_segment_length_mismatch_is_a_clear_error():
  params = init_params(TINY, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="segment_length"):
    Decoder(TINY, knn.make_backend(TINY)).apply({"params": params}, jnp.zeros((1, 5), jnp.int32),
                        init_carried_state(TINY, 1), jnp.ones((1,), bool))


@pytest.mark.parametrize("impl", ["xla", "remat"])
def test_attention_implementations_match_einsum(impl):
  config = TINY.replace(memory_layers=(1,), memory_size=32, num_neighbors=4)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 3 * 8), 0, 64)
  starts = np.array([[True], [False], [False]])
  ref, _ = run_segments(config.replace(attention="einsum"), params, tokens, starts)
  got, _ = run_segments(config.replace(attention=impl), params, tokens, starts)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_memory_layer_without_position_bias_ignores_the_bias_table():
  config = TINY.replace(num_layers=1, memory_layers=(0,), memory_size=32, num_neighbors=4,
                        memory_layer_position_bias=False)
  params = init_params(config, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 3 * 8), 0, 64)
  starts = np.array([[True], [False], [False]])
  shifted = jax.tree_util.tree_map(lambda x: x, params)
  table = shifted["relative_position_bias"]["rel_embedding"]
  shifted["relative_position_bias"]["rel_embedding"] = table + jnp.arange(table.shape[0])[:, None]
  a, _ = run_segments(config, params, tokens, starts)
  b, _ = run_segments(config, shifted, tokens, starts)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with_bias = config.replace(memory_layer_position_bias=True)
  c, _ = run_segments(with_bias, params, tokens, starts)
  d, _ = run_segments(with_bias, shifted, tokens, starts)
  assert not np.allclose(np.asarray(c), np.asarray(d))
