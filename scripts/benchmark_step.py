"""Benchmark of one training step: baseline (no kNN layer) vs kNN memory sizes and backends.

Runs warm-up then timed `memorizing.training.step.train_step` calls (the trainer's own
step: forward, backward, Adafactor update, carried-state update) on synthetic
batches that already sit on the device, with the state donated and no host
sync inside the timed loop. The memory is full (count = size, random unit
keys) and every row's XL cache valid, so each step does a full-size lookup.

Reported per run: step time (median over timing windows), tokens/s, model
FLOPs per step and MFU, peak device memory, ratio to the baseline step.

FLOPs per step (counted, not measured; T = batch x segment tokens):
  model      6 x params x T                 (params include the tied embedding,
                                             which is the output projection)
  attention  3 x 4 x B x H x D x pairs      (QK^T and PV, forward + 2x backward;
             pairs = L x C + L (L+1) / 2 attended query-key pairs per layer and
             head: the causal half of the segment plus the XL cache)
  kNN        2 x B x H x L x N x D          (the search over all N stored keys,
                                             forward only: no gradient)
           + 3 x 4 x B x H x L x k x D      (attention over the k retrieved keys)
MFU = FLOPs per step / step time / peak, peak = 989.4 TFLOP/s (H200 SXM dense
bf16, datasheet) on GPU; on CPU no MFU is given.

Peak memory: XLA's own figure for the compiled step (arguments + outputs +
temporaries - donated aliases, `compiled.memory_analysis()`), per run; and
`device.memory_stats()["peak_bytes_in_use"]` of the process so far (monotonic
over the runs of one process) where the backend gives it.

Usage:
  PYTHONPATH=. python scripts/benchmark_step.py --preset paper --batch 32 \
      --json docs/results/step_h200.json                     # one H200
  PYTHONPATH=. python scripts/benchmark_step.py --preset tiny  # CPU, seconds
  ... --tokens zipf --model_options '{"gather_gradient": "scatter"}'
      # text-like ids, and XLA's scatter-add for the lookups' gradients
Runs are taken in priority order until --budget_s is spent; later ones are
listed as skipped.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from memorizing import knn
from memorizing.model import layers
from memorizing.model.config import ModelConfig, TrainConfig
from memorizing.model.decoder import count_params, init_carried_state, init_params, layer_name
from memorizing.model.layers import l2_normalize
from memorizing.tools import profile_ops
from memorizing.training.step import TrainState, make_optimizer, train_step

H200_PEAK_BF16 = 989.4e12


def import_train():
  """(train_step, TrainState, make_optimizer, TrainConfig): the trainer's own step.

  memorizing.training.step imports the model only (no data pipeline, no TFDS),
  so this runs where tensorflow_datasets is missing (the GPU machine).
  """
  return train_step, TrainState, make_optimizer, TrainConfig


# --- configurations -------------------------------------------------------------------
def base_config(args) -> ModelConfig:
  if args.preset == "paper":
    cfg = ModelConfig.paper(dtype=args.dtype, param_dtype="float32")
  else:   # tiny: seconds on a CPU
    cfg = ModelConfig(vocab_size=256, num_layers=4, d_model=128, num_heads=4, head_dim=32,
                      mlp_dim=512, segment_length=128, memory_layers=(-2,), memory_size=1024,
                      num_neighbors=32, dtype=args.dtype, param_dtype="float32")
  if args.gin_file:
    try:
      import gin  # noqa: F401
    except ImportError:
      gin = None
      print("[benchmark_step] gin is not importable here; using the preset", flush=True)
    if gin is not None:
      from memorizing.tools import gin_config  # gin is optional on the GPU machine
      cfg, _ = gin_config.parse_gin(args.gin_file, [])
      cfg = cfg.replace(dtype=args.dtype)
  over = {}
  for name in ("num_layers", "d_model", "segment_length", "num_neighbors"):
    if getattr(args, name):
      over[name] = getattr(args, name)
  if args.model_options:
    over.update(json.loads(args.model_options))
  return cfg.replace(**over) if over else cfg


def parse_options(text: str):
  return tuple(sorted(json.loads(text).items())) if text else ()


def plan_runs(args, cfg):
  """Runs in priority order: (name, config or None for baseline, attention, dtype)."""
  runs = []
  impls = args.attention.split(",")
  base = cfg.replace(memory_layers=())
  for impl in impls:
    runs.append(dict(name="baseline", kind="baseline", config=base, attention=impl, main=True))
  sizes = [int(s) for s in args.memory_sizes.split(",") if s]
  backends = [b for b in args.backends.split(",") if b]
  mem_runs = []
  for backend in backends:
    for size in sizes:
      opts = parse_options(args.device_options) if backend == "device" else ()
      mem_runs.append(dict(name=f"{backend}", kind="memory",
                           config=cfg.replace(memory_size=size, knn_backend=backend,
                                              knn_options=opts),
                           attention=None))
  # The gate size first (65K device), then the other device sizes, the extra
  # device options, then the other backends in the listed order.
  mem_runs.sort(key=lambda r: (r["config"].knn_backend != "device",
                               r["config"].memory_size != 65536))
  extra = []
  for text in args.extra_device_options:
    size = 65536 if 65536 in sizes else sizes[0]
    extra.append(dict(name="device", kind="memory",
                      config=cfg.replace(memory_size=size, knn_backend="device",
                                         knn_options=parse_options(text)), attention=None))
  n_dev = sum(r["config"].knn_backend == "device" for r in mem_runs)
  if args.memory_signals:
    # Each device run again with the trainer's memory signals on (its default,
    # TrainConfig.memory_signals), right after the same run with them off.
    with_signals = []
    for r in mem_runs[:n_dev]:
      with_signals += [r, dict(r, name="device+signals", signals=True)]
    mem_runs = with_signals + mem_runs[n_dev:]
    n_dev *= 2
  runs += mem_runs[:n_dev] + extra + mem_runs[n_dev:]
  for impl in args.extra_baselines.split(","):
    if impl:
      dtype, _, att = impl.partition(":")
      runs.append(dict(name="baseline", kind="baseline",
                       config=base.replace(dtype=dtype), attention=att or "einsum"))
  return runs


# --- FLOPs -----------------------------------------------------------------------------
def step_flops(cfg: ModelConfig, batch: int, n_params: int):
  length, h, d = cfg.segment_length, cfg.num_heads, cfg.head_dim
  tokens = batch * length
  cache = length if cfg.use_xl_cache else 0
  pairs = length * cache + length * (length + 1) // 2
  model = 6 * n_params * tokens
  attention = 3 * 4 * batch * h * d * pairs * cfg.num_layers
  knn = 0
  for _ in cfg.memory_layer_set:
    if cfg.memory_enabled:
      knn += 2 * batch * h * length * cfg.memory_size * d
      knn += 3 * 4 * batch * h * length * cfg.num_neighbors * d
  return dict(model=model, attention=attention, knn=knn, total=model + attention + knn)


# --- state and batches -----------------------------------------------------------------
def filled_carried(cfg: ModelConfig, batch: int, seed: int):
  """Carried state with a full memory and valid XL caches (random unit keys)."""
  state = init_carried_state(cfg, batch)

  @jax.jit
  def fill(state, rng):
    r = iter(jax.random.split(rng, 2 + 2 * len(state.xl) + 2 * len(state.memory)))
    xl = {n: c.replace(keys=l2_normalize(jax.random.normal(next(r), c.keys.shape, c.keys.dtype)),
                       values=jax.random.normal(next(r), c.values.shape, c.values.dtype),
                       valid=jnp.ones_like(c.valid)) for n, c in state.xl.items()}
    mem = {n: m.replace(keys=l2_normalize(jax.random.normal(next(r), m.keys.shape, m.keys.dtype)),
                        values=jax.random.normal(next(r), m.values.shape, m.values.dtype),
                        count=jnp.full_like(m.count, m.size))
           for n, m in state.memory.items()}
    return state.replace(xl=xl, memory=mem)

  return fill(state, jax.random.PRNGKey(seed))


def synthetic_ids(key, shape, vocab_size: int, kind: str) -> jax.Array:
  """Token ids [shape] int32: "uniform" over the vocabulary; "zipf", id i with
  probability proportional to 1 / (i + 1), as word frequencies in text (the most
  frequent id about 1 in 10 at 32K ids, 1 in 6 at 256); "constant", all id 0."""
  if kind == "uniform":
    return jax.random.randint(key, shape, 0, vocab_size, jnp.int32)
  if kind == "zipf":
    logits = -jnp.log(jnp.arange(1, vocab_size + 1, dtype=jnp.float32))
    return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)
  if kind == "constant":
    return jnp.zeros(shape, jnp.int32)
  raise ValueError(f"--tokens {kind!r}: choose uniform, zipf or constant")


def corpus_batches(cfg: ModelConfig, batch: int, n: int, dataset: str, data_dir=None):
  """The first `n` training batches of a prepared data set (byte tokens, seed-0
  document order), on the device. start_of_document is cleared, so that the
  memory stays full and every row's XL cache valid, as with synthetic ids."""
  from memorizing.data import pipeline, registry, tokenizers  # TFDS: only for --tokens dataset:
  tok = tokenizers.get_tokenizer("bytes")
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"--tokens dataset:{dataset} needs vocab_size >= {tok.vocab_size}")
  docs = registry.load_documents(dataset, "train", data_dir)
  stream = pipeline.DocumentStream(docs, tok, batch, cfg.segment_length, shuffle_seed=0,
                                   repeat=True)
  out = []
  for _ in range(n):
    b = next(stream)
    out.append({"tokens": jnp.asarray(b["tokens"]), "targets": jnp.asarray(b["targets"]),
                "weights": jnp.asarray(b["weights"]),
                "start_of_document": jnp.zeros((batch,), bool)})
  return jax.block_until_ready(out)


