"""Exact resume after preemption (SIGKILL, SIGTERM) and after checkpoint faults.

Each run is a real `memorizing-train` subprocess on a tiny config (2 layers,
d_model 32, segment 16, 12 steps, checkpoints every 2) over the embedded
`synthetic` corpus, prepared once in a temporary directory. The processes
share a JAX compilation cache, so only the first one compiles.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

BIN = os.path.dirname(sys.executable)
NUM_STEPS = 12
TINY = [
    "ModelConfig.num_layers=2", "ModelConfig.d_model=32", "ModelConfig.num_heads=2",
    "ModelConfig.head_dim=16", "ModelConfig.mlp_dim=64", "ModelConfig.segment_length=16",
    "ModelConfig.memory_size=64", "ModelConfig.num_neighbors=4", "TrainConfig.batch_size=2",
    f"TrainConfig.num_steps={NUM_STEPS}", "TrainConfig.checkpoint_every=2",
    "TrainConfig.final_eval=False", "TrainConfig.progress_bar=False", "TrainConfig.log_every=1",
    "TrainConfig.dataset='synthetic'", "TrainConfig.prefetch=2",
]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
  """Environment of the subprocesses: a prepared data dir and a shared compile cache."""
  root = tmp_path_factory.mktemp("faults")
  data_dir = str(root / "data")
  from memorizing.data import registry
  registry.prepare("synthetic", data_dir)
  e = dict(os.environ, MEMORIZING_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
  e.pop("XLA_FLAGS", None)
  return e


def train_cmd(workdir, *params, tiny=True):
  cmd = [os.path.join(BIN, "memorizing-train"), "--gin_file", "quickstart.gin",
         "--workdir", str(workdir)]
  for p in (TINY if tiny else []) + list(params):
    cmd += ["--gin_param", p]
  return cmd


def start(env, workdir, *params, **kw):
  return subprocess.Popen(train_cmd(workdir, *params, **kw), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **_cwd())


def _cwd():
  return {"cwd": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def run(env, workdir, *params, timeout=300, **kw):
  """Runs to the end; returns (exit code, combined output)."""
  p = subprocess.run(train_cmd(workdir, *params, **kw), env=env, capture_output=True,
                     text=True, timeout=timeout, **_cwd())
  return p.returncode, p.stdout + p.stderr


def signal_after_step(proc, step, sig, timeout=300):
  """Sends `sig` once the process has printed `step N` for N >= step; returns its output."""
  lines, sent = [], threading.Event()
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    m = re.match(r"step (\d+):", line)
    if m and int(m.group(1)) >= step and not sent.is_set():
      proc.send_signal(sig)
      sent.set()
    assert time.time() < deadline, "".join(lines)
  proc.wait(timeout=max(1, deadline - time.time()))
  assert sent.is_set(), "the run ended before the signal:\n" + "".join(lines)
  return "".join(lines)


def steps_of(workdir):
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def restore_all(workdir, step):
  """Everything a checkpoint holds, as numpy: state, carried, data position, meta."""
  mgr = ocp.CheckpointManager(os.path.join(str(workdir), "checkpoints"))
  out = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), carried=ocp.args.StandardRestore(),
      data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return {k: out[k] for k in ("state", "carried", "data", "meta")}


def assert_same_checkpoint(workdir_a, workdir_b, step):
  a, b = restore_all(workdir_a, step), restore_all(workdir_b, step)
  assert a["data"] == b["data"]
  for item in ("state", "carried"):
    la, ta = jax.tree_util.tree_flatten_with_path(a[item])
    lb, tb = jax.tree_util.tree_flatten_with_path(b[item])
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=f"{item}{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="session")
def reference(env, tmp_path_factory):
  """The uninterrupted run (started in the background; `.wait()` returns its workdir)."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = start(env, workdir)

  class Ref:
    def wait(self):
      out = proc.communicate(timeout=300)[0]
      assert proc.returncode == 0, out
      assert steps_of(workdir)[-1] == NUM_STEPS
      return workdir
  return Ref()


