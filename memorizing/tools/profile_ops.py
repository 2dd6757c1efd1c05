"""Where a jitted step's time goes: device op time per op class, from a JAX trace.

  profile = trace_ops(lambda: step(), steps=5, log_dir="/tmp/prof")
  print(class_table({"baseline": profile}))

`trace_ops` runs the callable `steps` times under `jax.profiler.trace`, reads the
trace back with `jax.profiler.ProfileData` (no TensorBoard needed) and sums the
duration of every executed op: on a GPU the "XLA Ops" line of each device plane
(one event per HLO op, with its HLO text in the stats), else its kernel streams;
on the CPU the thunks of the PjRt client's threads. Each op gets one class
(`classify`: matmul, attention, top-k / sort, memory write, gather, copy /
transpose, reduction, ...), from its name and HLO text.

Used by scripts/benchmark_step.py --profile_steps N (issue 17's table of where
the time of the 150M step goes, with and without a 65K memory).
"""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import jax

# (class, substrings of the lowercased op name + HLO text), first match wins.
CLASSES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("attention (cuDNN / flash)", ("fmha", "flash", "cudnn$")),
    # On a GPU a Pallas kernel's events carry its Python function's name: the
    # project's kernels (memorizing/knn/pallas_buckets.py,
    # memorizing/model/pallas_retrieved.py).
    ("Pallas / Triton kernel", ("pallas", "mosaic", "__gpu$xla.gpu.triton", "_bucket_kernel",
                                "_retrieved_fwd_kernel", "_retrieved_bwd_kernel")),
    ("matmul", ("gemm", "cublas", "matmul", "dot", "convolution", "nvjet", "xmma", "cutlass")),
    ("top-k / sort", ("topk", "top_k", "top-k", "sort", "approx")),
    ("memory write (scatter / dynamic-update-slice)", ("scatter", "dynamic-update-slice",
                                                       "dynamic_update_slice")),
    ("gather / dynamic-slice", ("gather", "dynamic-slice", "dynamic_slice")),
    ("copy / transpose", ("copy", "transpose")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "collective", "nccl")),
    ("reduction", ("reduce",)),
    ("other fusion", ("fusion",)),
)
OTHER = "other"