def synthetic_batches(cfg: ModelConfig, batch: int, n: int, tokens: str = "uniform",
                      data_dir=None):
  """`n` batches [batch, L] of --tokens: uniform, zipf, constant or dataset:NAME."""
  if tokens.startswith("dataset:"):
    return corpus_batches(cfg, batch, 4 * n, tokens.split(":", 1)[1], data_dir)
  out = []
  for i in range(n):
    r1, r2 = jax.random.split(jax.random.PRNGKey(100 + i))
    shape = (batch, cfg.segment_length)
    out.append({"tokens": synthetic_ids(r1, shape, cfg.vocab_size, tokens),
                "targets": synthetic_ids(r2, shape, cfg.vocab_size, tokens),
                "weights": jnp.ones(shape, jnp.float32),
                "start_of_document": jnp.zeros((batch,), bool)})
  return jax.block_until_ready(out)


# --- one run ---------------------------------------------------------------------------
def run_one(run, args, params_cache, train_mod):
  train_step, TrainState, make_optimizer, TrainConfig = train_mod
  cfg = run["config"].replace(attention=run["attention"] or args.best_attention)
  attention = layers.attention_implementation(cfg.attention, cfg.compute_dtype)
  batch = args.batch
  result = dict(name=run["name"], kind=run["kind"], attention=attention, dtype=cfg.dtype,
                knn_backend=cfg.knn_backend if cfg.memory_layers else None,
                knn_options=dict(cfg.knn_options) if cfg.memory_layers else None,
                memory_size=cfg.memory_size if cfg.memory_layers else 0, batch=batch,
                segment_length=cfg.segment_length, tokens_per_step=batch * cfg.segment_length,
                memory_signals=bool(run.get("signals")))
  if cfg.memory_layers and cfg.knn_backend == "exact":
    need = batch * cfg.num_heads * cfg.segment_length * cfg.memory_size * 4
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit") if hasattr(
        jax.devices()[0], "memory_stats") else None
    if limit and need > 0.5 * limit:
      result.update(status="skipped", reason=f"exact search's float32 score matrix alone is "
                    f"{need / 2**30:.0f} GiB (> half of the {limit / 2**30:.0f} GiB device)")
      return result
  if cfg.memory_layers and cfg.knn_backend == "scann":
    try:
      import scann  # noqa: F401
    except ImportError:
      result.update(status="skipped", reason="scann not installed here")
      return result

  if "params" not in params_cache:
    # One initialisation for all runs: the model with its memory layer (small
    # memory: only parameter shapes matter); the baseline drops the gate.
    t = time.perf_counter()
    init_cfg = args.model_config.replace(memory_size=64, num_neighbors=32, knn_backend="exact",
                                         knn_options=())
    params_cache["params"] = jax.block_until_ready(
        init_params(init_cfg, jax.random.PRNGKey(args.seed)))
    params_cache["init_s"] = time.perf_counter() - t
  params = params_cache["params"]
  if not cfg.memory_layers:
    params = {k: ({**v, "attention": {a: b for a, b in v["attention"].items()
                                      if a != "memory_gate"}}
                  if k.startswith("block_") else v) for k, v in params.items()}
  # Copies: the step donates its state.
  params = jax.tree_util.tree_map(jnp.copy, params)
  n_params = count_params(params)
  optimizer = make_optimizer(TrainConfig(batch_size=batch, optimizer="adafactor",
                                         grad_clip_norm=1.0))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params),
                     carried=filled_carried(cfg, batch, args.seed))
  backend = knn.make_backend(cfg)      # this run's own; closed at its end
  if cfg.memory_layers and cfg.knn_backend == "scann":
    # The host index mirrors the device ring buffer; the memory was filled
    # outside the model, so the host copy is rebuilt from it first.
    for i in cfg.memory_layer_set:
      backend.sync(layer=i, train=True, memory=state.carried.memory[layer_name(i)])
  batches = synthetic_batches(cfg, batch, 4, args.tokens, args.data_dir)
  rng = jax.random.PRNGKey(1)
  fn = jax.jit(functools.partial(train_step, model_config=cfg, optimizer=optimizer,
                                 skip_nonfinite=False, backend=backend,
                                 memory_signals=bool(run.get("signals"))), donate_argnums=0)
  t = time.perf_counter()
  compiled = fn.lower(state, batches[0], rng).compile()
  result["compile_s"] = time.perf_counter() - t
  try:
    ma = compiled.memory_analysis()
    result["compiled_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                   + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    result["temp_bytes"] = int(ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001  (not every backend gives it)
    pass
  for i in range(args.warmup):
    state, metrics = compiled(state, batches[i % len(batches)], rng)
  loss0 = float(metrics["loss_sum"] / metrics["weight_sum"])
  jax.block_until_ready(state)
  t = time.perf_counter()
  state, metrics = compiled(state, batches[0], rng)
  jax.block_until_ready(state)
  # Windows of about args.window_s seconds each (at most args.steps steps).
  steps = int(max(2, min(args.steps, args.window_s / max(time.perf_counter() - t, 1e-6))))
  result["steps_per_window"] = steps
  host_before = dict(getattr(backend, "stats", None) or {})
  windows = []
  for w in range(args.windows):
    t = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % len(batches)], rng)
    jax.block_until_ready((state, metrics))
    windows.append((time.perf_counter() - t) / steps)
  step_s = statistics.median(windows)
  if "host_s" in host_before:          # a host backend (ScaNN): its calls' share of the step
    timed = args.windows * steps
    result["host_ms_per_step"] = {
        key[:-2]: 1e3 * (backend.stats[key] - host_before[key]) / timed
        for key in ("host_s", "search_s", "insert_s")}
  if args.profile_steps:
    holder = {"state": state}

    def one_step():
      holder["state"], m = compiled(holder["state"], batches[0], rng)
      return m
    log_dir = os.path.join(args.profile_dir, run["name"]) if args.profile_dir else ""
    prof = profile_ops.trace_ops(one_step, args.profile_steps, log_dir,
                                 hlo_text=compiled.as_text())
    state = holder["state"]
    result["profile"] = {k: prof[k] for k in ("ms_per_step", "total_ms_per_step", "ops", "op_hlo")}
  flops = step_flops(cfg, batch, n_params)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  result.update(status="ok", params=n_params, step_s=step_s, step_windows_s=windows,
                tokens_per_s=batch * cfg.segment_length / step_s, flops=flops,
                tflops_per_s=flops["total"] / step_s / 1e12,
                mfu=(flops["total"] / step_s / H200_PEAK_BF16
                     if dev.platform == "gpu" else None),
                loss_first=loss0, loss_last=float(metrics["loss_sum"] / metrics["weight_sum"]),
                process_peak_bytes=(stats or {}).get("peak_bytes_in_use"))
  del state, compiled
  if backend is not None:
    backend.close()
  return result


