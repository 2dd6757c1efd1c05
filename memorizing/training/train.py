"""The training loop: `train_and_evaluate(model_config, train_config, workdir)`.

Sections, in the order they run:
  1. devices, mesh, shardings       (data parallel; rows and their memories together)
  2. data: train stream, position   (document-ordered, DocumentStream)
  3. model, optimizer, state        (TrainState: params, opt_state, step, carried)
  4. resume                         (workdir checkpoint, else --init_from, else scratch)
  5. the loop: train_step, metrics, checkpoints, periodic evaluation
  6. final evaluation with memory and with memory disabled

`train_step(state, batch, rng) -> (state, metrics)` is one pure function,
jitted once with donated state; metrics are sums plus a denominator. The run
owns its kNN backend (`knn.make_backend(model_config)`) and passes it to the
step, the evaluations and the resume; TrainConfig is in memorizing/model/config.py.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memorizing import knn
from memorizing.data import pipeline, registry, tokenizers
from memorizing.errors import ConfigError, DatasetError, Preempted, TrainingError
from memorizing.knn_api import KNNBackend
from memorizing.model.config import ModelConfig, TrainConfig
from memorizing.model.decoder import carried_state_bytes, init_carried_state, init_params
from memorizing.training import checkpoint as ckpt_lib
from memorizing.training import evaluate as eval_lib
from memorizing.training import metrics as metrics_lib
from memorizing.training.step import (TrainState, learning_rate_multipliers,  # noqa: F401
                                      learning_rate_schedule, loss_sums, make_optimizer,
                                      param_path, train_step)

__all__ = ["Preempted", "TrainConfig", "TrainState", "TrainingError", "evaluate_params",
           "make_optimizer", "train_and_evaluate", "train_step"]


# --- sharding ----------------------------------------------------------------------
def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def row_sharding(mesh: Mesh, tree):
  """Leading (row) axis split over devices; scalars replicated."""
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, P("data") if np.ndim(x) >= 1 else P()), tree)


def replicated(mesh: Mesh, tree):
  return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)


def global_batch(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """This process's rows -> a global array sharded by rows."""
  return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), v)
          for k, v in batch.items()}


def device_memory_budget(cfg: Optional[TrainConfig] = None) -> Tuple[Optional[int], str]:
  """Bytes one device may hold, and where that number comes from.

  TrainConfig.device_memory_gib when set; else the device's bytes_limit; else,
  on CPU, the host's physical RAM; else (None, ...) and no check is made.
  """
  if cfg is not None and cfg.device_memory_gib > 0:
    return int(cfg.device_memory_gib * 2**30), "TrainConfig.device_memory_gib"
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - some backends do not implement it
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform} bytes_limit"
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"
    except (ValueError, OSError, AttributeError):
      pass
  return None, "unknown"


def check_fits_in_device_memory(model_config: ModelConfig, batch: int,
                                cfg: Optional[TrainConfig] = None) -> None:
  """Fails before allocation when the carried state cannot fit on the devices.

  The budget is `device_memory_budget(cfg)` per device, 90% of it usable; the
  carried state is split by rows over all devices.
  """
  need = carried_state_bytes(model_config, batch)
  limit, source = device_memory_budget(cfg)
  n_dev = len(jax.devices())
  if limit and need > 0.9 * limit * n_dev:
    mc = model_config
    item = jnp.dtype(mc.compute_dtype).itemsize
    mem_layers = len(mc.memory_layer_set)
    mem = batch * mc.num_heads * mc.memory_size * mem_layers * mc.head_dim * 2 * item
    xl_layers = mc.num_layers if mc.use_xl_cache else 0
    xl = batch * mc.num_heads * mc.segment_length * xl_layers * mc.head_dim * 2 * item
    gib = lambda x: f"{x / 2**30:.1f} GiB"
    raise TrainingError(
        f"the carried state needs {gib(need)} of device memory: kNN memories batch {batch} x "
        f"heads {mc.num_heads} x memory_size {mc.memory_size} x head_dim {mc.head_dim} x 2 "
        f"(keys, values) x {item} bytes x {mem_layers} layer(s) = {gib(mem)}, plus XL caches "
        f"{batch} x {mc.num_heads} x segment {mc.segment_length} x {mc.head_dim} x 2 x {item} "
        f"bytes x {xl_layers} layer(s) = {gib(xl)}; that is more than 90% of "
        f"{n_dev} x {gib(limit)} ({source}). Lower TrainConfig.batch_size or "
        "ModelConfig.memory_size, use ModelConfig.dtype='bfloat16', or state the budget with "
        "TrainConfig.device_memory_gib")


