"""`memorizing-table4`: the small-scale Table-4 protocol on one data set, as one sweep.

  memorizing-table4 --dataset perl_doc --seeds 0 --data_dir DATA
  memorizing-table4 --dataset text_files --source ~/corpus --summary_dataset my_corpus

It only builds and runs this memorizing-sweep command (printed first):

  memorizing-sweep --grid_file experiments/table4_protocol.yaml --sweep_dir SWEEP_DIR \\
      --gin_param "TrainConfig.dataset = 'NAME'" [--gin_param "TrainConfig.data_dir = 'D'"] \\
      --seeds 0 --parallel 6 --summary docs/results/table4_summary.json [--source DIR] ...

`memorizing-table4 --merge GPU_SUMMARY.json` merges a summary written elsewhere (a
GPU machine's $OUT) into docs/results/table4_summary.json; given a sweep's
sweep_results.json instead, it rebuilds the same records from the results it holds; `memorizing-table4 --report`
prints it as markdown tables with the check of the XL + 8K target.
The recipe is configs/experiments/table4_protocol.gin; `--tokenizer spm:8192`
and `--steps 4800` override its tokenizer and length; any other flag goes to
memorizing-sweep unchanged (`--only xl,mem8192`, `--deadline_s 560`, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from typing import List, Sequence

from memorizing.errors import UsageError
from memorizing.tools import protocol, sweep, table4_report

PROTOCOL = "experiments/table4_protocol.yaml"
SUMMARY = os.path.join("docs", "results", "table4_summary.json")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="memorizing-table4",
      description="Run the small-scale Table-4 protocol (configs/experiments/table4_protocol.gin "
                  "and .yaml) on one data set through memorizing-sweep; unknown flags go to "
                  "memorizing-sweep.")
  p.add_argument("--dataset", help="TrainConfig.dataset (a registered name)")
  p.add_argument("--data_dir", default=None, help="TrainConfig.data_dir (default: "
                 "$MEMORIZING_DATA_DIR or ~/tensorflow_datasets; with --source: SWEEP_DIR/data)")
  p.add_argument("--source", default=None,
                 help="prepare the data set from this directory or glob first (text_files, "
                      "linux_c, coq_stdlib, perl_doc)")
  p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
  p.add_argument("--tokenizer", default=None,
                 help="override the recipe's tokenizer: 'bytes' or 'spm:N' (trained per sweep)")
  p.add_argument("--steps", type=int, default=None,
                 help="override the recipe's TrainConfig.num_steps (fine-tunes keep theirs)")
  p.add_argument("--sweep_dir", default=None,
                 help="default: $TMPDIR/table4/DATASET[_SOURCE][_TOKENIZER][_STEPS]")
  p.add_argument("--summary", default=SUMMARY, help=f"summary JSON to merge into ({SUMMARY})")
  p.add_argument("--parallel", type=int, default=6, help="jobs at once on the device (6)")
  p.add_argument("--protocol", default=PROTOCOL, help=f"the sweep file ({PROTOCOL})")
  p.add_argument("--report", action="store_true",
                 help="run nothing: print --summary as markdown tables with the check of the "
                      "XL + 8K target (memorizing/tools/table4_report.py)")
  p.add_argument("--recipe", default=None, help="with --report: only this recipe's records")
  p.add_argument("--report_output", default=None, help="with --report: also write it here")
  p.add_argument("--merge", action="append", default=[],
                 help="run nothing: merge the records of this summary JSON (e.g. one written "
                      "on a GPU machine), or the records rebuilt from a sweep's "
                      "sweep_results.json, into --summary (repeatable)")
  return p


def sweep_argv(args: argparse.Namespace, rest: Sequence[str]) -> List[str]:
  """The memorizing-sweep flags of the protocol."""
  label = args.dataset
  if args.source:                       # one sweep directory (and data) per source
    source = os.path.expanduser(args.source).split("*")[0].rstrip("/")
    label += "_" + (os.path.basename(source) or "source")
  suffix = "".join(f"_{x}" for x in (args.tokenizer and args.tokenizer.replace(":", ""),
                                     args.steps and f"{args.steps}steps") if x)
  sweep_dir = args.sweep_dir or os.path.join(tempfile.gettempdir(), "table4", label + suffix)
  argv = ["--grid_file", args.protocol, "--sweep_dir", sweep_dir,
          "--gin_param", f"TrainConfig.dataset = {args.dataset!r}"]
  if args.data_dir:
    argv += ["--gin_param", f"TrainConfig.data_dir = {os.path.expanduser(args.data_dir)!r}"]
  if args.tokenizer:
    argv += ["--gin_param", f"TrainConfig.tokenizer = {args.tokenizer!r}"]
  if args.steps:
    argv += ["--gin_param", f"TrainConfig.num_steps = {args.steps}"]
  argv += ["--seeds", args.seeds, "--parallel", str(args.parallel)]
  if args.summary:
    argv += ["--summary", args.summary]
  if args.source:
    argv += ["--source", args.source]
  return argv + list(rest)


def main(argv: Sequence[str]) -> int:
  args, rest = build_parser().parse_known_args(list(argv))
  if args.report:
    try:
      with open(args.summary) as f:
        records = json.load(f)
    except (OSError, ValueError) as e:
      raise UsageError(f"--report: cannot read the summary {args.summary}: {e}") from e
    try:
      text = table4_report.render(records, args.recipe)
    except (KeyError, TypeError, AttributeError) as e:
      raise UsageError(f"--report: {args.summary} is not a list of summary records "
                       f"(memorizing-table4 writes them): missing or bad field {e}") from e
    print(text, end="")
    if args.report_output:
      with open(args.report_output, "w") as f:
        f.write(text)
    return 0
  if args.merge:
    for path in args.merge:
      try:
        with open(path) as f:
          records = json.load(f)
      except (OSError, ValueError) as e:
        raise UsageError(f"--merge: cannot read {path}: {e}") from e
      if isinstance(records, dict):       # a sweep_results.json: rebuild its records
        records = sweep.summary_from_results(records)
      if not isinstance(records, list) or not all(
          isinstance(r, dict) and all(k in r for k in protocol.KEY) for r in records):
        raise UsageError(f"--merge: {path} is neither a list of summary records nor a "
                         "sweep_results.json (memorizing-table4 and memorizing-sweep write them)")
      total = protocol.merge_summary(args.summary, records)
      print(f"merged {len(records)} records of {path} into {args.summary} ({total} records)")
    return 0
  if not args.dataset:
    raise UsageError("--dataset NAME is required (or --merge FILE)")
  command = sweep_argv(args, rest)
  print("memorizing-sweep " + " ".join(shlex.quote(a) for a in command), flush=True)
  return sweep.main(command)
