"""Benchmark of the kNN backends: time per lookup and recall@k against exact.

One lookup = B rows x H heads x Q queries over N keys of dim D, k neighbours
(default 8 x 8 x 512 over 65536 x 128, k = 32: one memory layer, one step of
the paper's setup). Keys and queries come from
memorizing.knn.synthetic.synthetic_memory (topic clusters plus positional
locality; see docs/knn.md).

Rows timed:
  exact            full scores + lax.top_k (the reference)
  matmul_bf16      the score matmul alone, bf16 in and out (the unfused floor)
  device[...]      DeviceBackend with the listed options
  scann            ScannBackend host call: search + insert of one segment
                   (Q new keys per row and head), and search / insert apart

Usage:
  python scripts/benchmark_knn.py --output results.json          # GPU defaults
  python scripts/benchmark_knn.py --sizes 1536,8192 --backends exact,device,scann
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback

import jax
import numpy as np
import jax.numpy as jnp

from memorizing import knn
from memorizing.model import memory as M
from memorizing.knn import device, pallas_buckets, synthetic
from memorizing.knn.exact import ExactBackend
from memorizing.tools.timing import back_to_back_ms

# (label, DeviceBackend options); pallas rows only run on GPU.
# --configs table: the rows of docs/knn.md's table.
DEVICE_CONFIGS = [
    ("xla bf16 S=256", dict(impl="xla", compute_dtype="bfloat16", num_buckets=256)),
    ("pallas S=256 pair bq64 w8 rows (old default)",
     dict(impl="pallas", num_buckets=256, block_q=64, num_warps=8, packed=False, grid_order="rows")),
    ("pallas S=128 pair bq64 w4 rows",
     dict(impl="pallas", num_buckets=128, block_q=64, num_warps=4, packed=False, grid_order="rows")),
    ("pallas S=256 pair bq128 w16 queries",
     dict(impl="pallas", num_buckets=256, block_q=128, num_warps=16, packed=False,
          grid_order="queries")),
    ("auto (default options)", dict()),
]


def _tune_configs(which):
  """--configs tune1 / tune2: the sweeps that chose the defaults (GPU, pallas).

  packed="max" rows are the kernel's floor (bucket maxima only, no slots: the
  same dots and one max per score); their recall is meaningless."""
  out = []
  base = dict(impl="pallas")
  tune1 = [
      (256, False, 64, 8, 3, "rows"), (256, False, 64, 8, 3, "queries"),
      (128, False, 64, 4, 3, "rows"), (128, False, 64, 4, 3, "queries"),
      (256, True, 64, 8, 3, "queries"),
      (256, "offset", 64, 8, 3, "rows"), (256, "offset", 64, 8, 3, "queries"),
      (256, "offset", 64, 4, 3, "queries"), (256, "offset", 32, 4, 3, "queries"),
      (256, "offset", 128, 8, 3, "queries"), (256, "offset", 128, 16, 3, "queries"),
      (256, "offset", 64, 8, 2, "queries"), (256, "offset", 64, 8, 4, "queries"),
      (256, "offset", 128, 8, 2, "queries"), (256, "offset", 64, 16, 3, "queries"),
      (192, "offset", 64, 4, 3, "queries"), (192, "offset", 64, 8, 3, "queries"),
      (192, "offset", 128, 8, 3, "queries"),
      (128, "offset", 64, 4, 3, "queries"), (128, "offset", 128, 4, 3, "queries"),
      (128, "offset", 128, 8, 3, "queries")]
  tune2 = [
      (256, "offset", 128, 16, 3, "queries"), (256, "offset", 128, 16, 2, "queries"),
      (256, "offset", 128, 16, 4, "queries"), (256, "offset", 256, 16, 3, "queries"),
      (256, "offset", 256, 32, 3, "queries"), (256, "offset", 128, 32, 3, "queries"),
      (256, "offset", 128, 16, 3, "queries", 64), (256, "offset", 128, 16, 3, "queries", 256),
      (256, False, 128, 16, 3, "queries"), (256, True, 128, 16, 3, "queries"),
      (256, "offset", 128, 16, 3, "rows"),
      (128, "offset", 128, 16, 3, "queries"), (128, False, 128, 16, 3, "queries"),
      (192, "offset", 128, 16, 3, "queries"),
      (256, "max", 128, 16, 3, "queries"), (256, "max", 64, 8, 3, "queries"),
      (128, "max", 128, 16, 3, "queries")]
  tune4 = [   # packed="float" (fmax, bias only in partial blocks) against the offset default
      (256, "offset", 128, 16, 3, "queries"), (256, "float", 128, 16, 3, "queries"),
      (256, "float", 128, 8, 3, "queries"), (256, "float", 128, 8, 2, "queries"),
      (256, "float", 128, 16, 2, "queries"), (256, "float", 64, 4, 2, "queries"),
      (256, "float", 64, 8, 3, "queries"), (256, "offset", 128, 8, 3, "queries"),
      (256, "float", 128, 16, 3, "queries", 64), (256, "float", 128, 8, 3, "queries", 256),
      (128, "float", 128, 16, 3, "queries"), (128, "float", 128, 8, 3, "queries"),
      (192, "float", 128, 16, 3, "queries")]
  tune3 = [
      (256, "offset", 128, 16, 3, "queries"), (256, "offset", 256, 16, 2, "queries"),
      (256, "offset", 256, 8, 2, "queries"), (256, "offset", 256, 32, 2, "queries"),
      (256, "offset", 128, 8, 3, "queries", 256), (128, "offset", 256, 16, 2, "queries")]
  for cfg in {"tune1": tune1, "tune2": tune2, "tune3": tune3, "tune4": tune4}.get(which, []):
    s, packed, bq, w, st, grid = cfg[:6]
    chunk = cfg[6] if len(cfg) > 6 else None
    label = (f"pallas S={s} {packed if packed else 'pair'} bq{bq} w{w} st{st} {grid}"
             + (f" chunk{chunk}" if chunk else ""))
    out.append((label, dict(base, num_buckets=s, packed=packed, block_q=bq, num_warps=w,
                            num_stages=st, grid_order=grid, chunk=chunk)))
  if which == "tune5":   # the final top k: (value, index) sorts against one sort of packed keys
    for s_, bq, w in ((256, 128, 16), (256, 64, 8), (128, 128, 16)):
      for impl in ("lax", "sort", "keys"):
        out.append((f"pallas S={s_} float bq{bq} w{w} st3 queries top_k {impl}",
                    dict(base, num_buckets=s_, packed="float", block_q=bq, num_warps=w,
                         num_stages=3, top_k_impl=impl)))
  elif which in ("tune3", "tune4"):
    pass
  elif which == "tune1":
    out.append(("pallas S=256 offset bq64 w8 st3 queries lax.top_k",
                dict(base, num_buckets=256, packed="offset", block_q=64, num_warps=8,
                     num_stages=3, grid_order="queries", top_k_impl="lax")))
  else:
    out.append(("pallas S=256 offset bq128 w16 st3 queries lax.top_k",
                dict(base, num_buckets=256, packed="offset", block_q=128, num_warps=16,
                     num_stages=3, grid_order="queries", top_k_impl="lax")))
  out.append(("auto (default options)", dict()))
  return out


def _search_fn(opts, k):
  """(jitted search, backend or None); packed="max" runs the floor kernel directly."""
  if opts.get("packed") == "max":
    o = dict(opts)
    fn = lambda qq, m: pallas_buckets.buckets_pallas(
        qq, m.keys, m.count, o["num_buckets"], k, jnp.bfloat16, o["block_q"], o["num_warps"],
        o["num_stages"], False, "max", "sort", o["grid_order"], o.get("chunk"))
    return jax.jit(fn), None
  be = device.DeviceBackend(**opts)
  return jax.jit(lambda qq, m: be.search(qq, m, k, None)), be


def exact_search(queries, mem, k, max_elements=2 ** 31):
  """ExactBackend in query chunks, so huge N does not run out of memory."""
  b, h, q, d = queries.shape
  chunk = q
  while b * h * chunk * mem.size > max_elements and chunk % 2 == 0:
    chunk //= 2
  if chunk == q:
    return ExactBackend().search(queries, mem, k)
  qs = queries.reshape(b, h, q // chunk, chunk, d).transpose(2, 0, 1, 3, 4)
  i, v = jax.lax.map(lambda x: ExactBackend().search(x, mem, k), qs)
  merge = lambda x: x.transpose(1, 2, 0, 3, 4).reshape(b, h, q, k)
  return merge(i), merge(v)


def time_fn(fn, *args, repeats: int, calls: int = 5):
  """ms per call of fn(*args): median over `repeats` of (wall time of `calls`
  back-to-back calls, synchronised once at the end) / calls; after one warm-up.
  Slow calls (exact at large N, over 0.05 s): one call, 3 repeats."""
  return back_to_back_ms(fn, *args, calls=calls, repeats=repeats, slow_s=0.05)[0]


def bench_size(args, n: int, rows: list):
  b, h, q, d, k = args.batch, args.heads, args.queries, args.dim, args.k
  if args.keys_file:   # real keys and queries captured from a model (scripts/capture_keys.py)
    captured = np.load(args.keys_file)
    keys, queries = jnp.asarray(captured["keys"]), jnp.asarray(captured["queries"])
    count = jnp.asarray(captured["count"], jnp.int32)
  else:
    keys, queries = synthetic.synthetic_memory(jax.random.PRNGKey(0), b, h, n, q, d)
    count = jnp.full((b,), n, jnp.int32)
  mem = M.MemoryState(keys=keys, values=keys, pointer=jnp.zeros((b,), jnp.int32), count=count)
  mem = jax.block_until_ready(mem)
  # What the approximate backends search: the keys in the dtype the model stores them in.
  stored = keys.astype(args.key_dtype)
  smem = jax.block_until_ready(M.MemoryState(keys=stored, values=stored, pointer=mem.pointer,
                                             count=count))
  common = dict(n=n, batch=b, heads=h, queries=q, dim=d, k=k, key_dtype=args.key_dtype)
  backends = args.backends.split(",")

  exact_fn = jax.jit(lambda qq, m: exact_search(qq, m, k))
  ei, ev = exact_fn(queries, mem)
  if "exact" in backends:
    ms = time_fn(exact_fn, queries, mem, repeats=args.repeats)
    chunked = b * h * q * n > 2 ** 31
    rows.append(dict(common, backend="exact", config="lax.top_k f32" + (" (q chunks)" if chunked else ""),
                     ms=ms, recall=1.0))
    print_row(rows[-1])

  kb, qb = keys.astype(jnp.bfloat16), queries.astype(jnp.bfloat16)
  mm = jax.jit(lambda qq, kk: jnp.einsum("bhqd,bhnd->bhqn", qq, kk))
  ms = time_fn(mm, qb, kb, repeats=args.repeats)
  flops = 2.0 * b * h * q * n * d
  rows.append(dict(common, backend="matmul_bf16", config="einsum bf16 -> bf16 scores",
                   ms=ms, recall=None, tflops=flops / ms / 1e9))
  print_row(rows[-1])

  if "device" in backends:
    on_gpu = jax.default_backend() == "gpu"
    configs = DEVICE_CONFIGS if args.configs == "table" else _tune_configs(args.configs)
    for label, opts in configs:
      if opts.get("impl") == "pallas" and not on_gpu:
        continue
      try:
        fn, be = _search_fn(opts, k)
        i, v = fn(queries, smem)
        r = synthetic.recall(i, v, ei, ev) if be else None
        ms = time_fn(fn, queries, smem, repeats=args.repeats)
        rows.append(dict(common, backend="device", config=label, options=opts,
                         resolved_impl=be.resolved_impl(d, k) if be else "pallas", ms=ms,
                         recall=r))
      except Exception as e:  # report and go on: one bad config must not lose the table
        traceback.print_exc()
        rows.append(dict(common, backend="device", config=label, options=opts,
                         error=f"{type(e).__name__}: {str(e)[:300]}"))
      print_row(rows[-1])
      if args.write:
        args.write(rows)

  if "scann" in backends:
    bench_scann(args, common, mem, queries, keys, k, rows)


def bench_scann(args, common, mem, queries, keys, k, rows):
  from memorizing.knn.scann_host import ScannBackend
  be = ScannBackend()
  b, h, q, d = queries.shape
  t = time.perf_counter()
  be.sync(0, True, mem)
  build_s = time.perf_counter() - t

  @jax.jit
  def step(m, qq, new):
    ctx = knn.SearchContext(layer=0, train=True, reset=jnp.zeros((b,), bool), new_keys=new)
    i, v = be.search(qq, m, k, ctx)
    ei, ev = exact_search(qq, m, k)
    return M.append(m, new, new), (i, v, ei, ev)

  recalls, total, search, insert = [], [], [], []
  rng = jax.random.PRNGKey(7)
  for s in range(args.scann_steps):
    # The next segment: fresh structured keys (queries of the step after).
    _, new = synthetic.synthetic_memory(jax.random.fold_in(rng, s), b, h, 0, q, d)
    t = time.perf_counter()
    mem, (i, v, ei, ev) = step(mem, queries, new)
    jax.block_until_ready(i)
    total.append((time.perf_counter() - t) * 1e3)
    recalls.append(synthetic.recall(i, v, ei, ev))
    search.append(be.last_timing["search_s"] * 1e3)
    insert.append(be.last_timing["insert_s"] * 1e3)
    queries = new
  med = lambda x: statistics.median(x[1:] if len(x) > 1 else x)
  rows.append(dict(common, backend="scann", config=f"tree+tail, {be.num_threads} threads",
                   ms=med(search) + med(insert), search_ms=med(search), insert_ms=med(insert),
                   build_s=build_s, recall=statistics.mean(recalls), recall_min=min(recalls),
                   steps=args.scann_steps, tree_builds=be.stats["tree_builds"]))
  print_row(rows[-1])


def print_row(r):
  rec = "" if r.get("recall") is None else f"{r['recall']:.3f}"
  ms = f"{r['ms']:10.3f}" if "ms" in r else "     error"
  extra = ""
  if "tflops" in r:
    extra = f"{r['tflops']:.0f} TFLOP/s"
  if r["backend"] == "scann":
    extra = (f"search {r['search_ms']:.1f} + insert {r['insert_ms']:.1f} ms, "
             f"build {r['build_s']:.1f} s, min recall {r['recall_min']:.3f}")
  if "error" in r:
    extra = r["error"][:100]
  print(f"{r['n']:>7} {r['dim']:>4} {r['backend']:<12} {r['config']:<48} {ms} ms  "
        f"recall {rec:<6} {extra}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  on_cpu = jax.default_backend() == "cpu"
  p.add_argument("--sizes", default="1536,8192" if on_cpu else "8192,65536")
  p.add_argument("--dims", default="128")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--queries", type=int, default=512)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--backends", default="exact,device,scann")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--scann_steps", type=int, default=4)
  p.add_argument("--output", default=None)
  p.add_argument("--configs", default="table", choices=("table", "tune1", "tune2", "tune3", "tune4", "tune5"),
                 help="device backend rows: docs/knn.md's table, or a tuning sweep")
  p.add_argument("--keys_file", default=None,
                 help="npz from scripts/capture_keys.py: benchmark on a model's real keys "
                      "and queries (its shape replaces --sizes/--dims/--batch/--heads/--queries)")
  p.add_argument("--key_dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="dtype of the stored keys: auto = the memory's dtype in the model on this "
                      "platform (its compute dtype: bfloat16 on GPU/TPU, float32 on CPU); the "
                      "exact reference always scores the float32 keys")
  args = p.parse_args()
  if args.key_dtype == "auto":
    args.key_dtype = "float32" if on_cpu else "bfloat16"
  if args.keys_file:
    shape = np.load(args.keys_file)["keys"].shape
    args.batch, args.heads, args.sizes, args.dims = shape[0], shape[1], str(shape[2]), str(shape[3])
    args.queries = np.load(args.keys_file)["queries"].shape[2]
  print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()[0].device_kind}; "
        f"{args.batch} rows x {args.heads} heads x {args.queries} queries, k={args.k}")
  print(f"{'N':>7} {'dim':>4} {'backend':<12} {'config':<48} {'time':>13}  recall")
  rows = []
  meta = dict(keys=args.keys_file or "synthetic_memory", jax=jax.__version__, platform=jax.default_backend(),
              device=jax.devices()[0].device_kind, host=platform.node(), args=dict(vars(args)),
              timing="ms per call: median of 5 back-to-back calls per repeat")
  def write(rows):
    if args.output:
      with open(args.output, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
  args.write = write
  for d in map(int, args.dims.split(",")):
    args.dim = d
    for n in map(int, args.sizes.split(",")):
      try:
        bench_size(args, n, rows)
      except Exception as e:  # e.g. out of memory at the largest size: keep the rest
        traceback.print_exc()
        rows.append(dict(n=n, dim=d, backend="all", config="", error=f"{type(e).__name__}: {str(e)[:300]}"))
      write(rows)          # after every size (and row), so a run cut short leaves its rows
  if args.output:
    print("wrote", args.output)


if __name__ == "__main__":
  main()
