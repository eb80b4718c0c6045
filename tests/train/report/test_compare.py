"""python -m train.compare: one real tiny sweep through the harness, planning, and errors."""

import csv
import io
import os

import pytest

from train import cli as train_cli
from train.report import compare, plot, reader
from train.errors import UsageError

# Tiny runs: the synthetic dataset given in-process (8x8 images), 2 steps on 2 devices,
# small leaves dense (compilation per compressed leaf dominates), no timing pass (its
# compilation would cost 3x the run; timing.json is read in test_plot.py and written in
# tests/train/test_profile.py).
TINY_FLAGS = ["--dataset", "synthetic", "--steps", "2", "--batch-size", "16", "--devices", "2",
              "--min-size", "1000", "--log-every", "1", "--no-profile", "--eval-batch-size", "16"]


def test_tiny_sweep_then_rerun_skips_then_plots(tmp_path, tiny_dataset):
  root = str(tmp_path / "comparison")
  runs = compare.plan(["none", "topk"], [0.1], TINY_FLAGS, root)
  out = io.StringIO()
  rows = compare.run_comparison(runs, root, command="test", dataset=tiny_dataset, stream=out)

  assert sorted(os.listdir(root)) == ["none", "summary.csv", "summary.md", "topk-d0.1"]
  for name in ("none", "topk-d0.1"):
    assert {"argv.json", "config.json", "metrics.jsonl",
            "summary.json"} <= set(os.listdir(os.path.join(root, name)))
  assert [r["status"] for r in rows] == ["ok", "ok"]
  with open(os.path.join(root, "summary.csv")) as f:
    table = {r["run"]: r for r in csv.DictReader(f)}
  assert set(table) == {"none", "topk-d0.1"}
  assert {r["compressor"] for r in table.values()} == {"none", "topk"}
  topk, dense = table["topk-d0.1"], table["none"]
  assert int(topk["steps"]) == 2 and float(topk["density"]) == 0.1
  assert float(topk["count_over_k"]) == pytest.approx(1.0)  # exact top-k sends exactly k
  assert float(topk["sent_bytes"]) < float(dense["sent_bytes"]) == float(dense["dense_bytes"])
  assert 0 <= float(topk["final_test_accuracy"]) <= 1
  assert topk["step_s"] == topk["compressor_update_s"] == ""  # not profiled: empty, not invented
  with open(os.path.join(root, "summary.md")) as f:
    md = f.read()
  assert "| none |" in md and "| topk-d0.1 |" in md and "Command: `test`" in md
  ratio = float(topk["sent_bytes"]) / float(topk["dense_bytes"])
  assert float(topk["bytes_ratio"]) == pytest.approx(ratio) and f"| {ratio:.4f}x |" in md

  # Re-running skips finished runs: nothing is appended to their logs.
  before = {n: os.path.getmtime(os.path.join(root, n, "metrics.jsonl")) for n in table}
  out = io.StringIO()
  compare.run_comparison(runs, root, command="test", dataset=tiny_dataset, stream=out)
  assert out.getvalue().count("skip ") == 2 and "run 1/" not in out.getvalue()
  assert before == {n: os.path.getmtime(os.path.join(root, n, "metrics.jsonl")) for n in table}

  # Other settings for an existing run are refused, not silently mixed.
  changed = compare.plan(["topk"], [0.1], TINY_FLAGS + ["--lr", "0.2"], root)
  with pytest.raises(UsageError, match="lr: 0.05 there, 0.2 now"):
    compare.run_comparison(changed, root, command="test", dataset=tiny_dataset, stream=out)

  # The charts read what the harness really wrote (all six are drawn in test_plot.py; the
  # curves vs wall time use the most of the schema: steps, rates, batch size, eval lines).
  series, subtitle = plot.setup(reader.load_runs(root))
  assert [s.label for s in series] == ["none (dense)", "topk@0.1"]
  path = plot.curves(series, subtitle, str(tmp_path / "png"),
                     lambda s: reader.train_wall_s(s.run), "time (s)", "t.png")
  assert os.path.getsize(path) > 5_000


