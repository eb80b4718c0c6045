"""benchmarks.wire_code runs end to end on small rows, and refuses bad sizes in one line."""

import json
import subprocess
import sys

import numpy as np

from benchmarks.wire_code import block_order


def test_block_order_is_sorted_by_block_and_shuffled_inside():
  pos = block_order(np.random.default_rng(0), 100_000, 5000)
  assert len(set(pos.tolist())) == pos.size
  assert np.all(np.diff(pos // 256) >= 0)  # blocks ascending
  assert not np.all(np.diff(pos) > 0)      # not sorted inside the blocks


def test_wire_code_times_every_piece_and_checks_the_sort(tmp_path):
  out = tmp_path / "code.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.wire_code", "--sizes", "2e5", "--densities",
       "0.001,0.05", "--rows", "2", "--reps", "1", "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["k"] for r in rows] == [200, 10_000] and all(r["sorted_equal"] for r in rows)
  assert set(rows[0]["ms"]) == {"lax.sort", "sort_distinct", "encode int32", "encode packed",
                                "decode int32", "decode packed"}
  assert "decode of 2 rows packed" in result.stdout


def test_bad_sizes_are_one_line():
  result = subprocess.run([sys.executable, "-m", "benchmarks.wire_code", "--sizes", "ten"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.count("\n") == 1
  assert result.stderr.startswith("error: --sizes")
