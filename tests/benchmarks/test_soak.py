"""benchmarks.soak: bad arguments, the report's checks, and a short soak end to end."""

import json
import os

import pytest

from benchmarks import soak


@pytest.mark.parametrize("argv, message", [
    (["--meshes", "2,x"], "--meshes: 'x' is not a mesh"),
    (["--meshes", "8/0"], "--meshes: '8/0' is not a mesh"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--nan-steps", "30", "--steps", "20"], "--nan-steps must be in 0..--steps"),
    (["--", "--resume"], "flags after -- may not set"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys):
  assert soak.main(["--work-dir", str(tmp_path), *argv]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def _fake_segments(monkeypatch, doubled=False):
  """`_segment` writes the run a soak would leave: train lines every 2 steps to 8, an eval
  at 8; the soak's second segment repeats step 4's line when `doubled`."""
  calls = []

  def segment(flags, poison, log_dir, output, rng=None, after=None, delay=0.0):
    del poison, output, after, delay
    calls.append(flags)
    os.makedirs(log_dir, exist_ok=True)
    soaked = log_dir.endswith("soak")
    steps = [2, 4] if soaked and len(calls) == 2 else [4, 6, 8] if doubled else [6, 8]
    if not soaked:
      steps = [2, 4, 6, 8]
    with open(os.path.join(log_dir, "metrics.jsonl"), "a") as f:
      for s in steps:
        f.write(json.dumps({"kind": "train", "step": s, "steps_per_s": 10.0,
                            "nonfinite_steps": int(s == 4)}) + "\n")
      if 8 in steps:
        f.write(json.dumps({"kind": "eval", "step": 8}) + "\n")
        with open(os.path.join(log_dir, "summary.json"), "w") as g:
          json.dump({"test_accuracy": 0.9 if soaked else 0.91}, g)
    killed = soaked and len(calls) == 2
    return {"flags": flags, "killed": killed, "returncode": -9 if killed else 0,
            "wall_s": 1.0, "checkpoint_before_kill": 4 if killed else None,
            "rss_kib": [(t, 1000) for t in range(8)]}

  monkeypatch.setattr(soak, "_segment", segment)
  return calls


@pytest.mark.parametrize("doubled", [False, True])
def test_the_report_compares_every_line_with_the_uninterrupted_run(monkeypatch, tmp_path,
                                                                  doubled, capsys):
  calls = _fake_segments(monkeypatch, doubled)
  out = tmp_path / "soak.json"
  assert soak.main(["--steps", "8", "--nan-steps", "1", "--meshes", "2", "--work-dir",
                    str(tmp_path / "w"), "--out", str(out)]) == (1 if doubled else 0)
  report = json.loads(out.read_text())
  assert report["every_line_once"] is not doubled
  assert report["doubled_lines"] == ([["train", 4]] if doubled else [])
  assert report["kills"] == 1 and len(calls) == 3
  assert calls[2][-5:] == ["--devices", "2", "--hosts", "none", "--resume"]
  assert report["accuracy_gap_points"] == pytest.approx(-1.0)
  assert report["reference_flatness"]["rss_change"] == 0.0
  assert "every line once: " + str(not doubled) in capsys.readouterr().out
  # The same work directory again: refused, not overwritten.
  assert soak.main(["--steps", "8", "--work-dir", str(tmp_path / "w")]) == 2


@pytest.mark.slow
def test_a_short_soak_on_synthetic_images_kills_and_resumes_on_two_devices(tmp_path):
  """16 steps per epoch, one kill right after the first checkpoint, resumed on 2 devices."""
  out = tmp_path / "soak.json"
  assert soak.main(["--steps", "48", "--nan-steps", "2", "--meshes", "2",
                    "--max-kill-delay", "0", "--work-dir", str(tmp_path / "w"), "--out",
                    str(out), "--", "--dataset", "synthetic", "--synthetic-size", "256",
                    "--batch-size", "16", "--eval-batch-size", "16", "--log-every", "4"]) == 0
  report = json.loads(out.read_text())
  assert report["every_line_once"] and report["kills"] == 1
  assert report["nonfinite_steps_counted"] == {"reference": 2, "soak": 2}
  assert report["segments"][1]["flags"] == "--devices 2 --hosts none --resume"
