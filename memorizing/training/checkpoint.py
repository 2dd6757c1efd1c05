"""Orbax checkpoints: params, optimizer state, step, data position, carried state.

One orbax step holds the items
  state    {step, params, opt_state}
  carried  the model's carried state (XL caches, kNN memories), unless turned off
  data     the data position of every process (JSON)
  meta     {"carried": bool}
so nothing else is needed to resume exactly.

Resume order (the one place it is written down):
  1. the latest readable checkpoint in the work directory;
  2. else `--init_from` (a work directory or checkpoint directory): parameters
     only, matched by name; parameters the source lacks (the memory gate when
     adding memory to a model trained without it) keep their initial values;
  3. else from scratch.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import traceback
import zlib
from typing import Any, Callable, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from memorizing.errors import CheckpointError
from memorizing.model.decoder import init_params


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's arrays differ from the checksum written when it was saved."""


def checksum(tree) -> str:
  """CRC-32 of every leaf's bytes, shape and dtype, in tree order (single process)."""
  crc = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.ascontiguousarray(jax.device_get(leaf))
    crc = zlib.crc32(f"{a.shape}{a.dtype}".encode(), crc)
    crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
  return f"{crc:08x}"


def check_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; returns its absolute path."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"work directory {workdir} is not writable ({e.strerror}); "
                          "choose another --workdir") from e
  return workdir


class _DropMissingMetadataNotice(logging.Filter):
  """orbax logs "Metadata file does not exist" (absl WARNING) for every checkpoint
  read; our checkpoints do not write that optional file, so the notice is noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Metadata file does not exist" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropMissingMetadataNotice())

DISK_FULL_MARKS = ("No space left on device", "[Errno 28]", "os_error_code='28'",
                   "Disk quota exceeded", "[Errno 122]")


def is_disk_full(error: BaseException) -> bool:
  """True when `error` or an exception it was raised from says the disk is full
  (orbax raises OSError errno 28, or tensorstore's ValueError RESOURCE_EXHAUSTED
  that quotes it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, "errno", None) in (28, 122) or any(m in str(error) for m in DISK_FULL_MARKS):
      return True
    error = error.__cause__ or error.__context__
  return False


class _DropDiskFullThreadErrors(logging.Filter):
  """orbax's writer threads and their asyncio futures each log a traceback when
  the disk is full; the run reports it once, as a CheckpointError
  (CheckpointManager._disk_full)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and is_disk_full(error):
      return False
    return not any(m in record.getMessage() for m in DISK_FULL_MARKS)


for _name in ("absl", "asyncio"):
  logging.getLogger(_name).addFilter(_DropDiskFullThreadErrors())

LOCK_FILE = ".memorizing-train.lock"


class WorkdirLock:
  """An exclusive OS lock (flock) on the work directory for one training run.

  The kernel releases it when the process ends, however it ends (SIGKILL
  included), so a rerun after a crash resumes; a second training started in
  the same directory while the first runs gets a one-line error. Only process
  0 of a multi-host run takes it (the processes of one run share a workdir).
  """

  def __init__(self, workdir: str):
    self._file = None
    if jax.process_index() != 0:
      return
    path = os.path.join(workdir, LOCK_FILE)
    self._file = open(path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      self._file = None
      raise CheckpointError(f"another training is running in {workdir} ({holder}); wait for "
                            "it to end or choose another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()}")
    self._file.flush()

  def release(self) -> None:
    if self._file is not None:
      self._file.close()   # closing the descriptor drops the lock
      self._file = None


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _gather_positions(position: dict) -> list:
  """Data position of every process, in process order."""
  if jax.process_count() == 1:
    return [position]
  raw = json.dumps(position).encode()
  buf = np.zeros((1 << 16,), np.uint8)
  if len(raw) > buf.size:
    raise CheckpointError(f"data position of {len(raw)} bytes is too large to gather")
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  everything = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(row).rstrip(b"\0")) for row in everything]


def _tree_bytes(path: str) -> int:
  """Bytes of the files under `path`."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


