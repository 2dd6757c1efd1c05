"""Console entry points: memorizing-train, -eval, -sweep, -table4, -generate, -inspect,
-prepare, -tokenizer, -plot.

Also `python -m memorizing.cli COMMAND [flags]` with the same names. The commands are in
memorizing/tools/ (commands.py, sweep.py); user errors are reported there.
"""
from __future__ import annotations

import sys

from memorizing.tools import (commands, generate, inspect_memory, plots, prepare, sweep, table4,
                              tokenizer)

# Kept here for callers of the old names.
CONFIG_DIR = commands.CONFIG_DIR
OPERATIVE_CONFIG = commands.OPERATIVE_CONFIG
parse_gin = commands.parse_gin


def _argv(argv):
  return sys.argv[1:] if argv is None else list(argv)


def train_main(argv=None) -> int:
  return commands.run(commands.train_command, _argv(argv))


def eval_main(argv=None) -> int:
  return commands.run(commands.eval_command, _argv(argv))


def sweep_main(argv=None) -> int:
  return commands.run(sweep.main, _argv(argv))


def table4_main(argv=None) -> int:
  return commands.run(table4.main, _argv(argv))


def prepare_main(argv=None) -> int:
  return commands.run(prepare.main, _argv(argv))


def tokenizer_main(argv=None) -> int:
  return commands.run(tokenizer.main, _argv(argv))


def plot_main(argv=None) -> int:
  return commands.run(plots.main, _argv(argv))


def generate_main(argv=None) -> int:
  return commands.run(generate.main, _argv(argv))


def inspect_main(argv=None) -> int:
  return commands.run(inspect_memory.main, _argv(argv))


def main(argv=None) -> int:
  argv = _argv(argv)
  entry_points = {"train": train_main, "eval": eval_main, "sweep": sweep_main,
                  "table4": table4_main, "generate": generate_main, "inspect": inspect_main,
                  "prepare": prepare_main, "tokenizer": tokenizer_main, "plot": plot_main}
  if not argv or argv[0] not in entry_points:
    print(f"usage: python -m memorizing.cli {{{'|'.join(entry_points)}}} [flags]", file=sys.stderr)
    return 2
  return entry_points[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
