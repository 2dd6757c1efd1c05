"""The Table-4 protocol (configs/experiments/table4_protocol.{gin,yaml}) through
memorizing-sweep: its rows and evaluations, --parallel with dependencies and the
time guard, the summary JSON that accumulates, and the 'spm:N' tokenizer step.

The runs here are fake (memorizing-train/-eval replaced by a function that writes
an evaluation JSON), so the tests take seconds; tests/test_sweep.py runs real ones.
"""
import json
import signal
import sys
import os
import threading
import time

import jax
import pytest

from memorizing.data import registry
from memorizing.errors import ConfigError, DatasetError, SweepError, UsageError
from memorizing.data.tokenizer_training import spm_vocab_size
from memorizing.data.tokenizers import get_tokenizer
from memorizing.tools import protocol, sweep, table4, table4_report
from memorizing.tools.gin_config import parse_gin
from memorizing.model.decoder import init_params
from memorizing.training.step import learning_rate_multipliers, param_path

ROWS = ["xl", "no_xl", "mem1536", "mem8192", "mem8192_empty", "mem65536", "finetune_mem8192",
        "finetune_control"]
NO_MEMORY_LAYERS = {"xl", "no_xl", "finetune_control"}
KEYS = {"dataset", "tokenizer", "seed", "steps", "row", "eval", "perplexity", "bits_per_byte",
        "commit", "recipe"}


def protocol_jobs(tmp_path, seeds=(0,)):
  spec = sweep.load_grid_file(table4.PROTOCOL)
  return sweep.plan(str(tmp_path), spec["gin_file"], spec["gin_param"], spec["grid"],
                    list(seeds), spec["rows"], spec["evals"])


def test_protocol_expands_to_the_rows_and_evaluations(tmp_path):
  jobs = protocol_jobs(tmp_path)
  assert [j.name for j in jobs] == [f"{r}_seed-0" for r in ROWS] + ["memory65536_seed-0"]
  configs = {j.row: parse_gin(j.files, j.params) for j in jobs if j.kind == "train"}
  for row, (model, train) in configs.items():
    assert train.eval_max_document_tokens == 262144 and train.eval_max_documents == 6
    assert train.tokenizer == "bytes" and train.seed == 0 and train.optimizer == "adamw"
    assert bool(model.memory_layers) == (row not in NO_MEMORY_LAYERS), row
    assert model.use_xl_cache == (row != "no_xl"), row
    assert model.memory_enabled == (row != "mem8192_empty"), row
    # Memory layers match content only, but a fine-tuned one keeps the XL layer's bias.
    assert model.memory_layer_position_bias == (row == "finetune_mem8192"), row
    steps = 2500 if not row.startswith("finetune") else train.num_steps
    assert train.num_steps == steps and steps <= 2500
  assert {r: configs[r][0].memory_size for r in ("mem1536", "mem8192", "mem65536",
                                                 "finetune_mem8192")} == {
      "mem1536": 1536, "mem8192": 8192, "mem65536": 65536, "finetune_mem8192": 8192}
  by_name = {j.row: j for j in jobs}
  for ft in ("finetune_mem8192", "finetune_control"):
    assert by_name[ft].init_from == "xl_seed-0" and configs[ft][1].num_steps <= 1000
  assert by_name["mem8192_empty"].memory == "on"
  ev = by_name["memory65536"]
  assert ev.kind == "eval" and ev.of == "mem8192_seed-0" and ev.memory == "on"
  assert ev.params == ["ModelConfig.memory_size = 65536"]
  # The recipe's hash ignores the data set and the seed, and sees the fine-tunes' macros.
  spec = sweep.load_grid_file(table4.PROTOCOL)
  other = sweep.plan(str(tmp_path), spec["gin_file"], ["TrainConfig.dataset = 'linux_c'"], {},
                     [1], spec["rows"], spec["evals"])
  longer = sweep.plan(str(tmp_path), spec["gin_file"], ["FINETUNE_STEPS = 900"], {},
                      [0], spec["rows"], spec["evals"])
  recipe = protocol.recipe_id(spec["gin_file"], jobs, 2500)
  assert recipe.startswith("table4_protocol.gin@")
  assert protocol.recipe_id(spec["gin_file"], other, 2500) == recipe
  assert protocol.recipe_id(spec["gin_file"], longer, 2500) != recipe


def test_finetune_variants_share_the_protocols_rows_and_name_real_parameters(tmp_path):
  # The variants file's xl and fine-tune rows are the protocol's (equal hashes, so
  # the report counts them for the protocol's recipe); every variant differs from
  # finetune_mem8192, and its learning-rate table names parameters that exist.
  spec = sweep.load_grid_file(table4.PROTOCOL)
  base = protocol_jobs(tmp_path)
  _, rows = protocol.recipe_and_rows(spec["gin_file"], base, 2500)
  variants = sweep.load_grid_file("experiments/table4_finetune_variants.yaml")
  jobs = sweep.plan(str(tmp_path), variants["gin_file"], variants["gin_param"], variants["grid"],
                    [0], variants["rows"], variants["evals"])
  _, var_rows = protocol.recipe_and_rows(variants["gin_file"], jobs, 2500)
  for row in ("xl", "finetune_mem8192", "finetune_control"):
    assert var_rows[row] == rows[row], row
  others = [r for r in var_rows if r.startswith("ft_")]
  assert len(others) == 5 and all(var_rows[r] != rows["finetune_mem8192"] for r in others)
  qk = next(j for j in jobs if j.row == "ft_qk10")
  model, train = parse_gin(qk.files, qk.params)
  params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  mults = learning_rate_multipliers(params, train.learning_rate_multipliers)
  flat = {param_path(path): m for path, m in jax.tree_util.tree_flatten_with_path(mults)[0]}
  layer = f"block_{model.num_layers + model.memory_layers[0]}"
  assert {n for n, m in flat.items() if m == 10.0} == {
      f"{layer}/attention/query/kernel", f"{layer}/attention/key/kernel"}