def test_sigkill_at_random_step_then_rerun_resumes_exactly(env, reference, tmp_path):
  kill_after = random.Random().randint(5, NUM_STEPS - 2)
  workdir = tmp_path / "run"
  out = signal_after_step(start(env, workdir), kill_after, signal.SIGKILL)
  saved = steps_of(workdir)
  assert saved and saved[-1] <= kill_after + 1, (kill_after, saved, out)
  rc, out2 = run(env, workdir)        # the same command again
  assert rc == 0, out2
  m = re.search(r"resumed from checkpoint (\d+) with carried state", out2)
  assert m, out2
  resumed = int(m.group(1))
  assert 2 <= resumed <= kill_after and resumed == saved[-1], (kill_after, saved, out2)
  assert f"training steps {resumed}..{NUM_STEPS}" in out2
  # Parameters, optimizer state, carried memory and data position all equal
  # those of the run that was never interrupted.
  assert_same_checkpoint(reference.wait(), workdir, NUM_STEPS)


def test_sigterm_saves_a_checkpoint_then_exits_and_resume_is_exact(env, reference, tmp_path):
  workdir = tmp_path / "run"
  proc = start(env, workdir)
  out = signal_after_step(proc, 5, signal.SIGTERM)
  assert proc.returncode == 143, out    # 128 + SIGTERM
  m = re.search(r"SIGTERM received: finished step (\d+), saved checkpoint (\d+)", out)
  assert m, out
  stopped = int(m.group(1))
  assert 5 <= stopped < NUM_STEPS and steps_of(workdir)[-1] == stopped, out
  assert "Traceback" not in out
  rc, out2 = run(env, workdir)
  assert rc == 0 and f"resumed from checkpoint {stopped} with carried state" in out2, out2
  assert_same_checkpoint(reference.wait(), workdir, NUM_STEPS)


def test_sigterm_is_honoured_within_a_few_steps_not_at_the_next_log_step(env, tmp_path):
  """SIGTERM sent just after the checkpoint of step 10 stops the run within a
  few steps, before the next checkpoint (step 20) or log step (1000): the
  loop keeps at most MAX_STEPS_IN_FLIGHT steps queued on the device. The
  quickstart's model, whose steps take longer than the loop needs to dispatch
  them (with the tiny model the loop is the slower one, and nothing queues)."""
  workdir = tmp_path / "run"
  proc = start(env, workdir, "TrainConfig.dataset='synthetic'", "TrainConfig.num_steps=1000",
               "TrainConfig.log_every=1000", "TrainConfig.checkpoint_every=10",
               "TrainConfig.final_eval=False", "TrainConfig.progress_bar=False", tiny=False)
  first = os.path.join(workdir, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  m = re.search(r"SIGTERM received: finished step (\d+)", out)
  assert m, out
  assert 10 <= int(m.group(1)) <= 16, out     # 20 without the bound; slack for a loaded machine


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "corrupt_json"])
def test_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(
    env, reference, tmp_path, damage):
  ref = reference.wait()
  workdir = tmp_path / "run"
  shutil.copytree(ref, workdir)
  latest = os.path.join(workdir, "checkpoints", str(NUM_STEPS))
  if damage == "corrupt_json":
    with open(os.path.join(latest, "data", "metadata"), "w") as f:
      f.write('{"positions": [{"doc_ind')
  else:
    d = os.path.join(latest, "state", "ocdbt.process_0", "d")
    for name in os.listdir(d):          # every data file: whichever holds the arrays
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        raw = bytearray(f.read())
      if damage == "truncate":
        raw = raw[:len(raw) // 2]
      else:
        for i in range(len(raw) // 3, min(len(raw), len(raw) // 3 + 16)):
          raw[i] ^= 0x5A
      with open(path, "wb") as f:
        f.write(bytes(raw))
  rc, out = run(env, workdir)         # resumes from the previous one, trains the last steps
  assert rc == 0, out
  assert re.search(rf"checkpoint {NUM_STEPS} in \S+ is unreadable", out), out
  assert f"resumed from checkpoint {NUM_STEPS - 2} with carried state" in out, out
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", str(NUM_STEPS)))
  assert_same_checkpoint(ref, workdir, NUM_STEPS)


def test_checkpoint_of_another_model_shape_names_the_parameter(env, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference.wait(), workdir)
  before = {s: sorted(os.listdir(os.path.join(workdir, "checkpoints", str(s))))
            for s in steps_of(workdir)}
  rc, out = run(env, workdir, "ModelConfig.mlp_dim=96")
  assert rc == 1, out
  last = out.strip().splitlines()[-1]
  assert last.startswith("memorizing-train: error: parameter ") and "mlp" in last, out
  assert "(64,)" in last and "(96,)" in last, out
  assert "Traceback" not in out
  # Nothing was moved or deleted.
  assert {s: sorted(os.listdir(os.path.join(workdir, "checkpoints", str(s))))
          for s in steps_of(workdir)} == before