def test_python_m_train_compare_is_this_sweep():
  import train.compare  # pylint: disable=import-outside-toplevel
  assert train.compare.main is compare.main


def test_plan_names_defaults_and_recorded_command(tmp_path):
  root = str(tmp_path)
  runs = compare.plan(["none", "topk", "hggtopk"], [0.01, 0.05], [], root)
  assert [r.name for r in runs] == ["none", "topk-d0.01", "topk-d0.05", "hggtopk-d0.01",
                                    "hggtopk-d0.05"]  # none once: it has no density
  for run in runs:
    # argv.json's command line resolves to exactly the run's config.
    assert train_cli.resolve(train_cli.build_parser().parse_args(run.argv))[0] == run.config
    assert run.config.log_dir == os.path.join(root, run.name)
    assert (run.config.steps, run.config.log_every, run.config.checkpoint) == (200, 20, False)
  assert runs[4].config.compressor == "hggtopk" and runs[4].config.density == 0.05
  # The user's flags win over compare's defaults; --epochs means no --steps default.
  cfg = compare.plan(["topk"], [0.01], ["--epochs", "2", "--log-every", "7", "--model",
                                        "vgg11"], root, checkpoint=True)[0].config
  assert (cfg.steps, cfg.epochs, cfg.log_every, cfg.model, cfg.checkpoint) == \
      (None, 2, 7, "vgg11", True)


@pytest.mark.parametrize("argv, message", [
    (["--compressors", "topk,zip"], "unknown or empty zip; choose from dgcsampling"),
    (["--compressor", "topk"], "--compressor is not a train.compare flag; use --compressors"),
    (["--densities", "0.01,0"], "--densities must be in (0, 1]"),
    (["--densities", "x"], "--densities must be comma-separated numbers"),
    (["--model", "alexnet"], "unknown model 'alexnet'"),
    (["--resume"], "--resume is not a train.compare flag"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
  assert compare.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
  from train import data  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  runs = compare.plan(["topk", "randomk"], [0.01], TINY_FLAGS, root)
  too_small = data.synthetic_dataset(8, (8, 8, 1))  # 8 examples < batch 16: both runs fail
  out = io.StringIO()
  rows = compare.run_comparison(runs, root, command="test", dataset=too_small, stream=out)
  assert [r["run"] for r in rows] == ["topk-d0.01", "randomk-d0.01"]
  for row in rows:
    assert row["status"].startswith("failed: UsageError: --batch-size 16 exceeds"), row
  with open(os.path.join(root, "summary.md")) as f:
    assert "| randomk-d0.01 | failed: UsageError" in f.read()


def test_a_run_without_usable_metrics_is_named_not_summarised(tmp_path):
  """A finished run whose every loss was NaN (null in metrics.jsonl): the summary names it
  instead of failing on it."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  root = str(tmp_path)
  (run,) = compare.plan(["topk"], [0.1], TINY_FLAGS, root)
  os.makedirs(run.config.log_dir)
  with open(os.path.join(run.config.log_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(run.config), f)
  line = {"kind": "train", "step": 2, "loss": None, "accuracy": None, "samples_per_s": None,
          "selected": 10, "k": 10, "sent_bytes": 80.0, "dense_bytes": 800.0,
          "threshold_rel_err": None}
  with open(os.path.join(run.config.log_dir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps(line) + "\n")
  with open(os.path.join(run.config.log_dir, "summary.json"), "w") as f:
    json.dump({"step": 2, "total_steps": 2}, f)
  rows = compare.run_comparison([run], root, command="test", stream=io.StringIO())
  assert rows[0]["status"] == "no usable metrics: no train line with a finite loss"
  with open(os.path.join(root, "summary.md")) as f:
    assert "| topk-d0.1 | no usable metrics: no train line with a finite loss |" in f.read()
