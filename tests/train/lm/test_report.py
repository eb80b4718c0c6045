"""`python -m train.compare --task lm` and `python -m train.plot` on real language-model
runs: the sweep through train.lm's own parser, the text columns, and the charts."""

import csv
import io
import json
import os

import pytest

from train.errors import UsageError
from train.report import compare, plot, reader

from tests.train.lm.conftest import LM_FLAGS


def test_tiny_text_sweep_summary_and_charts(tmp_path, tiny_corpus, nano_model, capsys):
  del nano_model
  root = str(tmp_path / "comparison")
  i = LM_FLAGS.index("--density")
  flags = LM_FLAGS[:i] + LM_FLAGS[i + 2:]  # compare gives each run its density
  runs = compare.plan(["none", "topk"], [0.1], flags, root, task="lm")
  assert [r.name for r in runs] == ["none", "topk-d0.1"]
  assert all(type(r.config).__name__ == "LMConfig" for r in runs)
  assert "--no-checkpoint" in runs[0].argv and "--steps" not in runs[0].argv[:2]
  rows = compare.run_comparison(runs, root, command="test", dataset=tiny_corpus,
                                stream=io.StringIO())
  assert [r["status"] for r in rows] == ["ok", "ok"]
  with open(os.path.join(root, "topk-d0.1", "argv.json")) as f:
    assert json.load(f)[:3] == ["python", "-m", "train.lm"]

  with open(os.path.join(root, "summary.csv")) as f:
    table = {r["run"]: r for r in csv.DictReader(f)}
  topk, dense = table["topk-d0.1"], table["none"]
  assert "final_test_accuracy" not in topk  # text columns, not the image ones
  with open(os.path.join(root, "none", "summary.json")) as f:
    dense_summary = json.load(f)
  assert float(dense["final_valid_loss"]) == pytest.approx(dense_summary["valid_loss"])
  assert float(dense["unigram_bits_per_byte"]) == pytest.approx(
      dense_summary["unigram_valid_bits_per_byte"])
  assert float(topk["final_valid_bits_per_byte"]) < float(topk["unigram_bits_per_byte"]) + 4
  assert float(topk["tokens_per_s"]) > 0 and int(topk["steps"]) == 4
  assert float(topk["sent_bytes"]) < float(dense["sent_bytes"])
  with open(os.path.join(root, "summary.md")) as f:
    md = f.read()
  unigram = float(dense["unigram_bits_per_byte"])
  assert f"Unigram baseline (no context) on the validation split: {unigram:.3f}" in md
  assert "| final valid loss | vs dense | bits/byte |" in md
  delta = 100 * (float(topk["final_valid_loss"]) - float(dense["final_valid_loss"])) / \
      float(dense["final_valid_loss"])
  assert f"| {delta:+.1f}% |" in md

  out = str(tmp_path / "png")
  assert plot.main(["--log-dir", root, "--out", out]) == 0
  names = set(os.listdir(out))
  assert {"curves_step.png", "curves_time.png", "bytes_per_step.png",
          "bits_per_byte_vs_density.png"} <= names, names
  assert "accuracy_vs_density.png" not in names
  assert "time_breakdown.png" not in names  # --no-profile: no timing.json, no chart
  capsys.readouterr()


def test_a_log_dir_mixing_image_and_text_runs_is_refused(tmp_path):
  runs = [reader.Run("a", str(tmp_path / "a"), "image", {}, [], [], None, None),
          reader.Run("b", str(tmp_path / "b"), "lm", {}, [], [], None, None)]
  assert reader.task_of({"seq_len": 8}) == "lm" and reader.task_of({}) == "image"
  with pytest.raises(UsageError, match="mixes image-classification and language-model runs"):
    plot.task_of(runs)


def test_the_text_schema_is_enforced(tmp_path):
  """An eval line of a text run without the validation keys names the line and docs/lm.md."""
  d = tmp_path / "run"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"compressor": "none", "density": 1.0,
                                             "seq_len": 8}))
  (d / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "test_loss": 1.0,
                                               "test_accuracy": 0.5}) + "\n")
  with pytest.raises(UsageError, match="line 1: eval line lacks valid_loss.*docs/lm.md"):
    reader.load_run(str(d))


def test_the_gpu_benchmark_command_plans(tmp_path):
  """benchmarks/lm_gpu.sh's train.compare flags resolve to two valid GPT-2 small runs
  (checked as train.lm checks them; nothing runs)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  with open(os.path.join(root, "benchmarks", "lm_gpu.sh")) as f:
    script = f.read()
  command = script[script.index("python3 -m train.compare"):].replace("\\\n", " ")
  argv = command.split("\n")[0].split()[3:]
  argv[argv.index('"$out"')] = str(tmp_path / "gpu")
  args, train_args = compare.build_parser().parse_known_args(argv)
  runs = compare.plan(args.compressors.split(","), [float(args.densities)], train_args,
                      args.log_dir, task=args.task)
  assert [r.name for r in runs] == ["none", "hggtopk-d0.01"]
  cfg = runs[1].config
  assert (cfg.model, cfg.seq_len, cfg.compute_dtype, cfg.profile) == \
      ("gpt2-small", 1024, "bfloat16", True)
