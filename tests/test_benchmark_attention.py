"""scripts/benchmark_attention.py runs every variant and writes its table as JSON."""
import importlib.util
import json
import os


def load_script():
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts",
                      "benchmark_attention.py")
  spec = importlib.util.spec_from_file_location("benchmark_attention", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_attention_times_four_variants_and_writes_json(tmp_path):
  out = tmp_path / "attention.json"
  rows = load_script().main(["--batch", "1", "--length", "16", "--heads", "2", "--head_dim", "8",
                             "--calls", "1", "--layers", "3", "--json", str(out)])
  assert [r["variant"] for r in rows] == ["bias + dbias (the model)", "bias, no dbias",
                                          "no bias, no mask", "no bias, causal (top-left)"]
  assert all("error" not in r and r["fwd_bwd_ms"] > 0 for r in rows)
  assert all(abs(r["layers_ms"] - 3 * r["fwd_bwd_ms"]) < 1e-9 for r in rows)
  assert json.loads(out.read_text())["rows"] == rows
