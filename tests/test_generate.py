"""memorizing-generate and memorizing.tools.generate on a tiny trained memory model:
the log-probabilities of the generated tokens are the Decoder's, greedy is
deterministic, batches work, and bad input ends in one line."""
import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import cli, knn
from memorizing.model.decoder import Decoder, init_carried_state
from memorizing.tools import generate
from tests.tiny_run import train_tiny

jax.config.update("jax_default_matmul_precision", "highest")

L = 16
TINY = [
    "ModelConfig.num_layers = 2", "ModelConfig.d_model = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", f"ModelConfig.segment_length = {L}",
    "ModelConfig.memory_layers = (-1,)", "ModelConfig.memory_size = 40",
    "ModelConfig.num_neighbors = 4", "TrainConfig.dataset = 'synthetic'",
    "TrainConfig.batch_size = 2", "TrainConfig.eval_batch_size = 2", "TrainConfig.num_steps = 2",
    "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 0",
    "TrainConfig.final_eval = False", "TrainConfig.progress_bar = False", "TrainConfig.prefetch = 0",
    "TrainConfig.optimizer = 'adamw'", "TrainConfig.learning_rate = 0.01",
    "TrainConfig.warmup_steps = 1", "TrainConfig.shuffle_documents = False",
]
PROMPT = "def add(a, b):\n    return a + b\n\n" * 3      # 102 bytes: longer than the memory


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir, _ = train_tiny(tmp_path_factory, TINY)
  model, _, params, _ = generate.load_run(workdir)
  return model, params, workdir


def decoder_logprobs(config, params, ids):
  """log p of ids[t+1] given ids[:t+1], through whole segments (padded)."""
  total = ids.shape[1]
  segs = -(-total // L)
  padded = jnp.pad(jnp.asarray(ids), ((0, 0), (0, segs * L - total)))
  state = init_carried_state(config, ids.shape[0])
  backend = knn.make_backend(config)
  out = []
  for s in range(segs):
    logits, state = Decoder(config, backend).apply(
        {"params": params}, padded[:, s * L:(s + 1) * L], state, jnp.full((ids.shape[0],), s == 0))
    out.append(logits)
  logp = jax.nn.log_softmax(jnp.concatenate(out, axis=1)[:, :total - 1])
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0])


@pytest.mark.parametrize("prompt_len", [2 * L, 3 * L + 5])
def test_generated_logprobs_are_the_decoders(trained, prompt_len):
  config, params, _ = trained
  prompts = np.random.RandomState(0).randint(0, 256, (2, prompt_len))
  result = generate.generate(config, params, prompts, max_new_tokens=L + 3, temperature=0.8,
                             top_k=50, top_p=0.95, seed=1)
  for r in range(2):
    ids = np.concatenate([prompts[r], result.tokens[r]])[None]
    expected = decoder_logprobs(config, params, ids)[0, prompt_len - 1:]
    np.testing.assert_allclose(result.logprobs[r], expected, atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_rows_are_independent(trained):
  config, params, _ = trained
  a = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32)
  b = a[::-1].copy()
  gen = generate.Generator(config, params, knn.make_backend(config))
  both = gen.generate(np.stack([a, b]), max_new_tokens=12)
  alone = gen.generate(a[None], max_new_tokens=12)
  again = gen.generate(np.stack([a, b]), max_new_tokens=12)
  assert both.tokens == again.tokens and both.logprobs == again.logprobs
  assert both.tokens[0] == alone.tokens[0]
  # Greedy: each token is the most likely one.
  assert all(lp <= 0 for lp in both.logprobs[0])


def test_prompts_of_several_lengths_each_get_what_they_get_alone(trained):
  config, params, _ = trained
  a = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32)
  prompts = [a[:40], a[:L + 7], a[:40][::-1].copy()]
  gen = generate.Generator(config, params, knn.make_backend(config))
  seen = []
  mixed = gen.generate(prompts, max_new_tokens=6, on_token=lambda r, t: seen.append((r, t)))
  for r, p in enumerate(prompts):
    alone = gen.generate(p[None], max_new_tokens=6)
    assert mixed.tokens[r] == alone.tokens[0], r
    np.testing.assert_allclose(mixed.logprobs[r], alone.logprobs[0], atol=1e-6)
    assert [t for row, t in seen if row == r] == mixed.tokens[r]
  assert mixed.prompt_lengths == [40, L + 7, 40] and mixed.prompt_tokens == 40   # the longest