# --- attention check -------------------------------------------------------------------
def check_attention(impl: str, dtype=jnp.bfloat16, b=4, h=8, length=512, d=128, seed=0):
  """`impl` against the einsum path on float32 copies of the same inputs:
  relative L2 error of the output and of the gradients of q, k, v, cache k/v,
  scale and bias. Half the rows have an invalid XL cache."""
  r = jax.random.split(jax.random.PRNGKey(seed), 6)
  unit = lambda key, n: l2_normalize(jax.random.normal(key, (b, h, n, d)))
  args = (unit(r[0], length), unit(r[1], length), jax.random.normal(r[2], (b, h, length, d)),
          jnp.full((h,), 11.0) + jax.random.normal(r[3], (h,)),
          0.3 * jax.random.normal(r[4], (h, length, 2 * length)),
          unit(r[5], length), jax.random.normal(r[5], (b, h, length, d)))
  valid = jnp.arange(b) % 2 == 0
  w = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, h, length, d))

  def loss(q, k, v, scale, bias, ck, cv, impl, dt):
    cast = lambda x: x.astype(dt)
    out = layers.xl_attention(cast(q), cast(k), cast(v), scale, bias, cast(ck), cast(cv),
                              valid, impl=impl)
    return jnp.sum(out.astype(jnp.float32) * w), out.astype(jnp.float32)

  grad = lambda impl, dt: jax.jit(jax.value_and_grad(
      functools.partial(loss, impl=impl, dt=dt), argnums=(0, 1, 2, 3, 4, 5, 6), has_aux=True))
  (_, out), g = grad(impl, dtype)(*args)
  (_, ref), g_ref = grad("einsum", jnp.float32)(*args)
  rel = lambda a, r_: float(jnp.linalg.norm((a - r_).ravel()) / jnp.linalg.norm(r_.ravel()))
  names = ("q", "k", "v", "scale", "bias", "cache_k", "cache_v")
  res = {"out": rel(out, ref)}
  res.update({f"d_{n}": rel(a.astype(jnp.float32), r_) for n, a, r_ in zip(names, g, g_ref)})
  res["finite"] = bool(all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *g)))
  return res