def test_memory_layer_variant_keeps_the_xl_rows_run(tmp_path, capsys):
  # MEMORY_LAYERS changes the memory rows (and the recipe) but not the XL row,
  # so a variant's XL + 8K can be compared with the XL trained for the recipe.
  spec = sweep.load_grid_file(table4.PROTOCOL)
  def rows(*params):
    jobs = sweep.plan(str(tmp_path), spec["gin_file"], list(params), {}, [0], spec["rows"],
                      spec["evals"])
    return protocol.recipe_and_rows(spec["gin_file"], jobs, 2500)
  recipe, base = rows()
  variant_recipe, variant = rows("MEMORY_LAYERS = (-2,)")
  assert variant_recipe != recipe
  assert variant["xl"] == base["xl"] and variant["no_xl"] == base["no_xl"]
  assert variant["mem8192"] != base["mem8192"] and variant["mem8192"] != variant["xl"]
  _, broken = rows("ModelConfig.memory_layers = (-3,)")    # overrides memory/xl.gin too
  assert broken["xl"] == broken["mem8192"] != base["xl"]


def test_only_takes_a_row_name_for_every_seed_or_one_seeded_job(tmp_path):
  jobs = protocol_jobs(tmp_path, seeds=(0, 1))
  assert sweep.select_only(jobs, ["xl,mem8192"]) == {
      "xl_seed-0", "xl_seed-1", "mem8192_seed-0", "mem8192_seed-1"}
  assert sweep.select_only(jobs, ["xl_seed-1", "memory65536"]) == {
      "xl_seed-1", "memory65536_seed-0", "memory65536_seed-1"}
  assert sweep.select_only(jobs, []) == set()
  with pytest.raises(sweep.SweepError, match=r"--only xll: no such job.*at every seed: .*xl"):
    sweep.select_only(jobs, ["xll"])


def test_only_says_which_evaluations_of_the_selected_runs_it_leaves_out(
    tmp_path, monkeypatch, capsys):
  jobs = protocol_jobs(tmp_path, seeds=(0, 1))
  only = sweep.select_only(jobs, ["mem8192_seed-1,xl"])
  assert sweep.evaluations_left_out(jobs, only) == ["memory65536_seed-1 (of mem8192_seed-1)"]
  assert sweep.evaluations_left_out(jobs, sweep.select_only(jobs, ["mem8192,memory65536"])) == []
  assert sweep.evaluations_left_out(jobs, set()) == []          # no --only: everything runs
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch, "--only", "mem8192") == 0
  assert ("note: --only selects runs whose evaluations it leaves out: memory65536_seed-0 "
          "(of mem8192_seed-0)") in capsys.readouterr().out


def test_table4_wrapper_builds_the_sweep(tmp_path):
  args, rest = table4.build_parser().parse_known_args(
      ["--dataset", "perl_doc", "--data_dir", "/d", "--seeds", "0,1", "--tokenizer", "spm:8192",
       "--only", "xl_seed-0", "--sweep_dir", str(tmp_path)])
  argv = table4.sweep_argv(args, rest)
  assert argv[:4] == ["--grid_file", "experiments/table4_protocol.yaml", "--sweep_dir",
                      str(tmp_path)]
  for flag in ["TrainConfig.dataset = 'perl_doc'", "TrainConfig.data_dir = '/d'",
               "TrainConfig.tokenizer = 'spm:8192'"]:
    assert flag in argv
  assert argv[argv.index("--parallel") + 1] == "6" and argv[argv.index("--seeds") + 1] == "0,1"
  assert argv[argv.index("--summary") + 1] == table4.SUMMARY and argv[-2:] == ["--only",
                                                                              "xl_seed-0"]


class FakeRuns:
  """memorizing-train/-eval stand-ins: record (name, which, start, end, env) and write
  an evaluation JSON shaped like memorizing-eval's."""

  def __init__(self, sleep=0.15, perplexity=2.0):
    self.sleep, self.perplexity = sleep, perplexity
    self.calls, self.lock, self.argvs = [], threading.Lock(), []

  def __call__(self, which, argv, launcher, env=None, log=None):
    assert launcher == "subprocess"
    workdir = os.path.basename(argv[argv.index("--workdir") + 1])
    start = time.time()
    time.sleep(self.sleep)
    with self.lock:
      self.argvs.append((which, list(argv)))
    if which == "eval":
      output = argv[argv.index("--output") + 1]
      name = os.path.basename(output)[:-5].replace("eval_", "") if "eval_" in output else workdir
      row = workdir.split("_seed-")[0]
      result = {"perplexity": self.perplexity, "bits_per_byte": 1.0, "tokens": 100,
                "documents": 6,
                "memory": {"layer_4": {"gate_mean": 0.1, "mass_mean": 0.05, "top1_mean": 0.4,
                                       "topk_mean": 0.3, "recall": 0.9, "gate": [0.1, 0.1],
                                       "distance": {"xl": 0.1, "to2k": 0.9}}}}
      if "--memory" in argv and argv[argv.index("--memory") + 1] == "on":
        results = {"with_memory": result}
      elif row in NO_MEMORY_LAYERS:
        results = {"memory_disabled": dict(result, memory=None)}
      else:
        results = {"with_memory": result, "memory_disabled": dict(result, perplexity=2.1)}
      with open(output, "w") as f:
        json.dump({"checkpoint_step": 3, "results": results}, f)
      workdir = name
    with self.lock:
      self.calls.append((workdir, which, start, time.time(), dict(env or {})))
    return 0


