"""The project as a wheel: built offline, installed elsewhere, the quickstart runs
from another directory with the gin configs shipped inside the package."""
import os
import site
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_runs_the_quickstart_from_another_directory(tmp_path):
  wheel_dir, venv, elsewhere = tmp_path / "wheel", tmp_path / "venv", tmp_path / "elsewhere"
  elsewhere.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheel_dir), ROOT], check=True, capture_output=True, cwd=tmp_path)
  wheel = next(wheel_dir.glob("memorizing-*.whl"))
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  py = venv / "bin" / "python"
  # The test environment's dependencies (jax, flax, ...), without its editable
  # install of this project: paths added by a .pth do not run their own .pth files.
  site_dir = subprocess.check_output(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
  with open(os.path.join(site_dir, "test_env.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                 check=True, capture_output=True)
  env = dict(os.environ, MEMORIZING_DATA_DIR=str(tmp_path / "data"), JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  where = subprocess.check_output([str(py), "-c", "import memorizing; print(memorizing.__file__)"],
                                  text=True, cwd=elsewhere, env=env)
  assert where.startswith(str(venv)), where       # the wheel, not the source tree
  train = subprocess.run(
      [str(venv / "bin" / "memorizing-train"), "--gin_file", "quickstart.gin",
       "--gin_param", "TrainConfig.num_steps = 2", "--gin_param", "TrainConfig.final_eval = False",
       "--gin_param", "TrainConfig.dataset = 'synthetic'", "--workdir", str(tmp_path / "run")],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stdout + train.stderr
  assert "training steps 0..2" in train.stdout
  for tool in ("memorizing-prepare", "memorizing-tokenizer", "memorizing-plot", "memorizing-eval",
               "memorizing-sweep"):
    help_ = subprocess.run([str(venv / "bin" / tool), "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert help_.returncode == 0, (tool, help_.stderr)
