"""Plots (PNG, matplotlib's Agg backend) from a work directory or a sweep directory.

  training_curves.png        train loss (and evaluation loss, when logged) per step,
                             from metrics.jsonl
  perplexity_vs_memory.png   perplexity against the memory size; memory disabled dashed
  perplexity_by_position.png perplexity by the target's position inside its document,
                             with memory (solid) and with memory disabled (dashed)

A work directory's evaluations come from its `*.json` files written by
`memorizing-eval --output` (e.g. results.json, eval_mem65536.json: the same
model evaluated with several memory sizes) and, failing those, from the final
`eval_with_memory` / `eval_memory_disabled` records of metrics.jsonl. A sweep
directory's come from each point's results.json.

    memorizing-plot --workdir DIR      # or --sweep_dir DIR; writes DIR/plots/

A sweep's one JSON of all results (sweep_results.json; the committed Table 4
results in docs/results/ have the same layout) gives three more (`plot_results`):

    memorizing-plot --results docs/results/repro_table4_h200_4000steps.json \
        --out_dir docs/img --prefix repro_
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from memorizing.errors import PlotError
from memorizing.tools import grid as grid_lib
from memorizing.training.evaluate import bucket_names


def _pyplot():
  # Imported when a plot is drawn: matplotlib is an optional dependency ('.[plots]').
  try:
    import matplotlib
  except ImportError as e:
    raise PlotError("plots need matplotlib: pip install -e '.[plots]' "
                    "(or pip install matplotlib)") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# --- reading ---------------------------------------------------------------------------
def read_metrics(workdir: str) -> List[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut by a crash
  return records


def workdir_evaluations(workdir: str) -> List[Dict[str, dict]]:
  """[{'with_memory': result, 'memory_disabled': result}, ...], one per evaluation found."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "*.json"))):
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
      found.append({**data["results"], "source": os.path.basename(path)})
  if not found:
    final = {}
    for r in read_metrics(workdir):
      if r.get("kind") in ("eval_with_memory", "eval_memory_disabled"):
        final[r["kind"][len("eval_"):]] = r
    if final:
      found.append({**final, "source": "metrics.jsonl"})
  return found


def _short_label(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir))


# --- plots -------------------------------------------------------------------------------
def plot_training_curves(runs: Dict[str, str], path: str) -> str:
  """runs: label -> workdir. Train loss per step; eval loss as markers."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  drawn = 0
  for i, (label, workdir) in enumerate(runs.items()):
    records = read_metrics(workdir)
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    if not train:
      continue
    color = f"C{i % 10}"
    # A single log point is a marker (a line of one point draws nothing).
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=label,
            marker="o" if len(train) == 1 else None)
    ev = [r for r in records if r.get("kind") in ("eval", "eval_with_memory") and "loss" in r]
    if ev:
      ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o", color=color,
              markerfacecolor="none")
    drawn += 1
  if not drawn:
    plt.close(fig)
    raise PlotError("no train records in any metrics.jsonl")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats/token); o: validation")
  ax.set_title("Training curves")
  return _save(plt, fig, ax, path)


def _save(plt, fig, ax, path: str) -> str:
  """Grid, legend, tight layout, PNG at `path`; closes the figure."""
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_perplexity_vs_memory(series: Dict[str, List[dict]], path: str) -> str:
  """series: label -> [{'memory_size', 'perplexity', 'perplexity_memory_disabled'}]."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  drawn = 0
  sizes = set()
  for i, (label, points) in enumerate(series.items()):
    color = f"C{i % 10}"
    mem = sorted((p for p in points if p.get("memory_size")), key=lambda p: p["memory_size"])
    flat = [p for p in points if not p.get("memory_size")]
    if mem:
      xs = [p["memory_size"] for p in mem]
      sizes.update(xs)
      ax.plot(xs, [p["perplexity"] for p in mem], "o-", color=color, label=label)
      off = [(p["memory_size"], p["perplexity_memory_disabled"]) for p in mem
             if p.get("perplexity_memory_disabled") is not None]
      if off:
        ax.plot(*zip(*off), "x--", color=color, alpha=0.7, label=f"{label}, memory disabled")
      drawn += 1
    for p in flat:  # no kNN layer: a horizontal reference line
      ax.axhline(p["perplexity"], color=color, linestyle=":", label=f"{label} (no kNN memory)")
      drawn += 1
  if not drawn:
    plt.close(fig)
    raise PlotError("no evaluation results with a perplexity")
  if sizes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes))
    ax.set_xticklabels([str(s) for s in sorted(sizes)])
  ax.set_xlabel("memory size (keys per row and head)")
  ax.set_ylabel("perplexity")
  ax.set_title("Perplexity vs memory size")
  return _save(plt, fig, ax, path)