def no_backend_here():
  raise AssertionError("the sweep's own process must not start a jax backend (on a GPU it "
                       "would take the memory its parallel jobs share)")


def run_protocol(tmp_path, fake, monkeypatch, *flags):
  monkeypatch.setattr(sweep, "_call", fake)
  monkeypatch.setattr(sweep.jax, "devices", no_backend_here)
  argv = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--sweep_dir", str(tmp_path / "sweep"), "--summary",
          str(tmp_path / "summary.json"), "--parallel", "2", "--no_plots"] + list(flags)
  return table4.main(argv)


def test_parallel_dependencies_summary_and_time_guard(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MEMORIZING_COMMIT", "abc123")
  fake = FakeRuns()
  assert run_protocol(tmp_path, fake, monkeypatch) == 0
  ends = {(w, k): e for w, k, _, e, _ in fake.calls}
  starts = {(w, k): s for w, k, s, _, _ in fake.calls}
  # At most two at once, and two at once at some point.
  events = sorted([(s, 1) for s in starts.values()] + [(e, -1) for e in ends.values()])
  running, peak = 0, 0
  for _, d in events:
    running += d
    peak = max(peak, running)
  assert peak == 2
  # Fine-tunes start after xl is evaluated, the 65K evaluation after mem8192.
  for ft in ("finetune_mem8192_seed-0", "finetune_control_seed-0"):
    assert starts[(ft, "train")] >= ends[("xl_seed-0", "eval")]
  assert starts[("memory65536_seed-0", "eval")] >= ends[("mem8192_seed-0", "eval")]
  assert {c[4].get("XLA_PYTHON_CLIENT_MEM_FRACTION") for c in fake.calls} == {"0.45"}
  # The protocol's evaluation documents reach every memorizing-eval.
  assert all(a[a.index("--max_documents") + 1] == "6" for w, a in fake.argvs if w == "eval")

  with open(tmp_path / "summary.json") as f:
    records = json.load(f)
  assert all(KEYS <= set(r) for r in records)
  got = {(r["row"], r["eval"]) for r in records}
  want = {(r, "memory") for r in ROWS} | {(r, "disabled") for r in ROWS
                                          if r not in NO_MEMORY_LAYERS | {"mem8192_empty"}}
  assert got == want | {("mem8192", "memory65536")}
  r = next(r for r in records if (r["row"], r["eval"]) == ("mem8192", "memory"))
  assert r["dataset"] == "synthetic" and r["tokenizer"] == "bytes" and r["seed"] == 0
  assert r["steps"] == 2500 and r["commit"] == "abc123"
  assert r["recipe"].startswith("table4_protocol.gin@")
  assert r["memory"]["layer_4"] == {"gate_mean": 0.1, "mass_mean": 0.05, "top1_mean": 0.4,
                                    "topk_mean": 0.3, "recall": 0.9,
                                    "distance": {"xl": 0.1, "to2k": 0.9}}
  assert "memory" not in next(r for r in records if r["row"] == "xl")

  # A second seed accumulates; the first seed again replaces its records.
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch, "--seeds", "1") == 0
  with open(tmp_path / "summary.json") as f:
    both = json.load(f)
  assert len(both) == 2 * len(records) and {r["seed"] for r in both} == {0, 1}
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch, "--seeds", "0") == 0
  with open(tmp_path / "summary.json") as f:
    assert len(json.load(f)) == len(both)
  protocol.merge_summary(str(tmp_path / "summary.json"),
                         [dict(records[0], perplexity=9.0), dict(records[0], commit="other")])
  with open(tmp_path / "summary.json") as f:
    merged = json.load(f)
  assert len(merged) == len(both) + 1 and merged[0]["perplexity"] == 9.0
  protocol.merge_summary(str(tmp_path / "summary.json"), [dict(records[0], recipe="variant")])
  with open(tmp_path / "summary.json") as f:                    # a variant of the recipe adds
    merged = json.load(f)
  assert len(merged) == len(both) + 2 and merged[0]["perplexity"] == 9.0
  (tmp_path / "gpu.json").write_text(json.dumps([dict(records[0], commit="gpu")]))
  assert table4.main(["--merge", str(tmp_path / "gpu.json"), "--summary",
                      str(tmp_path / "summary.json")]) == 0
  with open(tmp_path / "summary.json") as f:
    assert len(json.load(f)) == len(both) + 3

  # The time guard holds under --parallel: past the deadline nothing starts.
  capsys.readouterr()
  fake = FakeRuns(sleep=0)
  assert run_protocol(tmp_path, fake, monkeypatch, "--seeds", "2", "--deadline_s", "0.001") == 0
  out = capsys.readouterr().out
  assert not fake.calls and out.count("time guard") == 6      # the six main rows
  with open(tmp_path / "sweep" / "sweep_results.json") as f:
    jobs = json.load(f)["jobs"]
  assert {jobs[f"{r}_seed-2"]["status"] for r in ROWS} == {"skipped"}
  assert "needs xl_seed-2" in jobs["finetune_control_seed-2"]["skipped"]
  with open(tmp_path / "summary.json") as f:
    assert {r["seed"] for r in json.load(f)} == {0, 1}


