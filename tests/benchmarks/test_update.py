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


def test_wire_formats_are_timed_side_by_side_and_compared(tmp_path):
  """Two --wire formats under shard_map: both rows timed (in one interleaved call), and a
  ratio line per coded row against the first format's row of the same method."""
  out = tmp_path / "wires.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.update", "--sizes", "1e4", "--methods", "topk",
       "--wire", "int32,fp8-packed", "--axis", "shard_map", "--breakdown", "none",
       "--reps", "1", "--topk-reps", "1", "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [r for r in json.loads(out.read_text())["rows"] if r.get("axis") == "shard_map"]
  assert sorted(r["method"] for r in rows) == ["topk", "topk+fp8-packed"]
  assert all(r["update_ms"] > 0 for r in rows)
  assert "topk+fp8-packed shard_map:" in result.stdout and "x the int32 row" in result.stdout


def test_wire_ratios_divide_by_the_same_methods_first_format_row():
  from benchmarks.update import wire_ratios  # pylint: disable=import-outside-toplevel
  base = dict(shape="1e+07", density=0.01, momentum=0.0, axis="shard_map")
  rows = [dict(base, method="topk", wire="int32", update_ms=50.0),
          dict(base, method="hggtopk", wire="int32", update_ms=40.0),
          dict(base, method="topk+fp8-packed", wire="fp8-packed", update_ms=60.0),
          dict(base, method="hggtopk+fp8-packed", wire="fp8-packed", update_ms=30.0)]
  lines = wire_ratios(rows)
  assert len(lines) == 2
  assert lines[0].endswith("topk+fp8-packed shard_map: 1.20x the int32 row")
  assert lines[1].endswith("hggtopk+fp8-packed shard_map: 0.75x the int32 row")
