"""The relative position bias, the per-parameter learning-rate table that learns it\nfaster, and that together they let the XL cache help."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import knn
from memorizing.training import train as T
from memorizing.model.config import ModelConfig
from memorizing.data import pipeline, registry, tokenizers
from memorizing.model.decoder import Decoder, init_carried_state, init_params
from memorizing.model.layers import RelativePositionBias, relative_position_bucket


def test_position_bias_is_the_table_entry_of_the_distance_bucket():
  cfg = ModelConfig(num_heads=2, head_dim=8, d_model=16, relative_position_buckets=8,
                    relative_position_max_distance=16)
  module = RelativePositionBias(cfg)
  table = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  bias = module.apply({"params": {"rel_embedding": table}}, 4, 12)     # [H, 4, 12]
  for q in range(4):
    for k in range(12):
      b = int(relative_position_bucket(jnp.asarray(8 + q - k), 8, 16))
      np.testing.assert_allclose(bias[:, q, k], table[b], rtol=1e-6)


def _one_step_change(table, optimizer="adamw"):
  """|update| of every parameter after one step of a tiny memory model."""
  cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                    mlp_dim=64, segment_length=8, memory_layers=(1,), memory_size=16,
                    num_neighbors=4)
  tc = T.TrainConfig(optimizer=optimizer, schedule="cosine", learning_rate=1e-3, warmup_steps=1,
                     num_steps=10, learning_rate_multipliers=table, grad_clip_norm=0.0)
  opt = T.make_optimizer(tc)
  params = init_params(cfg, jax.random.PRNGKey(0))
  state = T.TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state=opt.init(params),
                       carried=init_carried_state(cfg, 2))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((2, 8)),
           "start_of_document": jnp.ones((2,), bool)}
  for _ in range(2):   # the second step: the memory holds keys, the gate gets gradient
    new, _ = T.train_step(state, batch, jax.random.PRNGKey(2), model_config=cfg, optimizer=opt,
                          skip_nonfinite=False,
                          backend=knn.make_backend(cfg))
    batch = dict(batch, start_of_document=jnp.zeros((2,), bool))
    state, new = new, state
  return jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                state.params, new.params)


def test_learning_rate_table_freezes_a_parameter_with_multiplier_zero():
  change = _one_step_change((("relative_position_bias", 0.0), ("memory_gate", 0.0)))
  assert change["relative_position_bias"]["rel_embedding"] == 0.0
  assert change["block_1"]["attention"]["memory_gate"] == 0.0
  assert change["block_0"]["attention"]["query"]["kernel"] > 0.0


def test_learning_rate_table_scales_each_named_parameter_update():
  plain = _one_step_change(())
  scaled = _one_step_change((("block_0/attention/logit_scale", 10.0),
                             ("block_1/mlp/wi/kernel", 0.5)))
  ratio = lambda tree, path: tree[path[0]][path[1]][path[2]] if len(path) == 3 else \
      tree[path[0]][path[1]][path[2]][path[3]]
  for path, m in ((("block_0", "attention", "logit_scale"), 10.0),
                  (("block_1", "mlp", "wi", "kernel"), 0.5),
                  (("block_1", "mlp", "wo", "kernel"), 1.0)):
    np.testing.assert_allclose(ratio(scaled, path) / ratio(plain, path), m, rtol=1e-4)


def test_learning_rate_table_rejects_a_bad_entry():
  for table in ((("(", 1.0),), (("x", -1.0),), (("x",),)):
    with pytest.raises(ValueError, match="learning_rate_multipliers"):
      T.TrainConfig(learning_rate_multipliers=table)


def _train(cfg, steps=300, rows=8, tail=50, table=T.TrainConfig.learning_rate_multipliers):
  """Mean loss over the last `tail` steps, overall and on the first quarter of
  each segment, training on the same document-ordered batches."""
  opt = T.make_optimizer(T.TrainConfig(optimizer="adamw", schedule="cosine", learning_rate=3e-3,
                                       warmup_steps=20, num_steps=steps,
                                       learning_rate_multipliers=table))
  stream = pipeline.DocumentStream(registry.load_documents("python_stdlib", "train"),
                                   tokenizers.get_tokenizer("bytes"), rows, cfg.segment_length,
                                   shuffle_seed=0, repeat=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       carried=init_carried_state(cfg, rows))
  step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(1), model_config=cfg,
                                           optimizer=opt, skip_nonfinite=False,
                          backend=knn.make_backend(cfg)))

  @jax.jit
  def nll_by_position(params, carried, batch):
    logits, _ = Decoder(cfg, knn.make_backend(cfg)).apply({"params": params}, batch["tokens"], carried,
                                   batch["start_of_document"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return (-logp * batch["weights"]).sum(0), batch["weights"].sum(0)

  nll, weight = np.zeros(cfg.segment_length), np.zeros(cfg.segment_length)
  for i in range(steps):
    batch = next(stream)
    if i >= steps - tail:
      a, w = nll_by_position(state.params, state.carried, batch)
      nll, weight = nll + np.asarray(a), weight + np.asarray(w)
    state, _ = step(state, batch)
  per_position = nll / weight
  return per_position.mean(), per_position[: cfg.segment_length // 4].mean()


# Slow (21 s): a training-quality check; the table itself is tested by the fast tests above.
@pytest.mark.slow
def test_xl_cache_lowers_training_loss_with_the_default_position_bias():
  # With the T5 bias learned at the plain rate (no entry for it in
  # TrainConfig.learning_rate_multipliers) this fails: the XL model trains
  # worse, even on the first positions of a segment where only it has context.
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=256,
                    segment_length=32)
  no_xl, no_xl_start = _train(cfg.replace(use_xl_cache=False))
  xl, xl_start = _train(cfg.replace(use_xl_cache=True))
  assert xl_start < no_xl_start - 0.05, (xl_start, no_xl_start)
  assert xl < no_xl - 0.02, (xl, no_xl)
