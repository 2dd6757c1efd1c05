"""ScannBackend: recall over FIFO turnovers, slot == index, masking, jit/grad, idempotence, sync."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("scann")

from memorizing import knn  # noqa: E402
from memorizing.model import memory as M  # noqa: E402
from memorizing.knn import synthetic  # noqa: E402
from memorizing.knn.exact import ExactBackend  # noqa: E402
from memorizing.knn.scann_host import ScannBackend, ScannBackendError  # noqa: E402

K = 32


def make_step(backend, k=K, layer=0, train=True):
  """One memory-layer step: reset, search (backend and exact), append."""
  @jax.jit
  def step(mem, queries, new_keys, reset):
    mem = M.reset(mem, reset)
    ctx = knn.SearchContext(layer=layer, train=train, reset=reset, new_keys=new_keys)
    idx, valid = backend.search(queries, mem, k, ctx)
    ei, ev = ExactBackend().search(queries, mem, k)
    return M.append(mem, new_keys, new_keys), mem, (idx, valid, ei, ev)
  return step


def stream(b, h, steps, seg, d, seed=0):
  keys, _ = synthetic.synthetic_memory(jax.random.PRNGKey(seed), b, h, steps * seg, 0, d)
  return [keys[:, :, t * seg:(t + 1) * seg] for t in range(steps)]


def test_scann_recall_stays_above_0_9_over_many_fifo_turnovers():
  # N = 4096, tree from 2048 keys: the stream turns the memory over 4 times.
  be = ScannBackend(tree_min_size=2048, num_threads=2)
  step = make_step(be)
  b, h, seg, n = 1, 2, 512, 4096
  mem = M.init(b, h, n, 64)
  segs = stream(b, h, 42, seg, 64, seed=1)
  recalls = []
  for t in range(len(segs) - 1):
    mem, _, (i, v, ei, ev) = step(mem, segs[t + 1], segs[t], jnp.array([t == 0]))
    if t >= 8:
      recalls.append(synthetic.recall(i, v, ei, ev))
  assert be.stats["tree_builds"] > 4            # the tree really served and was rebuilt
  assert np.mean(recalls) >= 0.9, recalls
  assert min(recalls) >= 0.6, recalls        # single hard segments (a topic new to the memory)


def test_scann_indices_are_ring_buffer_slots_after_wraparound():
  be = ScannBackend(tree_min_size=256, num_threads=2)
  step = make_step(be)
  b, h, seg, n = 2, 2, 96, 500                   # 96 does not divide 500: slots wrap mid-segment
  mem = M.init(b, h, n, 16)
  segs = stream(b, h, 14, seg, 16, seed=2)
  for t in range(13):
    mem, _, _ = step(mem, segs[t], segs[t], jnp.array([t == 0, t == 0]))
  assert int(mem.count[0]) == n and int(mem.pointer[0]) != 0
  mirror = np.stack([be.row_state(0, True, r).mirror for r in range(b)])
  np.testing.assert_array_equal(mirror, np.asarray(mem.keys))      # host mirror == ring buffer
  # Queries equal to stored keys at known slots must find exactly those slots first,
  # and the scores of gathered keys must come back in descending order.
  slots = jnp.array([0, 3, 250, 499, int(mem.pointer[0]) - 1])
  queries = mem.keys[:, :, slots]                                  # [B,H,5,D]
  _, pre, (i, v, _, _) = step(mem, queries, segs[13], jnp.array([False, False]))
  assert bool(v.all())
  # the tree is approximate: allow a rare miss of the self-match, never a wrong mapping
  top1 = np.asarray(i[..., 0]) == np.broadcast_to(np.asarray(slots), (b, h, 5))
  assert top1.mean() >= 0.9, top1
  got = knn.gather(pre.keys, i)                                      # [B,H,5,k,D]
  scores = np.einsum("bhqd,bhqkd->bhqk", np.asarray(queries), np.asarray(got))
  assert (np.diff(scores, axis=-1) <= 1e-5).all()


def test_scann_never_marks_empty_or_reset_slots_valid():
  be = ScannBackend(num_threads=2)
  step = make_step(be)
  b, h, n = 3, 2, 256
  mem = M.init(b, h, n, 16)
  segs = stream(b, h, 4, 5, 16, seed=3)                            # 5 keys per segment: count < k
  mem, _, (i, v, _, _) = step(mem, segs[1], segs[0], jnp.array([True, True, True]))
  assert not v.any()                                                # empty memory: nothing valid
  mem, _, (i, v, _, _) = step(mem, segs[2], segs[1], jnp.array([False, False, False]))
  assert (v.sum(-1) == 5).all()
  assert set(np.asarray(i)[np.asarray(v)].tolist()) == set(range(5))
  # Row 1 starts a new document: its memory (and the host's) is emptied first.
  mem, _, (i, v, _, _) = step(mem, segs[3], segs[2], jnp.array([False, True, False]))
  assert not v[1].any()
  assert (v[0].sum(-1) == 10).all() and (v[2].sum(-1) == 10).all()
  assert (np.asarray(i)[np.asarray(v)] < 10).all()


def test_scann_repeated_host_call_does_not_insert_twice():
  be = ScannBackend(num_threads=2)
  step = make_step(be)
  mem = M.init(1, 1, 64, 8)
  segs = stream(1, 1, 3, 8, 8, seed=4)
  mem1, _, out1 = step(mem, segs[1], segs[0], jnp.array([True]))
  _, _, out1b = step(mem, segs[1], segs[0], jnp.array([True]))     # same inputs again
  assert be.stats["repeated_calls"] == 1
  np.testing.assert_array_equal(out1[0], out1b[0])
  row = be.row_state(0, True, 0)
  assert row.count == 8 and len(row.searchers[0].tail_slots) == 8
  mem2, _, (i, v, ei, ev) = step(mem1, segs[2], segs[1], jnp.array([False]))
  assert be.row_state(0, True, 0).count == 16 and (v.sum(-1) == 8).all()
  assert synthetic.recall(i, v, ei, ev) == 1.0


def test_scann_stats_sum_the_seconds_of_the_host_calls_that_ran():
  be = ScannBackend(num_threads=2)
  step = make_step(be)
  mem = M.init(1, 2, 64, 8)
  segs = stream(1, 2, 3, 8, 8, seed=5)
  mem1, _, _ = jax.block_until_ready(step(mem, segs[1], segs[0], jnp.array([True])))
  first = dict(be.last_timing)
  mem2, _, _ = jax.block_until_ready(step(mem1, segs[2], segs[1], jnp.array([False])))
  second = dict(be.last_timing)
  for key in ("search_s", "insert_s"):
    assert be.stats[key] == pytest.approx(first[key] + second[key])
  assert be.stats["host_s"] == pytest.approx(first["total_s"] + second["total_s"])
  assert be.stats["host_s"] >= be.stats["search_s"] + be.stats["insert_s"] > 0
  total = be.stats["host_s"]
  jax.block_until_ready(step(mem1, segs[2], segs[1], jnp.array([False])))   # a repeat
  assert be.stats["repeated_calls"] == 1 and be.stats["host_s"] == total


def test_scann_out_of_sync_memory_raises_clear_error_naming_backend():
  be = ScannBackend(num_threads=2)
  step = make_step(be)
  keys, q = synthetic.synthetic_memory(jax.random.PRNGKey(5), 1, 1, 64, 8, 8)
  mem = M.MemoryState(keys=keys, values=keys, pointer=jnp.array([10]), count=jnp.array([10]))
  with pytest.raises(Exception, match=r"ScannBackend.*sync"):
    jax.block_until_ready(step(mem, q, q, jnp.array([False])))


def test_scann_sync_after_restore_rebuilds_from_device_memory():
  b, h, seg, n = 2, 2, 128, 1024
  segs = stream(b, h, 12, seg, 16, seed=6)
  first = ScannBackend(tree_min_size=512, num_threads=2)
  step = make_step(first)
  mem = M.init(b, h, n, 16)
  for t in range(10):
    mem, _, _ = step(mem, segs[t + 1], segs[t], jnp.array([t == 0] * b))
  restored = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), mem)  # "checkpoint"
  # A new process whose rows are small enough for exact search: after sync it
  # must return exactly the exact backend's neighbours, so its copy is complete.
  fresh = ScannBackend(tree_min_size=2048, num_threads=2)
  fresh.sync(0, True, restored)
  np.testing.assert_array_equal(np.stack([fresh.row_state(0, True, r).mirror for r in range(b)]),
                                np.asarray(mem.keys))
  _, _, (i, v, ei, ev) = make_step(fresh)(restored, segs[11], segs[10], jnp.array([False] * b))
  assert synthetic.recall(i, v, ei, ev) == 1.0
  assert fresh.row_state(0, True, 0).count == n
  # With a tree: the synced searcher serves and keeps stepping.
  tree = ScannBackend(tree_min_size=512, num_threads=2)
  tree.sync(0, True, restored)
  assert tree.stats["tree_builds"] == b * h
  _, _, (i, v, ei, ev) = make_step(tree)(restored, segs[11], segs[10], jnp.array([False] * b))
  assert bool(v.all()) and synthetic.recall(i, v, ei, ev) >= 0.75


def test_scann_search_under_jit_and_grad():
  be = ScannBackend(num_threads=2)
  keys, q = synthetic.synthetic_memory(jax.random.PRNGKey(7), 1, 2, 32, 4, 8)
  mem = M.init(1, 2, 64, 8)

  def loss(queries, mem, reset):
    mem = M.reset(mem, reset)
    ctx = knn.SearchContext(layer=3, train=False, reset=reset, new_keys=keys)
    idx, valid = be.search(jax.lax.stop_gradient(queries), mem, 4, ctx)
    got = knn.gather(mem.keys, idx)
    return jnp.sum(jnp.where(valid[..., None], got, 0.0) * queries[:, :, :, None, :])

  f = jax.jit(jax.value_and_grad(loss))
  _, g0 = f(q, mem, jnp.array([True]))                   # empty memory: zero gradient
  assert float(jnp.abs(g0).sum()) == 0.0
  mem = M.append(mem, keys, keys)
  _, g1 = f(q, mem, jnp.array([False]))
  assert g1.shape == q.shape and float(jnp.abs(g1).sum()) > 0
  assert (3, False) in be._layers


def test_scann_backend_from_registry_and_bad_options():
  be = knn.create("scann", (("num_threads", 1),))
  assert isinstance(be, ScannBackend)
  with pytest.raises(ValueError, match="tail_fraction"):
    ScannBackend(tail_fraction=0.9)
  assert issubclass(ScannBackendError, RuntimeError)
