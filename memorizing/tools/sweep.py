"""`memorizing-sweep`: a grid over gin parameters, run point by point, one table.

A sweep is a base configuration (`--gin_file`, `--gin_param`) and a grid of
axes, each a gin parameter and a list of values, from the command line

  --grid 'ModelConfig.memory_size=[1536,8192]' --grid 'ModelConfig.use_xl_cache=[True,False]'

or from a YAML/JSON file (`--grid_file`):

  gin_file: [quickstart.gin]          # optional: base files, added after --gin_file
  gin_param: ["TrainConfig.num_steps = 100"]
  grid:
    ModelConfig.memory_size: [1536, 8192]
    ModelConfig.use_xl_cache: [true, false]

The axis named `gin_file` sweeps over whole gin files (e.g. the Table 4 rows in
configs/experiments/). Values are gin literals: `'adamw'`, `(-4,)`, `True`;
in a YAML/JSON file plain strings that are not literals are quoted for you.

Each point of the product gets a work directory `SWEEP_DIR/<axis-value_...>`
and two commands: `memorizing-train` (TrainConfig.final_eval = False) and
`memorizing-eval --output WORKDIR/results.json`. A point whose workdir holds
results.json is done and is skipped; an interrupted point resumes from its
checkpoint. Points run sequentially in this process (gin is cleared before
each; the default) or as subprocesses (`--launcher subprocess`), or
`--print_commands` prints one shell line per unfinished point for a cluster.
At the end the results of every finished point are collected into
SWEEP_DIR/results.csv and results.md (one row per point with its config) and
plotted into SWEEP_DIR/plots/.
"""
from __future__ import annotations

import argparse
import ast
import csv
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

RESULTS_FILE = "results.json"
POINT_FILE = "point.json"
GIN_FILE_AXIS = "gin_file"


class SweepError(ValueError):
  """A bad grid or sweep flag; the message names the cause and the fix."""


# --- the grid ----------------------------------------------------------------------
def split_values(text: str) -> List[str]:
  """'[1, (2, 3), 'a,b']' -> ['1', '(2, 3)', "'a,b'"]: commas at depth 0, outside quotes."""
  text = text.strip()
  if text.startswith("[") and text.endswith("]"):
    text = text[1:-1]
  values, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      if ch == quote:
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append(text[start:i].strip())
      start = i + 1
  values.append(text[start:].strip())
  return [v for v in values if v]


def parse_grid_flag(flag: str) -> Tuple[str, List[str]]:
  """'ModelConfig.memory_size=[1536,8192]' -> ('ModelConfig.memory_size', ['1536', '8192'])."""
  if "=" not in flag:
    raise SweepError(f"--grid {flag!r}: expected 'Name=[v1,v2,...]', e.g. "
                     "'ModelConfig.memory_size=[1536,8192]'")
  name, values = flag.split("=", 1)
  name, values = name.strip(), split_values(values)
  if not name or not values:
    raise SweepError(f"--grid {flag!r}: needs a parameter name and at least one value")
  return name, values