def test_records_rebuilt_from_sweep_results_equal_the_summary(tmp_path, monkeypatch):
  # A GPU call whose summary did not come back: its sweep_results.json holds the
  # same records (with and without the facts kept in the sweep spec).
  monkeypatch.setenv("MEMORIZING_COMMIT", "abc123")
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch) == 0
  with open(tmp_path / "summary.json") as f:
    written = json.load(f)
  # The summary holds records in the order the jobs finished; the rebuilt ones
  # come in the sweep's order: compare them as sets of records.
  in_order = lambda records: sorted(records, key=lambda r: json.dumps(r, sort_keys=True))
  results = tmp_path / "sweep" / "sweep_results.json"
  assert table4.main(["--merge", str(results), "--summary", str(tmp_path / "rebuilt.json")]) == 0
  with open(tmp_path / "rebuilt.json") as f:
    assert in_order(json.load(f)) == in_order(written)
  assert all(r["xl_config"] and r["row_config"] for r in written)
  data = json.loads(results.read_text())
  del data["sweep"]["summary_facts"], data["sweep"]["row_configs"]   # files of older sweeps
  assert in_order(sweep.summary_from_results(data)) == in_order(written)
  data["sweep"]["recipe"] = "table4_protocol.gin@0000000000"        # a recipe not at hand
  assert all("row_config" not in r for r in sweep.summary_from_results(data))
  with pytest.raises(SweepError, match="not a sweep_results.json"):
    sweep.summary_from_results({"jobs": {}})


def test_spm_tokenizer_is_trained_once_and_bound(tmp_path, monkeypatch, capsys):
  with pytest.raises(ConfigError, match="spm:N"):
    spm_vocab_size("spm:12")
  assert spm_vocab_size("spm:8192") == 8192 and spm_vocab_size("bytes") is None
  with pytest.raises(DatasetError, match="recipe"):
    get_tokenizer("spm:8192")
  data_dir = str(tmp_path / "data")
  registry.load_documents("synthetic", "train", data_dir)      # embedded: built offline
  fake = FakeRuns(sleep=0)
  monkeypatch.setattr(sweep, "_call", fake)
  flags = ["--dataset", "synthetic", "--data_dir", data_dir, "--tokenizer", "spm:280",
           "--sweep_dir", str(tmp_path / "sweep"), "--summary", str(tmp_path / "s.json"),
           "--parallel", "2", "--no_plots", "--only", "xl_seed-0"]
  assert table4.main(flags) == 0
  model = tmp_path / "sweep" / "tokenizer" / "synthetic_spm280.model"
  assert model.exists() and "training 280 pieces" in capsys.readouterr().out
  train = [a for w, a in fake.argvs if w == "train"][0]
  assert f"TrainConfig.tokenizer = '{model}'" in train and "ModelConfig.vocab_size = 280" in train
  assert get_tokenizer(str(model)).vocab_size == 280
  stamp = os.path.getmtime(model)
  assert table4.main(flags[:-1] + ["xl_seed-0,no_xl_seed-0"]) == 0
  assert os.path.getmtime(model) == stamp and "trained before" in capsys.readouterr().out
  with open(tmp_path / "s.json") as f:
    assert {(r["tokenizer"], r["row"]) for r in json.load(f)} == {("spm:280", "xl"),
                                                                  ("spm:280", "no_xl")}


def test_source_is_prepared_once_and_names_the_dataset(tmp_path, monkeypatch, capsys):
  corpus = tmp_path / "my_corpus"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"f{i}.txt").write_text(f"document {i}\n" * (50 + i))
  fake = FakeRuns(sleep=0)
  monkeypatch.setattr(sweep, "_call", fake)
  flags = ["--dataset", "text_files", "--source", str(corpus), "--sweep_dir",
           str(tmp_path / "sweep"), "--summary", str(tmp_path / "s.json"), "--parallel", "2",
           "--no_plots", "--only", "xl_seed-0"]
  assert table4.main(flags) == 0
  data_dir = tmp_path / "sweep" / "data"
  assert "preparing text_files from" in capsys.readouterr().out
  assert len(registry.load_documents("text_files", "train", str(data_dir))) >= 1
  train = [a for w, a in fake.argvs if w == "train"][0]
  assert f"TrainConfig.data_dir = '{data_dir}'" in train
  assert table4.main(flags) == 0 and "already prepared" in capsys.readouterr().out
  with open(tmp_path / "s.json") as f:
    assert {r["dataset"] for r in json.load(f)} == {"text_files/my_corpus"}
  with pytest.raises(UsageError, match="--source"):
    table4.main(["--dataset", "synthetic", "--source", str(corpus), "--sweep_dir",
                 str(tmp_path / "other")])


