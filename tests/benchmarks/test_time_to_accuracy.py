"""benchmarks.time_to_accuracy: the time-to-target arithmetic, its arguments, and a dry run
of the real harness (2 processes on 127.0.0.1, unshaped: CI has no namespaces to give)."""

import json
import types

import pytest

from benchmarks import time_to_accuracy as tta


def _run(task, method, evals, metric, processes=4, rate="100mbit"):
  return {"task": task, "method": method, "processes": processes, "rate": rate,
          "evals": [{"step": i, "wall_s": t, metric: v} for i, (t, v) in enumerate(evals)],
          "final": evals[-1][1]}


def test_time_to_is_the_first_evaluation_at_the_target():
  evals = [{"wall_s": 10.0, "acc": 0.8}, {"wall_s": 20.0, "acc": 0.91},
           {"wall_s": 30.0, "acc": 0.89}, {"wall_s": 40.0, "acc": 0.95}]
  assert tta.time_to(evals, "acc", 0.9, higher=True) == 20.0
  assert tta.time_to(evals, "acc", 0.96, higher=True) is None
  assert tta.time_to(evals, "acc", 0.85, higher=False) == 10.0
  assert tta.time_to([{"wall_s": 5.0, "acc": None}], "acc", 0.1, higher=True) is None


def test_summarize_compares_with_dense_of_the_same_cell():
  args = types.SimpleNamespace(target_accuracy=0.9, lm_margin=0.03)
  runs = tta.summarize([
      _run("image", "dense", [(100.0, 0.85), (200.0, 0.905), (300.0, 0.91)], "test_accuracy"),
      _run("image", "hggtopk", [(30.0, 0.86), (60.0, 0.902), (90.0, 0.908)], "test_accuracy"),
      _run("image", "hggtopk", [(30.0, 0.91)], "test_accuracy", rate="1gbit"),  # no dense
      _run("lm", "dense", [(50.0, 3.0), (100.0, 2.0)], "valid_loss"),
      _run("lm", "hggtopk", [(10.0, 3.0), (20.0, 2.05), (30.0, 1.9)], "valid_loss"),
      _run("lm", "hggtopk-bf16", [(10.0, 3.0), (20.0, 2.5)], "valid_loss"),
  ], args)
  image, alone, lm_dense, lm, lm_bf16 = runs[1], runs[2], runs[3], runs[4], runs[5]
  assert image["time_to_target_s"] == 60.0 and image["speedup_vs_dense"] == pytest.approx(200 / 60)
  assert alone["time_to_target_s"] == 30.0 and alone["speedup_vs_dense"] is None
  # Text: dense's final loss + 3% = 2.06, reached by dense at 100 s and hggtopk at 20 s.
  assert lm["target"] == pytest.approx(2.06) and lm_dense["time_to_target_s"] == 100.0
  assert lm["speedup_vs_dense"] == pytest.approx(5.0)
  assert lm_bf16["time_to_target_s"] is None and lm_bf16["speedup_vs_dense"] is None


@pytest.mark.parametrize("flags, said", [
    (["--tasks", "video"], "--tasks: video unknown"),
    (["--methods", "dense,powersgd"], "--methods: powersgd unknown"),
    (["--processes", "1"], "must be >= 2"),
    (["--processes", "two"], "give counts"),
    (["--rates", "fast"], "--rates: rate 'fast'"),
    (["--target-accuracy", "90"], "(0, 1]"),
])
def test_bad_arguments_are_one_line_and_exit_2(flags, said, capsys):
  assert tta.main(flags) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and said in err[0], err


def test_dry_run_trains_through_the_launcher_and_reports(tmp_path, capsys):
  out, png = tmp_path / "tta.json", tmp_path / "tta.png"
  assert tta.main(["--dry-run", "--tasks", "image", "--methods", "dense,hggtopk",
                   "--work-dir", str(tmp_path / "runs"), "--out", str(out),
                   "--plot", str(png)]) == 0
  printed = capsys.readouterr().out
  assert "image hggtopk: 2 processes at loopback" in printed and "x dense" in printed
  report = json.loads(out.read_text())
  assert png.stat().st_size > 10_000
  dense, sparse = report["runs"]
  for r in (dense, sparse):
    assert r["processes"] == 2 and r["rate"] == tta.LOOPBACK
    assert "--num-processes" not in r["command"]  # the launcher's environment says it
    assert [e["step"] for e in r["evals"]] == [4, 6]  # 256 synthetic images, 64 a step: 4 per epoch
    clock = [e["wall_s"] for e in r["evals"]]
    assert 0 < clock[0] < clock[1] < r["process_wall_s"]
    assert 0 <= r["final"] <= 1 and r["step_ms"] > 0
  # What each sends is the compressor's: dense sends everything, hggtopk a share of it.
  assert dense["sent_bytes"] == dense["dense_bytes"]
  assert sparse["sent_bytes"] < 0.5 * sparse["dense_bytes"]
  # Both processes trained one run: process 1 wrote its own lines beside process 0's.
  assert (tmp_path / "runs" / "image-2p-loopback-hggtopk" / "process-1" /
          "metrics.jsonl").is_file()


@pytest.mark.slow
def test_dry_run_of_the_text_harness(tmp_path):
  out = tmp_path / "tta.json"
  assert tta.main(["--dry-run", "--tasks", "lm", "--work-dir", str(tmp_path / "runs"),
                   "--out", str(out), "--plot", str(tmp_path / "tta.png")]) == 0
  runs = json.loads(out.read_text())["runs"]
  assert [r["method"] for r in runs] == list(tta.METHODS)
  dense = runs[0]
  assert dense["target"] == pytest.approx(dense["final"] * 1.03)
  assert all([e["step"] for e in r["evals"]] == [2, 4] for r in runs)