def classify(text: str) -> str:
  """The op class of an op, from its name and HLO text."""
  t = text.lower()
  for name, keys in CLASSES:
    if any(k in t for k in keys):
      return name
  return OTHER


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_ATTRIBUTES = re.compile(r"(metadata|backend_config|frontend_attributes)=(\{.*?\}|\".*?\")(?=,|$)")
_OPCODE = re.compile(r"(?<![\w.%\-])([a-z][a-z0-9\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _parse(hlo_text: str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
  """({instruction name: its HLO line after "="}, {computation: its lines})."""
  bodies: Dict[str, List[str]] = {}
  lines: Dict[str, str] = {}
  current = None
  for raw in hlo_text.splitlines():
    comp = _COMPUTATION.match(raw)
    if comp and "=" not in raw.split("{")[0]:
      current = comp.group(1)
      bodies[current] = []
      continue
    inst = _INSTRUCTION.match(raw)
    if inst:
      lines[inst.group(1)] = inst.group(2)
      if current is not None:
        bodies[current].append(inst.group(2))
  return lines, bodies


def hlo_index(hlo_text: str) -> Dict[str, str]:
  """{instruction name: its HLO line, followed by the bodies of the computations it
  calls (a fusion's ops)}, from a compiled module's text (`compiled.as_text()`)."""
  lines, bodies = _parse(hlo_text)
  out = {}
  for name, line in lines.items():
    called = [" ".join(_opcodes(b) for b in bodies.get(c, ())) for c in _CALLS.findall(line)]
    out[name] = " ".join([_opcodes(line)] + called)
  return out


_LAYOUT = re.compile(r"\{[^}]*\}")
_TYPE = re.compile(r"^\s*(\([^=]*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+([a-z][a-z0-9\-]*)\(")
_UNINTERESTING = ("parameter", "constant", "bitcast", "get-tuple-element")


def hlo_details(hlo_text: str, names: Iterable[str], limit: int = 600) -> Dict[str, str]:
  """{instruction name: "result type opcode | the called computations' ops with
  their result types"} for `names` (e.g. the largest ops of a trace), so a
  fusion's row says what it reads and writes: "bf16[32,8,512,32,128] fusion |
  bf16[...] gather; bf16[...] transpose". Parameters and layouts are left out."""
  lines, bodies = _parse(hlo_text)

  def short(line):
    m = _TYPE.match(_ATTRIBUTES.sub("", line))
    if not m or m.group(2) in _UNINTERESTING:
      return ""
    return _LAYOUT.sub("", m.group(1)) + " " + m.group(2)

  out = {}
  for name in names:
    key = hlo_name(name, lines)
    if key is not None:
      line = lines[key]
      inner = [x for c in _CALLS.findall(line) for x in map(short, bodies.get(c, ())) if x]
      out[name] = (short(line) + (" | " + "; ".join(inner) if inner else ""))[:limit]
  return out


_KERNEL_SUFFIX = re.compile(r"_(\d+)$")


def hlo_name(name: str, names) -> Optional[str]:
  """The HLO instruction a trace's op name stands for, or None. A GPU trace
  names ops as their kernels are named, with "." turned into "_"
  ("input_add_reduce_fusion_18" for HLO's "input_add_reduce_fusion.18")."""
  if name in names:
    return name
  dotted = _KERNEL_SUFFIX.sub(r".\1", name)
  return dotted if dotted in names else None


def _opcodes(line: str) -> str:
  """The opcodes and custom-call targets of one HLO line, without its operands'
  names or metadata ("fusion dot TopK", not "%sort.1" or op_name="jit(f)/...")."""
  line = _ATTRIBUTES.sub("", line)
  return " ".join(_OPCODE.findall(line) + _TARGET.findall(line))


def _stat(event, key: str):
  for k, v in event.stats:
    if k == key:
      return v
  return None


def _event_text(event, hlo: Dict[str, str]) -> str:
  parts = [event.name]
  for key in ("hlo_op", "long_name", "hlo_category"):
    value = _stat(event, key)
    if isinstance(value, str):            # long_name: the HLO line, operands dropped
      parts.append(_opcodes(value) if key == "long_name" else value)
  op = hlo_name(str(_stat(event, "hlo_op") or event.name), hlo)
  parts.append(hlo.get(op, "") if op else "")
  return " ".join(parts)


def _op_lines(profile) -> Iterable[Tuple[Any, bool]]:
  """(line, whether only events with an hlo_op stat are ops): the lines whose events
  are executed ops, one set per device (no double count)."""
  device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
  if device_planes:
    for plane in device_planes:
      lines = list(plane.lines)
      ops = [ln for ln in lines if ln.name == "XLA Ops"]
      yield from ((ln, False) for ln in (ops or [ln for ln in lines
                                                 if ln.name.startswith("Stream")]))
    return
  for plane in profile.planes:
    if plane.name == "/host:CPU":            # the CPU client's thunks carry an hlo_op stat
      yield from ((ln, True) for ln in plane.lines)


def read_trace(log_dir: str, steps: int, hlo_text: str = "") -> Dict[str, Any]:
  """{"ms_per_step": {class: ms}, "ops": [(ms per step, class, op name)] largest first,
  "op_hlo": {op name: hlo_details of it} for those ops,
  "total_ms_per_step": device op time per step, "modules": {jitted module: {class: ms
  per step}}, "planes": plane names} from the newest
  trace under `log_dir`. `hlo_text`: the compiled module's text, to classify ops by
  what they compute (a fusion by the ops inside it)."""
  from jax.profiler import ProfileData
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {log_dir}: did the trace run?")
  profile = ProfileData.from_file(paths[-1])
  hlo = hlo_index(hlo_text) if hlo_text else {}
  by_class: Dict[str, float] = {}
  by_op: Dict[Tuple[str, str], float] = {}
  by_module: Dict[str, Dict[str, float]] = {}
  for line, needs_hlo_op in _op_lines(profile):
    for event in line.events:
      if event.duration_ns <= 0 or (needs_hlo_op and _stat(event, "hlo_op") is None):
        continue                           # a host function, not an executed op
      cls = classify(_event_text(event, hlo))
      ms = event.duration_ns / 1e6 / steps
      by_class[cls] = by_class.get(cls, 0.0) + ms
      by_op[(cls, event.name)] = by_op.get((cls, event.name), 0.0) + ms
      module = by_module.setdefault(str(_stat(event, "hlo_module") or "?"), {})
      module[cls] = module.get(cls, 0.0) + ms
  ops = sorted(((ms, cls, name) for (cls, name), ms in by_op.items()), reverse=True)
  return {"ms_per_step": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
          "total_ms_per_step": sum(by_class.values()), "ops": ops[:25],
          "op_hlo": hlo_details(hlo_text, [name for _, _, name in ops[:25]]) if hlo_text else {},
          "modules": {m: dict(sorted(c.items(), key=lambda kv: -kv[1]))
                      for m, c in by_module.items()},
          "planes": [p.name for p in profile.planes]}


def trace_ops(fn: Callable[[], Any], steps: int, log_dir: str = "",
              hlo_text: str = "") -> Dict[str, Any]:
  """Runs `fn` (one step, returning its arrays) `steps` times under the profiler
  and returns `read_trace` of it."""
  log_dir = log_dir or tempfile.mkdtemp(prefix="memorizing_profile_")
  out = fn()                               # outside the trace: compile, first-run costs
  jax.block_until_ready(out)
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
  result = read_trace(log_dir, steps, hlo_text)
  result["log_dir"] = log_dir
  return result


def class_table(profiles: Dict[str, Dict[str, Any]]) -> str:
  """Markdown: one row per op class, ms per step and share of each profile's op time."""
  names = list(profiles)
  classes: List[str] = []
  for p in profiles.values():
    classes += [c for c in p["ms_per_step"] if c not in classes]
  head = "| op class | " + " | ".join(f"{n}: ms/step (share)" for n in names) + " |"
  lines = [head, "|---|" + "---|" * len(names)]
  for c in classes:
    cells = []
    for n in names:
      p = profiles[n]
      ms = p["ms_per_step"].get(c, 0.0)
      cells.append(f"{ms:.3f} ({100 * ms / max(p['total_ms_per_step'], 1e-12):.0f}%)")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  lines.append("| **all ops** | " + " | ".join(
      f"{profiles[n]['total_ms_per_step']:.3f}" for n in names) + " |")
  return "\n".join(lines) + "\n"
