"""The train and eval commands, and the one place user errors are reported.

Flags are parsed here, gin in memorizing/tools/gin_config.py (memorizing/cli.py
holds the console entry points). A `memorizing.errors.UserError` (raised where its
cause is known) ends in one line naming the cause and the fix, and exit status
1; `Preempted` in status 143; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import gin

from memorizing.errors import Preempted, UsageError, UserError
from memorizing.tools.gin_config import CONFIG_DIR, parse_gin  # noqa: F401 (CONFIG_DIR re-exported)
from memorizing.training import checkpoint, metrics, train

OPERATIVE_CONFIG = "operative_config.gin"


def _common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; searched in . and configs/)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding such as 'ModelConfig.memory_size = 8192' (repeatable)")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics, configs")


def run(fn: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
  """Runs a command; reports user errors in one line (the only place they are caught)."""
  prog = os.path.basename(sys.argv[0]) or "memorizing"
  try:
    return fn(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except Preempted as e:
    print(f"{prog}: stopped: {e}", file=sys.stderr)
    return 143   # 128 + SIGTERM: a scheduler sees a preempted job, not a failed one
  except UserError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1


# --- train -------------------------------------------------------------------------
def train_command(argv: Sequence[str]) -> int:
  """memorizing-train: parse flags and gin, call train_and_evaluate."""
  parser = argparse.ArgumentParser(prog="memorizing-train", description="Train a model.")
  _common(parser)
  parser.add_argument("--init_from", default=None,
                      help="workdir whose latest parameters start this run (when the workdir "
                           "has no checkpoint); new parameters such as the memory gate are "
                           "initialised fresh")
  args = parser.parse_args(list(argv))
  model_config, train_config = parse_gin(args.gin_file, args.gin_param)
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  checkpoint.check_workdir(workdir)
  with open(os.path.join(workdir, OPERATIVE_CONFIG), "w") as f:
    f.write(gin.config_str())
  train.train_and_evaluate(model_config, train_config, workdir, init_from=args.init_from)
  return 0


# --- eval --------------------------------------------------------------------------
def eval_command(argv: Sequence[str]) -> int:
  """memorizing-eval: perplexity of a workdir's checkpoint, with and without memory."""
  parser = argparse.ArgumentParser(
      prog="memorizing-eval",
      description="Perplexity over whole documents, with memory and with memory disabled. "
                  "The workdir's operative config is read first; flags override it.")
  _common(parser)
  parser.add_argument("--split", default=None, help="default: TrainConfig.eval_split")
  parser.add_argument("--max_documents", type=int, default=None)
  parser.add_argument("--max_document_tokens", type=int, default=None,
                      help="evaluate only each document's first N tokens (0: whole documents)")
  parser.add_argument("--checkpoint_step", type=int, default=None, help="default: latest")
  parser.add_argument("--output", default=None, help="write the results as JSON here")
  parser.add_argument("--memory", choices=("both", "on", "off"), default="both",
                      help="evaluate with memory, memory disabled, or both")
  args = parser.parse_args(list(argv))
  for flag in ("max_documents", "max_document_tokens", "checkpoint_step"):
    value = getattr(args, flag)
    smallest = 0 if flag != "max_documents" else 1
    if value is not None and value < smallest:
      raise UsageError(f"--{flag} must be >= {smallest}, got {value}")
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  operative = os.path.join(workdir, OPERATIVE_CONFIG)
  model_config, train_config = parse_gin(args.gin_file, args.gin_param,
                                         before=operative if os.path.exists(operative) else None)
  if args.split:
    train_config = train_config.replace(eval_split=args.split)
  if args.max_document_tokens is not None:
    train_config = train_config.replace(eval_max_document_tokens=args.max_document_tokens)
  params, step = checkpoint.load_params(workdir, args.checkpoint_step)
  checkpoint.check_params_fit(model_config, params, f"checkpoint {step} in {workdir}")
  variants = {"with_memory": model_config,
              "memory_disabled": model_config.replace(memory_enabled=False)}
  if args.memory == "on":
    variants.pop("memory_disabled")
  elif args.memory == "off" or not model_config.memory_layers:
    variants.pop("with_memory")
  results = {name: train.evaluate_params(cfg, train_config, params, args.max_documents)
             for name, cfg in variants.items()}
  metrics.print_eval_table(results, model_config, train_config.eval_max_document_tokens)
  out = {"workdir": workdir, "checkpoint_step": step, "split": train_config.eval_split,
         "dataset": train_config.dataset, "results": results}
  if args.output:
    with open(args.output + ".tmp", "w") as f:     # whole or absent for a reader meanwhile
      json.dump(out, f, indent=1)
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {args.output}")
  return 0
