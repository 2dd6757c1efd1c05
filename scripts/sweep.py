"""Same as `memorizing-sweep` / `python -m memorizing.cli sweep`.

  python scripts/sweep.py --gin_file quickstart.gin --sweep_dir /tmp/sweep \
      --grid 'ModelConfig.memory_size=[1536,8192]' --grid 'ModelConfig.use_xl_cache=[True,False]'
"""
import sys

from memorizing import cli

if __name__ == "__main__":
  sys.exit(cli.sweep_main(sys.argv[1:]))
