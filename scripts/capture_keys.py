"""Captures a trained model's memory keys and queries for kNN recall benchmarks.

  python scripts/capture_keys.py --workdir /tmp/quickstart --segments 64 \
      --gin_param 'ModelConfig.memory_size = 8192' --output /tmp/keys.npz
  python scripts/benchmark_knn.py --keys_file /tmp/keys.npz

The model and data come from the work directory's operative config (flags
override it); documents are read from the evaluation split in order.
"""
import argparse
import os
import sys

import numpy as np

from memorizing.knn import capture
from memorizing.tools import commands
from memorizing.tools.gin_config import parse_gin
from memorizing.training import checkpoint
from memorizing.training.train import make_stream


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--segments", type=int, default=64, help="segments run before capture")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--layer", type=int, default=None)
  parser.add_argument("--output", required=True)
  args = parser.parse_args(argv)
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  operative = os.path.join(workdir, commands.OPERATIVE_CONFIG)
  model_config, train_config = parse_gin(
      args.gin_file, args.gin_param, before=operative if os.path.exists(operative) else None)
  params, step = checkpoint.load_params(workdir)
  checkpoint.check_params_fit(model_config, params, f"checkpoint {step} in {workdir}")
  stream, _, _ = make_stream(model_config, train_config, train_config.eval_split,
                             args.batch_size, train=False)
  out = capture.capture(model_config, params, stream, args.segments, args.layer)
  np.savez(args.output, **out)
  print(f"captured keys {out['keys'].shape} (filled {out['count'].tolist()}) and queries "
        f"{out['queries'].shape} from checkpoint {step} into {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(commands.run(main, sys.argv[1:]))
