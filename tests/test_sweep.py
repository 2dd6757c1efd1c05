"""memorizing-sweep: grid parsing, a 2x2 sweep of tiny points that writes the table
and plots, a re-run that skips finished points, --print_commands, scripts/plot.py."""
import csv
import json
import os
import subprocess
import sys

import pytest

from memorizing import cli, plots, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "ModelConfig.num_layers = 1", "ModelConfig.d_model = 32", "ModelConfig.num_heads = 2",
    "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "ModelConfig.segment_length = 32",
    "ModelConfig.memory_layers = (-1,)", "ModelConfig.num_neighbors = 8",
    "TrainConfig.dataset = 'synthetic'", "TrainConfig.batch_size = 2",
    "TrainConfig.eval_batch_size = 2", "TrainConfig.num_steps = 2", "TrainConfig.log_every = 1",
    "TrainConfig.checkpoint_every = 0", "TrainConfig.progress_bar = False",
    "TrainConfig.prefetch = 0", "TrainConfig.optimizer = 'adamw'",
    "TrainConfig.learning_rate = 0.01", "TrainConfig.warmup_steps = 1",
    "TrainConfig.eval_max_document_tokens = 300",
]
GRID = ["--grid", "ModelConfig.memory_size=[64,128]",
        "--grid", "ModelConfig.use_xl_cache=[True,False]"]


def base_flags(sweep_dir, data_dir):
  out = ["--sweep_dir", str(sweep_dir), "--gin_file", "base.gin",
         "--gin_param", f"TrainConfig.data_dir = '{data_dir}'", "--max_documents", "1"]
  for p in TINY:
    out += ["--gin_param", p]
  return out


def test_grid_flags_and_files(tmp_path):
  assert sweep.parse_grid_flag("ModelConfig.memory_layers=[(), (-4, -2), 'a,b']") == (
      "ModelConfig.memory_layers", ["()", "(-4, -2)", "'a,b'"])
  assert sweep.parse_grid_flag("A.b = 1,2") == ("A.b", ["1", "2"])
  with pytest.raises(sweep.SweepError):
    sweep.parse_grid_flag("ModelConfig.memory_size")
  points = sweep.expand({"M.a": ["1", "2"], "M.b": ["True", "False"]})
  assert [sweep.point_name(p) for p in points] == [
      "a-1_b-True", "a-1_b-False", "a-2_b-True", "a-2_b-False"]
  assert sweep.gin_literal("adamw") == "'adamw'"
  assert sweep.gin_literal("'adamw'") == "'adamw'"
  assert sweep.gin_literal([-4]) == "(-4,)"
  assert sweep.gin_literal(True) == "True"
  spec_file = tmp_path / "grid.yaml"
  spec_file.write_text("gin_file: quickstart.gin\ngin_param: ['TrainConfig.num_steps = 5']\n"
                       "grid:\n  TrainConfig.optimizer: [adamw, adafactor]\n"
                       "  gin_file: [experiments/table4_small/ctx512_xl.gin]\n")
  spec = sweep.load_grid_file(str(spec_file))
  assert spec["gin_file"] == ["quickstart.gin"]
  assert spec["grid"]["TrainConfig.optimizer"] == ["'adamw'", "'adafactor'"]
  (tmp_path / "grid.json").write_text(json.dumps({"grid": {"ModelConfig.memory_size": [1, 2]}}))
  assert sweep.load_grid_file(str(tmp_path / "grid.json"))["grid"] == {
      "ModelConfig.memory_size": ["1", "2"]}


def test_print_commands_runs_nothing(tmp_path, capsys):
  rc = cli.main(["sweep", "--sweep_dir", str(tmp_path / "s"), "--gin_file", "quickstart.gin",
                 "--print_commands"] + GRID)
  assert rc == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("memorizing-train")]
  assert len(lines) == 4
  assert "memory_size = 64" in lines[0] and "&& memorizing-eval" in lines[0]
  assert "results.json" in lines[0]
  assert not os.path.exists(tmp_path / "s" / "memory_size-64_use_xl_cache-True")


def test_bad_grid_is_one_clear_error(tmp_path, capsys):
  assert cli.sweep_main(["--sweep_dir", str(tmp_path)]) == 1
  assert "no grid" in capsys.readouterr().err


def test_2x2_sweep_writes_table_and_plots_and_rerun_skips(tmp_path, capsys):
  data_dir, sweep_dir = tmp_path / "data", tmp_path / "sweep"
  assert cli.sweep_main(base_flags(sweep_dir, data_dir) + GRID) == 0
  out = capsys.readouterr().out
  assert out.count("[sweep] point ") == 4
  with open(sweep_dir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == [
      "memory_size-64_use_xl_cache-True", "memory_size-64_use_xl_cache-False",
      "memory_size-128_use_xl_cache-True", "memory_size-128_use_xl_cache-False"]
  for r in rows:
    assert r["status"] == "done"
    assert float(r["perplexity"]) > 1 and float(r["perplexity_memory_disabled"]) > 1
    assert int(r["tokens"]) == 299 and r["step"] == "2"
    assert f"ModelConfig.memory_size = {r['memory_size']}" in r["config"]
  assert [r["use_xl_cache"] for r in rows] == ["True", "False", "True", "False"]
  md = (sweep_dir / "results.md").read_text()
  assert md.count("| memory_size-") == 4 and "perplexity_memory_disabled" in md
  for name in ("training_curves.png", "perplexity_vs_memory.png", "perplexity_by_position.png"):
    assert (sweep_dir / "plots" / name).stat().st_size > 5000
  stamps = {r["point"]: os.path.getmtime(sweep_dir / r["point"] / "results.json") for r in rows}

  # Re-running skips every finished point and rebuilds the same table.
  assert cli.sweep_main(base_flags(sweep_dir, data_dir) + GRID) == 0
  out = capsys.readouterr().out
  assert out.count("done, skipped") == 4 and "[sweep] point " not in out
  assert {p: os.path.getmtime(sweep_dir / p / "results.json") for p in stamps} == stamps
  with open(sweep_dir / "results.csv") as f:
    again = list(csv.DictReader(f))
  assert [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]
  assert {r["status"] for r in again} == {"done (skipped)"}

  # One finished point's directory also plots on its own (what scripts/plot.py calls).
  workdir = sweep_dir / rows[0]["point"]
  assert plots.main(["--workdir", str(workdir), "--out_dir", str(tmp_path / "p")]) == 0
  assert sorted(os.listdir(tmp_path / "p")) == [
      "perplexity_by_position.png", "perplexity_vs_memory.png", "training_curves.png"]


def test_plot_script_help():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot.py"), "--help"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0 and "--sweep_dir" in proc.stdout


def test_plot_errors_are_clear(tmp_path):
  with pytest.raises(plots.PlotError, match="sweep.json"):
    plots.plot_sweep(str(tmp_path))
  with pytest.raises(plots.PlotError, match="nothing to plot"):
    plots.plot_workdir(str(tmp_path))
