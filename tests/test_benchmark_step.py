"""scripts/benchmark_step.py's plan and report (no timing): --memory_signals times
each device memory run again with the trainer's memory signals on, and the report
gives the ratio of each such pair."""
import argparse

from memorizing.model.config import ModelConfig
from tests.test_gather_gradient import load_benchmark_step

CONFIG = ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                     mlp_dim=256, segment_length=64, memory_layers=(-1,), memory_size=2048)


def plan(**over):
  args = dict(attention="einsum", memory_sizes="1024,4096", backends="device,exact",
              device_options="", extra_device_options=[], extra_baselines="",
              memory_signals=False)
  args.update(over)
  return load_benchmark_step().plan_runs(argparse.Namespace(**args), CONFIG)


def test_memory_signals_adds_a_signals_run_after_each_device_run():
  names = lambda runs: [(r["name"], r["config"].memory_size if r["kind"] == "memory" else 0,
                         bool(r.get("signals"))) for r in runs]
  assert names(plan()) == [("baseline", 0, False), ("device", 1024, False),
                           ("device", 4096, False), ("exact", 1024, False),
                           ("exact", 4096, False)]
  assert names(plan(memory_signals=True)) == [
      ("baseline", 0, False), ("device", 1024, False), ("device+signals", 1024, True),
      ("device", 4096, False), ("device+signals", 4096, True), ("exact", 1024, False),
      ("exact", 4096, False)]


def test_signal_costs_pairs_each_signals_run_with_the_run_before_it():
  bench = load_benchmark_step()
  def res(size, step_s, signals, status="ok", opts=None):
    return dict(memory_size=size, knn_options=opts or {}, step_s=step_s,
                memory_signals=signals, status=status)
  results = [res(0, 0.010, False), res(4096, 0.020, False), res(4096, 0.021, True),
             res(1024, 0.015, False), res(1024, 0.0, True, status="failed"),
             res(8192, 0.03, False, opts={"num_buckets": 64}), res(8192, 0.03, True)]
  costs = bench.signal_costs(results)
  assert len(costs) == 1 and costs[0]["memory_size"] == 4096
  assert abs(costs[0]["ratio"] - 1.05) < 1e-9 and abs(costs[0]["on_ms"] - 21.0) < 1e-9
  assert "memory signals at 4K: 21.00 ms per step with them, 20.00 without (1.050x)" in \
      bench.table([dict(r, name="x", attention="einsum", dtype="float32",
                        tokens_per_s=1.0, flops={"total": 1.0}, main=r["memory_size"] == 0,
                        kind="baseline" if r["memory_size"] == 0 else "memory")
                   for r in results[:3]])


def test_memory_signals_without_a_device_memory_run_is_one_clear_error(capsys):
  import pytest
  bench = load_benchmark_step()
  for argv in (["--backends", "exact", "--memory_signals"],
               ["--memory_sizes", "", "--memory_signals"]):
    with pytest.raises(SystemExit) as e:
      bench.main(argv)
    assert e.value.code == 2
    assert "--memory_signals times the device backend's memory runs" in capsys.readouterr().err