def test_stops_at_end_of_document(trained):
  config, params, _ = trained
  a = np.arange(20, dtype=np.int32)[None]
  first = generate.generate(config, params, a, max_new_tokens=5).tokens[0]
  stopped = generate.generate(config, params, a, max_new_tokens=5, eos_id=first[0])
  assert stopped.tokens[0] == first[:1]


def test_command_line_streams_and_writes_json(trained, tmp_path, capsys, monkeypatch):
  _, _, workdir = trained
  prompt = tmp_path / "prompt.txt"
  prompt.write_text(PROMPT)
  outs = []
  for i in range(2):
    out = tmp_path / f"out{i}.json"
    assert cli.generate_main(["--workdir", workdir, "--prompt_file", str(prompt),
                              "--max_new_tokens", "20", "--output", str(out)]) == 0
    outs.append(json.loads(out.read_text()))
  captured = capsys.readouterr()
  assert outs[0]["tokens"] == outs[1]["tokens"] and len(outs[0]["tokens"]) == 20
  assert len(outs[0]["logprobs"]) == 20
  assert outs[0]["text"] in captured.out
  assert "tokens/s" in captured.err
  # stdin, memory off, sampling
  monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
  assert cli.generate_main(["--workdir", workdir, "--max_new_tokens", "5", "--memory", "off",
                            "--temperature", "1.0", "--top_k", "10", "--top_p", "0.9"]) == 0


def _one_line_error(capsys, argv):
  assert cli.generate_main(argv) == 1
  err = capsys.readouterr().err.strip()
  # One line naming the cause (a missing tokenizer adds the command that trains one).
  assert "error:" in err.splitlines()[0] and "Traceback" not in err, err
  assert len(err.splitlines()) == 1 or "memorizing-tokenizer" in err.splitlines()[1], err
  return err


def test_bad_input_ends_in_one_line(trained, tmp_path, capsys):
  _, _, workdir = trained
  prompt = tmp_path / "prompt.txt"
  prompt.write_text("hello")
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a sentencepiece model")
  base = ["--workdir", workdir, "--prompt_file", str(prompt), "--max_new_tokens", "3"]
  (tmp_path / "norun").mkdir()
  assert "no checkpoints" in _one_line_error(
      capsys, ["--workdir", str(tmp_path / "norun"), "--prompt_file", str(prompt),
               "--max_new_tokens", "3"])
  assert "empty" in _one_line_error(
      capsys, ["--workdir", workdir, "--prompt_file", str(empty), "--max_new_tokens", "3"])
  assert "cannot read" in _one_line_error(
      capsys, ["--workdir", workdir, "--prompt_file", str(tmp_path / "nope.txt"),
               "--max_new_tokens", "3"])
  assert "not found" in _one_line_error(
      capsys, base + ["--gin_param", f"TrainConfig.tokenizer = '{tmp_path}/missing.model'"])
  assert "unreadable" in _one_line_error(
      capsys, base + ["--gin_param", f"TrainConfig.tokenizer = '{garbage}'"])
  assert "max_new_tokens" in _one_line_error(
      capsys, ["--workdir", workdir, "--prompt_file", str(prompt), "--max_new_tokens", "0"])
  for top_p in ("0", "1.5"):
    assert "top_p" in _one_line_error(capsys, base + ["--top_p", top_p])


def test_inspect_command_writes_report(trained, tmp_path, capsys):
  """memorizing-inspect on the same run (its planted-case test is tests/test_inspect.py)."""
  _, _, workdir = trained
  doc = tmp_path / "doc.txt"
  doc.write_text(PROMPT * 2)
  out = tmp_path / "report.html"
  assert cli.inspect_main(["--workdir", workdir, "--document", str(doc), "--top", "2",
                           "--output", str(out)]) == 0
  page = out.read_text()
  assert "<mark>" in page and "data:image/png;base64," in page
  assert (tmp_path / "report_distances.png").exists()
  assert (tmp_path / "report_loss_difference.png").exists()
  assert json.loads((tmp_path / "report.json").read_text())["tokens"] == len(PROMPT) * 2
  assert "target" in capsys.readouterr().out
  assert cli.inspect_main(["--workdir", workdir, "--output", str(out)]) == 1