TINY_PROTOCOL = [
    "ModelConfig.num_layers = 2", "MEMORY_LAYERS = (-1,)", "ModelConfig.d_model = 32",
    "ModelConfig.num_heads = 2", "ModelConfig.head_dim = 16", "ModelConfig.mlp_dim = 64", "ModelConfig.segment_length = 32",
    "ModelConfig.num_neighbors = 8", "ModelConfig.knn_backend = 'exact'",
    "ModelConfig.knn_options = ()", "TrainConfig.batch_size = 2", "TrainConfig.eval_batch_size = 2",
    "TrainConfig.num_steps = 3", "TrainConfig.log_every = 1", "TrainConfig.prefetch = 0",
    "TrainConfig.eval_max_document_tokens = 300", "FINETUNE_STEPS = 2",
]


@pytest.mark.slow
def test_real_protocol_in_parallel(tmp_path):
  """The protocol's recipe with a tiny model, real subprocesses two at a time: the xl
  run, its fine-tune with an added memory (the gin macros reach the operative config
  that memorizing-eval reads back), the 8K run and its 65K evaluation (about 3 minutes
  on 2 cores)."""
  flags = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--sweep_dir",
           str(tmp_path / "sweep"), "--summary", str(tmp_path / "s.json"), "--parallel", "2",
           "--no_plots", "--only",
           "xl_seed-0,finetune_mem8192_seed-0,mem8192_seed-0,memory65536_seed-0"]
  for p in TINY_PROTOCOL:
    flags += ["--gin_param", p]
  assert table4.main(flags) == 0
  with open(tmp_path / "s.json") as f:
    records = json.load(f)
  assert {(r["row"], r["eval"]) for r in records} == {
      ("xl", "memory"), ("mem8192", "memory"), ("mem8192", "disabled"),
      ("mem8192", "memory65536"), ("finetune_mem8192", "memory"),
      ("finetune_mem8192", "disabled")}
  assert all(r["perplexity"] > 1 and r["steps"] == 3 for r in records)
  ft = next(r for r in records if (r["row"], r["eval"]) == ("finetune_mem8192", "memory"))
  assert ft["checkpoint_step"] == 2 and "memory" in ft
  assert os.path.getsize(tmp_path / "sweep" / "finetune_mem8192_seed-0" / "train.log") > 0


def test_parallel_scheduler_never_waits_on_a_cycle(tmp_path, monkeypatch):
  mk = lambda name, ref=None: sweep.Job(name, "train", [], [], {}, str(tmp_path / name),
                                        str(tmp_path / name / "results.json"), init_from=ref)
  jobs = [mk("a", "b"), mk("b", "a"), mk("c"), mk("d", "c")]
  order = []
  monkeypatch.setattr(sweep, "run_job", lambda job, *a: order.append(job.name) or (
      "done" if not job.init_from else "skipped"))
  args = type("Args", (), {"parallel": 2})()
  status, extra = {}, {j.name: {} for j in jobs}
  worker = threading.Thread(target=sweep.run_parallel,
                            args=(jobs, args, None, status, extra, set(), lambda: None))
  worker.start()
  worker.join(timeout=20)
  assert not worker.is_alive() and set(status) == {"a", "b", "c", "d"}
  assert order.index("d") > order.index("c")


FAKE_JOB = r'''
import json, os, signal, sys, time
which, args = sys.argv[1], sys.argv[2:]
workdir = args[args.index("--workdir") + 1]
if which == "eval":
  with open(args[args.index("--output") + 1], "w") as f:
    json.dump({"checkpoint_step": 3, "results": {"with_memory": {"perplexity": 2.0, "bits_per_byte": 1.0, "tokens": 100, "documents": 6}}}, f)
  sys.exit(0)
if os.environ.get("FAKE_JOB") == "finish":
  sys.exit(0)                                   # the rerun: resumed and finished
def stop(signum, frame):
  open(os.path.join(workdir, "saved"), "w").close()   # as memorizing-train: checkpoint, 143
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(workdir, "started"), "w").close()
time.sleep(60)
sys.exit(1)
'''


def test_sigterm_stops_the_sweep_lets_running_jobs_save_and_the_rerun_resumes(
    tmp_path, monkeypatch, capsys):
  """SIGTERM to the sweep reaches its running subprocess jobs (they save and exit 143),
  starts no queued job, exits 143 naming the interrupted jobs; the same command
  then finishes them (the real trainings' resume is tests/test_resume.py's)."""
  script = tmp_path / "fake_job.py"
  script.write_text(FAKE_JOB)
  monkeypatch.setattr(sweep, "job_argv", lambda which, args: [sys.executable, str(script), which]
                      + list(args))
  sweep_dir = tmp_path / "sweep"
  flags = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--sweep_dir",
           str(sweep_dir), "--summary", str(tmp_path / "s.json"), "--parallel", "2",
           "--no_plots", "--only", "xl_seed-0,no_xl_seed-0,mem1536_seed-0"]
  started = [sweep_dir / f"{r}_seed-0" / "started" for r in ("xl", "no_xl")]
  got_sigterm = []
  previous = signal.signal(signal.SIGTERM, lambda *a: got_sigterm.append(1))  # if none catches it

  def send_when_both_run():
    deadline = time.time() + 60
    while not all(p.exists() for p in started) and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  killer = threading.Thread(target=send_when_both_run, daemon=True)
  killer.start()
  try:
    rc = table4.main(flags)
  finally:
    killer.join()
    signal.signal(signal.SIGTERM, previous)
  assert not got_sigterm, "the sweep did not handle SIGTERM"
  assert rc == sweep.PREEMPTED
  out = capsys.readouterr().out
  assert "stopped by SIGTERM; interrupted: xl_seed-0, no_xl_seed-0" in out
  assert all((p.parent / "saved").exists() for p in started)       # passed on to the jobs
  assert not (sweep_dir / "mem1536_seed-0").exists()               # queued: never started
  with open(sweep_dir / "sweep_results.json") as f:
    jobs = json.load(f)["jobs"]
  assert [jobs[f"{r}_seed-0"]["status"] for r in ("xl", "no_xl", "mem1536")] == [
      "interrupted", "interrupted", "not run"]

  monkeypatch.setenv("FAKE_JOB", "finish")
  assert table4.main(flags) == 0                                   # the same command again
  with open(tmp_path / "s.json") as f:
    assert {r["row"] for r in json.load(f)} == {"xl", "no_xl", "mem1536"}


