"""The ring-buffer memory: FIFO order, reset per row, row isolation, masking."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.errors import ConfigError
from memorizing.model.config import ModelConfig
from memorizing.model import memory as memory_lib


def segment(rng, b=3, h=2, length=5, d=4, offset=0.0):
  keys = jax.random.normal(jax.random.PRNGKey(rng), (b, h, length, d)) + offset
  return keys, keys * 10.0


@pytest.mark.parametrize("size, length", [(12, 5), (10, 5), (3, 5), (7, 7)])
def test_fifo_holds_exactly_the_newest_entries(size, length):
  mem = memory_lib.init(3, 2, size, 4)
  fifo = [collections.deque(maxlen=size) for _ in range(3)]
  for s in range(6):
    keys, values = segment(s, length=length)
    mem = memory_lib.append(mem, keys, values)
    for b in range(3):
      fifo[b].extend(np.asarray(keys[b]).transpose(1, 0, 2))     # [L, H, D] entries
  for b in range(3):
    count = int(mem.count[b])
    assert count == len(fifo[b]) == min(size, 6 * length)
    stored = np.asarray(mem.keys[b]).transpose(1, 0, 2)[:count]  # slot order
    # Oldest entry sits at the write pointer once the buffer has wrapped.
    order = (int(mem.pointer[b]) + np.arange(count)) % size if count == size else np.arange(count)
    np.testing.assert_array_equal(stored[order], np.stack(fifo[b]))
    np.testing.assert_array_equal(np.asarray(mem.values[b]).transpose(1, 0, 2)[order],
                                  np.stack(fifo[b]) * 10.0)


def test_reset_clears_exactly_the_rows_whose_document_starts():
  mem = memory_lib.init(4, 2, 16, 4)
  mem = memory_lib.append(mem, *segment(0, b=4))
  mem = memory_lib.reset(mem, jnp.array([False, True, False, True]))
  np.testing.assert_array_equal(mem.count, [5, 0, 5, 0])
  np.testing.assert_array_equal(mem.pointer, [5, 0, 5, 0])
  np.testing.assert_array_equal(mem.valid_mask().sum(1), [5, 0, 5, 0])


def test_new_document_cannot_see_previous_document_of_its_row():
  backend = knn.create("exact")
  mem = memory_lib.init(3, 2, 16, 4)
  old_keys, old_values = segment(0)
  mem = memory_lib.append(mem, old_keys, old_values)
  mem = memory_lib.reset(mem, jnp.array([False, False, True]))
  new_keys, new_values = segment(1, offset=3.0)
  mem = memory_lib.append(mem, new_keys, new_values)
  # Query with the old document's keys: row 2 may only return its new keys.
  idx, valid = backend.search(old_keys, mem, 5, None)
  got = np.asarray(knn.gather(mem.keys, idx))[2]                # [H, Q, k, D]
  assert valid[2].all()
  new_set = {tuple(np.round(v, 5)) for v in np.asarray(new_keys[2]).reshape(-1, 4)}
  assert all(tuple(np.round(v, 5)) in new_set for v in got.reshape(-1, 4))


def test_rows_never_see_each_others_memory():
  backend = knn.create("exact")
  mem = memory_lib.init(2, 2, 16, 4)
  keys, values = segment(0, b=2)
  mem = memory_lib.append(mem, keys, values)
  mem = memory_lib.reset(mem, jnp.array([False, True]))         # row 1 empty
  _, valid = backend.search(keys, mem, 4, None)
  assert valid[0].all() and not valid[1].any()


def test_unwritten_slots_are_never_returned_when_fewer_than_k_are_stored():
  backend = knn.create("exact")
  mem = memory_lib.init(3, 2, 32, 4)
  mem = memory_lib.append(mem, *segment(0, length=3))
  idx, valid = backend.search(segment(1)[0], mem, 8, None)
  assert idx.dtype == jnp.int32 and idx.shape == (3, 2, 5, 8)
  np.testing.assert_array_equal(valid.sum(-1), 3)
  assert (np.asarray(idx)[np.asarray(valid)] < 3).all()


def test_append_carries_no_gradient_into_memory():
  mem = memory_lib.init(1, 1, 8, 2)

  def stored(keys):
    return memory_lib.append(mem, keys, keys).keys.sum()

  grad = jax.grad(stored)(jnp.ones((1, 1, 3, 2)))
  np.testing.assert_array_equal(grad, 0.0)


def test_unknown_backend_names_the_choices():
  with pytest.raises(knn.UnknownBackendError, match="exact"):
    knn.create("faiss")


def test_backends_are_new_objects_with_checked_options():
  config = ModelConfig(memory_layers=(-1,), knn_backend="device",
                       knn_options=(("num_buckets", 64),))
  a, b = knn.make_backend(config), knn.make_backend(config)
  assert a is not b and a.num_buckets == 64      # each owner gets its own; no global cache
  assert knn.make_backend(config.replace(memory_layers=())) is None
  with pytest.raises(ConfigError, match="no option bukets"):
    knn.create("device", {"bukets": 64})
