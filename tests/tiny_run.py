"""A tiny training run through the CLI, shared by test modules' fixtures."""
from memorizing import cli


def train_tiny(tmp_path_factory, bindings):
  """Trains base.gin plus `bindings` into a fresh workdir; returns (workdir, data_dir)."""
  data_dir = str(tmp_path_factory.mktemp("data"))
  workdir = str(tmp_path_factory.mktemp("run"))
  argv = ["--gin_file", "base.gin", "--workdir", workdir,
          "--gin_param", f"TrainConfig.data_dir = '{data_dir}'"]
  for p in bindings:
    argv += ["--gin_param", p]
  assert cli.train_main(argv) == 0
  return workdir, data_dir
