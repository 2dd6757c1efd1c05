"""Training output when stderr is not a terminal (a log file, a cluster job)."""
from memorizing.training import metrics


def test_progress_prints_a_line_per_log_step_when_not_on_a_terminal(capsys, monkeypatch):
  monkeypatch.delenv("MEMORIZING_FORCE_BAR", raising=False)
  bar = metrics.progress(0, 100, enabled=True)      # pytest captures: not a terminal
  bar.update(10, {"loss": 1.5, "perplexity": 4.48, "tokens_per_second": 1234.0})
  bar.close()
  assert "step 10: loss 1.5000 ppl 4.48 tok/s 1234" in capsys.readouterr().out
