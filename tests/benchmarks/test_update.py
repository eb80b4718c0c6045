"""benchmarks.update runs end to end on a small leaf: every piece it times still matches
the library's internals (the breakdown calls the transform's steps one by one)."""

import json
import subprocess
import sys


def test_update_benchmark_runs_with_breakdown_and_shard_map(tmp_path):
  out = tmp_path / "update.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.update", "--sizes", "1e4", "--densities", "0.01",
       "--methods", "hggtopk", "--momentum", "0", "--axis", "none,shard_map",
       "--breakdown", "hggtopk", "--reps", "1", "--topk-reps", "1", "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads(out.read_text())
  assert saved["machine"]["malloc"] == "reuse"  # the harness's setting, recorded
  rows = saved["rows"]
  updates = [r for r in rows if r.get("method") == "hggtopk"]
  assert {r["axis"] for r in updates} == {"none", "shard_map"}
  assert any("breakdown" in r for r in updates)


def test_plain_jit_with_the_default_allocator_is_recorded(tmp_path):
  """`--no-donate --malloc system`: what a user's own `jax.jit(tx.update)` loop gets."""
  out = tmp_path / "plain.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.update", "--sizes", "1e4", "--methods", "hggtopk",
       "--axis", "none", "--breakdown", "", "--reps", "1", "--topk-reps", "1",
       "--no-donate", "--malloc", "system", "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads(out.read_text())
  assert saved["machine"]["malloc"] == "system" and saved["machine"]["donate"] is False
  assert [r["update_ms"] > 0 for r in saved["rows"] if r.get("method") == "hggtopk"] == [True]
