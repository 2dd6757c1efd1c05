"""Benchmark of the kNN backends: time per lookup and recall@k against exact.

One lookup = B rows x H heads x Q queries over N keys of dim D, k neighbours
(default 8 x 8 x 512 over 65536 x 128, k = 32: one memory layer, one step of
the paper's setup). Keys and queries come from
memorizing.knn.device.synthetic_memory (topic clusters plus positional
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
from memorizing import memory as M
from memorizing.knn import device
from memorizing.knn.exact import ExactBackend

# (label, DeviceBackend options); pallas rows only run on GPU.
DEVICE_CONFIGS = [
    ("xla f32 S=256", dict(impl="xla", compute_dtype="float32", num_buckets=256)),
    ("xla bf16 S=256", dict(impl="xla", compute_dtype="bfloat16", num_buckets=256)),
    ("xla bf16 S=128", dict(impl="xla", compute_dtype="bfloat16", num_buckets=128)),
    ("pallas S=128 bq=64 w4", dict(impl="pallas", num_buckets=128, block_q=64, num_warps=4)),
    ("pallas S=128 bq=64 w4 packed", dict(impl="pallas", num_buckets=128, block_q=64, num_warps=4, packed=True)),
    ("pallas S=128 bq=128 w4 packed", dict(impl="pallas", num_buckets=128, block_q=128, num_warps=4, packed=True)),
    ("pallas S=256 bq=32 w4", dict(impl="pallas", num_buckets=256, block_q=32, num_warps=4)),
    ("pallas S=256 bq=64 w4", dict(impl="pallas", num_buckets=256, block_q=64, num_warps=4)),
    ("pallas S=256 bq=64 w4 packed", dict(impl="pallas", num_buckets=256, block_q=64, num_warps=4, packed=True)),
    ("pallas S=256 bq=64 w8 packed", dict(impl="pallas", num_buckets=256, block_q=64, num_warps=8, packed=True)),
    ("pallas S=256 bq=32 w4 packed", dict(impl="pallas", num_buckets=256, block_q=32, num_warps=4, packed=True)),
    ("auto (default options)", dict()),
]


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


def time_fn(fn, *args, repeats: int):
  """Median wall time in ms of fn(*args) (compiled, after one warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


def bench_size(args, n: int, rows: list):
  b, h, q, d, k = args.batch, args.heads, args.queries, args.dim, args.k
  if args.keys_file:   # real keys and queries captured from a model (scripts/capture_keys.py)
    captured = np.load(args.keys_file)
    keys, queries = jnp.asarray(captured["keys"]), jnp.asarray(captured["queries"])
    count = jnp.asarray(captured["count"], jnp.int32)
  else:
    keys, queries = device.synthetic_memory(jax.random.PRNGKey(0), b, h, n, q, d)
    count = jnp.full((b,), n, jnp.int32)
  mem = M.MemoryState(keys=keys, values=keys, pointer=jnp.zeros((b,), jnp.int32), count=count)
  mem = jax.block_until_ready(mem)
  common = dict(n=n, batch=b, heads=h, queries=q, dim=d, k=k)
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
    for label, opts in DEVICE_CONFIGS:
      if opts.get("impl") == "pallas" and not on_gpu:
        continue
      be = device.DeviceBackend(**opts)
      fn = jax.jit(lambda qq, m, be=be: be.search(qq, m, k, None))
      try:
        i, v = fn(queries, mem)
        r = device.recall(i, v, ei, ev)
        ms = time_fn(fn, queries, mem, repeats=args.repeats)
        rows.append(dict(common, backend="device", config=label, options=opts,
                         resolved_impl=be.resolved_impl(d, k), ms=ms, recall=r))
      except Exception as e:  # report and go on: one bad config must not lose the table
        traceback.print_exc()
        rows.append(dict(common, backend="device", config=label, options=opts,
                         error=f"{type(e).__name__}: {str(e)[:300]}"))
      print_row(rows[-1])

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
    _, new = device.synthetic_memory(jax.random.fold_in(rng, s), b, h, 0, q, d)
    t = time.perf_counter()
    mem, (i, v, ei, ev) = step(mem, queries, new)
    jax.block_until_ready(i)
    total.append((time.perf_counter() - t) * 1e3)
    recalls.append(device.recall(i, v, ei, ev))
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
  print(f"{r['n']:>7} {r['dim']:>4} {r['backend']:<12} {r['config']:<30} {ms} ms  "
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
  p.add_argument("--keys_file", default=None,
                 help="npz from scripts/capture_keys.py: benchmark on a model's real keys "
                      "and queries (its shape replaces --sizes/--dims/--batch/--heads/--queries)")
  args = p.parse_args()
  if args.keys_file:
    shape = np.load(args.keys_file)["keys"].shape
    args.batch, args.heads, args.sizes, args.dims = shape[0], shape[1], str(shape[2]), str(shape[3])
    args.queries = np.load(args.keys_file)["queries"].shape[2]
  print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()[0].device_kind}; "
        f"{args.batch} rows x {args.heads} heads x {args.queries} queries, k={args.k}")
  print(f"{'N':>7} {'dim':>4} {'backend':<12} {'config':<30} {'time':>13}  recall")
  rows = []
  meta = dict(keys=args.keys_file or "synthetic_memory", jax=jax.__version__, platform=jax.default_backend(),
              device=jax.devices()[0].device_kind, host=platform.node(), args=dict(vars(args)))
  for d in map(int, args.dims.split(",")):
    args.dim = d
    for n in map(int, args.sizes.split(",")):
      try:
        bench_size(args, n, rows)
      except Exception as e:  # e.g. out of memory at the largest size: keep the rest
        traceback.print_exc()
        rows.append(dict(n=n, dim=d, backend="all", config="", error=f"{type(e).__name__}: {str(e)[:300]}"))
      if args.output:      # after every size, so a run cut short still leaves its rows
        with open(args.output, "w") as f:
          json.dump(dict(meta=meta, rows=rows), f, indent=1)
  if args.output:
    print("wrote", args.output)


if __name__ == "__main__":
  main()