def plot_perplexity_by_position(series: Dict[str, Dict[str, dict]], path: str) -> str:
  """series: label -> {'with_memory': result, 'memory_disabled': result} (either may be absent)."""
  plt = _pyplot()
  names = bucket_names()
  used = [b for b in names
          if any(r.get(f"tokens_{b}") for s in series.values() for r in s.values()
                 if isinstance(r, dict))]
  if not used:
    raise PlotError("no evaluation results with tokens in any position bucket")
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  x = list(range(len(used)))
  for i, (label, variants) in enumerate(series.items()):
    color = f"C{i % 10}"
    for variant, style, suffix in (("with_memory", "o-", ""),
                                   ("memory_disabled", "x--", ", memory disabled")):
      r = variants.get(variant)
      if not isinstance(r, dict):
        continue
      ys = [r.get(f"perplexity_{b}", float("nan")) for b in used]
      ys = [y if y is not None else float("nan") for y in ys]
      if all(math.isnan(y) for y in ys):
        continue
      own = variant == "with_memory" or "with_memory" not in variants
      ax.plot(x, ys, style, color=color, alpha=1.0 if own else 0.7,
              label=label + (suffix if "with_memory" in variants else ""))
  ax.set_xticks(x)
  ax.set_xticklabels([f"{b}" for b in used])
  ax.set_xlabel("target position inside its document (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title("Perplexity by position: with memory (solid), memory disabled (dashed)")
  ax.title.set_fontsize(9)
  return _save(plt, fig, ax, path)


# --- entry points ---------------------------------------------------------------------------
def _try(fn, *args) -> Optional[str]:
  try:
    return fn(*args)
  except PlotError as e:
    if "matplotlib" in str(e):
      raise
    print(f"[plots] skipped {os.path.basename(args[-1])}: {e}", flush=True)
    return None


def plot_workdir(workdir: str, out_dir: Optional[str] = None) -> List[str]:
  """The three plots of one work directory into out_dir (default workdir/plots)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise PlotError(f"{workdir} is not a directory")
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  label = _short_label(workdir)
  written = [_try(plot_training_curves, {label: workdir},
                  os.path.join(out_dir, "training_curves.png"))]
  evals = workdir_evaluations(workdir)
  points = []
  for e in evals:
    main = e.get("with_memory") or e.get("memory_disabled")
    off = e.get("memory_disabled") if "with_memory" in e else None
    if main:
      points.append({"memory_size": main.get("memory_size", 0) if "with_memory" in e else 0,
                     "perplexity": main["perplexity"],
                     "perplexity_memory_disabled": off["perplexity"] if off else None})
  if points:
    written.append(_try(plot_perplexity_vs_memory, {label: points},
                        os.path.join(out_dir, "perplexity_vs_memory.png")))
    series = {}
    for e in evals:
      main = e.get("with_memory")
      size = main.get("memory_size") if main else None
      key = f"{label} ({e['source']}" + (f", memory {size})" if size else ")")
      series[key if len(evals) > 1 else label] = {k: v for k, v in e.items() if k != "source"}
    written.append(_try(plot_perplexity_by_position, series,
                        os.path.join(out_dir, "perplexity_by_position.png")))
  else:
    print(f"[plots] no evaluation results in {workdir} (run memorizing-eval --workdir "
          f"{workdir} --output {os.path.join(workdir, 'results.json')}); plotted training only")
  written = [w for w in written if w]
  if not written:
    raise PlotError(f"nothing to plot in {workdir}: no metrics.jsonl and no evaluation results")
  return written


def _axis_label(name: str, value: str) -> str:
  if name == grid_lib.GIN_FILE_AXIS:   # ctx512_xl_mem8192.gin -> ctx512_xl: one line per row family
    return re.sub(r"_?mem\d+", "", grid_lib.slug(value)) or "mem"
  return f"{grid_lib.short_name(name)}={value}"


def plot_sweep(sweep_dir: str, out_dir: Optional[str] = None) -> List[str]:
  """The three plots of a sweep directory (made by memorizing-sweep) into out_dir."""
  sweep_dir = os.path.abspath(os.path.expanduser(sweep_dir))
  spec_path = os.path.join(sweep_dir, "sweep.json")
  if not os.path.exists(spec_path):
    raise PlotError(f"{sweep_dir} has no sweep.json; is it a memorizing-sweep directory?")
  with open(spec_path) as f:
    spec = json.load(f)
  grid = dict(spec["grid"])
  if spec.get("seeds"):
    grid[grid_lib.SEED_AXIS] = [str(s) for s in spec["seeds"]]
  points = grid_lib.expand(grid) if grid else []
  out_dir = out_dir or os.path.join(sweep_dir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  runs, results = {}, {}
  for point in points:
    name = grid_lib.point_name(point)
    workdir = os.path.join(sweep_dir, name)
    if os.path.isdir(workdir):
      runs[name] = workdir
      res = grid_lib.load_results(workdir)
      if res:
        results[name] = (point, res)
  written = [_try(plot_training_curves, runs, os.path.join(out_dir, "training_curves.png"))
             if runs else None]
  if results:
    # Lines of perplexity vs memory size: one per setting of the other axes.
    memory_axes = [n for n in grid if n.endswith("memory_size")]
    series: Dict[str, List[dict]] = {}
    for name, (point, res) in results.items():
      main, off = grid_lib.primary(res)
      other = [_axis_label(n, v) for n, v in point.items() if n not in memory_axes]
      label = ", ".join(other) or "sweep"
      series.setdefault(label, []).append(
          {"memory_size": main.get("memory_size", 0) if off is not None else 0,
           "perplexity": main["perplexity"],
           "perplexity_memory_disabled": off["perplexity"] if off else None})
    written.append(_try(plot_perplexity_vs_memory, series,
                        os.path.join(out_dir, "perplexity_vs_memory.png")))
    written.append(_try(plot_perplexity_by_position,
                        {name: res["results"] for name, (_, res) in results.items()},
                        os.path.join(out_dir, "perplexity_by_position.png")))
  written = [w for w in written if w]
  if not written:
    raise PlotError(f"nothing to plot in {sweep_dir}: no point has metrics or results yet")
  return written


def _result(job: dict, variant: str = "with_memory") -> Optional[dict]:
  return (job.get("results") or {}).get(variant)


def _label(name: str, job: dict) -> str:
  return job.get("label") or name


def plot_results(path: str, out_dir: str, prefix: str = "") -> List[str]:
  """The plots of a sweep's one JSON of all results (sweep_results.json, or a
  Table 4 file under docs/results/ in the same {"jobs": {name: job}} layout):

  PREFIXppl_vs_memory.png    validation perplexity against the memory size: one
                             line over the trained runs with a kNN memory, runs
                             without one (memory size 0) as horizontal lines,
                             fine-tuned runs and extra evaluations as markers;
  PREFIXppl_by_position.png  perplexity by the target's position in its document,
                             one line per trained run (fine-tunes dashed);
  PREFIXtrain_loss.png       train loss per step of the runs trained from scratch.
  """
  try:
    with open(path) as f:
      jobs = json.load(f)["jobs"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise PlotError(f"{path}: not a results JSON with 'jobs' ({e})") from e
  plt = _pyplot()
  os.makedirs(out_dir, exist_ok=True)
  trained = {n: j for n, j in jobs.items() if j.get("kind", "train") == "train"}
  scratch = {n: j for n, j in trained.items() if not j.get("init_from")}
  written = []

  # Perplexity vs memory size.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  line = sorted((r["memory_size"], r["perplexity"]) for r in
                (_result(j) for j in scratch.values()) if r and r.get("memory_size"))
  flat = [(n, r) for n, j in scratch.items() for r in [_result(j)]
          if r and not r.get("memory_size")]
  if line:
    ax.plot([x for x, _ in line], [y for _, y in line], "o-",
            label="trained and evaluated with that memory")
  for i, (name, r) in enumerate(flat):
    ax.axhline(r["perplexity"], color=f"C{i + 3}", ls=":",
               label=f"{_label(name, jobs[name])} (no kNN memory)")
  markers = [(n, j, r) for n, j in jobs.items() for r in [_result(j)]
             if r and r.get("memory_size") and (j.get("kind") == "eval" or j.get("init_from"))]
  for i, (name, job, r) in enumerate(markers):
    ax.plot([r["memory_size"]], [r["perplexity"]], "s^Dv"[i % 4], label=_label(name, job))
  if not (line or flat or markers):
    plt.close(fig)
    raise PlotError(f"{path}: no job has a perplexity")
  ax.set_xscale("log", base=2)
  ticks = sorted({x for x, _ in line} | {r["memory_size"] for _, _, r in markers})
  ax.set_xticks(ticks, [str(x) for x in ticks])
  ax.set_xlabel("kNN memory size (per row and head)")
  ax.set_ylabel("validation perplexity")
  written.append(_save(plt, fig, ax, os.path.join(out_dir, f"{prefix}ppl_vs_memory.png")))

  # Perplexity by position.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  buckets: List[str] = []
  for name, job in trained.items():
    r = _result(job) or _result(job, "memory_disabled")
    if not r:
      continue
    buckets = [k[len("perplexity_"):] for k in r if k.startswith("perplexity_")]
    ax.plot(range(len(buckets)), [r["perplexity_" + b] for b in buckets], marker="o",
            label=_label(name, job), ls="--" if job.get("init_from") else "-")
  ax.set_xticks(range(len(buckets)), buckets)
  ax.set_xlabel("target position in its document (tokens)")
  ax.set_ylabel("validation perplexity")
  written.append(_save(plt, fig, ax, os.path.join(out_dir, f"{prefix}ppl_by_position.png")))

  # Train loss.
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, job in scratch.items():
    log = job.get("train_log")
    if log:
      ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=_label(name, job))
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats per token)")
  written.append(_save(plt, fig, ax, os.path.join(out_dir, f"{prefix}train_loss.png")))
  return written


def main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="memorizing-plot", description=__doc__.split("\n\n")[0])
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--workdir", help="a training work directory")
  group.add_argument("--sweep_dir", help="a memorizing-sweep directory")
  group.add_argument("--results", help="a sweep's sweep_results.json (or a docs/results/ "
                                       "Table 4 JSON)")
  p.add_argument("--out_dir", default=None,
                 help="default: DIR/plots (with --results: the JSON's folder)")
  p.add_argument("--prefix", default="", help="--results: prefix of the PNG names")
  args = p.parse_args(list(argv))
  if args.results:
    written = plot_results(args.results,
                           args.out_dir or os.path.dirname(os.path.abspath(args.results)),
                           args.prefix)
  elif args.workdir:
    written = plot_workdir(args.workdir, args.out_dir)
  else:
    written = plot_sweep(args.sweep_dir, args.out_dir)
  for w in written:
    print(f"wrote {w}")
  return 0
