"""Backends inside the memory layer: approximate backends at exact settings give the
exact backend's output; captured keys and queries are what the layer searches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, init_params
from memorizing.knn import capture

CONFIG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, head_dim=16,
                     mlp_dim=64, segment_length=16, memory_layers=(1,), memory_size=48,
                     num_neighbors=8)


def batches(seed=0, rows=2, steps=6):
  rng = np.random.default_rng(seed)
  for s in range(steps):
    yield {"tokens": jnp.asarray(rng.integers(0, 64, (rows, 16)), jnp.int32),
           "start_of_document": jnp.asarray([s == 0, s % 4 == 0])}


def logits_over_segments(config, params):
  apply = jax.jit(lambda st, b: Decoder(config, knn.make_backend(config)).apply({"params": params}, b["tokens"], st,
                                                      b["start_of_document"]))
  state, out = init_carried_state(config, 2), []
  for b in batches():
    logits, state = apply(state, b)
    out.append(logits)
  return np.asarray(jnp.concatenate(out, 1))


@pytest.mark.parametrize("backend, options", [
    ("device", (("num_buckets", 64),)),          # buckets >= memory: exact search
    ("scann", (("tree_min_size", 1 << 20),)),    # brute force below the tree size
])
def test_approximate_backend_at_exact_settings_gives_the_exact_layer_output(backend, options):
  if backend == "scann":
    pytest.importorskip("scann")
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  params["block_1"]["attention"]["memory_gate"] = jnp.full((2,), 3.0)   # memory matters
  exact = logits_over_segments(CONFIG, params)
  approx = logits_over_segments(CONFIG.replace(knn_backend=backend, knn_options=options), params)
  np.testing.assert_allclose(approx, exact, atol=1e-4)
  disabled = logits_over_segments(CONFIG.replace(memory_enabled=False), params)
  assert np.abs(exact - disabled).max() > 1e-3


def test_capture_returns_the_memory_and_normalised_next_queries():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  out = capture.capture(CONFIG, params, batches(), num_segments=3)
  assert out["keys"].shape == (2, 2, 48, 16) and out["queries"].shape == (2, 2, 16, 16)
  # Both rows streamed 3 segments of 16 into a memory of 48 before the captured one.
  np.testing.assert_array_equal(out["count"], [48, 48])
  np.testing.assert_allclose(np.linalg.norm(out["queries"], axis=-1), 1.0, atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(out["keys"], axis=-1), 1.0, atol=1e-3)
