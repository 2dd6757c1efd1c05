"""Training output when stderr is not a terminal (a log file, a cluster job)."""
from memorizing.training import metrics


def test_progress_prints_a_line_per_log_step_when_not_on_a_terminal(capsys, monkeypatch):
  monkeypatch.delenv("MEMORIZING_FORCE_BAR", raising=False)
  bar = metrics.progress(0, 100, enabled=True)      # pytest captures: not a terminal
  bar.update(10, {"loss": 1.5, "perplexity": 4.48, "tokens_per_second": 1234.0})
  bar.close()
  assert "step 10: loss 1.5000 ppl 4.48 tok/s 1234" in capsys.readouterr().out


def test_eval_table_shows_perplexity_by_position(capsys):
  from memorizing.model.config import ModelConfig
  r = {"perplexity": 3.0, "bits_per_byte": 1.5, "tokens": 700, "documents": 1,
       "perplexity_0-512": 4.0, "tokens_0-512": 512, "perplexity_512-2048": 2.0,
       "tokens_512-2048": 188, "perplexity_2048-8192": float("nan"), "tokens_2048-8192": 0}
  metrics.print_eval_table({"with_memory": r}, ModelConfig())
  out = capsys.readouterr().out
  assert "perplexity by position in the document" in out
  row = [l for l in out.splitlines() if l.startswith("with_memory")][-1]
  assert row.split()[1:] == ["4.000", "2.000"]          # empty buckets are left out
  assert "2048-8192" not in out


def test_training_curve_of_a_single_log_point_is_drawn(tmp_path, monkeypatch):
  import json
  pytest = __import__("pytest")
  pytest.importorskip("matplotlib")
  from memorizing.tools import plots
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "kind": "train", "loss": 2.0}) + "\n")
  drawn = {}
  real_save = plots._save

  def capture(plt, fig, ax, path):
    drawn["markers"] = [line.get_marker() for line in ax.get_lines()]
    return real_save(plt, fig, ax, path)

  monkeypatch.setattr(plots, "_save", capture)
  plots.plot_training_curves({"run": str(tmp_path)}, str(tmp_path / "curves.png"))
  assert drawn["markers"] == ["o"]
