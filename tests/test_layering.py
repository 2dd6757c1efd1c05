"""The package's layers import only downward, and no module imports itself back.

Layers, lowest first (docs/design.md):

    errors < knn_api < model < knn < data < training < tools < cli

A module may import modules of its own layer and of layers below it. data/
is stricter: it imports nothing of the model or the kNN code. Every import
counts, at module level or inside a function, so an import placed in a
function cannot hide an upward edge or a cycle. Imports are read with `ast`,
so nothing is executed.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "memorizing"

# First dotted prefix that matches wins (longest first).
LAYERS = {
    "memorizing.errors": 0,
    "memorizing.knn_api": 1,
    "memorizing.model": 2,
    "memorizing.knn": 3,
    "memorizing.data": 4,
    "memorizing.training": 5,
    "memorizing.tools": 6,
    "memorizing.cli": 7,
}
# (importer prefix, forbidden imported prefixes) beyond the order of LAYERS.
FORBIDDEN = {
    "memorizing.data": ("memorizing.model", "memorizing.knn", "memorizing.knn_api"),
}


def module_files(root: str = ROOT, package: str = PACKAGE) -> Dict[str, str]:
  """{dotted module name: file path} of every .py file of the package."""
  out = {}
  base = os.path.join(root, package)
  for dirpath, _, files in os.walk(base):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = path
  return out


def _resolve(name: str, modules: Dict[str, str]) -> str:
  """The longest prefix of `name` that is a module of the package."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return name


def imports_of(module: str, path: str, modules: Dict[str, str]) -> List[Tuple[int, str]]:
  """[(line, imported package module)] for every import statement anywhere in the file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
      else:
        prefix = node.module or ""
      # `from pkg import sub` imports pkg.sub when sub is a module, else pkg.
      names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
               for a in node.names]
    for name in names:
      if name == PACKAGE or name.startswith(PACKAGE + "."):
        out.append((node.lineno, _resolve(name, modules)))
  return out


def layer_of(module: str) -> Tuple[str, int]:
  for prefix in sorted(LAYERS, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      return prefix, LAYERS[prefix]
  return module, -1          # the root package: imports nothing, below everything


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components with more than one module (or a self-import)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in graph.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def check(root: str = ROOT, package: str = PACKAGE) -> List[str]:
  """Every upward import, forbidden import and import cycle, one line each."""
  modules = module_files(root, package)
  problems, graph = [], {}
  for module, path in sorted(modules.items()):
    rel = os.path.relpath(path, root)
    mine, rank = layer_of(module)
    graph[module] = set()
    for line, target in imports_of(module, path, modules):
      if target == module:
        continue
      graph[module].add(target)
      theirs, their_rank = layer_of(target)
      if their_rank > rank:
        problems.append(f"{rel}:{line}: {module} imports {target}: layer {theirs} is above "
                        f"layer {mine}")
      for prefix, banned in FORBIDDEN.items():
        if mine == prefix and any(target == b or target.startswith(b + ".") for b in banned):
          problems.append(f"{rel}:{line}: {module} imports {target}: {prefix} imports no "
                          f"model or kNN code")
  for component in _cycles(graph):
    problems.append("import cycle: " + " -> ".join(_one_cycle(graph, component)))
  return problems


def _one_cycle(graph: Dict[str, Set[str]], component: List[str]) -> List[str]:
  """A shortest cycle through the first module of a strongly connected component."""
  start, inside = component[0], set(component)
  paths, seen = [[start]], {start}
  while paths:
    path = paths.pop(0)
    for nxt in sorted(graph.get(path[-1], ())):
      if nxt == start:
        return path + [start]
      if nxt in inside and nxt not in seen:
        seen.add(nxt)
        paths.append(path + [nxt])
  return component + component[:1]


def test_imports_go_down_and_never_cycle():
  problems = check()
  assert not problems, "layering violations:\n  " + "\n  ".join(problems)


def test_every_module_has_a_layer():
  modules = module_files()
  assert len(modules) > 30
  unplaced = [m for m in modules if m != PACKAGE and layer_of(m)[1] < 0]
  assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


def test_check_finds_upward_imports_and_cycles(tmp_path):
  """The check itself: a fake package with an upward import, a function-level
  import closing a cycle and a data -> model import."""
  pkg = tmp_path / PACKAGE
  for sub in ("model", "training", "data"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "errors.py").write_text("")
  (pkg / "model" / "decoder.py").write_text("from memorizing.training import train\n")
  (pkg / "training" / "train.py").write_text(
      "def f():\n  from memorizing.model import decoder\n")
  (pkg / "data" / "pipeline.py").write_text("import memorizing.model.decoder\n")
  problems = check(str(tmp_path))
  text = "\n".join(problems)
  assert "memorizing.model.decoder imports memorizing.training.train: layer " \
         "memorizing.training is above layer memorizing.model" in text
  assert "memorizing.data.pipeline imports memorizing.model.decoder" in text
  assert ("import cycle: memorizing.model.decoder -> memorizing.training.train -> "
          "memorizing.model.decoder") in text
