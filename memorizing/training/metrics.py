"""Metrics: progress bar, workdir/metrics.jsonl, TensorBoard events, summaries."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

import jax.numpy as jnp
import numpy as np

from memorizing.model import signals


def summarize(pending: List[Dict[str, Any]], bytes_per_token: float) -> Dict[str, Any]:
  """Sums of per-step metrics -> means, divided once. Memory signals (per layer
  and head) go under "memory" (signals.summarize)."""
  total = {k: float(np.sum([m[k] for m in pending])) for k in pending[0] if k != "signals"}
  weight = max(total["weight_sum"], 1.0)
  loss = total["loss_sum"] / weight
  steps = total["steps"]
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss / math.log(2) / bytes_per_token,
          "grad_norm": total["grad_norm_sum"] / steps, "steps": int(steps),
          "target_tokens": int(total["weight_sum"]), "nonfinite_steps": int(total["nonfinite"]),
          "memory_fill": total["memory_fill_sum"] / steps,
          **({"memory": signals.summarize(functools.reduce(signals.add, [m["signals"] for m in pending]))}
             if "signals" in pending[0] else {})}


def memory_fill(carried):
  """Mean fraction of memory slots in use over memory layers and rows (0 if none);
  a device scalar, computed inside the step."""
  fills = [jnp.mean(m.count / m.size) for m in carried.memory.values()]
  return jnp.mean(jnp.stack(fills)) if fills else jnp.zeros(())


class MetricsLogger:
  """Writes one JSON line per log step and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # loaded by the process that logs only
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # optional on hosts without it
      self._tb = None

  def write_config(self, model_config, train_config, source: str) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, "config.json"), "w") as f:
      json.dump({"model": dataclasses.asdict(model_config),
                 "train": dataclasses.asdict(train_config), "start": source}, f, indent=1,
                default=str)

  def log(self, step: int, kind: str, values: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record, default=float) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      values = dict(values)
      if isinstance(values.get("memory"), dict):
        values.update(signals.flat_scalars(values.pop("memory")))
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(f"{kind}/{k}", v, step)
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class _Bar:
  def __init__(self, start, total, enabled):
    self._bar = None
    self._last = start
    if enabled:
      from tqdm import tqdm  # loaded when a progress bar is shown only
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0,
                       disable=None if not os.environ.get("MEMORIZING_FORCE_BAR") else False)
      if self._bar.disable:   # not a terminal (a log file, a cluster job): plain lines
        self._bar = None

  def update(self, step, summary):
    if self._bar is None:
      print(f"step {step}: loss {summary['loss']:.4f} ppl {summary['perplexity']:.2f} "
            f"tok/s {summary['tokens_per_second']:.0f}", flush=True)
      return
    self._bar.update(step - self._last)
    self._last = step
    self._bar.set_postfix(loss=f"{summary['loss']:.3f}", ppl=f"{summary['perplexity']:.2f}",
                          tok_s=f"{summary['tokens_per_second']:.0f}")

  def close(self):
    if self._bar is not None:
      self._bar.close()


def progress(start: int, total: int, enabled: bool = True) -> _Bar:
  """A tqdm bar with ETA, loss and tokens/s on a terminal; a plain line per log step
  when disabled or when stderr is not a terminal."""
  return _Bar(start, total, enabled)


def print_eval_table(results: Dict[str, Dict[str, float]], model_config,
                     max_document_tokens: int = 0) -> None:
  scope = (f"the first {max_document_tokens} tokens of each validation document"
           if max_document_tokens else "whole validation documents")
  print(f"\nEvaluation on {scope} (memory size "
        f"{model_config.memory_size if model_config.memory_layers else 0}):")
  print(f"{'':18s} {'perplexity':>10s} {'bits/byte':>9s} {'tokens':>9s} {'docs':>5s}")
  for name, r in results.items():
    print(f"{name:18s} {r['perplexity']:10.3f} {r['bits_per_byte']:9.4f} {r['tokens']:9d} "
          f"{r['documents']:5d}")
  buckets = [k[len("perplexity_"):] for k in next(iter(results.values()), {})
             if k.startswith("perplexity_")]
  buckets = [b for b in buckets if any(r.get(f"tokens_{b}", 0) for r in results.values())]
  if buckets:
    print("perplexity by position in the document (tokens):")
    print(f"{'':18s} " + " ".join(f"{b:>11s}" for b in buckets))
    for name, r in results.items():
      cells = [f"{r[f'perplexity_{b}']:11.3f}" if r.get(f"tokens_{b}") else f"{'-':>11s}"
               for b in buckets]
      print(f"{name:18s} " + " ".join(cells))
  print(flush=True)
