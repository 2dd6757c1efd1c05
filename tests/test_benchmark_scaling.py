"""scripts/benchmark_scaling.py on fake CPU devices: the 1-device baselines, two processes
joined by jax.distributed, the efficiency columns and the loss agreement (about 2 minutes
on 2 cores; `pytest -m slow tests/test_benchmark_scaling.py`)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_scaling_script_runs_two_processes_and_their_losses_equal_one_device(tmp_path):
  out = tmp_path / "scaling.json"
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "benchmark_scaling.py"), "--model", "tiny",
       "--devices", "1,2", "--modes", "processes", "--steps", "4", "--warmup", "1",
       "--compare", "3", "--global_batch", "2", "--batch_per_device", "1",
       "--memory_size", "1536", "--backend", "exact", "--segment_length", "128",
       "--data_dir", str(tmp_path / "data"), "--work_root", str(tmp_path), "--json", str(out)],
      capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [(x["devices"], x["mode"], x["variant"], x["batch"]) for x in rows] == [
      (1, "local", "global", 2), (1, "local", "per_device", 1),
      (2, "processes", "global", 2), (2, "processes", "per_device", 2)]
  two = [x for x in rows if x["devices"] == 2]
  assert all(x["losses_match"] and len(x["losses"]) == 3 for x in two)   # same global batch 2
  assert all(0 < x["efficiency"] for x in rows) and rows[0]["efficiency"] == 1.0
  assert "| tiny | 2 | processes | global | 2 |" in r.stdout
