"""The trainer end to end through the CLI: one run, resume, --init_from, data
parallel over 4 fake CPU devices, and two processes joined by jax.distributed."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from memorizing import cli
from memorizing.training.checkpoint import load_params

TINY = [
    "ModelConfig.num_layers = 2", "ModelConfig.d_model = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "ModelConfig.segment_length = 32",
    "ModelConfig.memory_layers = (-1,)", "ModelConfig.memory_size = 128",
    "ModelConfig.num_neighbors = 8", "TrainConfig.dataset = 'synthetic'",
    "TrainConfig.batch_size = 4", "TrainConfig.eval_batch_size = 4", "TrainConfig.num_steps = 3",
    "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 0", "TrainConfig.final_eval = False",
    "TrainConfig.progress_bar = False", "TrainConfig.prefetch = 0", "TrainConfig.optimizer = 'adamw'",
    "TrainConfig.learning_rate = 0.01", "TrainConfig.warmup_steps = 1",
    "TrainConfig.shuffle_documents = False",
]


def flags(workdir, data_dir, *extra):
  out = ["--gin_file", "base.gin", "--workdir", str(workdir),
         "--gin_param", f"TrainConfig.data_dir = '{data_dir}'"]
  for p in TINY + list(extra):
    out += ["--gin_param", p]
  return out


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_one_run_writes_metrics_config_checkpoint_and_evaluates(tmp_path, data_dir, capsys):
  rc = cli.train_main(flags(tmp_path, data_dir, "TrainConfig.final_eval = True",
                            "TrainConfig.eval_max_documents = 2",
                            "TrainConfig.eval_max_document_tokens = 256"))
  assert rc == 0
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train)
  assert 0 < train[-1]["memory_fill"] <= 1
  kinds = {r["kind"] for r in records}
  assert {"eval_with_memory", "eval_memory_disabled"} <= kinds
  assert "ModelConfig.memory_size = 128" in (tmp_path / "operative_config.gin").read_text()
  assert os.listdir(tmp_path / "tensorboard")
  _, step = load_params(str(tmp_path))
  assert step == 3
  out = capsys.readouterr().out
  assert "with_memory" in out and "memory_disabled" in out


def test_twenty_steps_through_the_cli_lower_the_loss(tmp_path, data_dir):
  assert cli.train_main(flags(tmp_path, data_dir, "TrainConfig.num_steps = 20")) == 0
  losses = train_losses(tmp_path)
  assert len(losses) == 20
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


def test_rerun_resumes_from_the_workdir_checkpoint(tmp_path, data_dir, capsys):
  assert cli.train_main(flags(tmp_path, data_dir)) == 0
  assert cli.train_main(flags(tmp_path, data_dir, "TrainConfig.num_steps = 5")) == 0
  out = capsys.readouterr().out
  assert "resumed from checkpoint 3 with carried state" in out
  assert len(train_losses(tmp_path)) == 5


def test_init_from_a_model_without_memory_adds_only_the_gate_at_its_configured_init(
    tmp_path, data_dir, capsys):
  plain = tmp_path / "plain"
  assert cli.train_main(flags(plain, data_dir, "ModelConfig.memory_layers = ()")) == 0
  # A fresh memory model initialised from the plain one (lr 0: parameters stay as loaded).
  fresh = tmp_path / "fresh"
  assert cli.train_main(flags(fresh, data_dir, "TrainConfig.num_steps = 1",
                              "TrainConfig.learning_rate = 0.0", "TrainConfig.grad_clip_norm = 0.0",
                              "ModelConfig.memory_gate_init = -3.0")
                        + ["--init_from", str(plain)]) == 0
  assert "new parameters: block_1/attention/memory_gate" in capsys.readouterr().out
  src, _ = load_params(str(plain))
  dst, _ = load_params(str(fresh))
  np.testing.assert_array_equal(src["block_0"]["mlp"]["wi"]["kernel"],
                                dst["block_0"]["mlp"]["wi"]["kernel"])
  np.testing.assert_array_equal(dst["block_1"]["attention"]["memory_gate"], -3.0)


def _run(args, env_extra=None, timeout=300):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "memorizing.cli", "train"] + args, env=env,
                        capture_output=True, text=True, timeout=timeout)


# Slow (27 s): the 4-device ScaNN test below compares 4-device losses in the default suite.
@pytest.mark.slow
def test_four_devices_give_the_same_losses_as_one(tmp_path, data_dir):
  one, four = tmp_path / "one", tmp_path / "four"
  r1 = _run(flags(one, data_dir), {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  r4 = _run(flags(four, data_dir), {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r1.returncode == 0, r1.stderr[-2000:]
  assert r4.returncode == 0, r4.stderr[-2000:]
  assert "on 4 cpu device(s)" in r4.stdout
  np.testing.assert_allclose(train_losses(four), train_losses(one), rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("scann") is None, reason="scann not installed")
def test_four_devices_with_per_device_scann_searches_give_the_exact_losses(tmp_path, data_dir):
  """The trainer declares its mesh, so ScaNN is called once per device with its
  rows (knn.per_device_rows); brute-force ScaNN equals exact search."""
  one, four = tmp_path / "one", tmp_path / "four"
  scann = ("ModelConfig.knn_backend = 'scann'",
           "ModelConfig.knn_options = (('num_threads', 2), ('tree_min_size', 1048576))")
  r1 = _run(flags(one, data_dir), {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  r4 = _run(flags(four, data_dir, *scann),
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r1.returncode == 0, r1.stderr[-2000:]
  assert r4.returncode == 0, r4.stderr[-2000:]
  np.testing.assert_allclose(train_losses(four), train_losses(one), rtol=1e-4)


def test_two_processes_joined_by_jax_distributed_train_together(tmp_path, data_dir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    args = flags(tmp_path / "dist", data_dir, "TrainConfig.multihost = True",
                 f"TrainConfig.coordinator_address = '127.0.0.1:{port}'",
                 "TrainConfig.num_processes = 2", f"TrainConfig.process_id = {pid}")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs.append(subprocess.Popen([sys.executable, "-m", "memorizing.cli", "train"] + args,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert "on 2 cpu device(s)" in outs[0][0]
  losses = train_losses(tmp_path / "dist")          # written by process 0 only
  assert len(losses) == 3 and all(np.isfinite(losses))
  _, step = load_params(str(tmp_path / "dist"))
  assert step == 3
