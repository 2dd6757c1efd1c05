"""Fault injection: non-finite steps, the bad-input catalogue, memory-fit
arithmetic, messy documents, and a failing ScaNN host callback.

Training runs are `memorizing-train` subprocesses on the tiny config of
test_resume.py; input errors that end before any compilation are run
in-process through the same entry point (`cli.train_main`), which returns the
exit code the console script exits with.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memorizing import cli, knn
from memorizing.model import memory as M
from memorizing.model.config import ModelConfig
from memorizing.data import pipeline, registry, tokenizers
from memorizing.errors import TrainingError
from memorizing.model.config import TrainConfig
from memorizing.training.train import check_fits_in_device_memory
from tests.test_resume import (BIN, NUM_STEPS, TINY, env, restore_all, run, start,  # noqa: F401
                               steps_of, train_cmd)

# adamw + cosine warmup of 50 steps: step 0 has learning rate 0, step 1 moves every
# parameter by about 1e36 / 50, and from step 2 on the loss and gradient overflow.
HUGE_LR = "TrainConfig.learning_rate=1e36"


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


# --- numerical faults -----------------------------------------------------------------
def test_nonfinite_loss_stops_with_a_clear_message_and_no_poisoned_checkpoint(env, tmp_path):
  rc, out = run(env, tmp_path, HUGE_LR)
  assert rc == 1, out
  last = out.strip().splitlines()[-1]
  assert last.startswith("memorizing-train: error: non-finite loss or gradient"), out
  assert "stopped without writing a checkpoint" in last and "nan_policy='skip'" in last
  assert "Traceback" not in out
  saved = steps_of(tmp_path)
  assert saved == [2], saved                 # the steps after it went non-finite
  assert f"last good checkpoint (step 2)" in last
  ckpt = restore_all(tmp_path, 2)
  assert _finite(ckpt["state"]) and _finite(ckpt["carried"])


def test_nan_policy_skip_discards_the_step_and_its_memory_update(env, tmp_path):
  rc, out = run(env, tmp_path, HUGE_LR, "TrainConfig.nan_policy='skip'",
                "TrainConfig.keep_checkpoints=10", "TrainConfig.max_skipped_steps=100")
  assert rc == 0, out
  assert steps_of(tmp_path)[-1] == NUM_STEPS
  good, end = restore_all(tmp_path, 2), restore_all(tmp_path, NUM_STEPS)
  assert _finite(end["state"]) and _finite(end["carried"])
  # Every step after step 2 was skipped: parameters, optimizer state and the
  # carried memory (which would hold those steps' keys) are exactly step 2's.
  for item in ("carried",):
    for x, y in zip(jax.tree_util.tree_leaves(good[item]), jax.tree_util.tree_leaves(end[item])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for name in ("params", "opt_state"):
    for x, y in zip(jax.tree_util.tree_leaves(good["state"][name]),
                    jax.tree_util.tree_leaves(end["state"][name])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(end["state"]["step"]) == NUM_STEPS
  assert end["data"] != good["data"]        # the data still moved on
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    skipped = sum(r.get("nonfinite_steps", 0) for r in map(json.loads, f) if r["kind"] == "train")
  assert skipped == NUM_STEPS - 2


def test_nan_policy_skip_stops_once_too_many_steps_were_skipped(env, tmp_path):
  rc, out = run(env, tmp_path, HUGE_LR, "TrainConfig.nan_policy='skip'")
  assert rc == 1, out
  last = out.strip().splitlines()[-1]
  assert "steps were skipped as non-finite (TrainConfig.max_skipped_steps allows 5)" in last, out
  assert "The last good checkpoint (step " in last and "lower TrainConfig.learning_rate" in last
  assert "enable clipping" not in last                # clipping is on (base.gin)
  assert steps_of(tmp_path)[-1] < NUM_STEPS


# --- the bad-input catalogue ------------------------------------------------------------
def _train_in_process(capsys, workdir, *params, gin_files=("quickstart.gin",)):
  argv = ["--workdir", str(workdir)]
  for f in gin_files:
    argv += ["--gin_file", f]
  for p in list(TINY) + list(params):
    argv += ["--gin_param", p]
  capsys.readouterr()
  rc = cli.train_main(argv)
  err = capsys.readouterr().err
  return rc, err


def _one_clear_error(rc, err, *needles):
  assert rc == 1, err
  assert "Traceback" not in err, err
  lines = [l for l in err.strip().splitlines() if not l.startswith("WARNING:")]
  assert ": error: " in lines[0], err
  assert len(lines) <= 2, err          # the message, and at most the command that fixes it
  for needle in needles:
    assert needle in err, (needle, err)
  return err


@pytest.fixture
def data_env(env, monkeypatch):
  monkeypatch.setenv("MEMORIZING_DATA_DIR", env["MEMORIZING_DATA_DIR"])
  return env["MEMORIZING_DATA_DIR"]


def test_unknown_gin_binding(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "ModelConfig.no_such_field = 1"),
                   "gin configuration error", "no_such_field")


def test_unknown_gin_file(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, gin_files=("nope.gin",)),
                   "gin file 'nope.gin' not found")


def test_unknown_dataset(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "TrainConfig.dataset='wikitext'"),
                   "Unknown dataset 'wikitext'", "pg19")


def test_data_dir_not_prepared_names_the_prepare_command(data_env, capsys, tmp_path):
  empty = tmp_path / "empty_data"
  _one_clear_error(*_train_in_process(capsys, tmp_path / "w", "TrainConfig.dataset='text_files'",
                                      f"TrainConfig.data_dir='{empty}'"),
                   "is not prepared", f"memorizing-prepare text_files --data_dir {empty}")


def test_empty_split(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "TrainConfig.train_split='train[:0]'"),
                   "split 'train[:0]' of dataset 'synthetic' has no documents",
                   "memorizing-prepare synthetic")


def test_num_neighbors_larger_than_memory_names_the_field(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "ModelConfig.num_neighbors=128"),
                   "ModelConfig.num_neighbors=128 exceeds ModelConfig.memory_size=64")


def test_workdir_not_writable(data_env, capsys, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  _one_clear_error(*_train_in_process(capsys, blocker / "run"), "is not writable",
                   "choose another --workdir")


def test_sentencepiece_model_missing(data_env, capsys, tmp_path):
  missing = tmp_path / "tok" / "spm32k.model"
  _one_clear_error(*_train_in_process(capsys, tmp_path / "w", f"TrainConfig.tokenizer='{missing}'"),
                   f"SentencePiece model not found: {missing}", "memorizing-tokenizer")


def test_unclosed_parenthesis_in_a_binding_is_one_line(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "ModelConfig.memory_layers = (1,"),
                   "gin configuration error", "EOF in multi-line statement")


def test_a_value_of_the_wrong_type_names_the_field(data_env, capsys, tmp_path):
  _one_clear_error(*_train_in_process(capsys, tmp_path, "ModelConfig.memory_size = 'big'"),
                   "ModelConfig.memory_size must be an int, got 'big'")
  _one_clear_error(*_train_in_process(capsys, tmp_path, "TrainConfig.learning_rate = 'x'"),
                   "TrainConfig.learning_rate must be a float, got 'x'")


def test_eval_with_a_missing_checkpoint_step_or_no_documents_is_one_line(env, data_env, capsys,
                                                                         tmp_path):
  rc, out = run(env, tmp_path)
  assert rc == 0, out
  capsys.readouterr()
  for flags, needle in ((["--checkpoint_step", "999"], "no checkpoint at step 999"),
                        (["--max_documents", "0"], "--max_documents must be >= 1, got 0"),
                        (["--max_documents", "-1"], "--max_documents must be >= 1, got -1")):
    rc = cli.eval_main(["--workdir", str(tmp_path)] + flags)
    _one_clear_error(rc, capsys.readouterr().err, needle)


def test_num_steps_below_the_checkpoint_step_is_an_error_not_a_relabel(env, data_env, capsys,
                                                                      tmp_path):
  rc, out = run(env, tmp_path)
  assert rc == 0, out
  before = steps_of(tmp_path)
  _one_clear_error(*_train_in_process(capsys, tmp_path, f"TrainConfig.num_steps={NUM_STEPS - 2}"),
                   f"is at step {NUM_STEPS}, past TrainConfig.num_steps={NUM_STEPS - 2}")
  assert steps_of(tmp_path) == before


def test_eval_of_a_damaged_checkpoint_is_an_error_not_a_nan(env, data_env, capsys, tmp_path):
  rc, out = run(env, tmp_path)
  assert rc == 0, out
  d = os.path.join(tmp_path, "checkpoints", str(NUM_STEPS), "state", "ocdbt.process_0", "d")
  for name in os.listdir(d):               # flip bytes all through every data file
    path = os.path.join(d, name)
    with open(path, "rb") as f:
      raw = bytearray(f.read())
    for i in range(len(raw) // 4, len(raw), 97):
      raw[i] ^= 0x5A
    with open(path, "wb") as f:
      f.write(raw)
  capsys.readouterr()
  rc = cli.eval_main(["--workdir", str(tmp_path)])
  err = _one_clear_error(rc, capsys.readouterr().err, f"checkpoint {NUM_STEPS} in")
  assert "is corrupt" in err or "is unreadable" in err, err
  # As a command, to its exit: the reads orbax left in flight print nothing after the
  # error line (they printed "RuntimeError: Event loop is closed" tracebacks).
  p = subprocess.run([os.path.join(BIN, "memorizing-eval"), "--workdir", str(tmp_path)],
                     env=env, capture_output=True, text=True, timeout=300)
  _one_clear_error(p.returncode, p.stderr, f"checkpoint {NUM_STEPS} in")
  assert "See full TensorStore details" not in p.stderr, p.stderr


def test_orphaned_read_filter_drops_only_orbax_tasks_never_retrieved():
  from memorizing.training.checkpoint import _OrphanedReadTasks
  def record(msg):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)
  keep = _OrphanedReadTasks().filter
  assert not keep(record("Task exception was never retrieved\nfuture: <Task finished "
                         "coro=<async_deserialize() done, defined at /x/orbax/checkpoint/"
                         "_src/serialization/serialization.py:394>>"))
  assert keep(record("Task exception was never retrieved\nfuture: <Task coro=<mine()>>"))
  # A TensorStore read's future (seen in CI, 1 run of 3): its message names the
  # checkpoint's OCDBT database, not orbax.
  assert not keep(record("Future exception was never retrieved\nfuture: <Future finished "
                         "exception=ValueError('FAILED_PRECONDITION: Error reading \"params.a/0\" "
                         "in OCDBT database at local file \"/c/checkpoints/12/state/\": "
                         "ZSTD_decompressStream() failed')>"))
  assert keep(record("Future exception was never retrieved\nfuture: <Future finished "
                     "exception=ValueError('mine')>"))
  # The gathering future of orbax's reads (CI, the next run): its message quotes the
  # TensorStore spec; the read error is in the exception the record carries.
  assert not keep(record("_GatheringFuture exception was never retrieved\nfuture: "
                         "<_GatheringFuture finished exception=Exception(\"Encountered error "
                         "while reading array index. See full TensorStore details\")>"))
  try:
    try:
      raise ValueError('FAILED_PRECONDITION: Error reading "p/0" in OCDBT database')
    except ValueError as cause:
      raise Exception("Encountered error while reading array index") from cause
  except Exception:  # noqa: BLE001
    carried = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                "Future exception was never retrieved", None, sys.exc_info())
  assert not keep(carried)
  assert keep(logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                "Future exception was never retrieved", None,
                                (ValueError, ValueError("mine"), None)))
  assert keep(record("Unclosed client session"))


def test_a_second_training_in_a_running_workdir_is_one_line(env, data_env, capsys, tmp_path):
  first = start(env, tmp_path, "TrainConfig.num_steps=100000", "TrainConfig.checkpoint_every=0")
  try:
    for line in first.stdout:             # the first run holds the lock once it trains
      if line.startswith("step "):
        break
    err = _one_clear_error(*_train_in_process(capsys, tmp_path),
                           "another training is running in", f"pid {first.pid}")
    assert "choose another --workdir" in err
  finally:
    first.kill()
    first.wait()
  # The lock died with the killed process: a rerun starts.
  rc, out = run(env, tmp_path)
  assert rc == 0, out


def test_resume_with_another_memory_size_names_both_sizes(env, data_env, capsys, tmp_path):
  rc, out = run(env, tmp_path)
  assert rc == 0, out
  before = steps_of(tmp_path)
  err = _one_clear_error(*_train_in_process(capsys, tmp_path, "ModelConfig.memory_size=128",
                                            f"TrainConfig.num_steps={NUM_STEPS + 2}"),
                         "holds a kNN memory of 64 entries per row and head, but "
                         "ModelConfig.memory_size is 128")
  assert "unreadable" not in err
  assert steps_of(tmp_path) == before       # nothing moved aside


def test_memory_that_cannot_fit_is_caught_before_allocation(data_env, capsys, tmp_path):
  # 2 rows x 2 heads x 2**20 slots x 16 dims x 2 x 4 bytes = 0.5 GiB > 90% of a 0.25 GiB budget
  err = _one_clear_error(*_train_in_process(
      capsys, tmp_path, "ModelConfig.memory_size=1048576", "TrainConfig.device_memory_gib=0.25"),
      "kNN memories batch 2 x heads 2 x memory_size 1048576 x head_dim 16 x 2 (keys, values) "
      "x 4 bytes x 1 layer(s) = 0.5 GiB", "1 x 0.2 GiB (TrainConfig.device_memory_gib)")
  assert not os.path.exists(tmp_path / "checkpoints")


def test_memory_fit_arithmetic_of_the_paper_setting():
  # 256 documents x 8 heads x 65536 x 128 x 2 x 2 bytes (bf16) = 64 GiB of memory.
  paper = ModelConfig.paper(dtype="bfloat16")
  with pytest.raises(TrainingError) as e:
    check_fits_in_device_memory(paper, 256, TrainConfig(device_memory_gib=40))
  msg = str(e.value)
  assert "memory_size 65536 x head_dim 128 x 2 (keys, values) x 2 bytes x 1 layer(s) = 64.0 GiB" in msg
  assert "needs 70.0 GiB" in msg and "40.0 GiB (TrainConfig.device_memory_gib)" in msg
  check_fits_in_device_memory(paper, 256, TrainConfig(device_memory_gib=141))   # an H200 fits it


def test_memory_fit_uses_host_ram_on_cpu_without_a_stated_budget():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("CPU only")
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  size = 1 << max(10, int(np.ceil(np.log2(ram / (8 * 16 * 2 * 4)))) + 1)   # 2x the RAM
  big = ModelConfig(num_layers=2, d_model=32, num_heads=2, head_dim=16, memory_layers=(-1,),
                    memory_size=size, num_neighbors=4)
  with pytest.raises(TrainingError, match=r"\(host RAM\)"):
    check_fits_in_device_memory(big, 4)
  check_fits_in_device_memory(big.replace(memory_size=1024), 4)


def test_a_bad_input_exits_non_zero_from_the_console_script(env, tmp_path):
  p = subprocess.run(train_cmd(tmp_path, "TrainConfig.dataset='wikitext'"), env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1].startswith(
      "memorizing-train: error: Unknown dataset 'wikitext'"), p.stderr
  assert "Traceback" not in p.stderr


# --- messy documents and small memories: handled, not errors ----------------------------
MESSY = {"empty.txt": b"", "short.txt": b"tiny", "latin1.txt": b"caf\xe9 \xff\xfe\x80 " * 40,
         "normal_a.txt": b"def f(x):\n  return x\n" * 30, "normal_b.txt": b"import os\n" * 60}


def test_empty_short_and_non_utf8_documents_are_streamed(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name, raw in MESSY.items():
    (src / name).write_bytes(raw)
  data_dir = str(tmp_path / "data")
  registry.prepare("text_files", data_dir, source=str(src))
  docs = [registry.load_documents("text_files", s, data_dir)
          for s in ("train", "validation")]
  assert sum(len(d) for d in docs) == len(MESSY)
  all_docs = [d[i] for d in docs for i in range(len(d))]
  assert b"" in all_docs and MESSY["latin1.txt"] in all_docs   # stored unchanged
  seg = 16
  stream = pipeline.DocumentStream(all_docs, tokenizers.ByteTokenizer(), 2, seg)
  targets = 0
  for batch in stream:
    targets += int(batch["weights"].sum())
  # Every token but a document's first is a target once; the empty one is skipped.
  assert targets == sum(max(len(d) - 1, 0) for d in all_docs)


def test_training_on_messy_documents_with_memory_smaller_than_a_segment(env, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name, raw in MESSY.items():
    (src / name).write_bytes(raw)
  data_dir = str(tmp_path / "data")
  registry.prepare("text_files", data_dir, source=str(src))
  rc, out = run(env, tmp_path / "w", "TrainConfig.dataset='text_files'",
                f"TrainConfig.data_dir='{data_dir}'", "TrainConfig.num_steps=4",
                "ModelConfig.memory_size=8")   # < segment 16: the newest 8 keys are kept
  assert rc == 0, out
  carried = restore_all(tmp_path / "w", 4)["carried"]
  counts = [np.asarray(m["count"]) for m in carried["memory"].values()]
  assert counts and all((c == 8).all() for c in counts), counts


def test_memory_smaller_than_segment_keeps_the_newest_keys():
  mem = M.init(1, 1, 8, 2)
  keys = jnp.arange(32, dtype=jnp.float32).reshape(1, 1, 16, 2)
  out = M.append(mem, keys, keys)
  assert int(out.count[0]) == 8 and int(out.pointer[0]) == 0
  np.testing.assert_array_equal(np.asarray(out.keys[0, 0]), np.asarray(keys[0, 0, 8:]))


# --- ScaNN: a failing host callback --------------------------------------------------------
def test_scann_host_callback_failure_is_a_clear_error_not_a_hang(monkeypatch):
  scann_host = pytest.importorskip("memorizing.knn.scann_host")
  backend = scann_host.ScannBackend(num_threads=2)

  def broken(*args, **kwargs):
    raise OSError("simulated failure inside the searcher")
  monkeypatch.setattr(backend, "_search_one", broken)

  @jax.jit
  def step(mem, queries, new_keys, reset):
    mem = M.reset(mem, reset)
    ctx = knn.SearchContext(layer=3, train=True, reset=reset, new_keys=new_keys)
    return backend.search(queries, mem, 4, ctx)

  keys = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 16, 8))
  mem = M.append(M.init(1, 2, 64, 8), keys, keys)
  backend.sync(3, True, mem)
  result = {}

  def call():
    try:
      jax.block_until_ready(step(mem, keys, keys, jnp.array([False])))
      result["ok"] = True
    except Exception as e:  # noqa: BLE001
      result["error"] = e
  t = threading.Thread(target=call, daemon=True)
  t.start()
  t.join(timeout=120)
  assert not t.is_alive(), "the failing host call hung"
  assert "error" in result, result
  msg = str(result["error"])
  assert "ScannBackend host call failed (layer 3, train)" in msg, msg
  assert "OSError: simulated failure inside the searcher" in msg


# --- a full disk ------------------------------------------------------------------------
def test_a_full_disk_during_a_save_is_one_error_naming_the_intact_checkpoints(tmp_path):
  """orbax reports a full disk as tensorstore's ValueError (RESOURCE_EXHAUSTED quoting
  errno 28) or as OSError 28, from the save or from a writer thread; the run gets one
  CheckpointError that says so and names the complete checkpoints, and the writer
  threads' own logs of it are dropped. (Reproduced for real on a 1.2 MB tmpfs: the
  one line comes last; see docs/reliability.md for the thread output that remains.)"""
  import logging
  import types
  from memorizing.errors import CheckpointError
  from memorizing.training import checkpoint as ckpt
  manager = ckpt.CheckpointManager(str(tmp_path), save_carried_state=False)
  state = types.SimpleNamespace(step=np.int32(2), params={"w": np.ones(3, np.float32)},
                                opt_state={"m": np.zeros(3, np.float32)}, carried=None)
  manager.save(2, state, {"row": 0})
  manager.wait()
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 352 "
                    "bytes to file 21: No space left on device [os_error_code='28']")
  for raised in (full, OSError(28, "No space left on device")):
    def fail(*args, **kwargs):
      raise raised
    manager._manager.save = fail
    with pytest.raises(CheckpointError, match=r"disk full: could not write a checkpoint in "
                       r".*checkpoints \(No space left on device\); the complete checkpoints "
                       r"\(2\) are intact; free space"):
      manager.save(4, state, {"row": 0})
  assert not ckpt.is_disk_full(RuntimeError("another failure"))
  try:
    try:
      raise OSError(28, "No space left on device")
    except OSError as inner:
      raise RuntimeError("commit failed") from inner
  except RuntimeError as outer:
    assert ckpt.is_disk_full(outer)
  record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             "Future exception was never retrieved", None,
                             (OSError, OSError(28, "No space left on device"), None))
  assert not ckpt._DropDiskFullThreadErrors().filter(record)
  other = logging.LogRecord("absl", logging.ERROR, __file__, 1, "another failure", None, None)
  assert ckpt._DropDiskFullThreadErrors().filter(other)


def test_a_save_that_would_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
  """The next checkpoint needs about the latest one's size; with less free space the
  save is refused in one line, nothing is written, and the checkpoints stay."""
  import collections
  import types
  from memorizing.errors import CheckpointError
  from memorizing.training import checkpoint as ckpt
  manager = ckpt.CheckpointManager(str(tmp_path), save_carried_state=False)
  state = types.SimpleNamespace(step=np.int32(2), params={"w": np.ones(1000, np.float32)},
                                opt_state={"m": np.zeros(1000, np.float32)}, carried=None)
  manager.save(2, state, {"row": 0})
  manager.wait()
  size = ckpt._tree_bytes(os.path.join(manager.directory, "2"))
  assert size > 1000
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**9, 10**9, size // 2))
  with pytest.raises(CheckpointError, match=r"disk full: checkpoint 4 needs about .* MiB "
                     r"\(checkpoint 2 takes .*\) and .* has .* MiB free; the complete "
                     r"checkpoints \(2\) are intact"):
    manager.save(4, state, {"row": 0})
  assert manager.all_steps() == [2] and sorted(os.listdir(manager.directory)) == ["2"]
  monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**9, 0, 10 * size))
  manager._failed = False
  manager.save(4, state, {"row": 0})
  manager.wait()
  assert manager.all_steps() == [2, 4]
