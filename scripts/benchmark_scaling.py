"""Data-parallel scaling of the real trainer on 1, 2, 4 ... devices of one host.

For each model (--model), device count n (--devices) and mode, it runs `memorizing-train`
for --steps steps (log_every 1, no checkpoints, no evaluation) in a fresh workdir and
reads its metrics.jsonl:

  mode       'local': one process that sees n devices (CUDA_VISIBLE_DEVICES=0..n-1, or
             n fake CPU devices); 'processes': n processes of one device each, joined by
             jax.distributed (TrainConfig.multihost) through a coordinator on 127.0.0.1.
  batch      'global': the same global batch on every n (--global_batch; strong scaling);
             'per_device': --batch_per_device rows on each device (weak scaling).

Reported per run: median step time after --warmup steps, tokens/s, scaling efficiency
(global: t(1) / (n t(n)); per_device: tokens/s(n) / (n tokens/s(1))), the peak memory
used per GPU (nvidia-smi polled every 0.2 s, with XLA_PYTHON_CLIENT_PREALLOCATE=false so
that it is what the run allocated; CPU: not measured), and whether the first --compare
losses equal those of the 1-device run at the same global batch (relative tolerance
--rtol: 1e-5 for float32; say the tolerance you use for bfloat16).

  python scripts/benchmark_scaling.py --model small --model paper150m --devices 1,2,4 \
      --json docs/results/scaling_h200x4.json                       # a host with 4 GPUs
  python scripts/benchmark_scaling.py --model tiny --devices 1,2 --steps 6 --warmup 2 \
      --compare 4 --global_batch 4 --batch_per_device 2             # CPU, fake devices
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_count() -> int:
  if not shutil.which("nvidia-smi"):
    return 0
  out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                       capture_output=True, text=True)
  return len(out.stdout.split()) if out.returncode == 0 else 0


class GpuMemoryPoller:
  """Peak memory.used (MiB) per GPU index while running."""

  def __init__(self, period_s: float = 0.2):
    self.period_s, self.peak, self._stop = period_s, {}, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True)
      for line in out.stdout.strip().splitlines():
        i, used = (int(x) for x in line.split(","))
        self.peak[i] = max(self.peak.get(i, 0), used)
      self._stop.wait(self.period_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_flags(args, model: str, batch: int, workdir: str) -> List[str]:
  flags = ["--gin_file", "base.gin", "--gin_file", f"models/{model}.gin",
           "--gin_file", f"memory/mem{args.memory_size}.gin", "--workdir", workdir]
  params = [f"TrainConfig.dataset = {args.dataset!r}", f"TrainConfig.batch_size = {batch}",
            f"TrainConfig.num_steps = {args.steps}", "TrainConfig.log_every = 1",
            "TrainConfig.checkpoint_every = 0", "TrainConfig.final_eval = False",
            "TrainConfig.progress_bar = False", "TrainConfig.optimizer = 'adamw'",
            "TrainConfig.schedule = 'cosine'", "TrainConfig.learning_rate = 0.001",
            "TrainConfig.warmup_steps = 10", f"ModelConfig.knn_backend = {args.backend!r}",
            f"ModelConfig.dtype = {args.dtype!r}", "ModelConfig.knn_options = ()"]
  if args.data_dir:
    params.append(f"TrainConfig.data_dir = {os.path.abspath(args.data_dir)!r}")
  for p in params + list(args.gin_param):
    flags += ["--gin_param", p]
  return flags


def run_one(args, model: str, n: int, mode: str, batch: int, on_gpu: bool) -> Dict:
  workdir = tempfile.mkdtemp(prefix=f"scaling_{model}_{n}{mode[0]}_{batch}_", dir=args.work_root)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "memorizing.cli", "train"]
  flags = train_flags(args, model, batch, workdir)
  t0 = time.time()
  procs = []
  log_path = os.path.join(workdir, "scaling.log")
  with GpuMemoryPoller() if on_gpu else _Null() as poller, open(log_path, "w") as log:
    if mode == "local":
      env_n = dict(env, **({"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))} if on_gpu else
                           {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                            "JAX_PLATFORMS": "cpu"}))
      procs.append(subprocess.Popen(command + flags, env=env_n, stdout=log, stderr=log))
    else:
      port = free_port()
      for pid in range(n):
        extra = ["--gin_param", "TrainConfig.multihost = True",
                 "--gin_param", f"TrainConfig.coordinator_address = '127.0.0.1:{port}'",
                 "--gin_param", f"TrainConfig.num_processes = {n}",
                 "--gin_param", f"TrainConfig.process_id = {pid}"]
        env_p = dict(env, **({"CUDA_VISIBLE_DEVICES": str(pid)} if on_gpu else
                             {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                              "JAX_PLATFORMS": "cpu"}))
        procs.append(subprocess.Popen(command + flags + extra, env=env_p, stdout=log, stderr=log))
    try:
      codes = [p.wait(timeout=args.timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      codes = ["timeout"]
  row = {"model": model, "devices": n, "mode": mode, "batch": batch,
         "batch_per_device": batch / n, "wall_s": round(time.time() - t0, 1)}
  if any(c != 0 for c in codes):
    with open(log_path, errors="replace") as f:
      row["error"] = f"exit {codes}: " + f.read()[-1500:]
    return row
  records = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") == "train":
        records.append(r)
  timed = [r["step_time"] for r in records if r["step"] > args.warmup and r.get("step_time")]
  step_s = statistics.median(timed) if timed else float("nan")
  row.update(step_time_ms=round(1e3 * step_s, 2),
             tokens_per_s=round(batch * args.segment_length / step_s),
             losses=[r["loss"] for r in records[:args.compare]])
  if on_gpu:
    row["peak_mib_per_gpu"] = [poller.peak.get(i) for i in range(n)]
  if not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return row


class _Null:
  peak: Dict = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def add_comparisons(rows: List[Dict], rtol: float) -> None:
  """Efficiency against the 1-device run of the same model and batch variant, and loss
  agreement with the 1-device run at the same global batch."""
  def base(row, variant):
    return next((r for r in rows if r["model"] == row["model"] and r["devices"] == 1
                 and r["variant"] == variant and "error" not in r), None)
  for r in rows:
    if "error" in r:
      continue
    b = base(r, r["variant"])
    if b:
      n = r["devices"]
      r["efficiency"] = round(b["step_time_ms"] / (n * r["step_time_ms"]), 3) \
          if r["variant"] == "global" else round(r["tokens_per_s"] / (n * b["tokens_per_s"]), 3)
    same = next((x for x in rows if x["model"] == r["model"] and x["devices"] == 1
                 and x["batch"] == r["batch"] and "error" not in x), None)
    if same and same is not r and same["losses"] and r["losses"]:
      k = min(len(same["losses"]), len(r["losses"]))
      diffs = [abs(a - c) / max(abs(c), 1e-12) for a, c in zip(r["losses"][:k], same["losses"][:k])]
      r["max_rel_loss_diff"] = max(diffs)
      r["losses_match"] = max(diffs) <= rtol


def print_table(rows: List[Dict], rtol: float) -> None:
  head = ("model", "devices", "mode", "variant", "batch", "ms/step", "tokens/s", "efficiency",
          "peak MiB/GPU", f"losses = 1 device (rtol {rtol:g})")
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    if "error" in r:
      print(f"| {r['model']} | {r['devices']} | {r['mode']} | {r['variant']} | {r['batch']} | "
            f"failed: {r['error'].splitlines()[-1][:80] if r['error'] else ''} |||||")
      continue
    peak = r.get("peak_mib_per_gpu")
    match = r.get("losses_match")
    agree = "" if match is None else "%s (%.1e)" % ("yes" if match else "NO", r["max_rel_loss_diff"])
    cells = (r["model"], r["devices"], r["mode"], r["variant"], r["batch"], r["step_time_ms"],
             r["tokens_per_s"], r.get("efficiency", ""),
             max(x or 0 for x in peak) if peak else "n/a", agree)
    print("| " + " | ".join(str(c) for c in cells) + " |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", action="append", default=[], help="models/NAME.gin (repeatable; small)")
  p.add_argument("--devices", default="1,2,4", help="device counts (only those present run)")
  p.add_argument("--modes", default="local,processes")
  p.add_argument("--global_batch", type=int, default=32)
  p.add_argument("--batch_per_device", type=int, default=16)
  p.add_argument("--memory_size", type=int, default=65536, choices=(1536, 8192, 65536))
  p.add_argument("--backend", default="device")
  p.add_argument("--dtype", default="float32", help="ModelConfig.dtype (float32 for the loss check)")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
  p.add_argument("--compare", type=int, default=20, help="first N losses compared")
  p.add_argument("--rtol", type=float, default=1e-5)
  p.add_argument("--segment_length", type=int, default=512, help="for tokens/s (the model's)")
  p.add_argument("--dataset", default="synthetic")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--gin_param", action="append", default=[])
  p.add_argument("--timeout_s", type=float, default=900)
  p.add_argument("--work_root", default=None)
  p.add_argument("--keep", action="store_true", help="keep the workdirs")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  models = args.model or ["small"]
  gpus = gpu_count()
  on_gpu = gpus > 0
  available = gpus if on_gpu else 64
  counts = [int(x) for x in args.devices.split(",") if int(x) <= available]
  skipped = [int(x) for x in args.devices.split(",") if int(x) > available]
  rows = []
  for model in models:
    for n in counts:
      for mode in (["local"] if n == 1 else args.modes.split(",")):   # 1 device: the baseline
        for variant, batch in (("global", args.global_batch),
                               ("per_device", args.batch_per_device * n)):
          if batch % n:
            continue
          print(f"[scaling] {model}: {n} device(s), {mode}, {variant} batch {batch}", flush=True)
          row = run_one(args, model, n, mode, batch, on_gpu)
          row["variant"] = variant
          rows.append(row)
  add_comparisons(rows, args.rtol)
  print_table(rows, args.rtol)
  if skipped:
    print(f"not run: {skipped} device(s) (this host has {gpus} GPU(s))")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "gpus": gpus, "skipped_device_counts": skipped,
                 "host": platform.node(), "python": sys.version.split()[0],
                 "argv": sys.argv[1:]}, f, indent=1)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
