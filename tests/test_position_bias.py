"""The relative position bias: its parameterisation, and that it lets the XL cache help."""
import jax
import jax.numpy as jnp
import numpy as np

from memorizing import train as T
from memorizing.config import ModelConfig
from memorizing.data import pipeline, registry, tokenizers
from memorizing.decoder import Decoder, init_carried_state, init_params
from memorizing.layers import RelativePositionBias, relative_position_bucket


def test_position_bias_is_multiplier_times_table_entry_of_the_distance_bucket():
  cfg = ModelConfig(num_heads=2, head_dim=8, d_model=16, relative_position_buckets=8,
                    relative_position_max_distance=16, relative_position_multiplier=7.0)
  module = RelativePositionBias(cfg)
  table = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  bias = module.apply({"params": {"rel_embedding": table}}, 4, 12)     # [H, 4, 12]
  for q in range(4):
    for k in range(12):
      b = int(relative_position_bucket(jnp.asarray(8 + q - k), 8, 16))
      np.testing.assert_allclose(bias[:, q, k], 7.0 * table[b], rtol=1e-6)


def test_position_bias_starts_at_the_same_scale_for_any_multiplier():
  stds = []
  for m in (1.0, 100.0):
    cfg = ModelConfig(num_heads=4, relative_position_buckets=32, relative_position_multiplier=m)
    params = RelativePositionBias(cfg).init(jax.random.PRNGKey(0), 8, 16)["params"]
    stds.append(float(jnp.std(params["rel_embedding"])) * m)
  np.testing.assert_allclose(stds[0], stds[1], rtol=1e-5)


def _train(cfg, steps=300, rows=8, tail=50):
  """Mean loss over the last `tail` steps, overall and on the first quarter of
  each segment, training on the same document-ordered batches."""
  opt = T.make_optimizer(T.TrainConfig(optimizer="adamw", schedule="cosine", learning_rate=3e-3,
                                       warmup_steps=20, num_steps=steps))
  stream = pipeline.DocumentStream(registry.load_documents("python_stdlib", "train"),
                                   tokenizers.get_tokenizer("bytes"), rows, cfg.segment_length,
                                   shuffle_seed=0, repeat=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                       carried=init_carried_state(cfg, rows))
  step = jax.jit(lambda s, b: T.train_step(s, b, jax.random.PRNGKey(1), model_config=cfg,
                                           optimizer=opt, skip_nonfinite=False))

  @jax.jit
  def nll_by_position(params, carried, batch):
    logits, _ = Decoder(cfg).apply({"params": params}, batch["tokens"], carried,
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


def test_xl_cache_lowers_training_loss_with_the_default_position_bias():
  # With a plain T5 bias (multiplier 1) this fails: the XL model trains worse,
  # even on the first positions of a segment where only it has context.
  cfg = ModelConfig(num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=256,
                    segment_length=32)
  no_xl, no_xl_start = _train(cfg.replace(use_xl_cache=False))
  xl, xl_start = _train(cfg.replace(use_xl_cache=True))
  assert xl_start < no_xl_start - 0.05, (xl_start, no_xl_start)
  assert xl < no_xl - 0.02, (xl, no_xl)
