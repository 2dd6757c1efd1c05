"""memorizing-sweep: grid parsing, a 2x2 sweep of tiny points that writes the table
and plots, a re-run that skips finished points, --print_commands, memorizing-plot."""
import csv
import json
import os
import subprocess
import sys

import pytest

from memorizing import cli
from memorizing.tools import plots, sweep

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
                       "  gin_file: [experiments/table4_paper150m/ctx512_xl.gin]\n")
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


def test_unparsable_grid_file_is_one_line_with_its_position(tmp_path, capsys):
  bad = tmp_path / "bad.yaml"
  bad.write_text("grid: [a\n  b: c")
  assert cli.sweep_main(["--grid_file", str(bad), "--sweep_dir", str(tmp_path / "s")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "is not valid YAML (line 2, column 4)" in err, err
  bad_json = tmp_path / "bad.json"
  bad_json.write_text("{")
  assert cli.sweep_main(["--grid_file", str(bad_json), "--sweep_dir", str(tmp_path / "s")]) == 1
  assert "is not valid JSON" in capsys.readouterr().err


# Slow (36 s): rows, evals, seeds, --only, the time guard and the JSON run in the default suite
# (test_rows_evals_only_deadline_and_one_json, tests/test_protocol.py).
@pytest.mark.slow
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

  # One finished point's directory also plots on its own (what memorizing-plot calls).
  workdir = sweep_dir / rows[0]["point"]
  assert plots.main(["--workdir", str(workdir), "--out_dir", str(tmp_path / "p")]) == 0
  assert sorted(os.listdir(tmp_path / "p")) == [
      "perplexity_by_position.png", "perplexity_vs_memory.png", "training_curves.png"]


def test_plot_script_help():
  proc = subprocess.run([sys.executable, "-m", "memorizing.cli", "plot", "--help"],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0 and "--sweep_dir" in proc.stdout


def test_plot_errors_are_clear(tmp_path):
  with pytest.raises(plots.PlotError, match="sweep.json"):
    plots.plot_sweep(str(tmp_path))
  with pytest.raises(plots.PlotError, match="nothing to plot"):
    plots.plot_workdir(str(tmp_path))


def test_plan_with_seeds_rows_and_evals(tmp_path):
  rows = {"ft": {"gin_file": [], "gin_param": ["TrainConfig.num_steps = 1"], "init_from": "a"}}
  evals = {"big": {"of": "a", "gin_param": ["ModelConfig.memory_size = 128"], "memory": "on"}}
  jobs = sweep.plan(str(tmp_path), ["base.gin"], [], {"gin_file": ["a.gin"]}, [0, 1], rows, evals)
  assert [(j.name, j.kind) for j in jobs] == [
      ("a_seed-0", "train"), ("a_seed-1", "train"), ("ft_seed-0", "train"),
      ("ft_seed-1", "train"), ("big_seed-0", "eval"), ("big_seed-1", "eval")]
  ft = jobs[3]
  assert ft.init_from == "a_seed-1" and "TrainConfig.seed = 1" in ft.params
  train, _ = ft.commands([], None)
  assert train[-2:] == ["--init_from", str(tmp_path / "a_seed-1")]
  _, ev = jobs[5].commands([], 2)
  assert ev == ["--workdir", str(tmp_path / "a_seed-1"), "--output",
                str(tmp_path / "a_seed-1" / "eval_big_seed-1.json"), "--gin_param",
                "ModelConfig.memory_size = 128", "--memory", "on", "--max_documents", "2"]
  with pytest.raises(sweep.SweepError, match="not a point or row"):
    sweep.plan(str(tmp_path), [], [], {"gin_file": ["b.gin"]}, [], rows, {})


def test_rows_evals_only_deadline_and_one_json(tmp_path, capsys):
  """A fine-tune from another run's checkpoint, an extra evaluation with a larger
  memory, --only, the time guard, and sweep_results.json plotted by plots.plot_results."""
  data_dir, sweep_dir = tmp_path / "data", tmp_path / "sweep"
  spec = tmp_path / "sweep.yaml"
  spec.write_text(
      "grid:\n  ModelConfig.memory_size: [64]\n"
      "rows:\n  ft:\n    init_from: memory_size-64\n"
      "    gin_param: ['TrainConfig.num_steps = 1']\n"
      "evals:\n  big:\n    of: memory_size-64\n"
      "    gin_param: ['ModelConfig.memory_size = 128']\n    memory: 'on'\n")
  flags = base_flags(sweep_dir, data_dir) + ["--grid_file", str(spec), "--no_plots"]
  assert cli.sweep_main(flags + ["--only", "memory_size-64,ft"]) == 0
  capsys.readouterr()
  with open(sweep_dir / "sweep_results.json") as f:
    jobs = json.load(f)["jobs"]
  assert jobs["memory_size-64"]["status"] == "done"
  assert jobs["memory_size-64"]["train_log"][-1]["step"] == 2
  curve = jobs["memory_size-64"]["train_log"][-1]["memory"]      # the memory signals' curve
  assert curve and all({"gate_mean", "mass_mean", "top1_mean"} <= set(v) for v in curve.values())
  assert set(jobs["memory_size-64"]["results"]) == {"with_memory", "memory_disabled"}
  assert jobs["ft"]["init_from"] == "memory_size-64" and jobs["ft"]["checkpoint_step"] == 1
  assert jobs["big"]["status"] == "not run" and "results" not in jobs["big"]

  assert cli.sweep_main(flags + ["--deadline_s", "0.001"]) == 0
  assert "skip big: time guard" in capsys.readouterr().out
  with open(sweep_dir / "sweep_results.json") as f:
    jobs = json.load(f)["jobs"]
  assert jobs["big"]["status"] == "skipped" and "time guard" in jobs["big"]["skipped"]
  assert jobs["ft"]["status"] == "done (skipped)"

  assert cli.sweep_main(flags) == 0
  with open(sweep_dir / "memory_size-64" / "eval_big.json") as f:
    big = json.load(f)["results"]
  assert list(big) == ["with_memory"] and big["with_memory"]["memory_size"] == 128
  written = plots.plot_results(str(sweep_dir / "sweep_results.json"), str(tmp_path / "p"), "x_")
  assert [os.path.basename(w) for w in written] == [
      "x_ppl_vs_memory.png", "x_ppl_by_position.png", "x_train_loss.png"]