def test_mem_fraction_reaches_jobs_without_parallel(tmp_path, monkeypatch):
  fake = FakeRuns(sleep=0)
  monkeypatch.setattr(sweep, "_call", fake)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  flags = ["--dataset", "synthetic", "--data_dir", str(tmp_path / "data"), "--sweep_dir",
           str(tmp_path / "sweep"), "--summary", "", "--no_plots", "--only", "xl_seed-0",
           "--parallel", "1", "--mem_fraction", "0.2"]
  assert table4.main(flags + ["--launcher", "subprocess"]) == 0
  assert {c[4].get("XLA_PYTHON_CLIENT_MEM_FRACTION") for c in fake.calls} == {"0.2"}
  seen = []
  monkeypatch.setattr(sweep, "_call", lambda which, argv, launcher, env=None, log=None: seen.append(
      (launcher, os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))) or 1)
  table4.main(flags + ["--launcher", "inprocess", "--sweep_dir", str(tmp_path / "s2")])
  assert seen == [("inprocess", "0.2")]      # set in this process before its jax backend starts


def test_parse_gin_beside_directories_named_like_the_config_folders(tmp_path, monkeypatch):
  """A 'data/' or 'models/' directory on sys.path (beside the script, or the working
  directory under `python -m`) made gin look the includes up as packages and fail."""
  for name in ("data", "models", "memory", "experiments"):
    (tmp_path / name).mkdir()
  monkeypatch.syspath_prepend(str(tmp_path))
  model, train = parse_gin(["experiments/table4_protocol.gin", "memory/mem8192.gin"], [])
  assert model.memory_layers == (-3,) and train.num_steps == 2500


def test_parse_gin_from_many_threads_gives_each_its_own_config(caplog):
  """The sweep's job threads parse their configs at once: each must get its own
  bindings, and gin's search-path misses must not reach the log."""
  results, errors = {}, []

  def parse(i):
    try:
      for _ in range(15):
        _, cfg = parse_gin(["experiments/table4_protocol.gin", "memory/mem8192.gin"],
                           [f"TrainConfig.num_steps = {100 + i}"])
        if cfg.num_steps != 100 + i:
          results[i] = cfg.num_steps
    except Exception as e:  # noqa: BLE001
      errors.append(repr(e))

  threads = [threading.Thread(target=parse, args=(i,)) for i in range(4)]
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)            # switch threads often, as a busy machine would
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)
  assert not errors and not results
  assert "Path not found" not in caplog.text


def test_report_tables_the_summary_and_checks_the_target(tmp_path, capsys):
  def rec(ds, seed, row, ppl, ev="memory", commit="c1", recipe="r@1"):
    return {"dataset": ds, "tokenizer": "bytes", "seed": seed, "steps": 2500, "row": row,
            "eval": ev, "perplexity": ppl, "bits_per_byte": 1.0, "commit": commit,
            "recipe": recipe, "memory": {"layer_4": {"gate_mean": 0.25, "top1_mean": 0.7,
                                                     "recall": 0.95}} if row != "xl" else None}
  records = [rec("a", 0, "xl", 2.0), rec("a", 0, "mem8192", 1.9), rec("a", 0, "mem8192", 2.0,
                                                                        "disabled"),
             rec("a", 1, "xl", 2.0), rec("a", 1, "mem8192", 1.99),
             rec("b", 0, "xl", 3.0, commit="old"), rec("b", 0, "xl", 3.0),
             rec("b", 0, "mem8192", 2.7), rec("b", 0, "mem8192", 1.0, recipe="other@2")]
  path = tmp_path / "s.json"
  path.write_text(json.dumps(records))
  assert table4.main(["--report", "--summary", str(path), "--recipe", "r@1"]) == 0
  out = capsys.readouterr().out
  assert "| 0 | mem8192 | 1.9000 | 2.0000 |  | -5.0% | 0.25 | 0.70 | 0.95 | c1 |" in out
  assert "**does not hold** (3 pairs, mean gain 5.2%; below 2%: a seed 1 (+0.5%))" in out
  assert "other@2" not in out                         # another recipe's records are left out
  holds = table4_report.target(table4_report.gains([r for r in records if r["seed"] == 0],
                                                   "r@1"))
  assert holds["holds"] and abs(holds["mean_gain"] - 0.075) < 1e-9
  assert not table4_report.target([])["holds"]