def gin_literal(value: Any) -> str:
  """A YAML/JSON value as gin text: bools, numbers, None, tuples; strings quoted
  unless they already are a literal (`'adamw'`, `(-4,)`) or a reference (@, %)."""
  if isinstance(value, bool) or value is None:
    return repr(value)
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (list, tuple)):
    items = [gin_literal(v) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  text = str(value).strip()
  if text.startswith(("@", "%")):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def load_grid_file(path: str) -> Dict[str, Any]:
  """{'gin_file': [...], 'gin_param': [...], 'grid': {name: [gin text, ...]}}."""
  if not os.path.exists(path):
    from memorizing.cli import CONFIG_DIR
    if os.path.exists(os.path.join(CONFIG_DIR, path)):
      path = os.path.join(CONFIG_DIR, path)
    else:
      raise SweepError(f"--grid_file {path!r} not found (looked in . and configs/)")
  with open(path) as f:
    text = f.read()
  if path.endswith(".json"):
    spec = json.loads(text)
  else:
    import yaml
    spec = yaml.safe_load(text)
  if not isinstance(spec, dict) or not isinstance(spec.get("grid", {}), dict):
    raise SweepError(f"{path}: expected a mapping with 'grid: {{Name: [values]}}' and "
                     "optional 'gin_file' and 'gin_param' lists")
  unknown = set(spec) - {"gin_file", "gin_param", "grid"}
  if unknown:
    raise SweepError(f"{path}: unknown keys {sorted(unknown)}; allowed: gin_file, gin_param, grid")
  grid = {}
  for name, values in (spec.get("grid") or {}).items():
    values = values if isinstance(values, list) else [values]
    if name == GIN_FILE_AXIS:
      grid[name] = [str(v) for v in values]
    else:
      grid[name] = [gin_literal(v) for v in values]
  as_list = lambda v: [v] if isinstance(v, str) else list(v or [])
  return {"gin_file": as_list(spec.get("gin_file")), "gin_param": as_list(spec.get("gin_param")),
          "grid": grid}


def short_name(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def _slug(text: str) -> str:
  text = re.sub(r"\.gin$", "", os.path.basename(text.strip("'\""))) if text.endswith(".gin") else text
  return re.sub(r"[^A-Za-z0-9._+-]+", "", text.replace(",", "-")) or "none"


def expand(grid: Dict[str, List[str]]) -> List[Dict[str, str]]:
  """The product of the axes, in order (the last axis varies fastest)."""
  names = list(grid)
  return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def point_name(point: Dict[str, str]) -> str:
  shorts = [short_name(n) for n in point]
  use_short = len(set(shorts)) == len(shorts)
  parts = []
  for name, value in point.items():
    key = short_name(name) if use_short else name
    parts.append(_slug(value) if name == GIN_FILE_AXIS else f"{key}-{_slug(value)}")
  return "_".join(parts) or "base"


# --- commands -----------------------------------------------------------------------
def train_args(base_files, base_params, point, workdir) -> List[str]:
  args = []
  for f in list(base_files) + ([point[GIN_FILE_AXIS]] if GIN_FILE_AXIS in point else []):
    args += ["--gin_file", f]
  bindings = list(base_params) + [f"{n} = {v}" for n, v in point.items() if n != GIN_FILE_AXIS]
  for p in bindings + ["TrainConfig.final_eval = False"]:
    args += ["--gin_param", p]
  return args + ["--workdir", workdir]


def eval_args(workdir, eval_params, max_documents) -> List[str]:
  args = ["--workdir", workdir, "--output", os.path.join(workdir, RESULTS_FILE)]
  for p in eval_params:
    args += ["--gin_param", p]
  if max_documents is not None:
    args += ["--max_documents", str(max_documents)]
  return args


def shell_line(train: List[str], evaluate: List[str]) -> str:
  q = lambda args: " ".join(shlex.quote(a) for a in args)
  return f"memorizing-train {q(train)} && memorizing-eval {q(evaluate)}"


# --- results -------------------------------------------------------------------------
def load_results(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def primary(results: dict) -> Tuple[dict, Optional[dict]]:
  """(the model's own evaluation, its memory-disabled evaluation or None)."""
  r = results["results"]
  if "with_memory" in r:
    return r["with_memory"], r.get("memory_disabled")
  return r["memory_disabled"], None


def _fmt(v) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
  return "" if v is None else str(v)


def collect(sweep_dir: str, points: Sequence[Dict[str, str]], base_files, base_params,
            status: Dict[str, str]) -> List[Dict[str, Any]]:
  """One row per point: its axes, config, status and results; writes results.csv/.md."""
  from memorizing.evaluate import bucket_names
  buckets = bucket_names()
  rows = []
  for point in points:
    name = point_name(point)
    workdir = os.path.join(sweep_dir, name)
    res = load_results(workdir)
    row: Dict[str, Any] = {"point": name}
    row.update({short_name(n) if n != GIN_FILE_AXIS else n: v for n, v in point.items()})
    row["status"] = status.get(name, "done" if res else "not run")
    if res:
      main, off = primary(res)
      row.update(step=res.get("checkpoint_step"), perplexity=main["perplexity"],
                 perplexity_memory_disabled=off["perplexity"] if off else None,
                 bits_per_byte=main["bits_per_byte"], tokens=main["tokens"],
                 documents=main["documents"], memory_size=main.get("memory_size", 0))
      for b in buckets:
        row[f"ppl_{b}"] = main.get(f"perplexity_{b}")
        row[f"ppl_off_{b}"] = off.get(f"perplexity_{b}") if off else None
    files = list(base_files) + ([point[GIN_FILE_AXIS]] if GIN_FILE_AXIS in point else [])
    params = list(base_params) + [f"{n} = {v}" for n, v in point.items() if n != GIN_FILE_AXIS]
    row["config"] = "; ".join([f"gin_file {f}" for f in files] + params)
    row["workdir"] = workdir
    rows.append(row)
  columns: List[str] = []
  for row in rows:
    columns += [c for c in row if c not in columns]
  with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
  skip = {"workdir", "config"} | {c for c in columns if c.startswith("ppl_off_")}
  present = lambda v: v not in (None, "") and not (isinstance(v, float) and math.isnan(v))
  md_cols = [c for c in columns if c not in skip and any(present(r.get(c)) for r in rows)]
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(f"# Sweep {os.path.basename(os.path.abspath(sweep_dir))}\n\n")
    f.write(f"Base: {' '.join('--gin_file ' + x for x in base_files)} "
            f"{' '.join(repr(p) for p in base_params)}\n\n".replace("  ", " "))
    f.write("perplexity: the model with its memory; perplexity_memory_disabled: same parameters, "
            "memory always empty; ppl_A-B: perplexity of targets at positions [A, B) of "
            "their document.\n\n")
    f.write("| " + " | ".join(md_cols) + " |\n")
    f.write("|" + "|".join("---" for _ in md_cols) + "|\n")
    for row in rows:
      f.write("| " + " | ".join(_fmt(row.get(c)) for c in md_cols) + " |\n")
    f.write("\nConfigs:\n\n")
    for row in rows:
      f.write(f"- `{row['point']}`: {row['config']}\n")
  return rows


# --- running -------------------------------------------------------------------------
def run_point(train: List[str], evaluate: List[str], launcher: str) -> int:
  if launcher == "subprocess":
    base = [sys.executable, "-m", "memorizing.cli"]
    rc = subprocess.call(base + ["train"] + train)
    return rc or subprocess.call(base + ["eval"] + evaluate)
  from memorizing import cli
  rc = cli.train_main(train)
  return rc or cli.eval_main(evaluate)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="memorizing-sweep",
      description="Train and evaluate every point of a grid over gin parameters; skip finished "
                  "points; collect results.csv, results.md and plots into --sweep_dir.")
  p.add_argument("--sweep_dir", required=True, help="one workdir per point, plus the table")
  p.add_argument("--gin_file", action="append", default=[], help="base gin file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="base gin binding (repeatable)")
  p.add_argument("--grid", action="append", default=[],
                 help="axis 'Name=[v1,v2]' (repeatable; Name 'gin_file' sweeps gin files)")
  p.add_argument("--grid_file", default=None, help="YAML or JSON: gin_file, gin_param, grid")
  p.add_argument("--eval_gin_param", action="append", default=[],
                 help="binding for evaluation only, e.g. a larger 'ModelConfig.memory_size = 65536'")
  p.add_argument("--max_documents", type=int, default=None,
                 help="evaluate the first N documents of the split (default: all)")
  p.add_argument("--launcher", choices=("inprocess", "subprocess"), default="inprocess")
  p.add_argument("--print_commands", action="store_true",
                 help="print one shell line per unfinished point (for a cluster) and exit")
  p.add_argument("--collect_only", action="store_true",
                 help="run nothing: collect the table and plots of finished points")
  p.add_argument("--no_plots", action="store_true")
  return p


def main(argv: Sequence[str]) -> int:
  args = build_parser().parse_args(list(argv))
  base_files, base_params = list(args.gin_file), list(args.gin_param)
  grid: Dict[str, List[str]] = {}
  if args.grid_file:
    spec = load_grid_file(args.grid_file)
    base_files += spec["gin_file"]
    base_params += spec["gin_param"]
    grid.update(spec["grid"])
  for flag in args.grid:
    name, values = parse_grid_flag(flag)
    grid[name] = values
  if not grid:
    raise SweepError("no grid: give --grid 'Name=[v1,v2]' (repeatable) or --grid_file FILE")
  points = expand(grid)
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise SweepError(f"two grid points share a directory name ({names}); make values distinct")
  sweep_dir = os.path.abspath(os.path.expanduser(args.sweep_dir))
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
    json.dump({"gin_file": base_files, "gin_param": base_params, "grid": grid,
               "eval_gin_param": args.eval_gin_param, "max_documents": args.max_documents},
              f, indent=1)

  status: Dict[str, str] = {}
  todo = []
  for point, name in zip(points, names):
    workdir = os.path.join(sweep_dir, name)
    cmds = (train_args(base_files, base_params, point, workdir),
            eval_args(workdir, args.eval_gin_param, args.max_documents))
    if load_results(workdir) is not None:
      status[name] = "done (skipped)"
      print(f"[sweep] {name}: done, skipped", flush=True)
    else:
      todo.append((point, name, workdir, cmds))

  if args.print_commands:
    for _, _, _, (train, evaluate) in todo:
      print(shell_line(train, evaluate))
    print(f"# {len(todo)} of {len(points)} points to run; afterwards collect with: "
          f"memorizing-sweep {' '.join(shlex.quote(a) for a in argv if a != '--print_commands')}"
          " --collect_only", file=sys.stderr)
    return 0

  failed = 0
  if not args.collect_only:
    for i, (point, name, workdir, (train, evaluate)) in enumerate(todo):
      print(f"[sweep] point {i + 1}/{len(todo)}: {name}\n  {shell_line(train, evaluate)}",
            flush=True)
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, POINT_FILE), "w") as f:
        json.dump({"point": point, "gin_file": base_files, "gin_param": base_params}, f, indent=1)
      rc = run_point(train, evaluate, args.launcher)
      if rc == 0 and load_results(workdir) is not None:
        status[name] = "done"
      else:
        status[name] = f"failed (exit {rc})"
        failed += 1
        print(f"[sweep] {name} failed (exit {rc}); going on with the next point", flush=True)

  rows = collect(sweep_dir, points, base_files, base_params, status)
  done = sum(1 for r in rows if "perplexity" in r)
  print(f"[sweep] {done}/{len(rows)} points have results: "
        f"{os.path.join(sweep_dir, 'results.md')} and results.csv", flush=True)
  if not args.no_plots and done:
    from memorizing import plots
    try:
      written = plots.plot_sweep(sweep_dir)
      print(f"[sweep] plots: {', '.join(written)}", flush=True)
    except plots.PlotError as e:
      print(f"[sweep] no plots: {e}", file=sys.stderr)
  return 1 if failed else 0
