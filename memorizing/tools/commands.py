"""Console entry points: memorizing-train, memorizing-eval, memorizing-sweep.

Flag and gin parsing live here only. Gin files are searched in the working
directory, then in the project's configs/ folder. Errors a user can cause end
in one line naming the cause and the fix, and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
OPERATIVE_CONFIG = "operative_config.gin"


class UsageError(Exception):
  """A bad flag, gin file or binding."""


def _user_errors():
  """Exception types whose message is the whole story for a user."""
  from memorizing.checkpoint import CheckpointError
  from memorizing.config import ConfigError
  from memorizing.data.registry import DatasetError
  from memorizing.knn import UnknownBackendError
  from memorizing.train import TrainingError
  return (UsageError, ConfigError, DatasetError, CheckpointError, TrainingError,
          UnknownBackendError, FileNotFoundError, ValueError)


def _preempted():
  from memorizing.train import Preempted
  return Preempted


def _configurables():
  """Registers the gin-configurable classes once; returns the wrapped ones."""
  import gin
  from memorizing.config import ModelConfig
  from memorizing.train import TrainConfig
  if not hasattr(_configurables, "cache"):
    _configurables.cache = (gin.external_configurable(ModelConfig, "ModelConfig"),
                            gin.external_configurable(TrainConfig, "TrainConfig"))
  return _configurables.cache


def parse_gin(gin_files: List[str], gin_params: List[str], before: Optional[str] = None):
  """Parses gin files and bindings; returns (ModelConfig, TrainConfig)."""
  import gin
  model_cls, train_cls = _configurables()
  gin.clear_config()
  gin.add_config_file_search_path(os.getcwd())
  gin.add_config_file_search_path(CONFIG_DIR)
  files = ([before] if before else []) + list(gin_files)
  for f in files:
    if not (os.path.exists(f) or os.path.exists(os.path.join(CONFIG_DIR, f))):
      raise UsageError(f"gin file {f!r} not found in . or {CONFIG_DIR}")
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)   # gin logs every search-path miss as an error
  try:
    gin.parse_config_files_and_bindings(files, gin_params, finalize_config=False)
    model_config, train_config = model_cls(), train_cls()
  except (ValueError, KeyError, TypeError, IOError, SyntaxError) as e:
    if isinstance(e, ValueError) and type(e).__module__.startswith("memorizing"):
      raise
    raise UsageError(f"gin configuration error: {str(e).splitlines()[0]}") from e
  finally:
    root.setLevel(level)
  return model_config, train_config


def _common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; searched in . and configs/)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding such as 'ModelConfig.memory_size = 8192' (repeatable)")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics, configs")


def _run(fn, argv):
  try:
    return fn(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except _preempted() as e:
    prog = os.path.basename(sys.argv[0]) or "memorizing"
    print(f"{prog}: stopped: {e}", file=sys.stderr)
    return 143   # 128 + SIGTERM: a scheduler sees a preempted job, not a failed one
  except _user_errors() as e:
    prog = os.path.basename(sys.argv[0]) or "memorizing"
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1


# --- train -------------------------------------------------------------------------
def _train(argv) -> int:
  parser = argparse.ArgumentParser(prog="memorizing-train", description="Train a model.")
  _common(parser)
  parser.add_argument("--init_from", default=None,
                      help="workdir whose latest parameters start this run (when the workdir "
                           "has no checkpoint); new parameters such as the memory gate are "
                           "initialised fresh")
  args = parser.parse_args(argv)
  import gin
  from memorizing import train
  model_config, train_config = parse_gin(args.gin_file, args.gin_param)
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  from memorizing.checkpoint import check_workdir
  check_workdir(workdir)
  with open(os.path.join(workdir, OPERATIVE_CONFIG), "w") as f:
    f.write(gin.config_str())
  train.train_and_evaluate(model_config, train_config, workdir, init_from=args.init_from)
  return 0


def train_main(argv=None) -> int:
  return _run(_train, sys.argv[1:] if argv is None else argv)


# --- eval --------------------------------------------------------------------------
def _eval(argv) -> int:
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
  args = parser.parse_args(argv)
  from memorizing import checkpoint, metrics
  from memorizing.train import evaluate_params
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
  results = {name: evaluate_params(cfg, train_config, params, args.max_documents)
             for name, cfg in variants.items()}
  metrics.print_eval_table(results, model_config, train_config.eval_max_document_tokens)
  out = {"workdir": workdir, "checkpoint_step": step, "split": train_config.eval_split,
         "dataset": train_config.dataset, "results": results}
  if args.output:
    with open(args.output, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.output}")
  return 0


def eval_main(argv=None) -> int:
  return _run(_eval, sys.argv[1:] if argv is None else argv)


def sweep_main(argv=None) -> int:
  from memorizing import sweep
  return _run(sweep.main, sys.argv[1:] if argv is None else argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  commands = {"train": train_main, "eval": eval_main, "sweep": sweep_main}
  if not argv or argv[0] not in commands:
    print(f"usage: python -m memorizing.cli {{{'|'.join(commands)}}} [flags]", file=sys.stderr)
    return 2
  return commands[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