def test_report_takes_xl_from_another_recipe_only_when_it_is_the_same_run(tmp_path, capsys):
  def rec(recipe, row, ppl, row_config, xl_config, seed=0):
    return {"dataset": "a", "tokenizer": "bytes", "seed": seed, "steps": 2500, "row": row,
            "eval": "memory", "perplexity": ppl, "bits_per_byte": 1.0, "commit": "c",
            "recipe": recipe, "row_config": row_config, "xl_config": xl_config}
  records = [dict(rec("base@1", "xl", 2.0, "X", "X"), train_loss_tail=0.75),
             dict(rec("base@1", "mem8192", 1.9, "M", "X"), train_loss_tail=0.70),
             rec("base@1", "xl", 2.0, "X", "X", seed=1),
             rec("variant@2", "mem8192", 1.8, "M3", "X"),        # same XL run: compared
             rec("variant@2", "mem8192", 1.5, "M3", "Y", seed=1)]  # another XL: not compared
  got = {(g["recipe"], g["seed"]): g for g in table4_report.gains(records)}
  assert set(got) == {("base@1", 0), ("variant@2", 0)}
  assert abs(got[("variant@2", 0)]["gain"] - 0.1) < 1e-9
  assert got[("variant@2", 0)]["xl_recipe"] == "base@1" and "xl_recipe" not in got[("base@1", 0)]
  assert abs(got[("base@1", 0)]["train_gap"] + 0.05) < 1e-9 and "train_gap" not in got[
      ("variant@2", 0)]
  assert "| +5.0% | -0.050 |" in table4_report.render(records, "base@1")
  text = table4_report.render(records, "variant@2")
  assert "| 0 | xl (the same run: base@1) | 2.0000 |" in text
  assert "| 0 | mem8192 | 1.8000 |  |  | -10.0% |" in text


def test_report_takes_any_row_from_another_recipe_where_it_is_the_same_run():
  # Recipe new@2 changed only its fine-tune: its table (recipe_rows) gives every
  # other row old@1's hash, so old@1's runs of those rows stand in; the fine-tune
  # (another hash) and an extra evaluation defined otherwise do not.
  old_rows = {"xl": "X", "mem8192": "M", "finetune_mem8192": "F1", "memory65536": "E"}
  new_rows = dict(old_rows, finetune_mem8192="F2")
  def rec(recipe, row, ppl, table, ev="memory", seed=0):
    return {"dataset": "a", "tokenizer": "bytes", "seed": seed, "steps": 2500, "row": row,
            "eval": ev, "perplexity": ppl, "bits_per_byte": 1.0, "commit": "c",
            "recipe": recipe, "row_config": table[row], "xl_config": "X", "recipe_rows": table}
  records = [rec("old@1", "xl", 2.0, old_rows), rec("old@1", "mem8192", 1.8, old_rows),
             rec("old@1", "mem8192", 1.9, old_rows, ev="disabled"),
             rec("old@1", "mem8192", 1.7, old_rows, ev="memory65536"),
             rec("old@1", "finetune_mem8192", 1.95, old_rows),
             rec("new@2", "finetune_mem8192", 1.85, new_rows),
             rec("new@2", "xl", 2.1, new_rows, seed=1)]
  gains = {(g["recipe"], g["seed"]): g for g in table4_report.gains(records)}
  assert abs(gains[("new@2", 0)]["gain"] - 0.1) < 1e-9 and ("new@2", 1) not in gains
  text = table4_report.render(records, "new@2")
  assert "| 0 | mem8192 (the same run: old@1) | 1.8000 | 1.9000 | 1.7000 | -10.0% |" in text
  assert "| 0 | finetune_mem8192 | 1.8500 |" in text and "1.9500" not in text
  assert "| 1 | xl | 2.1000 |" in text                     # its own run where it has one
  # Another 65K evaluation (a different hash) is not the same run.
  other_eval = [dict(r, recipe_rows=dict(new_rows, memory65536="E2"))
                if r["recipe"] == "new@2" else r for r in records]
  assert "1.7000" not in table4_report.render(other_eval, "new@2")
  # Records without a table (older files) lend nothing but their XL row.
  bare = [{k: v for k, v in r.items() if k != "recipe_rows"} for r in records]
  assert "mem8192 (the same run" not in table4_report.render(bare, "new@2")


