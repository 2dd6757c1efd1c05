"""Plots from a work directory or a sweep directory (PNG, into DIR/plots/).

  python scripts/plot.py --workdir /tmp/quickstart
  python scripts/plot.py --sweep_dir /tmp/sweep [--out_dir docs/img]
"""
import sys

from memorizing.tools import plots

if __name__ == "__main__":
  sys.exit(plots.main(sys.argv[1:]))
