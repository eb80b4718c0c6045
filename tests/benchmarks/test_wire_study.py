"""benchmarks.wire_study: the table from run directories, the flags, and bad input."""

import dataclasses
import json

from benchmarks import wire_study
from train.config import Config


def _summary(path, accuracy, sent):
  path.mkdir(parents=True)
  (path / "summary.json").write_text(json.dumps(
      {"test_accuracy": accuracy, "sent_bytes": sent, "dense_bytes": 100_000.0, "step": 10,
       "train_wall_s": 1.0}))


def test_finished_runs_are_read_not_rerun(tmp_path, capsys):
  _summary(tmp_path / "int32-s0", 0.9, 8192.0)
  _summary(tmp_path / "bf16-packed-s0", 0.895, 2048.0)
  out = tmp_path / "study.json"
  assert wire_study.main(["--log-dir", str(tmp_path), "--out", str(out), "--seeds", "0",
                          "--formats", "int32,bf16-packed"]) == 0
  text = capsys.readouterr().out
  assert ("| bf16-packed | `--value-dtype bfloat16 --index-coding packed` | 0 | 89.50% | "
          "-0.50 points | 2.0 KiB | 4.00x |") in text
  assert [r["format"] for r in json.loads(out.read_text())["rows"]] == ["int32", "bf16-packed"]
  assert wire_study.main(["--render", str(out)]) == 0


def test_every_format_is_flags_the_harness_takes():
  names = {f.name for f in dataclasses.fields(Config)}
  for flags in wire_study.FORMATS.values():
    assert all(f[2:].replace("-", "_") in names for f in flags[::2])


def test_bad_input_is_one_line(capsys):
  assert wire_study.main(["--formats", "nope"]) == 2
  assert wire_study.main(["--seeds", "a"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("error: unknown format(s) nope") and err[1].startswith("error: --seeds")
