"""`memorizing-sweep`: the one experiment path. Train and evaluate a set of runs, one table, one JSON.

A sweep is a base configuration (`--gin_file`, `--gin_param`) and a grid of
axes, each a gin parameter and a list of values, from the command line

  --grid 'ModelConfig.memory_size=[1536,8192]' --grid 'ModelConfig.use_xl_cache=[True,False]'

or from a YAML/JSON file (`--grid_file`; configs/experiments/repro_table4_small.yaml):

  gin_file: [quickstart.gin]          # optional: base files, added after --gin_file
  gin_param: ["TrainConfig.num_steps = 100"]
  grid:
    ModelConfig.memory_size: [1536, 8192]
    ModelConfig.use_xl_cache: [true, false]
  seeds: [0, 1]                       # optional: every point and row once per seed
  rows:                               # optional: runs beyond the grid
    finetune:                         #   fine-tuned from another run's checkpoint
      init_from: memory_size-1536_use_xl_cache-True
      gin_param: ["TrainConfig.num_steps = 50", "ModelConfig.memory_size = 8192"]
  evals:                              # optional: more evaluations of a finished run
    big_memory:
      of: memory_size-1536_use_xl_cache-True
      gin_param: ["ModelConfig.memory_size = 65536"]
      memory: "on"                    # both (default), on or off

The axis named `gin_file` sweeps over whole gin files (e.g. memory/*.gin).
Values are gin literals: `'adamw'`, `(-4,)`, `True`; in a YAML/JSON file
plain strings that are not literals are quoted for you. `seeds` (or
`--seeds 0,1`) adds the axis TrainConfig.seed; a row or eval then runs once
per seed, named `NAME_seed-S`, and refers to the run of the same seed.

Jobs, in this order: every grid point, then every row (`memorizing-train`
with TrainConfig.final_eval = False, `--init_from SWEEP_DIR/<init_from>` for
a fine-tune, then `memorizing-eval --output WORKDIR/results.json`, which
evaluates with memory and with memory disabled), then every eval
(`memorizing-eval --workdir SWEEP_DIR/<of> --output SWEEP_DIR/<of>/eval_<name>.json`).
A job whose output exists is done and skipped; an interrupted run resumes from
its checkpoint. SIGTERM to the sweep (e.g. `timeout -k 60 3600 memorizing-sweep ...`)
starts no more jobs, passes the SIGTERM to the running ones (a training finishes
its step and saves a checkpoint), waits for them and exits with 143; the same
command then resumes. `--only a,b` runs only those jobs (a row name without `_seed-S`
selects it at every seed). `--deadline_s T` is a time
guard: a job that would not end T seconds after the sweep started (estimated
from the jobs already run: seconds per training step, eval time) is skipped
and recorded as such. Jobs run in this process (gin is cleared before each;
the default) or as subprocesses (`--launcher subprocess`); `--parallel N` runs
up to N subprocess jobs at once on the same device(s), each with
XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9/N (`--mem_fraction`) and its output in a
log file of its workdir, a job starting once the run it needs has results;
`--print_commands` prints one shell line per unfinished job for a cluster.

Per-corpus steps, before any job (memorizing/tools/protocol.py): `--source DIR`
prepares TrainConfig.dataset from DIR; a recipe with TrainConfig.tokenizer =
'spm:N' gets a SentencePiece model of N pieces trained on the train split
(once per sweep directory), bound with ModelConfig.vocab_size = N. A config
that binds TrainConfig.eval_max_documents evaluates that many documents.
`--summary FILE` merges one record per (row, evaluation) into a JSON list that
accumulates across corpora and seeds (configs/experiments/table4_protocol.yaml,
memorizing-table4).

Collected at the end, from whatever is done: SWEEP_DIR/results.csv and
results.md (one line per job with its config), SWEEP_DIR/sweep_results.json
(every job: config, status, times, train log, results; plotted with
`memorizing-plot --results SWEEP_DIR/sweep_results.json`) and the plots
in SWEEP_DIR/plots/.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import jax

from memorizing.errors import PlotError, SweepError, UserError
from memorizing.tools import commands, plots, protocol
from memorizing.tools.gin_config import parse_gin
from memorizing.tools.grid import (GIN_FILE_AXIS, POINT_FILE, RESULTS_FILE, SEED_AXIS,  # noqa: F401
                                   expand, gin_literal, load_grid_file, load_results,
                                   parse_grid_flag, point_name, primary, short_name, slug,
                                   split_values)
from memorizing.training.evaluate import bucket_names

SWEEP_RESULTS = "sweep_results.json"


@dataclasses.dataclass
class Job:
  """One unit of a sweep: a run to train and evaluate ("train"), or one more
  evaluation of a run ("eval")."""
  name: str
  kind: str                                  # "train" or "eval"
  files: List[str]                           # gin files (base + the job's own)
  params: List[str]                          # gin bindings (base + the job's own)
  axes: Dict[str, str]                       # grid point (empty for rows and evals)
  workdir: str                               # the run's workdir (an eval's: its run's)
  output: str                                # results.json, or eval_<name>.json
  init_from: Optional[str] = None            # a train job's source run (name)
  of: Optional[str] = None                   # an eval job's run (name)
  memory: str = "both"
  row: str = ""                              # the point, row or eval name without its seed
  seed: Optional[int] = None                 # the seed of a seeds axis (None: none)
  of_row: Optional[str] = None               # an eval job's run name without its seed

  def commands(self, eval_params: Sequence[str], max_documents: Optional[int]):
    """(train flags or None, eval flags)."""
    ev = ["--workdir", self.workdir, "--output", self.output]
    for p in list(eval_params) + (self.params if self.kind == "eval" else []):
      ev += ["--gin_param", p]
    if self.memory != "both":
      ev += ["--memory", self.memory]
    if max_documents is not None:
      ev += ["--max_documents", str(max_documents)]
    if self.kind == "eval":
      return None, ev
    tr = []
    for f in self.files:
      tr += ["--gin_file", f]
    for p in self.params + ["TrainConfig.final_eval = False"]:
      tr += ["--gin_param", p]
    tr += ["--workdir", self.workdir]
    if self.init_from:
      tr += ["--init_from", os.path.join(os.path.dirname(self.workdir), self.init_from)]
    return tr, ev


def _seeded(name: str, seed: Optional[int]) -> str:
  return name if seed is None else f"{name}_seed-{seed}"


def plan(sweep_dir: str, base_files: List[str], base_params: List[str],
         grid: Dict[str, List[str]], seeds: Sequence[int], rows: Dict[str, dict],
         evals: Dict[str, dict]) -> List[Job]:
  """Every job of the sweep, in run order."""
  grid = dict(grid)
  if seeds and grid:
    grid[SEED_AXIS] = [str(s) for s in seeds]
  jobs: List[Job] = []
  for point in (expand(grid) if grid else []):
    name = point_name(point)
    files = base_files + ([point[GIN_FILE_AXIS]] if GIN_FILE_AXIS in point else [])
    params = base_params + [f"{n} = {v}" for n, v in point.items() if n != GIN_FILE_AXIS]
    workdir = os.path.join(sweep_dir, name)
    unseeded = {n: v for n, v in point.items() if n != SEED_AXIS}
    seed = int(point[SEED_AXIS]) if SEED_AXIS in point else None
    jobs.append(Job(name, "train", files, params, point, workdir,
                    os.path.join(workdir, RESULTS_FILE), row=point_name(unseeded), seed=seed))
  for seed in (list(seeds) or [None]):
    seed_param = [] if seed is None else [f"{SEED_AXIS} = {seed}"]
    for row, spec in rows.items():
      name = _seeded(row, seed)
      workdir = os.path.join(sweep_dir, name)
      init_from = _seeded(spec["init_from"], seed) if spec.get("init_from") else None
      jobs.append(Job(name, "train", base_files + spec["gin_file"],
                      base_params + spec["gin_param"] + seed_param, {}, workdir,
                      os.path.join(workdir, RESULTS_FILE), init_from=init_from,
                      memory=spec.get("memory", "both"), row=row, seed=seed))
  for seed in (list(seeds) or [None]):
    for ev, spec in evals.items():
      name, of = _seeded(ev, seed), _seeded(spec["of"], seed)
      workdir = os.path.join(sweep_dir, of)
      jobs.append(Job(name, "eval", [], spec["gin_param"], {}, workdir,
                      os.path.join(workdir, f"eval_{name}.json"), of=of, memory=spec["memory"],
                      row=ev, seed=seed, of_row=spec["of"]))
  names = [j.name for j in jobs]
  if len(set(names)) != len(names):
    raise SweepError(f"two jobs share a name ({names}); make grid values and row names distinct")
  known = {j.name for j in jobs if j.kind == "train"}
  for j in jobs:
    ref = j.init_from or j.of
    if ref and ref not in known:
      raise SweepError(f"{j.name} refers to {ref!r}, which is not a point or row of this sweep "
                       f"(they are: {', '.join(sorted(known))})")
  return jobs


def select_only(jobs: Sequence[Job], flags: Sequence[str]) -> set:
  """The job names that `--only` flags (comma-separated, repeatable) select: a job's
  name (`xl_seed-1`) selects that job, a row, eval or point name without its seed
  (`xl`) selects it at every seed. Empty: no --only given."""
  wanted = {n.strip() for flag in flags for n in flag.split(",") if n.strip()}
  unknown = wanted - {j.name for j in jobs} - {j.row for j in jobs}
  if unknown:
    rows = sorted({j.row for j in jobs if j.row != j.name})
    raise SweepError(f"--only {', '.join(sorted(unknown))}: no such job; the jobs are "
                     f"{', '.join(j.name for j in jobs)}"
                     + (f" (or, at every seed: {', '.join(rows)})" if rows else ""))
  return {j.name for j in jobs if j.name in wanted or j.row in wanted}


def evaluations_left_out(jobs: Sequence[Job], only: set) -> List[str]:
  """The eval jobs that `only` leaves out although it selects the run they evaluate
  (`--only mem8192` without `memory65536`): "NAME (of RUN)"."""
  if not only:
    return []
  return [f"{j.name} (of {j.of})" for j in jobs
          if j.kind == "eval" and j.of in only and j.name not in only]


# --- running -------------------------------------------------------------------------
def shell_line(train: Optional[List[str]], evaluate: List[str]) -> str:
  q = lambda args: " ".join(shlex.quote(a) for a in args)
  ev = f"memorizing-eval {q(evaluate)}"
  return f"memorizing-train {q(train)} && {ev}" if train is not None else ev


PREEMPTED = 143      # memorizing-train's exit status after SIGTERM (checkpoint saved)


class Stop:
  """SIGTERM to the sweep (a `timeout`, a scheduler): no job starts any more, the
  running subprocess jobs get SIGTERM too (a training finishes its step and saves a
  checkpoint), and the sweep waits for them, records them as interrupted and exits
  with 143; the same command then resumes them. Installed by `main` (main thread only)."""

  def __init__(self):
    self.requested = False
    self._procs: set = set()
    # Reentrant: the handler runs in the main thread, which may be inside `call`.
    self._lock = threading.RLock()
    self._previous = None

  def install(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    if not self.requested:
      print("[sweep] SIGTERM: no new job starts; the running ones finish their step, save a "
            "checkpoint and stop", flush=True)
    self.requested = True
    with self._lock:
      for proc in self._procs:
        try:
          proc.send_signal(signal.SIGTERM)
        except (ProcessLookupError, OSError):
          pass

  def call(self, argv: List[str], **popen_kwargs) -> int:
    """subprocess.call that a SIGTERM to the sweep reaches (143 if none may start)."""
    with self._lock:
      if self.requested:
        return PREEMPTED
      proc = subprocess.Popen(argv, **popen_kwargs)
      self._procs.add(proc)
    if self.requested:                      # SIGTERM came while it was starting
      proc.send_signal(signal.SIGTERM)
    try:
      return proc.wait()
    finally:
      with self._lock:
        self._procs.discard(proc)


STOP = Stop()


def job_env(args) -> Optional[Dict[str, str]]:
  """The environment a job adds: XLA_PYTHON_CLIENT_MEM_FRACTION when --mem_fraction
  is set (or implied by --parallel N)."""
  fraction = getattr(args, "mem_fraction", None)
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(fraction)} if fraction is not None else None


def job_argv(which: str, args: List[str]) -> List[str]:
  """The command line of a subprocess job: memorizing-train or -eval with `args`."""
  return [sys.executable, "-m", "memorizing.cli", which] + list(args)


def _call(which: str, args: List[str], launcher: str, env: Optional[Dict[str, str]] = None,
          log: Optional[str] = None) -> int:
  """Runs memorizing-train or -eval: in this process, or as a subprocess with `env`
  added to the environment and its output appended to the file `log` (if given)."""
  if launcher == "subprocess":
    argv = job_argv(which, args)
    environ = dict(os.environ, **(env or {}))
    if log is None:
      return STOP.call(argv, env=environ)
    with open(log, "a") as out:
      return STOP.call(argv, env=environ, stdout=out, stderr=subprocess.STDOUT)
  command = commands.train_command if which == "train" else commands.eval_command
  return commands.run(command, args)


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


MEMORY_CURVE_KEYS = ("gate_mean", "mass_mean", "top1_mean", "topk_mean", "recall")


def train_log(workdir: str) -> List[dict]:
  """The train records of a run's metrics.jsonl: step, loss, step time, bits per byte
  and, for a memory model, each memory layer's mean gate, memory mass, top-1/top-k
  similarity and recall (so the sweep's JSON shows when the memory took off)."""
  log = []
  for r in plots.read_metrics(workdir):
    if r.get("kind") != "train" or "loss" not in r:
      continue
    rec = {"step": r["step"], "loss": r["loss"], "step_time": r.get("step_time"),
           "bits_per_byte": r.get("bits_per_byte")}
    if r.get("memory"):
      rec["memory"] = {layer: {k: sig[k] for k in MEMORY_CURVE_KEYS if k in sig}
                       for layer, sig in r["memory"].items()}
    log.append(rec)
  return log


class TimeGuard:
  """Skips a job that would not end before the deadline, estimated from the jobs run:
  the slowest seconds per training step seen so far, and the slowest evaluation."""

  def __init__(self, deadline_s: float, start: float):
    self.deadline_s, self.start = deadline_s, start
    self.per_step: List[float] = []
    self.evals: List[float] = []

  def record(self, train_s: Optional[float], steps: Optional[int], eval_s: Optional[float]):
    if train_s is not None and steps:
      self.per_step.append(train_s / steps)
    if eval_s is not None:
      self.evals.append(eval_s)

  def refuse(self, job: Job, steps: Optional[int]) -> Optional[str]:
    """Why `job` is skipped, or None."""
    if not self.deadline_s:
      return None
    guess = None
    if job.kind == "train" and self.per_step and steps:
      guess = max(self.per_step) * steps + (max(self.evals) if self.evals else 0.0)
    elif job.kind == "eval" and self.evals:
      guess = max(self.evals)
    elapsed = time.time() - self.start
    if guess is not None and elapsed + guess > self.deadline_s:
      return (f"time guard: {elapsed:.0f} s elapsed + ~{guess:.0f} s estimated > deadline "
              f"{self.deadline_s:.0f} s")
    if guess is None and elapsed > self.deadline_s:
      return f"time guard: {elapsed:.0f} s elapsed > deadline {self.deadline_s:.0f} s"
    return None


def _num_steps(job: Job) -> Optional[int]:
  try:
    return parse_gin(job.files, job.params)[1].num_steps
  except UserError:
    return None          # the job itself will report the error


def run_job(job: Job, args, guard: TimeGuard, record: Dict[str, Any], done: set) -> str:
  """Runs one job; fills `record`; returns its status."""
  train, evaluate = job.commands(args.eval_gin_param, args.max_documents)
  ref = job.init_from or job.of
  if ref and ref not in done:
    record["skipped"] = f"needs {ref}, which has no results"
    return "skipped"
  steps = _num_steps(job) if job.kind == "train" else None
  why = guard.refuse(job, steps)
  if why:
    record["skipped"] = why
    print(f"[sweep] skip {job.name}: {why}", flush=True)
    return "skipped"
  print(f"  {shell_line(train, evaluate)}", flush=True)
  os.makedirs(job.workdir, exist_ok=True)
  parallel = getattr(args, "parallel", 1) > 1
  env = job_env(args)
  log = lambda which: (os.path.join(job.workdir, f"{which}.log" if job.kind == "train"
                                    else f"eval_{job.name}.log") if parallel else None)
  train_s = eval_s = None
  rc = 0
  if train is not None:
    with open(os.path.join(job.workdir, POINT_FILE), "w") as f:
      json.dump({"point": job.axes, "name": job.name, "gin_file": job.files,
                 "gin_param": job.params, "init_from": job.init_from}, f, indent=1)
    t0 = time.time()
    rc = _call("train", train, args.launcher, env, log("train"))
    train_s = time.time() - t0
  if rc == 0 and not STOP.requested:
    t0 = time.time()
    rc = _call("eval", evaluate, args.launcher, env, log("eval"))
    eval_s = time.time() - t0
  elif rc == 0:
    rc = PREEMPTED                          # trained; its evaluation waits for the rerun
  if rc != PREEMPTED and not STOP.requested:
    guard.record(train_s, steps, eval_s)
  record.update({k: v for k, v in (("train_s", train_s), ("eval_s", eval_s)) if v is not None})
  if rc == 0 and os.path.exists(job.output):
    return "done"
  if rc == PREEMPTED or STOP.requested:
    record["interrupted"] = "stopped by SIGTERM; the same command resumes it"
    return "interrupted"
  record["error"] = f"exit {rc}"
  failed_log = log("eval" if eval_s is not None else "train")
  tail = _tail(failed_log) if failed_log else ""
  print(f"[sweep] {job.name} failed (exit {rc}); going on with the next job"
        + (f"; end of {failed_log}:\n{tail}" if tail else ""), flush=True)
  return f"failed (exit {rc})"


def run_parallel(todo: Sequence[Job], args, guard: TimeGuard, status: Dict[str, str],
                 extra: Dict[str, Dict[str, Any]], done: set, on_finish) -> None:
  """Runs `todo` with up to args.parallel jobs at once (each one a thread that
  launches its subprocesses). A job starts, in the order of `todo`, once a slot is
  free and the run it needs (init_from, of) is no longer queued or running; so
  the first slots to free up take the fine-tunes of a finished run.
  `on_finish()` is called, under the lock, after every job."""
  pending = list(todo)
  running: Dict[str, threading.Thread] = {}
  finished: List[tuple] = []
  cond = threading.Condition()

  def work(job: Job, number: int):
    try:
      result = run_job(job, args, guard, extra[job.name], done)
    except Exception as e:  # noqa: BLE001 - reported as the job's failure; the others go on
      extra[job.name]["error"] = repr(e)
      result = f"failed ({type(e).__name__}: {e})"
    with cond:
      finished.append((job, number, result))
      cond.notify_all()

  started = 0
  with cond:
    while pending or running:
      while finished:                       # bookkeeping in this thread only
        job, number, result = finished.pop(0)
        status[job.name] = result
        if result == "done":
          done.add(job.name)
        running.pop(job.name).join()
        print(f"[sweep] {job.name}: {result} ({number}/{len(todo)})", flush=True)
        on_finish()
      waiting = {j.name for j in pending} | set(running)
      ready = [j for j in pending if not ((j.init_from or j.of) in waiting
                                          and (j.init_from or j.of) != j.name)]
      if not ready and pending and not running:
        ready = pending[:1]          # references in a cycle: run_job skips it (no results)
      if STOP.requested:
        pending.clear()                     # recorded as not run
        ready = []
      for job in ready:
        if len(running) >= args.parallel:
          break
        pending.remove(job)
        started += 1
        print(f"[sweep] start {started}/{len(todo)}: {job.name} "
              f"({len(running) + 1} running)", flush=True)
        thread = threading.Thread(target=work, args=(job, started), daemon=True)
        running[job.name] = thread
        thread.start()
      if running and not finished:
        cond.wait(1.0)                      # a timeout, so that SIGTERM is handled promptly


# --- results -------------------------------------------------------------------------
def _read(path: str) -> Optional[dict]:
  """A job's results, or None (also while a parallel job is still writing them)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    return None


def job_record(job: Job, status: str, extra: Dict[str, Any]) -> Dict[str, Any]:
  """One job of sweep_results.json."""
  rec: Dict[str, Any] = {"kind": job.kind, "status": status, "gin_files": job.files,
                         "gin_params": job.params, "workdir": job.workdir}
  if job.axes:
    rec["point"] = job.axes
  if job.init_from:
    rec["init_from"] = job.init_from
  if job.of:
    rec["of"] = job.of
  rec.update(extra)
  if job.kind == "train" and os.path.isdir(job.workdir):
    log = train_log(job.workdir)
    if log:
      rec["train_log"] = log
      times = [r["step_time"] for r in log[1:] if r["step_time"]]   # the first holds compile
      rec["step_time_s"] = sum(times) / len(times) if times else None
  res = _read(job.output)
  if res:
    rec["checkpoint_step"] = res.get("checkpoint_step")
    rec["results"] = res["results"]
  return rec


def _with_train_log(job: Job) -> Optional[dict]:
  """A job's results with its training log (for the summary's train_loss_tail)."""
  res = _read(job.output)
  if res is not None and job.kind == "train":
    res = dict(res, train_log=train_log(job.workdir))
  return res


def summary_from_results(data: Dict[str, Any]) -> List[Dict[str, Any]]:
  """The summary records of a sweep_results.json (`data`): the same records that
  `--summary` writes, rebuilt from the results the file holds, for a call whose
  summary did not come back. Raises SweepError if `data` is not such a file."""
  try:
    spec, done = data["sweep"], data["jobs"]
    jobs = plan("/", list(spec["gin_file"]), list(spec["gin_param"]), spec["grid"],
                spec["seeds"], spec["rows"], spec["evals"])
    recipe, commit = spec["recipe"], spec["commit"]
  except (KeyError, TypeError) as e:
    raise SweepError(f"not a sweep_results.json of memorizing-sweep: missing {e}") from e
  facts = spec.get("summary_facts")
  if facts is None:              # written before the facts were kept: parse the recipe
    _, train_config = parse_gin(list(spec["gin_file"]), list(spec["gin_param"]))
    facts = {"tokenizer": protocol.tokenizer_name(train_config.tokenizer),
             "steps": train_config.num_steps, "seed": train_config.seed}
  facts = dict(facts, dataset=spec.get("summary_dataset") or facts.get("dataset"))
  rows = spec.get("row_configs")
  if rows is None:                 # older files: only where the recipe is the same here
    here, here_rows = protocol.recipe_and_rows(spec["gin_file"], jobs, facts["steps"])
    rows = here_rows if here == recipe else None
  return protocol.summary_records(jobs, facts, commit, recipe,
                                  load=lambda job: done.get(job.name), rows=rows)


def _fmt(v) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
  return "" if v is None else str(v)


def collect(sweep_dir: str, jobs: Sequence[Job], base_files, base_params,
            status: Dict[str, str]) -> List[Dict[str, Any]]:
  """One line per job: its axes, config, status and results; writes results.csv/.md."""
  buckets = bucket_names()
  rows = []
  for job in jobs:
    res = _read(job.output)
    row: Dict[str, Any] = {"point": job.name}
    row.update({short_name(n) if n != GIN_FILE_AXIS else n: v for n, v in job.axes.items()})
    row["status"] = status.get(job.name, "done" if res else "not run")
    if res:
      main, off = primary(res)
      row.update(step=res.get("checkpoint_step"), perplexity=main["perplexity"],
                 perplexity_memory_disabled=off["perplexity"] if off else None,
                 bits_per_byte=main["bits_per_byte"], tokens=main["tokens"],
                 documents=main["documents"], memory_size=main.get("memory_size", 0))
      for b in buckets:
        row[f"ppl_{b}"] = main.get(f"perplexity_{b}")
        row[f"ppl_off_{b}"] = off.get(f"perplexity_{b}") if off else None
    config = [f"gin_file {f}" for f in job.files] + list(job.params)
    if job.init_from:
      config.append(f"init_from {job.init_from}")
    if job.of:
      config = [f"evaluation of {job.of}"] + config + ([f"memory {job.memory}"]
                                                       if job.memory != "both" else [])
    row["config"] = "; ".join(config)
    row["workdir"] = job.workdir
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


def device_description(launcher: str, jobs: Sequence[Job] = ()) -> str:
  """The devices the jobs ran on. With subprocess jobs this process never starts a
  backend (on a GPU it would take the memory the jobs share): their logs say."""
  if launcher == "inprocess":
    dev = jax.devices()[0]
    return f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev.platform)}"
  for job in jobs:
    found = re.search(r"on (\d+) (\w+) device\(s\)", _tail(os.path.join(job.workdir,
                                                                       "train.log"), 400))
    if found:
      return f"{found.group(1)} x {found.group(2)} (from {job.name}/train.log)"
  return "subprocess jobs (their output says)"


def write_sweep_results(sweep_dir: str, spec: dict, records: Dict[str, dict],
                        start: float, device: Optional[str] = None) -> str:
  report = {"sweep": spec, "device": device or device_description("inprocess"),
            "jax": jax.__version__, "python": platform.python_version(),
            "elapsed_s": time.time() - start, "jobs": records}
  path = os.path.join(sweep_dir, SWEEP_RESULTS)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


# --- the command ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="memorizing-sweep",
      description="Train and evaluate every point of a grid over gin parameters (plus rows and "
                  "evaluations of a sweep file); skip finished jobs; collect results.csv, "
                  "results.md, sweep_results.json and plots into --sweep_dir.")
  p.add_argument("--sweep_dir", required=True, help="one workdir per run, plus the table")
  p.add_argument("--gin_file", action="append", default=[], help="base gin file (repeatable)")
  p.add_argument("--gin_param", action="append", default=[], help="base gin binding (repeatable)")
  p.add_argument("--grid", action="append", default=[],
                 help="axis 'Name=[v1,v2]' (repeatable; Name 'gin_file' sweeps gin files)")
  p.add_argument("--grid_file", default=None,
                 help="YAML or JSON: gin_file, gin_param, grid, seeds, rows, evals")
  p.add_argument("--seeds", default=None, help="comma-separated seeds: TrainConfig.seed axis")
  p.add_argument("--eval_gin_param", action="append", default=[],
                 help="binding for evaluation only, e.g. a larger 'ModelConfig.memory_size = 65536'")
  p.add_argument("--max_documents", type=int, default=None,
                 help="evaluate the first N documents of the split (default: "
                      "TrainConfig.eval_max_documents where the config binds it, else all)")
  p.add_argument("--only", action="append", default=[],
                 help="run only these jobs (comma-separated names; a row name without _seed-S means every seed; repeatable)")
  p.add_argument("--deadline_s", type=float, default=0,
                 help="time guard: skip a job that would end later than this many seconds "
                      "after the start (0: none)")
  p.add_argument("--launcher", choices=("inprocess", "subprocess"), default="inprocess")
  p.add_argument("--parallel", type=int, default=1,
                 help="run up to N jobs at once, as subprocesses sharing the device(s); a job "
                      "waits for the run it fine-tunes or evaluates; each job's output goes to "
                      "WORKDIR/train.log (eval_NAME.log)")
  p.add_argument("--mem_fraction", type=float, default=None,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION of each job (default with --parallel "
                      "N: 0.9 / N; otherwise jax's own)")
  p.add_argument("--source", default=None,
                 help="prepare TrainConfig.dataset (text_files, or a Debian corpus) from this "
                      "directory or glob first, into TrainConfig.data_dir (default "
                      "SWEEP_DIR/data)")
  p.add_argument("--summary", default=None,
                 help="merge one record per (row, evaluation) into this JSON list "
                      "(docs/results/table4_summary.json); written after every job")
  p.add_argument("--summary_dataset", default=None,
                 help="the summary's dataset name (default TrainConfig.dataset; with --source: "
                      "text_files/<the source's base name>)")
  p.add_argument("--print_commands", action="store_true",
                 help="print one shell line per unfinished job (for a cluster) and exit")
  p.add_argument("--collect_only", action="store_true",
                 help="run nothing: collect the table, JSON and plots of finished jobs")
  p.add_argument("--no_plots", action="store_true")
  return p


def main(argv: Sequence[str]) -> int:
  start = time.time()
  args = build_parser().parse_args(list(argv))
  base_files, base_params = list(args.gin_file), list(args.gin_param)
  grid: Dict[str, List[str]] = {}
  spec = {"seeds": [], "rows": {}, "evals": {}}
  if args.grid_file:
    spec = load_grid_file(args.grid_file)
    base_files += spec["gin_file"]
    base_params += spec["gin_param"]
    grid.update(spec["grid"])
  for flag in args.grid:
    name, values = parse_grid_flag(flag)
    grid[name] = values
  seeds = spec["seeds"]
  if args.seeds:
    try:
      seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
      raise SweepError(f"--seeds {args.seeds!r}: expected integers such as 0,1,2") from e
  if not grid and not spec["rows"]:
    raise SweepError("no grid: give --grid 'Name=[v1,v2]' (repeatable) or --grid_file FILE")
  sweep_dir = os.path.abspath(os.path.expanduser(args.sweep_dir))
  jobs = plan(sweep_dir, base_files, base_params, grid, seeds, spec["rows"], spec["evals"])
  only = select_only(jobs, args.only)
  left_out = evaluations_left_out(jobs, only)
  if left_out:
    print(f"[sweep] note: --only selects runs whose evaluations it leaves out: "
          f"{', '.join(left_out)}; name them in --only to run them too (a run's "
          "checkpoint must still be in the sweep directory to evaluate it later)", flush=True)
  if args.parallel < 1:
    raise SweepError(f"--parallel {args.parallel}: expected 1 or more jobs at once")
  if args.parallel > 1:
    args.launcher = "subprocess"          # jax and gin are per process
    if args.mem_fraction is None:
      args.mem_fraction = round(0.9 / args.parallel, 3)
  elif args.mem_fraction is not None and args.launcher == "inprocess":
    os.environ.update(job_env(args))      # read when this process starts its jax backend
  os.makedirs(sweep_dir, exist_ok=True)
  corpus_params, facts = protocol.prepare_corpus(base_files, base_params, sweep_dir, args.source)
  # Before the corpus's bindings:
  recipe, row_configs = protocol.recipe_and_rows(base_files, jobs, facts["steps"])
  same: Dict[str, List[str]] = {}
  for row, digest in row_configs.items():
    same.setdefault(digest, []).append(row)
  for rows in same.values():
    if len(rows) > 1:
      print(f"[sweep] warning: rows {', '.join(rows)} resolve to the same run: a --gin_param "
            "binds what their gin files set (bindings apply after every file)", flush=True)
  if corpus_params:
    base_params += corpus_params
    jobs = plan(sweep_dir, base_files, base_params, grid, seeds, spec["rows"], spec["evals"])
  if args.max_documents is None and facts["eval_max_documents"]:
    args.max_documents = facts["eval_max_documents"]   # the config's binding, for every job
  if args.summary_dataset:
    facts["dataset"] = args.summary_dataset
  elif args.source and facts["dataset"] == "text_files":
    source = os.path.expanduser(args.source).rstrip("/")
    facts["dataset"] = "text_files/" + os.path.basename(source.split("*")[0].rstrip("/") or source)
  commit = protocol.code_commit()
  summary = os.path.abspath(os.path.expanduser(args.summary)) if args.summary else None

  def write_summary():
    if summary:
      protocol.merge_summary(summary, protocol.summary_records(
          jobs, facts, commit, recipe, load=_with_train_log, rows=row_configs))

  sweep_spec = {"gin_file": base_files, "gin_param": base_params, "grid": grid,
                "seeds": seeds, "rows": spec["rows"], "evals": spec["evals"],
                "eval_gin_param": args.eval_gin_param, "max_documents": args.max_documents,
                "recipe": recipe, "commit": commit, "summary_dataset": facts["dataset"],
                "summary_facts": facts, "row_configs": row_configs}
  with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
    json.dump(sweep_spec, f, indent=1)

  status: Dict[str, str] = {}
  extra: Dict[str, Dict[str, Any]] = {j.name: {} for j in jobs}
  todo = []
  for job in jobs:
    if os.path.exists(job.output):
      status[job.name] = "done (skipped)"
      print(f"[sweep] {job.name}: done, skipped", flush=True)
    elif not only or job.name in only:
      todo.append(job)

  if args.print_commands:
    for job in todo:
      print(shell_line(*job.commands(args.eval_gin_param, args.max_documents)))
    print(f"# {len(todo)} of {len(jobs)} jobs to run; afterwards collect with: "
          f"memorizing-sweep {' '.join(shlex.quote(a) for a in argv if a != '--print_commands')}"
          " --collect_only", file=sys.stderr)
    return 0

  records = lambda: {j.name: job_record(j, status.get(j.name, "not run"), extra[j.name])
                     for j in jobs}
  failed = 0
  STOP.install()
  try:
    if todo and not args.collect_only:
      protocol.ensure_data(base_files, base_params)
    if not args.collect_only and args.parallel > 1:
      guard = TimeGuard(args.deadline_s, start)
      done = {j.name for j in jobs if os.path.exists(j.output)}

      def on_finish():
        write_sweep_results(sweep_dir, sweep_spec, records(), start,
                            device_description(args.launcher, jobs))
        write_summary()
      run_parallel(todo, args, guard, status, extra, done, on_finish)
      failed = sum(1 for j in todo if status.get(j.name, "").startswith("failed"))
    elif not args.collect_only:
      guard = TimeGuard(args.deadline_s, start)
      done = {j.name for j in jobs if os.path.exists(j.output)}
      for i, job in enumerate(todo):
        if STOP.requested:
          break
        print(f"[sweep] point {i + 1}/{len(todo)}: {job.name}", flush=True)
        status[job.name] = run_job(job, args, guard, extra[job.name], done)
        if status[job.name] == "done":
          done.add(job.name)
        elif status[job.name].startswith("failed"):
          failed += 1
        elif status[job.name] == "interrupted":
          STOP.requested = True             # an in-process training took the SIGTERM
        write_sweep_results(sweep_dir, sweep_spec, records(), start,
                            device_description(args.launcher, jobs))
        write_summary()
  finally:
    STOP.restore()

  rows = collect(sweep_dir, jobs, base_files, base_params, status)
  path = write_sweep_results(sweep_dir, sweep_spec, records(), start,
                             device_description(args.launcher, jobs))
  write_summary()
  if summary:
    print(f"[sweep] summary: {summary} (dataset {facts['dataset']}, recipe {recipe}, "
          f"commit {commit})", flush=True)
  finished = sum(1 for r in rows if "perplexity" in r)
  print(f"[sweep] {finished}/{len(rows)} jobs have results: "
        f"{os.path.join(sweep_dir, 'results.md')}, results.csv and {path}", flush=True)
  interrupted = [j.name for j in jobs if status.get(j.name) == "interrupted"]
  if STOP.requested or interrupted:
    print(f"[sweep] stopped by SIGTERM; interrupted: {', '.join(interrupted) or 'none'}. "
          "Run the same command again to resume (finished jobs are skipped, an interrupted "
          "training resumes from its checkpoint)", flush=True)
    return PREEMPTED
  if not args.no_plots and finished:
    try:
      written = plots.plot_sweep(sweep_dir)
      print(f"[sweep] plots: {', '.join(written)}", flush=True)
    except PlotError as e:
      print(f"[sweep] no plots: {e}", file=sys.stderr)
  return 1 if failed else 0
