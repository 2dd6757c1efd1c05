"""Fused attention alone at one layer's shapes: what the position bias costs.

Times jax.nn.dot_product_attention forward and forward + backward (gradients to
q, k, v, and to the bias where the model takes it) for four variants:
  bias + dbias   the model's XL attention: a [1,H,L,2L] bias with its gradient
  bias           the same bias, no gradient for it
  no bias        all 2L keys, no mask
  causal         no bias, the implementation's causal mask (top-left aligned:
                 fewer keys than the XL window; a lower bound)
Shapes default to one layer of the paper step (32 x 512 queries over 1024
keys, 8 heads of 128, bf16). Prints a table and writes JSON.

  python scripts/benchmark_attention.py --json attention.json        # GPU: cuDNN
  python scripts/benchmark_attention.py --batch 2 --implementation xla   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from memorizing.tools.timing import back_to_back_ms


def median_ms(fn, *args, calls=20, repeats=5):
  return back_to_back_ms(fn, *args, calls=calls, repeats=repeats)[0]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=512, help="queries; keys are twice as many")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--layers", type=int, default=12, help="the x-layers column multiplies by this")
  p.add_argument("--implementation", default=None,
                 help="jax.nn.dot_product_attention implementation (default: cudnn on GPU, xla else)")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  impl = a.implementation or ("cudnn" if jax.default_backend() == "gpu" else "xla")
  b, l, h, d = a.batch, a.length, a.heads, a.head_dim
  dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
  r = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(r[0], (b, l, h, d), dtype)
  k = jax.random.normal(r[1], (b, 2 * l, h, d), dtype)
  v = jax.random.normal(r[2], (b, 2 * l, h, d), dtype)
  bias = (jax.random.normal(r[3], (1, h, l, 2 * l)) * 0.1).astype(dtype)
  cot = jax.random.normal(r[4], (b, l, h, d), jnp.float32)
  att = lambda q, k, v, bb=None, causal=False: jax.nn.dot_product_attention(
      q, k, v, bias=bb, scale=d ** -0.5, is_causal=causal, implementation=impl)
  variants = {
      "bias + dbias (the model)": (lambda q, k, v, bb: att(q, k, v, bb), (0, 1, 2, 3)),
      "bias, no dbias": (lambda q, k, v, bb: att(q, k, v, jax.lax.stop_gradient(bb)), (0, 1, 2)),
      "no bias, no mask": (lambda q, k, v, bb: att(q, k, v), (0, 1, 2)),
      "no bias, causal (top-left)": (lambda q, k, v, bb: att(q, k, v, None, True), (0, 1, 2)),
  }
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {impl}; batch {b}, {l} queries "
        f"over {2 * l} keys, {h} heads of {d}, {jnp.dtype(dtype).name}")
  print(f"| variant | forward ms | forward + backward ms | x {a.layers} layers |\n|---|---|---|---|")
  rows = []
  for name, (fn, argnums) in variants.items():
    def loss(q, k, v, bb, fn=fn):
      return jnp.sum(fn(q, k, v, bb).astype(jnp.float32) * cot)
    try:
      fwd = median_ms(jax.jit(fn), q, k, v, bias, calls=a.calls)
      both = median_ms(jax.jit(jax.grad(loss, argnums=argnums)), q, k, v, bias, calls=a.calls)
      rows.append(dict(variant=name, fwd_ms=fwd, fwd_bwd_ms=both, layers_ms=a.layers * both))
      print(f"| {name} | {fwd:.3f} | {both:.3f} | {a.layers * both:.2f} |", flush=True)
    except Exception as e:  # one variant the implementation refuses must not lose the table
      rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
      print(f"| {name} | error: {type(e).__name__} | | |", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(args=vars(a), implementation=impl, jax=jax.__version__,
                     device=jax.devices()[0].device_kind, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
