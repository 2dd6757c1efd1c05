"""memorizing-inspect: a token repeated far beyond the XL window is reported as a
neighbour at its planted distance; the HTML report is self-contained."""
import jax
import numpy as np

from memorizing.data import tokenizers
from memorizing.model.config import ModelConfig
from memorizing.model.decoder import init_params
from memorizing.tools import inspect_memory

L = 8
CONFIG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                     mlp_dim=64, segment_length=L, relative_position_max_distance=16,
                     relative_position_buckets=8, memory_layers=(0,), memory_size=256,
                     num_neighbors=4, knn_backend="exact")
FIRST, SECOND, PLANTED = 20, 150, 63


def planted():
  """Layer 0 is the memory layer; its input is the token alone (no position
  embedding), and with query = key weights a token's best key is its own."""
  params = jax.tree_util.tree_map(np.asarray, init_params(CONFIG, jax.random.PRNGKey(0)))
  attn = params["block_0"]["attention"]
  attn["query"]["kernel"] = attn["key"]["kernel"].copy()
  ids = np.random.RandomState(0).randint(0, PLANTED, 200).astype(np.int32)
  ids[[FIRST, SECOND]] = PLANTED              # the only two occurrences
  return params, ids


def test_planted_repeat_is_found_at_its_distance():
  params, ids = planted()
  # Target SECOND + 1 is predicted by the query at SECOND, the repeated token.
  report = inspect_memory.inspect_document(CONFIG, params, ids, positions=[SECOND + 1])
  heads = report["targets"][0]["layers"]["layer_0"]
  assert len(heads) == CONFIG.num_heads
  for hd in heads:
    best = hd["neighbours"][0]
    assert best["distance"] == SECOND - FIRST and best["position"] == FIRST
    assert best["similarity"] > 0.999
    assert 0 < hd["mass"] <= 1
  assert SECOND - FIRST > 2 * L                 # beyond the XL window
  assert sum(report["distance_histogram"]["counts"]) > 0


def test_top_targets_and_self_contained_html():
  params, ids = planted()
  report = inspect_memory.inspect_document(CONFIG, params, ids, top=3)
  assert len(report["targets"]) == 3
  diffs = [t["loss_difference"] for t in report["targets"]]
  assert diffs == sorted(diffs) and diffs[0] == min(report["loss_difference"])
  tok = tokenizers.ByteTokenizer()
  images = inspect_memory.plots(report)
  page = inspect_memory.render_html(report, tok, ids, images, context=20)
  assert "<mark>" in page and "data:image/png;base64," in page
  assert "http://" not in page and "https://" not in page
  assert len(inspect_memory.summary_lines(report)) == 4


def test_distance_histogram_edges_increase_for_every_segment_length():
  # The small config's 512-token segments once gave edges 0, 512, 1024, 512, ...
  # and numpy refused the histogram on the GPU.
  for length in (8, 128, 512, 1024, 4096, 20000):
    edges = inspect_memory.distance_edges(length)
    assert np.all(np.diff(edges) > 0), (length, edges)
    assert {length, 2 * length} <= set(edges.tolist())
