"""Sweep points: the grid, the points' names and work directories, their results.

Shared by memorizing/tools/sweep.py (which runs the points) and
memorizing/tools/plots.py (which draws them); imports neither.
"""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from memorizing.errors import SweepError
from memorizing.tools.gin_config import find_config

RESULTS_FILE = "results.json"
POINT_FILE = "point.json"
GIN_FILE_AXIS = "gin_file"
SEED_AXIS = "TrainConfig.seed"
SPEC_KEYS = ("gin_file", "gin_param", "grid", "seeds", "rows", "evals")


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


def _as_list(v) -> List[str]:
  return [v] if isinstance(v, str) else list(v or [])


def _params(values) -> List[str]:
  return [str(v) for v in _as_list(values)]


def load_grid_file(path: str) -> Dict[str, Any]:
  """The sweep of a YAML/JSON file:

    {'gin_file': [...], 'gin_param': [...], 'grid': {name: [gin text, ...]},
     'seeds': [int, ...], 'rows': {name: {'gin_file', 'gin_param', 'init_from', 'memory'}},
     'evals': {name: {'of', 'gin_param', 'memory'}}}
  """
  if find_config(path) is None:
    raise SweepError(f"--grid_file {path!r} not found (looked in . and configs/)")
  path = find_config(path)
  with open(path) as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      spec = json.loads(text)
    except json.JSONDecodeError as e:
      raise SweepError(f"{path} is not valid JSON: {e}") from e
  else:
    import yaml  # only a YAML sweep file needs it
    try:
      spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
      where = getattr(e, "problem_mark", None)
      at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
      raise SweepError(f"{path} is not valid YAML{at}: "
                       f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from e
  if not isinstance(spec, dict) or not isinstance(spec.get("grid", {}), dict):
    raise SweepError(f"{path}: expected a mapping with 'grid: {{Name: [values]}}' and "
                     "optional 'gin_file', 'gin_param', 'seeds', 'rows' and 'evals'")
  unknown = set(spec) - set(SPEC_KEYS)
  if unknown:
    raise SweepError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
  grid = {}
  for name, values in (spec.get("grid") or {}).items():
    values = values if isinstance(values, list) else [values]
    if name == GIN_FILE_AXIS:
      grid[name] = [str(v) for v in values]
    else:
      grid[name] = [gin_literal(v) for v in values]
  rows = {}
  for name, row in (spec.get("rows") or {}).items():
    if not isinstance(row, dict) or set(row) - {"gin_file", "gin_param", "init_from", "memory"}:
      raise SweepError(f"{path}: row {name!r} takes gin_file, gin_param, init_from and memory")
    rows[str(name)] = {"gin_file": _params(row.get("gin_file")),
                       "gin_param": _params(row.get("gin_param")),
                       "init_from": row.get("init_from")}
    if "memory" in row:
      rows[str(name)]["memory"] = _memory(path, f"row {name!r}", row["memory"])
  evals = {}
  for name, ev in (spec.get("evals") or {}).items():
    if not isinstance(ev, dict) or "of" not in ev or set(ev) - {"of", "gin_param", "memory"}:
      raise SweepError(f"{path}: eval {name!r} takes of (a point or row), gin_param, memory")
    memory = _memory(path, f"eval {name!r}", ev.get("memory", "both"))
    evals[str(name)] = {"of": str(ev["of"]), "gin_param": _params(ev.get("gin_param")),
                        "memory": memory}
  return {"gin_file": _as_list(spec.get("gin_file")), "gin_param": _as_list(spec.get("gin_param")),
          "grid": grid, "seeds": [int(s) for s in _as_list(spec.get("seeds"))],
          "rows": rows, "evals": evals}


def _memory(path: str, what: str, value) -> str:
  """An evaluation's memory setting: both, on or off (YAML reads on/off as booleans)."""
  memory = {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)
  if memory not in ("both", "on", "off"):
    raise SweepError(f"{path}: {what}: memory is both, on or off, got {value!r}")
  return memory


def short_name(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def slug(text: str) -> str:
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
    parts.append(slug(value) if name == GIN_FILE_AXIS else f"{key}-{slug(value)}")
  return "_".join(parts) or "base"


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