def test_report_checks_the_other_targets_where_their_rows_ran():
  def rec(ds, seed, row, ppl, ev="memory", recipe="r@1"):
    return {"dataset": ds, "tokenizer": "bytes", "seed": seed, "steps": 2500, "row": row,
            "eval": ev, "perplexity": ppl, "bits_per_byte": 1.0, "commit": "c", "recipe": recipe}
  records = [rec("a", 0, "xl", 2.0), rec("a", 0, "mem8192", 1.9), rec("a", 1, "mem8192", 1.9),
             rec("a", 0, "mem65536", 1.8), rec("a", 1, "mem65536", 1.95),   # worse at seed 1
             rec("a", 0, "mem8192", 1.85, "memory65536"), rec("b", 0, "mem8192", 2.5),
             rec("b", 0, "mem8192", 2.5, "memory65536"),                   # equal: no worse
             rec("a", 0, "finetune_mem8192", 1.7), rec("a", 0, "finetune_control", 1.8),
             rec("b", 0, "finetune_mem8192", 2.2), rec("b", 0, "finetune_control", 2.2)]
  big, wide, tune = table4_report.secondary_targets(records)[("r@1", 2500, "bytes")]
  assert not big["holds"] and "a seed 1 1.9500 vs 1.9000" in big["why"]
  assert len(big["pairs"]) == 2
  # No worse on both data sets, but better only on one: the ">= 2 data sets" part fails.
  assert not wide["holds"] and "better (mean over seeds) on 1 data set(s): a" in wide["why"]
  assert not tune["holds"] and "b seed 0 2.2000 vs 2.2000" in tune["why"]   # a tie does not beat
  better = records + [rec("b", 0, "mem8192", 2.4, "memory65536")]
  assert [c["holds"] for c in table4_report.secondary_targets(better)[("r@1", 2500, "bytes")]
          ][1] is True
  text = table4_report.render(records, "r@1")
  assert "- XL + 65K no worse than XL + 8K: **does not hold** (2 pairs: a seed 1" in text
  none = table4_report.secondary_targets([rec("a", 0, "xl", 2.0), rec("a", 0, "mem8192", 1.9)])
  assert [c["holds"] for c in none[("r@1", 2500, "bytes")]] == [None, None, None]
  assert "- fine-tune with an added 8K memory beats its control: not run." in (
      table4_report.render([rec("a", 0, "xl", 2.0), rec("a", 0, "mem8192", 1.9)]))


def test_train_loss_tail_is_the_mean_over_the_last_36_percent_of_steps():
  log = [{"step": s, "loss": float(s >= 1700)} for s in range(100, 2600, 100)]
  # Steps 1600-2500 are the tail; 1700-2500 have loss 1, 1600 has 0.
  assert abs(protocol.train_loss_tail(log) - 0.9) < 1e-12
  assert protocol.train_loss_tail([]) is None


def test_sweep_warns_when_a_binding_makes_two_rows_the_same_run(tmp_path, monkeypatch, capsys):
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch, "--only", "xl",
                      "--gin_param", "ModelConfig.memory_layers = (-3,)") == 0
  out = capsys.readouterr().out
  assert "warning: rows xl, mem8192 resolve to the same run" in out
  # (the fine-tunes still differ: the fine-tuned memory layer keeps its position bias)
  assert "finetune_mem8192, finetune_control resolve" not in out
  assert run_protocol(tmp_path, FakeRuns(sleep=0), monkeypatch, "--only", "xl",
                      "--gin_param", "MEMORY_LAYERS = (-2,)") == 0
  assert "warning" not in capsys.readouterr().out


def test_report_of_a_file_that_is_not_a_summary_is_one_line(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"dataset": "a"}]))
  out = str(tmp_path / "out.json")
  for text, match in (("not json", "cannot read"), ("[1, 2]", "neither a list of summary"),
                      (json.dumps([{"dataset": "a"}]), "neither a list of summary"),
                      (json.dumps({"a": 1}), "not a sweep_results.json")):
    bad.write_text(text)
    with pytest.raises((UsageError, SweepError), match=match):
      table4.main(["--merge", str(bad), "--summary", out])
  with pytest.raises(UsageError, match="cannot read"):
    table4.main(["--merge", str(tmp_path / "missing.json"), "--summary", out])
  assert not os.path.exists(out)
  bad.write_text(json.dumps([{"dataset": "a"}]))
  with pytest.raises(UsageError, match="not a list of summary records"):
    table4.main(["--report", "--summary", str(bad)])
  with pytest.raises(UsageError, match="cannot read the summary"):
    table4.main(["--report", "--summary", str(tmp_path / "missing.json")])


def test_report_splits_the_gain_into_the_layer_and_the_retrieved_content():
  def rec(seed, row, ppl, ev="memory"):
    return {"dataset": "a", "tokenizer": "bytes", "seed": seed, "steps": 2500, "row": row,
            "eval": ev, "perplexity": ppl, "bits_per_byte": 1.0, "commit": "c", "recipe": "r@1"}
  records = [rec(0, "xl", 2.0), rec(0, "mem8192_empty", 1.9), rec(0, "mem8192", 1.8),
             rec(0, "mem8192", 1.98, "disabled"),
             rec(1, "xl", 2.0), rec(1, "mem8192", 1.5)]          # seed 1: no empty row
  got = {g["seed"]: g for g in table4_report.gains(records)}
  assert abs(got[0]["layer_gain"] - 0.05) < 1e-9                 # 1 - 1.9 / 2.0
  assert abs(got[0]["content_gain"] - (1 - 1.8 / 1.9)) < 1e-9
  assert abs(got[0]["off_cost"] - 0.1) < 1e-9                    # 1.98 / 1.8 - 1
  assert abs((1 - got[0]["layer_gain"]) * (1 - got[0]["content_gain"]) - (1 - got[0]["gain"])) < 1e-9
  assert not {"layer_gain", "content_gain", "off_cost"} & set(got[1])
  text = table4_report.render(records, "r@1")
  assert "| 1.9000 | +5.0% | +5.3% | +10.0% |" in text
  assert "The gain's parts over the 1 pairs with the memory-always-empty row: layer +5.0% to " \
         "+5.0%, content +5.3% to +5.3%" in text