# --- report ----------------------------------------------------------------------------
def main_baseline(results):
  """The baseline the ratios refer to: the fastest baseline of the main dtype
  (the memory runs use its attention implementation)."""
  main = [b for b in results if b["kind"] == "baseline" and b.get("status") == "ok"
          and b.get("main")]
  return min(main, key=lambda b: b["step_s"]) if main else None


def signal_costs(results):
  """Each run with the memory signals on against the same run with them off (the
  one before it): [{"memory_size", "knn_options", "off_ms", "on_ms", "ratio"}]."""
  out = []
  for prev, r in zip(results, results[1:]):
    if (r.get("memory_signals") and not prev.get("memory_signals")
        and r.get("status") == prev.get("status") == "ok"
        and (r["memory_size"], r["knn_options"]) == (prev["memory_size"], prev["knn_options"])):
      out.append(dict(memory_size=r["memory_size"], knn_options=r["knn_options"],
                      off_ms=1e3 * prev["step_s"], on_ms=1e3 * r["step_s"],
                      ratio=r["step_s"] / prev["step_s"]))
  return out


def table(results) -> str:
  head = ("| run | backend / options | memory | attention | dtype | step ms | tokens/s | "
          "GFLOP/step | MFU | peak GiB (XLA) | ratio to baseline |")
  lines = [head, "|" + "---|" * 11]
  for r in results:
    opts = r.get("knn_options") or {}
    backend = (r.get("knn_backend") or "-") + (
        " " + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    mem = f"{r['memory_size'] // 1024}K" if r["memory_size"] else "-"
    if r.get("status") != "ok":
      lines.append(f"| {r['name']} | {backend} | {mem} | {r.get('attention')} | {r['dtype']} | "
                   f"{r.get('status')}: {r.get('reason', '')[:120]} | | | | | |")
      continue
    b = main_baseline(results)
    ratio = f"{r['step_s'] / b['step_s']:.2f}x" if b else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    peak = f"{r['compiled_bytes'] / 2**30:.1f}" if r.get("compiled_bytes") else "-"
    lines.append(f"| {r['name']} | {backend} | {mem} | {r['attention']} | {r['dtype']} | "
                 f"{1e3 * r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['flops']['total'] / 1e9:,.1f} | {mfu} | {peak} | {ratio} |")
  for c in signal_costs(results):
    lines.append(f"\nmemory signals at {c['memory_size'] // 1024}K: {c['on_ms']:.2f} ms per step "
                 f"with them, {c['off_ms']:.2f} without ({c['ratio']:.3f}x)")
  for r in results:
    host = r.get("host_ms_per_step")
    if r.get("status") == "ok" and host:
      mem = f" {r['memory_size'] // 1024}K" if r["memory_size"] else ""
      lines.append(f"\n{r['name']}{mem}: the host calls take {host['host']:.2f} ms of its "
                   f"{1e3 * r['step_s']:.2f} ms step (search {host['search']:.2f}, insert "
                   f"{host['insert']:.2f}; mean over the timed steps)")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=("paper", "tiny"), default="tiny")
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--batch", type=int, default=None, help="rows (default: paper 32, tiny 4)")
  p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on GPU)")
  p.add_argument("--num_layers", type=int, default=0)
  p.add_argument("--d_model", type=int, default=0)
  p.add_argument("--segment_length", type=int, default=0)
  p.add_argument("--num_neighbors", type=int, default=0)
  p.add_argument("--memory_sizes", default=None, help="default: paper 8192,65536,262144")
  p.add_argument("--backends", default="device,exact,scann")
  p.add_argument("--device_options", default="", help='JSON, e.g. {"num_buckets": 128}')
  p.add_argument("--extra_device_options", action="append", default=[],
                 help="JSON options of an extra device run at 65K (repeatable)")
  p.add_argument("--attention", default="auto",
                 help="baseline attention implementations to try, in order; the fastest "
                      "that works is used for the memory runs")
  p.add_argument("--extra_baselines", default="",
                 help="extra baseline runs at the end, dtype:attention, e.g. float32:einsum")
  p.add_argument("--tokens", default="uniform",
                 help="token ids: uniform (default), zipf (text-like frequencies), constant, "
                      "or dataset:NAME (the first 16 training batches of a prepared data set, "
                      "byte tokens; --data_dir); a lookup's scatter gradient on a GPU is slower "
                      "the more ids repeat (ModelConfig.gather_gradient)")
  p.add_argument("--data_dir", default=None, help="for --tokens dataset:NAME")
  p.add_argument("--memory_signals", action="store_true",
                 help="time each device memory run again with the memory signals on (the "
                      "trainer's default, TrainConfig.memory_signals) and print the ratio")
  p.add_argument("--model_options", default="",
                 help='JSON ModelConfig overrides for every run, e.g. {"gather_gradient": "scatter"}')
  p.add_argument("--steps", type=int, default=10, help="steps per timing window")
  p.add_argument("--windows", type=int, default=3)
  p.add_argument("--window_s", type=float, default=2.0,
                 help="fewer steps per window for slow runs, so a window lasts about this")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--budget_s", type=float, default=1e9,
                 help="start no new run after this many seconds")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--check_attention", default="",
                 help="implementations to check against einsum float32 first, e.g. cudnn,remat")
  p.add_argument("--profile_steps", type=int, default=0,
                 help="after timing, trace this many steps and report device op time per "
                      "op class (memorizing/tools/profile_ops.py); 0: no profile")
  p.add_argument("--profile_dir", default="",
                 help="keep the traces here (one folder per run; default: a temporary folder)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.tokens not in ("uniform", "zipf", "constant") and not args.tokens.startswith("dataset:"):
    p.error(f"--tokens {args.tokens!r}: choose uniform, zipf, constant or dataset:NAME")
  on_gpu = jax.default_backend() == "gpu"
  args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  args.batch = args.batch or (32 if args.preset == "paper" else 4)
  if args.memory_sizes is None:
    args.memory_sizes = "8192,65536,262144" if args.preset == "paper" else "1024,4096"
  if args.memory_signals and ("device" not in args.backends.split(",")
                              or not [s for s in args.memory_sizes.split(",") if s]):
    p.error("--memory_signals times the device backend's memory runs again: give "
            "--backends with device and at least one --memory_sizes")
  cfg = base_config(args)
  if not cfg.memory_layers:
    raise SystemExit("the model config names no memory layer; set memory_layers")
  args.model_config = cfg
  t_start = time.perf_counter()
  train_mod = import_train()
  runs = plan_runs(args, cfg)
  results, params_cache = [], {}
  checks = {}
  for impl in [i for i in args.check_attention.split(",") if i]:
    try:
      checks[impl] = check_attention(impl, cfg.compute_dtype)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      checks[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print(f"[benchmark_step] attention check {impl} vs einsum float32: {checks[impl]}", flush=True)
  args.best_attention = "auto"
  device = jax.devices()[0]
  print(f"[benchmark_step] {len(runs)} runs on {device.device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}; preset {args.preset}, batch {args.batch}, dtype {args.dtype}",
        flush=True)
  for run in runs:
    elapsed = time.perf_counter() - t_start
    r_cfg = run["config"]
    if elapsed > args.budget_s:
      results.append(dict(name=run["name"], kind=run["kind"], attention=run["attention"],
                          dtype=r_cfg.dtype, memory_size=r_cfg.memory_size if r_cfg.memory_layers else 0,
                          knn_backend=r_cfg.knn_backend if r_cfg.memory_layers else None,
                          knn_options=dict(r_cfg.knn_options) if r_cfg.memory_layers else None,
                          status="skipped", reason=f"time budget ({args.budget_s:.0f} s) spent"))
      continue
    try:
      r = run_one(run, args, params_cache, train_mod)
    except Exception as e:  # noqa: BLE001  (record and go on)
      traceback.print_exc()
      r = dict(name=run["name"], kind=run["kind"], attention=run["attention"],
               dtype=r_cfg.dtype, memory_size=r_cfg.memory_size if r_cfg.memory_layers else 0,
               knn_backend=r_cfg.knn_backend if r_cfg.memory_layers else None,
               knn_options=dict(r_cfg.knn_options) if r_cfg.memory_layers else None,
               status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    r["main"] = run.get("main", False)
    results.append(r)
    if r["main"] and r.get("status") == "ok":
      args.best_attention = main_baseline(results)["attention"]
    if r.get("status") == "ok":
      print(f"[benchmark_step] {r['name']} {r.get('knn_backend') or ''} "
            f"{r['memory_size']} {r['attention']}: {1e3 * r['step_s']:.2f} ms/step "
            f"(windows {', '.join(f'{1e3 * w:.2f}' for w in r['step_windows_s'])}), "
            f"compile {r['compile_s']:.1f} s, loss {r['loss_first']:.3f}->{r['loss_last']:.3f}",
            flush=True)
    else:
      print(f"[benchmark_step] {r['name']} {r.get('knn_backend') or ''}: {r['status']}: "
            f"{r.get('reason')}", flush=True)
  b = main_baseline(results)
  for r in results:
    r["ratio_to_baseline"] = (r["step_s"] / b["step_s"]
                              if b and r.get("status") == "ok" else None)
  report = dict(
      machine=dict(device=device.device_kind, platform=jax.default_backend(),
                   host=platform.node(), cpu_count=os.cpu_count(), jax=jax.__version__,
                   python=platform.python_version()),
      preset=args.preset, model=dict((k, v) for k, v in vars(cfg).items()
                                     if k not in ("knn_options",)),
      batch=args.batch, tokens=args.tokens, steps=args.steps, windows=args.windows,
      warmup=args.warmup,
      command=" ".join(sys.argv), init_params_s=params_cache.get("init_s"),
      total_s=time.perf_counter() - t_start, attention_checks=checks,
      flops_note=("model 6*params*tokens; attention 12*B*H*D*(L*C + L(L+1)/2) per layer; "
                  "kNN 2*B*H*L*N*D search + 12*B*H*L*k*D memory attention; "
                  "MFU against 989.4 TFLOP/s dense bf16"),
      results=results, memory_signal_costs=signal_costs(results))
  text = table(results)
  profiled = {f"{r['name']} {r['memory_size'] or ''}".strip(): r["profile"]
              for r in results if r.get("profile")}
  if profiled:
    text += "\n\nDevice op time per step by op class (profile of --profile_steps steps):\n\n"
    text += profile_ops.class_table(profiled)
    for name, prof in profiled.items():
      text += f"\nLargest ops of {name} (ms/step, class, op: what it computes):\n"
      for ms, cls, op in prof["ops"][:12]:
        text += f"  {ms:7.3f}  {cls:<28} {op[:40]:<40} {prof['op_hlo'].get(op, '')[:160]}\n"
  print(text, flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1, default=str)
  return report


if __name__ == "__main__":
  main()
