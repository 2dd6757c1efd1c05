"""The per-corpus steps and the summary of a protocol sweep (memorizing-sweep).

- `prepare_corpus`: prepares `--source DIR` as the recipe's data set (text_files,
  or a Debian corpus from its .deb or directory), and resolves a recipe's
  `TrainConfig.tokenizer = 'spm:N'` by training a SentencePiece model of N
  pieces on the train split, once per sweep directory, then binding
  TrainConfig.tokenizer to its path and ModelConfig.vocab_size to N.
- `summary_records` / `merge_summary`: one record per (row, evaluation) of
  the sweep, {"dataset", "tokenizer", "seed", "steps", "row", "eval",
  "perplexity", "bits_per_byte", "commit", "recipe"} (plus "checkpoint_step"
  and, when the evaluation measured them, "memory": per memory layer the mean
  gate, memory mass, top-1 and top-k similarity, recall and the distance buckets),
  merged into a JSON list so that runs of several corpora and seeds accumulate;
  a record with the same dataset, tokenizer, seed, steps, row, eval and commit
  replaces the old one.
- `code_commit`: the code's commit ($MEMORIZING_COMMIT, else `git rev-parse
  HEAD` with "+dirty" when memorizing/ or configs/ differ from it, else the
  package version); `recipe_id`: the protocol file's name and a hash of what
  it configures (every config field but the data set, data_dir and seed, and
  the sweep's rows and evaluations).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import gin

from memorizing.data import registry, tokenizer_training
from memorizing.errors import UsageError
from memorizing.tools.gin_config import parse_gin
from memorizing.tools.grid import primary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = ("dataset", "tokenizer", "seed", "steps", "row", "eval", "commit", "recipe")
# Fields that are not the recipe: the corpus, the seed, and how (not what) the
# model computes (gather_gradient, retrieved_attention: the same numbers, another kernel).
NOT_RECIPE = {"dataset", "data_dir", "seed", "tokenizer", "vocab_size", "gather_gradient",
              "retrieved_attention"}
# Data sets prepared from a directory, glob or .deb given as --source.
SOURCE_DATASETS = ("text_files", "linux_c", "coq_stdlib", "perl_doc")
MEMORY_KEYS = ("gate_mean", "memory_bias_mean", "mass_mean", "top1_mean", "topk_mean", "recall",
               "distance")


# --- the code and the recipe -----------------------------------------------------------
def code_commit(root: str = ROOT) -> str:
  if os.environ.get("MEMORIZING_COMMIT"):
    return os.environ["MEMORIZING_COMMIT"]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=20)
    if head.returncode == 0 and head.stdout.strip():
      dirty = subprocess.run(["git", "status", "--porcelain", "--", "memorizing", "configs"],
                             cwd=root, capture_output=True, text=True, timeout=20)
      return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    from importlib.metadata import version  # the installed package's version, last resort
    return f"memorizing-{version('memorizing')}"
  except Exception:  # noqa: BLE001 - not installed: no version to name
    return "unknown"


def _recipe_fields(files: Sequence[str], params: Sequence[str]) -> Dict[str, Any]:
  model_config, train_config = parse_gin(list(files), list(params))
  fields = {f"ModelConfig.{k}": v for k, v in dataclasses.asdict(model_config).items()
            if k not in NOT_RECIPE}
  fields.update({f"TrainConfig.{k}": v for k, v in dataclasses.asdict(train_config).items()
                 if k not in NOT_RECIPE})
  fields["TrainConfig.tokenizer"] = tokenizer_name(train_config.tokenizer)
  return fields


def _recipe_runs(jobs: Sequence[Any], steps: int) -> Dict[str, Any]:
  """{row: what defines it}: a train row's resolved config (but the data set,
  data_dir and seed; num_steps only where it differs from the protocol's `steps`),
  its fine-tune source and memory mode; an extra evaluation's run and bindings."""
  runs: Dict[str, Any] = {}
  for job in jobs:
    if job.kind == "train" and (job.row or job.name) not in runs:
      fields = _recipe_fields(job.files, job.params)
      if fields["TrainConfig.num_steps"] == steps:
        fields["TrainConfig.num_steps"] = "steps"
      runs[job.row or job.name] = {"config": fields,
                                   "init_from": job.init_from and job.init_from.split("_seed-")[0],
                                   "memory": job.memory}
    elif job.kind == "eval" and (job.row or job.name) not in runs:
      runs[job.row or job.name] = {"of": job.of_row or job.of, "gin_param": list(job.params),
                                   "memory": job.memory}
  return runs


