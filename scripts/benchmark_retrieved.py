"""Times the attention over retrieved memory rows, forward + backward, per implementation.

  python scripts/benchmark_retrieved.py --batch 32 --memory 65536 --json retrieved.json
  python scripts/benchmark_retrieved.py --pallas_configs 64x4,32x4,64x8

One memory layer's work after the search, at the paper's shapes by default
(batch 32 x 8 heads x 512 queries, k 32, head dim 128, bf16): given fixed
neighbour indices, the gradient of a loss of the memory attention's output and
log-sum-exp with respect to the queries, logit scale and bias. Implementations:
"einsum" (gather [B,H,L,k,D] keys and values, then batched dots), "reduce" (the
same gathers, then multiply and sum in float32: a variant measured here only) and
"pallas" (fused kernels reading the rows by index, memorizing/model/pallas_retrieved.py)
for each --pallas_configs block_q x num_warps. Each is compared with einsum (max
relative difference of out and of the query gradient) after it is timed.
Prints a table and writes JSON.
"""
import argparse
import json
import platform
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from memorizing.model import memory as memory_lib
from memorizing.model.layers import l2_normalize
from memorizing.tools.timing import back_to_back_ms
from memorizing.model.memory_attention import attend_retrieved, retrieved_softmax
from memorizing.model.pallas_retrieved import fused_retrieved_attention


def make_inputs(args):
  dtype = jnp.dtype(args.dtype)
  r = jax.random.split(jax.random.PRNGKey(args.seed), 5)
  b, h, length, d, n, k = args.batch, args.heads, args.queries, args.dim, args.memory, args.k
  q = l2_normalize(jax.random.normal(r[0], (b, h, length, d))).astype(dtype)
  keys = l2_normalize(jax.random.normal(r[1], (b, h, n, d))).astype(dtype)
  values = jax.random.normal(r[2], (b, h, n, d)).astype(dtype)
  idx = jax.random.randint(r[3], (b, h, length, k), 0, n, dtype=jnp.int32)
  valid = jax.random.uniform(r[4], (b, h, length, k)) > 0.05
  scale = jnp.linspace(5.0, 12.0, h).astype(jnp.float32)
  bias = jnp.zeros((h,), jnp.float32)
  return q, keys, values, idx, valid, scale, bias


def loss_and_grad(impl, block_q=64, num_warps=4, interpret=False):
  """jitted (q, keys, values, idx, valid, scale, bias) -> (out, (dq, dscale, dbias))."""
  def forward(q, scale, bias, keys, values, idx, valid):
    if impl == "pallas":
      out, lse, _ = fused_retrieved_attention(q, keys, values, idx, valid, scale, bias,
                                              block_q=block_q, num_warps=num_warps,
                                              interpret=interpret)
    elif impl == "reduce":
      f32 = jnp.float32
      k_, v_ = memory_lib.gather(keys, idx).astype(f32), memory_lib.gather(values, idx).astype(f32)
      probs, lse = retrieved_softmax(jnp.sum(q[..., None, :].astype(f32) * k_, axis=-1), valid,
                                     scale, bias)
      out = jnp.sum(probs[..., None] * v_, axis=-2).astype(q.dtype)
    else:
      out, _, lse = attend_retrieved(q, memory_lib.gather(keys, idx),
                                     memory_lib.gather(values, idx), valid, scale, bias)
    return out, lse

  def loss(q, scale, bias, keys, values, idx, valid):
    out, lse = forward(q, scale, bias, keys, values, idx, valid)
    return (jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(lse > -1e29, lse, 0.0)),
            out)

  @jax.jit
  def fn(q, keys, values, idx, valid, scale, bias):
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, scale, bias, keys, values, idx, valid)
    return out, grads
  return fn


def time_fn(fn, inputs, repeats, inner=5):
  """(median ms per call, the output) of fn(*inputs): `inner` back-to-back calls a repeat."""
  return back_to_back_ms(fn, *inputs, calls=inner, repeats=repeats)


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--queries", type=int, default=512)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--memory", type=int, default=65536)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--impls", default="einsum,reduce,pallas")
  p.add_argument("--pallas_configs", default="16x4,8x4,16x8,32x8,64x16",
                 help="block_q x num_warps of the fused kernels, comma-separated")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  interpret = jax.default_backend() != "gpu"
  inputs = make_inputs(args)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.batch} rows x "
        f"{args.heads} heads x {args.queries} queries, k {args.k}, dim {args.dim}, memory "
        f"{args.memory}, {args.dtype}" + (" (Pallas in interpret mode)" if interpret else ""))
  runs = []
  for impl in args.impls.split(","):
    if impl == "pallas":
      for c in args.pallas_configs.split(","):
        bq, w = map(int, c.split("x"))
        runs.append((f"pallas bq{bq} w{w}", loss_and_grad("pallas", bq, w, interpret),
                     dict(block_q=bq, num_warps=w)))
    else:
      runs.append((impl, loss_and_grad(impl), {}))
  rows, ref = [], None
  print(f"{'implementation':<20} {'fwd+bwd ms':>11} {'out rel err':>12} {'dq rel err':>11}")
  for name, fn, opts in runs:
    try:
      ms, (out, grads) = time_fn(fn, inputs, args.repeats)
      if ref is None:
        ref = (out, grads)
      row = dict(name=name, options=opts, ms=ms, out_rel_err=rel_err(out, ref[0]),
                 dq_rel_err=rel_err(grads[0], ref[1][0]),
                 dscale_rel_err=rel_err(grads[1], ref[1][1]))
    except Exception as e:  # noqa: BLE001 - one failing config must not lose the table
      traceback.print_exc()
      row = dict(name=name, options=opts, error=f"{type(e).__name__}: {str(e)[:300]}")
    rows.append(row)
    if "ms" in row:
      print(f"{name:<20} {row['ms']:>11.3f} {row['out_rel_err']:>12.2e} {row['dq_rel_err']:>11.2e}",
            flush=True)
    else:
      print(f"{name:<20} {'error':>11} {row['error'][:80]}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                     host=platform.node(), args=vars(args),
                     command="scripts/benchmark_retrieved.py " + " ".join(argv or sys.argv[1:]),
                     rows=rows), f, indent=1)
    print("wrote", args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
