"""Prompt and decode throughput of memorizing-generate (random weights).

    python scripts/benchmark_generate.py --model tiny --memory_size 2048 --backend exact \
        --batch 1 --baseline --output docs/results/benchmark_generate_cpu.json
    # one H200:
    python scripts/benchmark_generate.py --model small --model paper150m \
        --memory_size 8192 --memory_size 65536 --backend device --batch 1 --batch 8 \
        --baseline --output benchmark_generate_h200.json

For each (model, memory size, backend, batch) the prompt is `memory_size +
prompt_extra` tokens, so the memory is full (and has wrapped) when decoding
starts; decoding then makes `new_tokens` tokens per row. Compilation is
excluded (one warm-up generation of a segment and a bit first). `--baseline`
adds the same model without its memory layer (memory_layers=()), the
reference of the issue's target: decode time per token with a full 65K memory
at most 1.5x the baseline's.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import jax
import numpy as np

from memorizing.knn import make_backend
from memorizing.model.decoder import init_params
from memorizing.tools import profile_ops
from memorizing.tools.generate import Generator
from memorizing.tools.gin_config import parse_gin


def config_for(model: str, memory_size: int, backend: str, extra=()):
  model_config, _ = parse_gin(["base.gin", f"models/{model}.gin"],
                              [f"ModelConfig.memory_size = {memory_size}",
                               f"ModelConfig.knn_backend = '{backend}'", *extra])
  return model_config


def run_one(config, batch: int, prompt_tokens: int, new_tokens: int, repeats: int = 3,
            seed: int = 0, profile: bool = False):
  """Median over `repeats` timed generations (after one warm-up); with `profile`,
  one more generation under the profiler: device op time per jitted module and op
  class, per generated token (memorizing/tools/profile_ops.py)."""
  params = init_params(config, jax.random.PRNGKey(seed))
  uses_memory = bool(config.memory_layers and config.memory_enabled)
  backend = make_backend(config) if uses_memory else None
  try:
    gen = Generator(config, params, backend)
    rng = np.random.RandomState(seed)
    prompt = rng.randint(0, config.vocab_size, (batch, prompt_tokens)).astype(np.int32)
    length = config.segment_length
    gen.generate(prompt[:, :length + 1], max_new_tokens=length + 1)   # compile every path
    runs = []
    for _ in range(repeats):
      result = gen.generate(prompt, max_new_tokens=new_tokens)
      runs.append((result.prompt_seconds, result.decode_seconds))
    if profile:
      log_dir = tempfile.mkdtemp(prefix="benchmark_generate_")
      with jax.profiler.trace(log_dir):
        traced = gen.generate(prompt, max_new_tokens=new_tokens)
      modules = profile_ops.read_trace(log_dir, traced.decode_steps)["modules"]
  finally:
    if backend is not None:
      backend.close()
  prompt_s = float(np.median([r[0] for r in runs]))
  decode_s = float(np.median([r[1] for r in runs]))
  steps = result.decode_steps
  out = {"prompt_tokens_per_s": batch * prompt_tokens / prompt_s,
         "decode_tokens_per_s": batch * steps / decode_s,
         "decode_ms_per_step": 1e3 * decode_s / steps,
         "prompt_seconds": prompt_s, "decode_seconds": decode_s, "repeats": repeats}
  if profile:
    out["profile_ms_per_token"] = modules
  return out


def profile_lines(row) -> list:
  """Printable lines: per jitted module, device ms per generated token by op class."""
  lines = []
  for module, classes in sorted(row.get("profile_ms_per_token", {}).items(),
                                key=lambda kv: -sum(kv[1].values())):
    parts = ", ".join(f"{c} {ms:.3f}" for c, ms in classes.items() if ms >= 0.001)
    lines.append(f"    {module}: {sum(classes.values()):.3f} ms/token ({parts})")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", action="append", default=None,
                      help="configs/models/NAME.gin (repeatable; default tiny)")
  parser.add_argument("--memory_size", action="append", type=int, default=None,
                      help="repeatable; default 2048")
  parser.add_argument("--backend", action="append", default=None, help="repeatable; default exact")
  parser.add_argument("--batch", action="append", type=int, default=None, help="repeatable; default 1")
  parser.add_argument("--prompt_extra", type=int, default=256,
                      help="prompt tokens beyond the memory size")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
  parser.add_argument("--baseline", action="store_true",
                      help="also the model without its memory layer")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--profile", action="store_true",
                      help="also trace one generation per row: device ms per token by jitted "
                           "module (jit_decode_token, jit_prompt_segment, ...) and op class")
  parser.add_argument("--output", default=None,
                      help="JSON file (written after every row, so a cut run keeps its rows)")
  args = parser.parse_args()
  meta = {"jax": jax.__version__, "device": str(jax.devices()[0]),
          "platform": platform.platform(), "processor": platform.processor(),
          "note": "random weights; compile excluded; prompt fills the memory",
          "command": " ".join(sys.argv)}

  def write():
    if args.output:
      with open(args.output, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
  models = args.model or ["tiny"]
  sizes = args.memory_size or [2048]
  backends = args.backend or ["exact"]
  batches = args.batch or [1]
  rows = []
  for model in models:
    for batch in batches:
      cases = [(m, b) for m in sizes for b in backends]
      for memory_size, backend in cases:
        config = config_for(model, memory_size, backend, args.gin_param)
        r = run_one(config, batch, memory_size + args.prompt_extra, args.new_tokens, args.repeats,
                    profile=args.profile)
        rows.append({"model": model, "memory_size": memory_size, "backend": backend,
                     "batch": batch, "memory_layers": list(config.memory_layers),
                     "prompt_tokens": memory_size + args.prompt_extra,
                     "new_tokens": args.new_tokens, **r})
        print(rows[-1], flush=True)
        write()
      if args.baseline:
        for memory_size in sizes:
          config = config_for(model, memory_size, "exact",
                              list(args.gin_param) + ["ModelConfig.memory_layers = ()"])
          r = run_one(config, batch, memory_size + args.prompt_extra, args.new_tokens,
                      args.repeats, profile=args.profile)
          rows.append({"model": model, "memory_size": 0, "backend": "none", "batch": batch,
                       "memory_layers": [], "prompt_tokens": memory_size + args.prompt_extra,
                       "new_tokens": args.new_tokens, **r})
          print(rows[-1], flush=True)
          write()
  header = (f"{'model':<10} {'memory':>7} {'backend':<8} {'batch':>5} {'prompt':>7} "
            f"{'prompt tok/s':>12} {'decode tok/s':>12} {'ms/step':>8}")
  print(header)
  for r in rows:
    print(f"{r['model']:<10} {r['memory_size']:>7} {r['backend']:<8} {r['batch']:>5} "
          f"{r['prompt_tokens']:>7} {r['prompt_tokens_per_s']:>12.1f} "
          f"{r['decode_tokens_per_s']:>12.1f} {r['decode_ms_per_step']:>8.2f}")
    for line in profile_lines(r):
      print(line)
  if args.output:
    write()
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