class CheckpointManager:
  """Keeps the `keep` newest checkpoints of `workdir/checkpoints`; saves are atomic."""

  def __init__(self, workdir: str, keep: int = 3, save_carried_state: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    self.save_carried_state = save_carried_state
    self._failed = False
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_position: dict) -> None:
    self._check_space(step)
    core = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    meta = {"carried": self.save_carried_state}
    if jax.process_count() == 1:   # read back and compared on restore
      # The parameters are fetched to the host once for both checksums; the second
      # one, of the parameters alone, is for readers that restore only them
      # (memorizing-eval, --init_from).
      host_params = jax.device_get(state.params)
      meta["checksum"] = checksum([dict(core, params=host_params),
                                   state.carried if self.save_carried_state else None])
      meta["params_checksum"] = checksum(host_params)
    items = {
        "state": ocp.args.StandardSave(core),
        "data": ocp.args.JsonSave({"positions": _gather_positions(data_position)}),
        "meta": ocp.args.JsonSave(meta),
    }
    if self.save_carried_state:
      items["carried"] = ocp.args.StandardSave(state.carried)
    # force: orbax would otherwise skip a save while the previous one is still
    # being written, silently losing e.g. the checkpoint taken on SIGTERM.
    saved = self._orbax(self._manager.save, step, args=ocp.args.Composite(**items), force=True)
    if not saved:
      raise CheckpointError(f"orbax declined to save checkpoint {step} in {self.directory}")

  def _check_space(self, step: int) -> None:
    """Refuses a save that would not fit: it needs about the size of the latest
    complete checkpoint (plus 10%), and the disk must have that free. A disk
    that fills during the write is caught from orbax's error instead. The
    previous save is waited for first (orbax would wait for it anyway), so that
    its size counts and its own failure is reported here."""
    self.wait()
    latest = self._manager.latest_step()
    if latest is None or jax.process_index() != 0:
      return
    need = int(_tree_bytes(os.path.join(self.directory, str(latest))) * 1.1)
    free = shutil.disk_usage(self.directory).free
    if free < need:
      self._failed = True
      raise CheckpointError(
          f"disk full: checkpoint {step} needs about {need / 2**20:.1f} MiB (checkpoint "
          f"{latest} takes {need / 1.1 / 2**20:.1f}) and {self.directory} has "
          f"{free / 2**20:.1f} MiB free; the complete checkpoints "
          f"({', '.join(str(s) for s in self.all_steps())}) are intact; free space or choose "
          "another --workdir, then run the same command again")

  def _disk_full(self) -> CheckpointError:
    """The one-line error of a save that found the disk full (the failed save's
    temporary directory is ignored on restore, like any interrupted save)."""
    self._failed = True
    kept = ", ".join(str(s) for s in self.all_steps()) or "none"
    return CheckpointError(f"disk full: could not write a checkpoint in {self.directory} (No space "
                           f"left on device); the complete checkpoints ({kept}) are intact; free "
                           "space or choose another --workdir, then run the same command again")

  def restore(self, step: int, abstract_state, shardings) -> Tuple[Any, dict, bool]:
    """-> (state, this process's data position, whether carried state was restored)."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    has_carried = bool(meta["carried"])
    items = {
        "state": ocp.args.StandardRestore(_abstract(
            {"step": abstract_state.step, "params": abstract_state.params,
             "opt_state": abstract_state.opt_state},
            {"step": shardings.step, "params": shardings.params,
             "opt_state": shardings.opt_state})),
        "data": ocp.args.JsonRestore(),
    }
    if has_carried:
      items["carried"] = ocp.args.StandardRestore(
          _abstract(abstract_state.carried, shardings.carried))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    core = restored["state"]
    positions = restored["data"]["positions"]
    if len(positions) != jax.process_count():
      raise CheckpointError(f"checkpoint {step} holds data positions of {len(positions)} "
                            f"processes; this run has {jax.process_count()}")
    state = abstract_state.replace(step=core["step"], params=core["params"],
                                   opt_state=core["opt_state"])
    if has_carried:
      state = state.replace(carried=restored["carried"])
    if "checksum" in meta and jax.process_count() == 1:
      got = checksum([core, restored["carried"] if has_carried else None])
      if got != meta["checksum"]:
        raise CorruptCheckpointError(
            f"its arrays have checksum {got}, but {meta['checksum']} was written at save time")
    return state, positions[jax.process_index()], has_carried

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the way (kept, never deleted); returns where."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable", str(step))
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if jax.process_index() == 0:
      shutil.move(src, dst)
    self._manager.reload()
    return dst

  def _orbax(self, call, *args, **kwargs):
    """call(*args, **kwargs), with a full disk (which orbax reports as several
    exception types, from the call or a writer thread) as one CheckpointError."""
    try:
      return call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
      if is_disk_full(e):
        raise self._disk_full() from None
      raise

  def wait(self) -> None:
    self._orbax(self._manager.wait_until_finished)

  def close(self) -> None:
    """Finishes pending saves and stops orbax's background threads. After a
    disk-full error (already raised) it does nothing: waiting for the failed
    writers would only raise (and print) the same error again."""
    if not self._failed:
      self._orbax(self._manager.close)


def _check_shapes(target_params, source_params, source: str) -> None:
  flat_t = traverse_util.flatten_dict(target_params, sep="/")
  flat_s = traverse_util.flatten_dict(source_params, sep="/")
  for name, value in flat_s.items():
    shape = tuple(getattr(value, "shape", None) or np.shape(value))
    if name in flat_t and tuple(flat_t[name].shape) != shape:
      raise CheckpointError(
          f"parameter {name} has shape {shape} in {source} but "
          f"{tuple(flat_t[name].shape)} in this model; the model configurations differ")


def load_params(path: str, step: Optional[int] = None):
  """Parameters (as numpy) of the checkpoint at `path` (a workdir or checkpoints dir)."""
  path = os.path.abspath(os.path.expanduser(path))
  directory = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoints in {path} (looked for {directory})")
  with ocp.CheckpointManager(directory) as manager:
    return _load_params(manager, directory, step)


def _orbax_read_error(e: Exception) -> str:
  """One line for a failed array read: the exception's first line without the
  TensorStore spec that orbax appends to it."""
  text = str(e).splitlines()[0] if str(e) else ""
  text = text.split(" See full TensorStore details")[0].rstrip(". ")
  return f"{type(e).__name__}: {text[:200]}"


_QUIET_INSTALLED = False


class _OrphanedReadTasks(logging.Filter):
  """Drops asyncio's "<Task|Future|_GatheringFuture> exception was never retrieved"
  when what it holds is a checkpoint read: orbax's read tasks, or TensorStore
  futures whose error names the checkpoint's OCDBT store (in the message, or in
  the exception and its causes that the record carries)."""

  MARKS = ("orbax", "ocdbt", "tensorstore")          # matched in lower case

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message.split("\n", 1)[0]:
      return True
    text = message
    if record.exc_info and record.exc_info[1] is not None:
      text += "".join(traceback.format_exception(*record.exc_info))
    text = text.lower()
    return not any(mark in text for mark in self.MARKS)


def quiet_orphaned_reads() -> None:
  """After a restore that failed part-way, the array reads still in flight finish
  on TensorStore's threads and try to wake an event loop that orbax has already
  closed ("RuntimeError: Event loop is closed", or an orbax read coroutine closed
  at garbage collection), or their tasks end with the read error that nobody
  awaits (asyncio logs "Task exception was never retrieved", or "Future ..." /
  "_GatheringFuture ..." for TensorStore's futures, when they are collected):
  Python prints each as a traceback, long after the one error line.
  Drop those kinds, and only those (which of them appear, and through which
  hook, depends on thread timing and on when the garbage collector runs: a read
  finishing on a TensorStore thread prints its closed-loop error through
  sys.excepthook, even before the restore's own error has reached the caller).
  Installed before a restore is tried, since that print can come first."""
  global _QUIET_INSTALLED
  if _QUIET_INSTALLED:
    return
  logging.getLogger("asyncio").addFilter(_OrphanedReadTasks())
  previous, previous_excepthook = sys.unraisablehook, sys.excepthook

  def closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    orbax_coroutine = code is not None and "orbax" in code.co_filename
    if not (closed_loop(unraisable.exc_value) or orbax_coroutine):
      previous(unraisable)

  def excepthook(kind, value, traceback):
    if not closed_loop(value):
      previous_excepthook(kind, value, traceback)

  sys.unraisablehook, sys.excepthook = hook, excepthook
  _QUIET_INSTALLED = True


def _load_params(manager, directory: str, step: Optional[int]):
  if step is not None and step not in manager.all_steps():
    raise CheckpointError(f"no checkpoint at step {step} in {directory}; it holds steps "
                          f"{sorted(manager.all_steps()) or 'none'}")
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no finished checkpoint in {directory}")
  # Restore onto this process's first device, whatever topology saved it.
  item = os.path.join(directory, str(step), "state")
  try:
    tree = ocp.StandardCheckpointer().metadata(item)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step} in {directory} is unreadable: {e}") from e
  tree = getattr(tree, "item_metadata", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(tree))
  quiet_orphaned_reads()   # a damaged file's reads can print before restore raises
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds for damaged files
    others = [s for s in sorted(manager.all_steps()) if s != step]
    hint = (f"; other checkpoints: {', '.join(map(str, others))} (--checkpoint_step N)"
            if others else "")
    raise CheckpointError(f"checkpoint {step} in {directory} is unreadable (damaged files): "
                          f"{_orbax_read_error(e)}{hint}") from e
  # As numpy (the docstring's promise), not pinned to that device: the caller
  # places them (replicated over a mesh, or wherever jit puts them).
  params = jax.device_get(restored["state"]["params"])
  expected = (restored.get("meta") or {}).get("params_checksum")
  if expected is not None and checksum(params) != expected:
    raise CheckpointError(
        f"checkpoint {step} in {directory} is corrupt: its parameters have checksum "
        f"{checksum(params)}, but {expected} was written at save time; evaluate an earlier "
        f"step with --checkpoint_step (steps held: {sorted(manager.all_steps())})")
  return params, step


def check_params_fit(model_config, params, source: str) -> None:
  """CheckpointError naming the first parameter of `params` that the model lacks or shapes
  differently (e.g. evaluating with a config other than the one trained)."""
  expected = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0)))
  _check_shapes(expected, params, source)
  missing = sorted(set(traverse_util.flatten_dict(expected, sep="/"))
                   - set(traverse_util.flatten_dict(params, sep="/")))
  extra = sorted(set(traverse_util.flatten_dict(params, sep="/"))
                 - set(traverse_util.flatten_dict(expected, sep="/")))
  if missing or extra:
    raise CheckpointError(f"{source} does not match the model configuration: "
                          + (f"missing {', '.join(missing[:3])} " if missing else "")
                          + (f"unexpected {', '.join(extra[:3])}" if extra else "")
                          + "; pass the gin files the model was trained with")


def merge_params(target_params, source_params, source: str) -> Tuple[Any, list]:
  """Target params with every same-named source param copied in; names not in source."""
  _check_shapes(target_params, source_params, source)
  flat_t = traverse_util.flatten_dict(target_params, sep="/")
  flat_s = traverse_util.flatten_dict(source_params, sep="/")
  unknown = sorted(set(flat_s) - set(flat_t))
  if unknown:
    raise CheckpointError(f"{source} has parameters this model lacks: {', '.join(unknown[:5])}; "
                          "the model configurations differ")
  merged = {k: (np.asarray(flat_s[k]).astype(v.dtype) if k in flat_s else v)
            for k, v in flat_t.items()}
  kept = sorted(set(flat_t) - set(flat_s))
  return traverse_util.unflatten_dict(merged, sep="/"), kept


def resume(manager: CheckpointManager, abstract_state, shardings,
           fresh_state: Callable[[], Any], init_optimizer: Callable[[Any], Any],
           init_from: Optional[str]):
  """The resume order of this module's docstring.

  Returns (state, data position or None, whether the carried state was restored,
  a line saying where the run started from).
  """
  steps = manager.all_steps()
  unreadable = []
  for step in reversed(steps):
    # A checkpoint of another model shape is a config error, not corruption: say so
    # from the metadata, before any array is read.
    saved = _saved_params_metadata(manager.directory, step)
    if saved is not None:
      _check_shapes(abstract_state.params, saved, f"checkpoint {step} in {manager.directory}")
    _check_carried_shapes(abstract_state.carried, manager.directory, step)
    try:
      state, position, has_carried = manager.restore(step, abstract_state, shardings)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - unreadable: try the previous one
      quiet_orphaned_reads()
      print(f"[memorizing] checkpoint {step} in {manager.directory} is unreadable "
            f"({_orbax_read_error(e)}); trying the previous one", flush=True)
      unreadable.append(step)
      continue
    for bad in unreadable:  # a later save of that step must not collide with it
      print(f"[memorizing] moved unreadable checkpoint {bad} to {manager.set_aside(bad)}",
            flush=True)
    if not has_carried:
      state = state.replace(carried=fresh_state().carried)
    state = jax.device_put(state, shardings)
    how = "with" if has_carried else "without (rows restart at their next document)"
    return state, position, has_carried, f"resumed from checkpoint {step} {how} carried state"
  if steps:
    raise CheckpointError(f"none of the checkpoints {steps} in {manager.directory} could be read")
  state = fresh_state()
  if init_from:
    source, step = load_params(init_from)
    params, kept = merge_params(state.params, source, f"--init_from {init_from}")
    state = state.replace(params=params, opt_state=init_optimizer(params))
    added = f"; new parameters: {', '.join(kept)}" if kept else ""
    return (jax.device_put(state, shardings), None, False,
            f"initialised from {init_from} step {step}{added}")
  return jax.device_put(state, shardings), None, False, "started from scratch"


def _check_carried_shapes(abstract_carried, directory: str, step: int) -> None:
  """A carried state saved with another memory size or batch is a config error,
  said once from the metadata, not a chain of "unreadable" checkpoints."""
  try:
    tree = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "carried"))
    saved = traverse_util.flatten_dict(_as_dict(getattr(tree, "item_metadata", tree)), sep="/")
  except Exception:  # noqa: BLE001 - no carried state saved, or unreadable: handled by restore
    return
  wanted = traverse_util.flatten_dict(_as_dict(abstract_carried), sep="/")
  for name, value in saved.items():
    shape = tuple(getattr(value, "shape", None) or ())
    if name not in wanted or tuple(wanted[name].shape) == shape:
      continue
    want = tuple(wanted[name].shape)
    if name.startswith("memory/") and name.endswith("/keys") and shape[:2] == want[:2]:
      raise CheckpointError(
          f"checkpoint {step} in {directory} holds a kNN memory of {shape[2]} entries per "
          f"row and head, but ModelConfig.memory_size is {want[2]}; resume with "
          f"memory_size={shape[2]}, or start another --workdir (--init_from {directory} "
          "takes the parameters). The checkpoints are left as they are")
    raise CheckpointError(
        f"checkpoint {step} in {directory} holds carried state {name} of shape {shape}, this "
        f"run needs {want} (batch size, memory size or model shape changed); resume with the "
        "settings that saved it, or start another --workdir. The checkpoints are left as "
        "they are")


def _as_dict(tree):
  """Nested dicts of a pytree of dataclasses/dicts (CarriedState, XLCache, MemoryState);
  leaves are whatever has a shape (arrays, ShapeDtypeStruct, orbax ArrayMetadata)."""
  if hasattr(tree, "shape"):
    return tree
  if hasattr(tree, "__dataclass_fields__"):
    return {k: _as_dict(getattr(tree, k)) for k in tree.__dataclass_fields__}
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _as_dict(v) for k, v in dict(tree).items()}
  return tree


def _saved_params_metadata(directory: str, step: int):
  """Shapes of the saved parameters (tree of metadata), or None if unreadable."""
  try:
    tree = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "state"))
    return dict(getattr(tree, "item_metadata", tree))["params"]
  except Exception:  # noqa: BLE001 - unreadable metadata: corruption, handled by the caller
    return None
