"""Paper Table 4 at small scale: train and evaluate each row on one machine.

    python scripts/run_table4.py --part all --out OUT --workroot /tmp/table4

Rows (configs/experiments/repro_table4_small.gin + one memory file each), all
trained for the same number of steps:
  no_xl      memory/none.gin        no XL cache, no kNN layer
  xl         memory/xl.gin          Transformer-XL cache of the previous segment
  mem1536    memory/mem1536.gin     XL + kNN memory of 1536 per row and head
  mem8192    memory/mem8192.gin     XL + 8192
  mem65536   memory/mem65536.gin    XL + 65536
Extras: the 8K model evaluated with a 65K memory; the XL checkpoint fine-tuned
with an added 8K memory layer (--init_from) and, as a control, the XL
checkpoint trained for the same extra steps without memory.

--part 1 runs no_xl, xl and the fine-tunes (they need the xl checkpoint);
--part 2 runs mem8192 (+ its 65K evaluation), mem65536, mem1536; --part all
runs both, rows first, then fine-tunes and extra evaluations. Each part is self-contained (one machine, one call). A time guard
skips a job that would not end before --deadline_s (estimated from the jobs
already run) and records it as skipped. Only JSON leaves: OUT/repro_table4_part*.json,
rewritten after every job. Plots: scripts/plot_repro.py, from those files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPERIMENT = "experiments/repro_table4_small.gin"
ROWS = {
    "no_xl": "memory/none.gin",
    "xl": "memory/xl.gin",
    "mem1536": "memory/mem1536.gin",
    "mem8192": "memory/mem8192.gin",
    "mem65536": "memory/mem65536.gin",
}
FINETUNE_PARAMS = ["TrainConfig.learning_rate = 0.0005", "TrainConfig.warmup_steps = 30"]


def jobs_for(part: str, finetune_steps: int):
  """(name, kind, spec) in run order; kind 'train' or 'eval'."""
  p1 = [
      ("no_xl", "train", dict(row="no_xl", evals={"with_memory": []})),
      ("xl", "train", dict(row="xl", evals={"with_memory": []})),
      ("finetune_xl_mem8192", "train", dict(
          row="mem8192", init_from="xl", steps=finetune_steps, params=FINETUNE_PARAMS,
          evals={"with_memory": [], "memory_disabled": ["ModelConfig.memory_enabled = False"]})),
      ("finetune_xl_control", "train", dict(
          row="xl", init_from="xl", steps=finetune_steps, params=FINETUNE_PARAMS,
          evals={"with_memory": []})),
  ]
  p2 = [
      ("mem8192", "train", dict(row="mem8192", evals={"with_memory": []})),
      ("mem8192_eval65536", "eval", dict(
          row="mem8192", of="mem8192", evals={"with_memory": ["ModelConfig.memory_size = 65536"]})),
      ("mem65536", "train", dict(row="mem65536", evals={"with_memory": []})),
      ("mem1536", "train", dict(row="mem1536", evals={"with_memory": []})),
      ("mem8192_disabled", "eval", dict(
          row="mem8192", of="mem8192", evals={"memory_disabled": ["ModelConfig.memory_enabled = False"]})),
      ("mem65536_disabled", "eval", dict(
          row="mem65536", of="mem65536", evals={"memory_disabled": ["ModelConfig.memory_enabled = False"]})),
  ]
  by_name = {j[0]: j for j in p1 + p2}
  # One call: the rows first (the XL baseline and the 8K row before the others),
  # then the fine-tunes and the extra evaluations, so a time guard drops extras first.
  order = ["xl", "mem8192", "no_xl", "mem65536", "mem1536", "finetune_xl_mem8192",
           "mem8192_eval65536", "finetune_xl_control", "mem8192_disabled", "mem65536_disabled"]
  return {"1": p1, "2": p2, "all": [by_name[n] for n in order]}[part]


def train_log(workdir: str):
  """Train records of metrics.jsonl: [(step, loss, step_time)]."""
  out = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      r = json.loads(line)
      if r.get("kind") == "train":
        out.append({"step": r["step"], "loss": r["loss"], "step_time": r.get("step_time"),
                    "bits_per_byte": r.get("bits_per_byte")})
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--part", choices=("1", "2", "all"), default="all")
  ap.add_argument("--out", required=True, help="folder for the JSON results")
  ap.add_argument("--workroot", required=True, help="folder for the run workdirs")
  ap.add_argument("--steps", type=int, default=None, help="training steps per row "
                  "(default: the experiment file's TrainConfig.num_steps)")
  ap.add_argument("--finetune_steps", type=int, default=300)
  ap.add_argument("--deadline_s", type=float, default=0, help="0: no time guard")
  ap.add_argument("--gin_param", action="append", default=[], help="extra binding for every job")
  ap.add_argument("--only", default="", help="comma-separated job names to run (default: all)")
  args = ap.parse_args(argv)
  t_start = time.time()

  import gin
  import jax
  from memorizing import checkpoint, cli, train

  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.workroot, exist_ok=True)
  out_path = os.path.join(args.out, f"repro_table4_part{args.part}.json")
  dev = jax.devices()[0]
  report = {"part": args.part, "experiment": EXPERIMENT, "rows": ROWS,
            "device": f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev.platform)}",
            "jax": jax.__version__, "python": platform.python_version(),
            "extra_gin_params": args.gin_param, "steps": args.steps,
            "finetune_steps": args.finetune_steps, "deadline_s": args.deadline_s,
            "MEMORIZING_ATTENTION": os.environ.get("MEMORIZING_ATTENTION"), "jobs": {}}

  def save():
    report["elapsed_s"] = time.time() - t_start
    with open(out_path, "w") as f:
      json.dump(report, f, indent=1)

  durations = {"train": [], "eval": []}
  only = {s for s in args.only.split(",") if s}
  for name, kind, spec in jobs_for(args.part, args.finetune_steps):
    if only and name not in only:
      continue
    elapsed = time.time() - t_start
    steps = spec.get("steps", args.steps)
    if args.deadline_s and durations[kind]:
      guess = max(durations[kind])
      if kind == "train" and "steps" in spec:  # a short fine-tune: scale the step part
        guess = 0.5 * guess
      if elapsed + guess > args.deadline_s:
        report["jobs"][name] = {"skipped": f"time guard: {elapsed:.0f} s elapsed + ~{guess:.0f} s "
                                           f"estimated > deadline {args.deadline_s:.0f} s"}
        print(f"[table4] skip {name}: {report['jobs'][name]['skipped']}", flush=True)
        save()
        continue
    gin_files = [EXPERIMENT, ROWS[spec["row"]]]
    params = list(args.gin_param) + list(spec.get("params", []))
    if steps:
      params.append(f"TrainConfig.num_steps = {steps}")
    job = {"kind": kind, "gin_files": gin_files, "gin_params": params}
    t0 = time.time()
    try:
      if kind == "train":
        workdir = os.path.join(args.workroot, name)
        model_config, train_config = cli.parse_gin(gin_files, params)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, cli.OPERATIVE_CONFIG), "w") as f:
          f.write(gin.config_str())
        init_from = os.path.join(args.workroot, spec["init_from"]) if spec.get("init_from") else None
        job["init_from"] = spec.get("init_from")
        print(f"[table4] train {name}: {' '.join(gin_files)} {params}", flush=True)
        train.train_and_evaluate(model_config, train_config, workdir, init_from=init_from)
        job["train_s"] = time.time() - t0
        log = train_log(workdir)
        job["train_log"] = log
        times = [r["step_time"] for r in log[1:] if r["step_time"]]  # first window holds compile
        job["step_time_s"] = sum(times) / len(times) if times else None
        job["num_steps"] = train_config.num_steps
        job["tokens_per_step"] = train_config.batch_size * model_config.segment_length
      else:
        workdir = os.path.join(args.workroot, spec["of"])
      params_tree, step = checkpoint.load_params(workdir)
      job["checkpoint_step"] = int(step)
      job["results"] = {}
      for variant, extra in spec["evals"].items():
        t1 = time.time()
        model_config, train_config = cli.parse_gin(gin_files, params + extra)
        res = train.evaluate_params(model_config, train_config, params_tree,
                                    train_config.eval_max_documents)
        res["eval_s"] = time.time() - t1
        res["eval_gin_params"] = extra
        job["results"][variant] = res
        print(f"[table4] {name}/{variant}: perplexity {res['perplexity']:.4f} bits/byte "
              f"{res['bits_per_byte']:.4f} ({res['eval_s']:.0f} s)", flush=True)
    except Exception as e:  # noqa: BLE001 - record it, go on with the next job
      import traceback
      traceback.print_exc()
      job["error"] = f"{type(e).__name__}: {e}"[:2000]
    job["wall_s"] = time.time() - t0
    durations[kind].append(job["wall_s"])
    report["jobs"][name] = job
    save()
  save()
  print(f"[table4] wrote {out_path} after {time.time() - t_start:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