def _digest(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def recipe_and_rows(base_files: Sequence[str], jobs: Sequence[Any], steps: int
                    ) -> Tuple[str, Dict[str, str]]:
  """(recipe id, row configs), from one parse of every row:
  recipe id: '<protocol gin file>@<10 hex digits>', a hash of every row's
  definition (`_recipe_runs`: resolved configs, fine-tune sources, extra
  evaluations), so that a change anywhere in the recipe's files changes it;
  row configs: {row: 10 hex digits}, a hash of each row's own definition. Two
  recipes that differ only in their memory rows give their XL row the same hash,
  so the report can compare a variant's XL + 8K with an XL trained under another."""
  runs = _recipe_runs(jobs, steps)
  name = os.path.basename(base_files[-1]) if base_files else "command-line"
  return f"{name}@{_digest(runs)}", {row: _digest(run) for row, run in runs.items()}


def recipe_id(base_files: Sequence[str], jobs: Sequence[Any], steps: int) -> str:
  """The recipe id of `recipe_and_rows`."""
  return recipe_and_rows(base_files, jobs, steps)[0]


def tokenizer_name(tokenizer: str) -> str:
  """'bytes', 'spm:N', or a SentencePiece model's file name."""
  if tokenizer in ("bytes", "byte") or tokenizer_training.spm_vocab_size(tokenizer):
    return tokenizer
  return os.path.basename(str(tokenizer))


# --- per-corpus steps ------------------------------------------------------------------
def prepare_corpus(base_files: Sequence[str], base_params: Sequence[str], sweep_dir: str,
                   source: Optional[str] = None) -> Tuple[List[str], Dict[str, Any]]:
  """Runs the recipe's per-corpus steps; returns (bindings to add, facts for the summary)."""
  _, train_config = parse_gin(list(base_files), list(base_params))
  dataset, data_dir = train_config.dataset, train_config.data_dir
  params: List[str] = []
  if source:
    if dataset not in SOURCE_DATASETS:
      raise UsageError(f"--source: TrainConfig.dataset is {dataset!r}; a source directory is "
                       f"read by {', '.join(SOURCE_DATASETS)}")
    if not data_dir:
      data_dir = os.path.join(sweep_dir, "data")
      params.append(f"TrainConfig.data_dir = {data_dir!r}")
    spec = registry.get_spec(dataset)
    if registry.find_prepared(data_dir, spec.tfds_name):
      print(f"[sweep] {dataset} already prepared in {data_dir}; --source {source} not read "
            "again (use another data_dir for another source)", flush=True)
    else:
      print(f"[sweep] preparing {dataset} from {source} into {data_dir}", flush=True)
      print(registry.prepare(dataset, data_dir, source=source), flush=True)
  size = tokenizer_training.spm_vocab_size(train_config.tokenizer)
  if size:
    path = os.path.join(sweep_dir, "tokenizer", f"{dataset}_spm{size}.model")
    if os.path.exists(path):
      print(f"[sweep] tokenizer {train_config.tokenizer}: {path} (trained before)", flush=True)
    else:
      print(f"[sweep] tokenizer {train_config.tokenizer}: training {size} pieces on "
            f"{dataset}/{train_config.train_split}", flush=True)
      _, report = tokenizer_training.train_on_dataset(dataset, data_dir, path, size,
                                                      train_config.train_split)
      print(f"[sweep] {report}", flush=True)
    params += [f"TrainConfig.tokenizer = {path!r}", f"ModelConfig.vocab_size = {size}"]
  facts = {"dataset": dataset, "tokenizer": tokenizer_name(train_config.tokenizer),
           "steps": train_config.num_steps, "seed": train_config.seed,
           "eval_max_documents": bound_eval_documents(base_files, base_params)}
  return params, facts


def ensure_data(base_files: Sequence[str], base_params: Sequence[str]) -> None:
  """Opens the train and evaluation splits once, here: an embedded data set is built
  before parallel jobs would race to build it, and unprepared data is one error
  (with the command that prepares it) instead of one per job."""
  _, cfg = parse_gin(list(base_files), list(base_params))
  for split in dict.fromkeys((cfg.train_split, cfg.eval_split)):
    registry.load_documents(cfg.dataset, split, cfg.data_dir)


def bound_eval_documents(base_files: Sequence[str], base_params: Sequence[str]) -> Optional[int]:
  """TrainConfig.eval_max_documents where the files or bindings set it, else None."""
  parse_gin(list(base_files), list(base_params))
  try:
    value = gin.query_parameter("TrainConfig.eval_max_documents")
  except ValueError:
    return None
  return int(value) if value else None


# --- the summary -----------------------------------------------------------------------
def memory_summary(result: dict) -> Optional[Dict[str, Any]]:
  """Per memory layer, the signals' means of one evaluation (None without signals)."""
  mem = result.get("memory")
  if not isinstance(mem, dict) or not mem:
    return None
  return {layer: {k: rec[k] for k in MEMORY_KEYS if k in rec} for layer, rec in mem.items()
          if isinstance(rec, dict)}


def _variants(results: dict, eval_name: Optional[str]) -> List[Tuple[str, dict]]:
  """[(eval name, result)]: a run's own evaluation ('memory': as trained) and
  'disabled'; an extra evaluation under its own name."""
  main, off = primary({"results": results})
  if eval_name:
    return [(eval_name, main)]
  return [("memory", main)] + ([("disabled", off)] if off is not None else [])


def _read_output(job: Any) -> Optional[dict]:
  try:
    with open(job.output) as f:
      return json.load(f)
  except (OSError, ValueError):          # not written, or still being written
    return None


def summary_records(jobs: Sequence[Any], facts: Dict[str, Any], commit: str, recipe: str,
                    load: Callable[[Any], Optional[dict]] = _read_output,
                    rows: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
  """One record per finished (row, evaluation) of `jobs` (memorizing.tools.sweep.Job).
  `load(job)`: the job's results JSON ({"results", "checkpoint_step"}, and its
  "train_log" where known: the record then has "train_loss_tail") or None; by
  default its output file. `rows`: row_configs of the recipe; a record then
  carries its row's hash ("row_config"), the recipe's XL row's ("xl_config") and
  the whole table ("recipe_rows": row or extra evaluation -> hash), with which the
  report takes a row the recipe did not run from another recipe where it is the
  same run."""
  rows = rows or {}
  out = []
  for job in jobs:
    res = load(job)
    if not res or "results" not in res:
      continue
    row = job.row or job.name
    eval_name = None
    if job.kind == "eval":
      row, eval_name = job.of_row or job.of, job.row or job.name
    for ev, result in _variants(res["results"], eval_name):
      rec = {"dataset": facts["dataset"], "tokenizer": facts["tokenizer"],
             "seed": facts["seed"] if job.seed is None else job.seed, "steps": facts["steps"],
             "row": row, "eval": ev, "perplexity": result["perplexity"],
             "bits_per_byte": result["bits_per_byte"], "commit": commit, "recipe": recipe,
             "checkpoint_step": res.get("checkpoint_step")}
      for field, name in (("row_config", row), ("xl_config", "xl")):
        if name in rows:
          rec[field] = rows[name]
      if rows:
        rec["recipe_rows"] = dict(rows)
      tail = train_loss_tail(res.get("train_log") or []) if job.kind == "train" else None
      if tail is not None:
        rec["train_loss_tail"] = tail
      memory = memory_summary(result)
      if memory:
        rec["memory"] = memory
      out.append(rec)
  return out


TAIL = 0.36      # the last 36% of the logged steps (1600-2500 of 2500)


def train_loss_tail(log: Sequence[Dict[str, Any]]) -> Optional[float]:
  """Mean training loss over the last TAIL of a run's logged steps (None without a
  log). Rows of one seed see the same batches, so the difference between two rows'
  tails shows whether the memory got ahead in training ("took off")."""
  if not log:
    return None
  last = max(r["step"] for r in log)
  tail = [r["loss"] for r in log if r["step"] >= (1.0 - TAIL) * last]
  return sum(tail) / len(tail) if tail else None


def merge_summary(path: str, records: Sequence[Dict[str, Any]]) -> int:
  """Adds `records` to the JSON list at `path` (created if missing), replacing any
  record of the same KEY; returns the number of records in the file."""
  old: List[Dict[str, Any]] = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if not isinstance(old, list):
      raise UsageError(f"--summary {path}: expected a JSON list of records")
  key = lambda r: tuple(r.get(k) for k in KEY)
  new = {key(r): r for r in records}
  merged = [new.pop(key(r), r) for r in old]
  merged += list(new.values())          # the records of keys not in the file, in order
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(merged, f, indent=1)
  os.replace(path + ".tmp", path)
  return len(merged)
