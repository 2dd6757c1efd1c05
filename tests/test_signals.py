"""Memory signals on planted cases: distances, distance buckets, recall (with
ties), and the gate and memory mass a memory layer reports."""
import jax
import jax.numpy as jnp
import numpy as np

from memorizing import knn
from memorizing.model import memory as memory_lib
from memorizing.model import signals
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import Decoder, init_carried_state, init_params

jax.config.update("jax_default_matmul_precision", "highest")


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def filled_memory(num_segments, length, size, dim=16, seed=0):
  """One row, one head: `num_segments` segments of random unit keys appended in
  order (token t of the document is the t-th key). Returns (mem, keys [T, D])."""
  keys = unit(np.random.default_rng(seed).normal(size=(num_segments * length, dim)))
  mem = memory_lib.init(1, 1, size, dim)
  for s in range(num_segments):
    seg = jnp.asarray(keys[s * length:(s + 1) * length])[None, None]
    mem = memory_lib.append(mem, seg, seg)
  return mem, keys


def exact_top(q, mem, k):
  """q [1,1,L,D] -> idx, valid [1,1,L,k] by exact search over the valid slots."""
  scores = jnp.einsum("bhqd,bhnd->bhqn", q, mem.keys)
  scores = jnp.where(mem.valid_mask()[:, None, None, :], scores, -jnp.inf)
  top, idx = jax.lax.top_k(scores, k)
  return idx, jnp.isfinite(top)


def test_a_key_repeated_at_a_known_distance_is_retrieved_at_that_distance():
  length, segments = 8, 4
  for size in (64, 16):                      # 16: the ring buffer has wrapped
    mem, keys = filled_memory(segments, length, size)
    now = segments * length                  # the current segment's first token
    oldest = now - min(size, now)
    plant = [(0, oldest + 3), (5, now - 1), (7, oldest)]   # (query position, planted token)
    q = np.zeros((length, keys.shape[1]))
    for j, t in plant:
      q[j] = keys[t]
    idx, _ = exact_top(jnp.asarray(q)[None, None], mem, 1)
    dist = np.asarray(signals.neighbour_distances(idx, mem))[0, 0, :, 0]
    for j, t in plant:
      assert dist[j] == now + j - t, (size, j, t, dist[j])


def test_distance_buckets_split_at_the_xl_window_and_2k_8k_32k():
  size = 40000
  mem = memory_lib.MemoryState(keys=jnp.zeros((1, 1, size, 2)), values=jnp.zeros((1, 1, size, 2)),
                               pointer=jnp.zeros((1,), jnp.int32),
                               count=jnp.full((1,), size, jnp.int32))
  back = np.asarray(signals.slot_distances(mem))[0]         # slot s is size - s tokens back
  assert back[size - 1] == 1 and back[0] == size
  wanted = {100: 0, 512: 0, 513: 1, 2048: 1, 2049: 2, 8192: 2, 8193: 3, 32768: 3, 32769: 4}
  idx = jnp.asarray([size - d for d in wanted], jnp.int32)[None, None, None, :]  # query 0
  bucket = np.asarray(signals.distance_bucket(idx, mem, 512, use_xl_cache=True))[0, 0, 0]
  assert list(bucket) == list(wanted.values())
  without_xl = np.asarray(signals.distance_bucket(idx, mem, 512, use_xl_cache=False))[0, 0, 0]
  assert without_xl[0] == 1                                  # no XL window: "to2k"


def test_recall_is_one_for_exact_search_and_counts_a_miss():
  mem, keys = filled_memory(4, 16, 64, dim=8, seed=1)
  q = jnp.asarray(unit(np.random.default_rng(2).normal(size=(16, 8))))[None, None]
  idx, valid = exact_top(q, mem, 4)
  hits, total = signals.sampled_recall(q, mem, idx, valid, 4)
  assert float(total) > 0 and float(hits) == float(total)
  worst = jnp.argsort(jnp.einsum("bhqd,bhnd->bhqn", q, mem.keys)[..., :64], axis=-1)[..., :4]
  hits, total = signals.sampled_recall(q, mem, worst.astype(jnp.int32), valid, 4)
  assert float(hits) == 0.0


def test_recall_counts_an_equal_key_in_another_slot_as_found():
  length, dim, k = 8, 8, 2
  mem, keys = filled_memory(2, length, 32, dim=dim, seed=3)
  dup = keys[2]
  mem = memory_lib.append(mem, jnp.asarray(np.stack([dup] * length))[None, None],
                          jnp.zeros((1, 1, length, dim)))     # slots 16..23 all hold `dup`
  q = jnp.asarray(np.stack([dup] * length))[None, None]
  idx, valid = exact_top(q, mem, k)
  other = jnp.full_like(idx, 20).at[..., 1].set(21)            # two other copies of `dup`
  hits, total = signals.sampled_recall(q, mem, other, valid, k)
  assert float(hits) == float(total) > 0
  same_twice = jnp.full_like(idx, 20)                          # one slot returned twice: 1 of 2
  hits, total = signals.sampled_recall(q, mem, same_twice, valid, k)
  assert float(hits) == float(total) / 2


TINY = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                   mlp_dim=64, segment_length=8, relative_position_max_distance=16,
                   relative_position_buckets=8, memory_layers=(1,), memory_size=32,
                   num_neighbors=4)


def layer_summary(config, params, num_segments):
  """Runs `num_segments` segments of one document; returns the memory layer's
  summarized signals over the segments after the first."""
  state = init_carried_state(config, 1)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, num_segments * 8), 0, 64)
  apply = jax.jit(lambda t, st, start: Decoder(config, knn.make_backend(config)).apply(
      {"params": params}, t, st, start, mutable=["signals"]))
  sums = None
  for s in range(num_segments):
    (_, state), variables = apply(tokens[:, s * 8:(s + 1) * 8], state, jnp.asarray([s == 0]))
    if s > 0:
      sums = signals.add(sums, jax.device_get(signals.collect(variables)))
  return signals.summarize(sums)["layer_1"]


def test_a_gate_set_by_hand_is_reported_as_set_and_is_the_memory_mass():
  params = init_params(TINY, jax.random.PRNGKey(0))
  gates = np.array([0.1, 0.25, 0.5, 0.9])
  attn = params["block_1"]["attention"]
  attn["memory_gate"] = jnp.asarray(np.log(gates / (1 - gates)), jnp.float32)
  rec = layer_summary(TINY, params, 3)
  np.testing.assert_allclose(rec["gate"], gates, rtol=1e-5)
  # From the second segment on every query has neighbours: mass = gate.
  np.testing.assert_allclose(rec["mass"], gates, rtol=1e-5)
  assert rec["recall"] == 1.0                                   # exact backend
  # 2 earlier segments of 8 tokens: every neighbour lies inside 2K tokens.
  assert rec["distance"]["xl"] + rec["distance"]["to2k"] == 1.0


def test_joint_reports_the_memory_bias_and_a_mass_between_zero_and_one():
  config = TINY.replace(memory_combine="joint")
  params = init_params(config, jax.random.PRNGKey(0))
  params["block_1"]["attention"]["memory_bias"] = jnp.asarray([-30.0, 0.0, 0.0, 30.0])
  rec = layer_summary(config, params, 3)
  np.testing.assert_allclose(rec["memory_bias"], [-30.0, 0.0, 0.0, 30.0])
  assert rec["mass"][0] < 1e-6 and rec["mass"][3] > 1 - 1e-6
  assert 0.0 < rec["mass"][1] < 1.0