# --- the run -----------------------------------------------------------------------
def make_stream(model_config: ModelConfig, cfg: TrainConfig, split: str, batch_size: int, *,
                train: bool, max_documents: Optional[int] = None,
                max_document_tokens: int = 0):
  if jax.process_count() > 1:
    # Process 0 builds an embedded corpus on first use; the others wait for it.
    if jax.process_index() == 0:
      registry.load_documents(cfg.dataset, split, cfg.data_dir)
    multihost_utils.sync_global_devices(f"data {cfg.dataset} {split}")
  try:
    docs = registry.load_documents(cfg.dataset, split, cfg.data_dir, max_documents=max_documents)
  except ValueError as e:   # ArrayRecord refuses a split of zero shards
    if "can not be of 0 length" not in str(e):
      raise
    docs = []
  if len(docs) == 0:
    raise DatasetError(
        f"split {split!r} of dataset {cfg.dataset!r} has no documents; prepare it again with "
        f"documents in that split:\n  "
        f"{registry.prepare_command(cfg.dataset, cfg.data_dir or registry.default_data_dir())}")
  tok = tokenizers.get_tokenizer(cfg.tokenizer)
  if tok.vocab_size > model_config.vocab_size:
    raise ConfigError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} ids but "
                     f"ModelConfig.vocab_size is {model_config.vocab_size}; raise vocab_size")
  stream = pipeline.DocumentStream(
      docs, tok, batch_size, model_config.segment_length,
      shuffle_seed=cfg.seed if (train and cfg.shuffle_documents) else None,
      repeat=train, process_index=jax.process_index(), process_count=jax.process_count(),
      max_tokens=max_document_tokens or None)
  return stream, docs, tok


def train_and_evaluate(model_config: ModelConfig, cfg: TrainConfig, workdir: str,
                       init_from: Optional[str] = None,
                       backend: Optional[KNNBackend] = None) -> Dict[str, Any]:
  """Trains, checkpoints, evaluates; returns the final metrics (also in workdir).

  `backend` searches the kNN memory in training and evaluation; by default the
  run makes one (`knn.make_backend(model_config)`) and closes it at the end.
  """
  # jax.distributed first: it must precede any use of the backend, and the lock
  # below is taken by process 0 only.
  if cfg.multihost and not jax.distributed.is_initialized():
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  workdir = ckpt_lib.check_workdir(workdir)
  lock = ckpt_lib.WorkdirLock(workdir)
  own = backend is None
  try:
    if own:
      backend = knn.make_backend(model_config)
    return _train_and_evaluate(model_config, cfg, workdir, init_from, backend)
  finally:
    if own and backend is not None:
      backend.close()
    lock.release()


def _train_and_evaluate(model_config: ModelConfig, cfg: TrainConfig, workdir: str,
                        init_from: Optional[str], backend: Optional[KNNBackend]):
  # 1. devices, mesh (jax.distributed is initialised by the caller) -------------------
  mesh = make_mesh()
  n_dev = len(jax.devices())
  if cfg.batch_size % n_dev:
    raise ConfigError(f"TrainConfig.batch_size={cfg.batch_size} must be a multiple of the "
                     f"{n_dev} devices (rows are split across devices)")
  check_fits_in_device_memory(model_config, cfg.batch_size, cfg)
  logger = metrics_lib.MetricsLogger(workdir, enabled=jax.process_index() == 0)

  # 2. data ---------------------------------------------------------------------------
  stream, docs, tok = make_stream(model_config, cfg, cfg.train_split, cfg.batch_size, train=True)
  bytes_per_token = tok.bytes_per_token([docs[i] for i in range(min(len(docs), 32))])

  # 3. model, optimizer, state --------------------------------------------------------
  optimizer = make_optimizer(cfg)
  rng = jax.random.PRNGKey(cfg.seed)
  init_rng, step_rng = jax.random.split(rng)

  def fresh_state():
    params = init_params(model_config, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      carried=init_carried_state(model_config, cfg.batch_size))

  abstract = jax.eval_shape(fresh_state)
  shardings = TrainState(step=NamedSharding(mesh, P()),
                         params=replicated(mesh, abstract.params),
                         opt_state=replicated(mesh, abstract.opt_state),
                         carried=row_sharding(mesh, abstract.carried))
  fresh_state = jax.jit(fresh_state, out_shardings=shardings)   # one compile, not one per op

  # 4. resume: workdir checkpoint, else --init_from, else scratch ----------------------
  manager = ckpt_lib.CheckpointManager(workdir, keep=cfg.keep_checkpoints,
                                       save_carried_state=cfg.save_carried_state)
  try:
    state, data_position, has_carried, source = ckpt_lib.resume(
        manager, abstract, shardings, fresh_state, optimizer.init, init_from)
  except BaseException:
    manager.close()   # else orbax's threads fail noisily at interpreter exit
    raise
  if data_position is not None:
    if not has_carried:
      data_position = pipeline.restart_at_next_documents(data_position)
    stream.set_state(data_position)
  if has_carried and model_config.memory_layers and model_config.memory_enabled:
    # Host backends (ScaNN) rebuild their indices from the restored ring buffers.
    for name, mem in state.carried.memory.items():
      backend.sync(int(name.rsplit("_", 1)[1]), True, mem)
  start_step = int(state.step)
  if start_step > cfg.num_steps:
    manager.close()
    logger.close()
    raise ConfigError(f"the checkpoint in {workdir} is at step {start_step}, past "
                      f"TrainConfig.num_steps={cfg.num_steps}; raise num_steps to continue, "
                      "or use another --workdir (memorizing-eval --checkpoint_step N "
                      "evaluates an earlier checkpoint)")
  logger.write_config(model_config, cfg, source)
  mults = jax.tree_util.tree_leaves_with_path(
      learning_rate_multipliers(abstract.params, cfg.learning_rate_multipliers))
  scaled = sorted({f"{param_path(p)} x{m:g}" for p, m in mults if m != 1.0})
  if scaled:
    print(f"[memorizing] learning-rate multipliers: {', '.join(scaled)}", flush=True)
  print(f"[memorizing] {source}; training steps {start_step}..{cfg.num_steps} on "
        f"{n_dev} {jax.devices()[0].platform} device(s)", flush=True)

  # 5. the loop ----------------------------------------------------------------------
  step_fn = jax.jit(
      lambda s, b, r: train_step(s, b, r, model_config=model_config, optimizer=optimizer,
                                 skip_nonfinite=cfg.nan_policy == "skip",
                                 memory_signals=cfg.memory_signals, backend=backend),
      in_shardings=(shardings, None, None), out_shardings=(shardings, None), donate_argnums=0)
  batches = pipeline.Prefetch(stream, cfg.prefetch) if cfg.prefetch else stream
  pending, window_start, tokens_seen = [], time.time(), 0
  last_good = manager.latest_step()
  bar = metrics_lib.progress(start_step, cfg.num_steps, enabled=cfg.progress_bar)
  eval_result = {}
  stop = _SigtermFlag()
  skipped = 0
  allowed_skips = (cfg.max_skipped_steps if cfg.max_skipped_steps >= 0
                   else max(5, cfg.num_steps // 100))
  try:
    for step in range(start_step, cfg.num_steps):
      batch = next(batches)
      position = batches.get_state()
      with knn.mesh_context(mesh):      # kNN searches run per device on their rows
        state, m = step_fn(state, global_batch(batch, mesh), step_rng)
      pending.append(m)
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        # JAX returns before the device has run the step; without this wait the
        # loop would queue every step up to the next log step, and a SIGTERM
        # (noticed here, between steps) would wait for all of them.
        jax.block_until_ready(pending[-1 - MAX_STEPS_IN_FLIGHT])
      tokens_seen += int(batch["weights"].size)
      done = step + 1
      is_log = done % cfg.log_every == 0 or done == cfg.num_steps
      is_ckpt = ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                 or done == cfg.num_steps or stop.requested)
      if is_log or is_ckpt:
        summary = metrics_lib.summarize(jax.device_get(pending), bytes_per_token)
        pending = []
        if summary["nonfinite_steps"] and cfg.nan_policy == "stop":
          raise TrainingError(
              f"non-finite loss or gradient between steps {done - summary['steps']} and {done}; "
              f"stopped without writing a checkpoint. {_last_good_text(last_good, workdir)} "
              f"{_nonfinite_advice(cfg)}")
        skipped += summary["nonfinite_steps"]
        if skipped > allowed_skips:
          raise TrainingError(
              f"{skipped} of {done - start_step} steps were skipped as non-finite "
              f"(TrainConfig.max_skipped_steps allows {allowed_skips}); stopped without "
              f"writing a checkpoint. {_last_good_text(last_good, workdir)} "
              f"{_nonfinite_advice(cfg, skip=False)}")
        elapsed = time.time() - window_start
        summary.update(step=done, learning_rate=float(learning_rate_schedule(cfg)(jnp.array(step))),
                       step_time=elapsed / summary["steps"],
                       tokens_per_second=tokens_seen / max(elapsed, 1e-9))
        logger.log(done, "train", summary)
        bar.update(done, summary)
        window_start, tokens_seen = time.time(), 0
      if is_ckpt:
        manager.save(done, state, position)
        last_good = done
      if stop.requested:
        if last_good != done:   # the signal came after this step's checkpoint decision
          if pending:
            summary = metrics_lib.summarize(jax.device_get(pending), bytes_per_token)
            if summary["nonfinite_steps"] and cfg.nan_policy == "stop":
              raise TrainingError(f"SIGTERM received, but steps before {done} were not finite; "
                                  f"the last good checkpoint (step {last_good}) is intact")
          manager.save(done, state, position)
          last_good = done
        manager.wait()
        raise Preempted(f"SIGTERM received: finished step {done}, saved checkpoint {done} in "
                        f"{manager.directory}; run the same command again to resume")
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.num_steps:
        result = evaluate_params(model_config, cfg, state.params, cfg.eval_max_documents,
                                 backend)
        logger.log(done, "eval", result)
  finally:
    stop.restore()
    bar.close()
    if hasattr(batches, "close"):
      batches.close()
    manager.close()

  # 6. final evaluation ----------------------------------------------------------------
  if cfg.final_eval:
    eval_result = {
        "with_memory": evaluate_params(model_config, cfg, state.params, cfg.eval_max_documents,
                                       backend),
        "memory_disabled": evaluate_params(model_config.replace(memory_enabled=False), cfg,
                                           state.params, cfg.eval_max_documents),
    }
    for name, res in eval_result.items():
      logger.log(cfg.num_steps, f"eval_{name}", res)
    metrics_lib.print_eval_table(eval_result, model_config, cfg.eval_max_document_tokens)
  logger.close()
  return eval_result


def _last_good_text(last_good: Optional[int], workdir: str) -> str:
  if last_good is None:
    return f"No checkpoint had been written yet in {workdir}."
  return f"The last good checkpoint (step {last_good}) in {workdir} is intact."


def _nonfinite_advice(cfg: TrainConfig, skip: bool = True) -> str:
  fixes = [f"lower TrainConfig.learning_rate (now {cfg.learning_rate:g})"]
  if not cfg.grad_clip_norm:
    fixes.append("enable clipping (TrainConfig.grad_clip_norm = 1.0)")
  if skip:
    fixes.append("set TrainConfig.nan_policy='skip'")
  return "Fix: " + ", or ".join(fixes) + "."


# Steps the loop may dispatch ahead of the device: enough to keep it busy, few
# enough that SIGTERM is honoured within a few steps, whatever log_every is.
MAX_STEPS_IN_FLIGHT = 2


class _SigtermFlag:
  """While installed (main thread only), SIGTERM sets `requested` instead of killing:
  the loop finishes the step in flight, saves a checkpoint and stops."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    if not self.requested:
      print("[memorizing] SIGTERM: finishing this step, then saving a checkpoint", flush=True)
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def evaluate_params(model_config: ModelConfig, cfg: TrainConfig, params,
                    max_documents: Optional[int],
                    backend: Optional[KNNBackend] = None) -> Dict[str, float]:
  """Perplexity of `params` over whole documents of the evaluation split.

  Each process evaluates its own share of documents on its first local device;
  the sums are combined across processes. `backend`: the caller's kNN backend
  (default: one made for this evaluation from `model_config`).
  """
  params = jax.tree_util.tree_map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, params)
  stream, _, tok = make_stream(model_config, cfg, cfg.eval_split, cfg.eval_batch_size,
                               train=False, max_documents=max_documents,
                               max_document_tokens=cfg.eval_max_document_tokens)
  return eval_lib.evaluate(model_config, params, stream, tok, backend=backend,
                           progress=cfg.progress_bar)
