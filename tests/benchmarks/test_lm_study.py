"""benchmarks.lm_study: the table from run directories, and bad input."""

import json

from benchmarks import lm_study


def _summary(path, loss, sent, dense=1000.0, mean=None):
  path.mkdir(parents=True)
  s = {"valid_loss": loss, "valid_bits_per_byte": loss / 0.693, "sent_bytes": sent,
       "dense_bytes": dense, "train_wall_s": 1.0}
  if mean is not None:
    s["mean_sent_bytes"] = mean
  (path / "summary.json").write_text(json.dumps(s))


def test_finished_runs_are_read_not_rerun_and_refreshes_count(tmp_path, capsys):
  _summary(tmp_path / "none", 2.0, 1000.0)
  _summary(tmp_path / "hggtopk-local", 2.1, 20.0)
  _summary(tmp_path / "hggtopk-shared", 2.2, 20.0, mean=50.0)
  out = tmp_path / "study.json"
  assert lm_study.main(["--log-dir", str(tmp_path), "--out", str(out),
                        "--runs", "none,hggtopk-local,hggtopk-shared"]) == 0
  text = capsys.readouterr().out
  assert ("| hggtopk-local | `--scope leaf --value-dtype none --index-coding int32 "
          "--residual-lowpass 1 --density 0.01` | 2.1000 | +5.0% | 0.0 KiB | 50.0x |") in text
  assert ("| hggtopk-shared | `--scope leaf --value-dtype none --index-coding int32 "
          "--second-moment shared --residual-lowpass 1 --density 0.01` | 2.2000 | +10.0% | "
          "0.0 KiB | 20.0x |") in text
  study = json.loads(out.read_text())
  assert [r["run"] for r in study["rows"]] == ["none", "hggtopk-local", "hggtopk-shared"]
  assert lm_study.main(["--render", str(out)]) == 0


def test_rows_that_ran_without_the_default_filter_pin_it_off():
  """python -m train.lm filters the residual by default: the rows of plain error feedback
  under Adam before a compressor say --residual-lowpass 1; dense rows, DeMo, Adam after
  the exchange, momentum masking and the filter's own rows do not add it."""
  runs = lm_study.RUNS
  for name in ("hggtopk-global", "hggtopk-local", "hggtopk-leader", "hggtopk-global-warmup"):
    assert runs[name][-4:-2] == ["--residual-lowpass", "1"], name
  for name in ("none", "none-adam-before", "hggtopk-demo", "hggtopk-adam-after",
               "hggtopk-global-mask"):
    assert "--residual-lowpass" not in runs[name], name
  assert runs["hggtopk-global-lowpass0.5"].count("--residual-lowpass") == 1
  assert runs["hggtopk-global-lowpass0.5"][-3] == "0.5"


def test_rows_at_one_percent_name_their_density():
  """python -m train.lm sends 3% by default: every compressed row names its density, the
  dense rows none."""
  for name, flags in lm_study.RUNS.items():
    assert ("--density" in flags) == ("--compressor" not in flags), name
    assert flags.count("--density") <= 1, name
  assert lm_study.RUNS["hggtopk-global"][-2:] == ["--density", "0.01"]
  assert lm_study.RUNS["hggtopk-global-d0.05"].count("0.01") == 0


def test_an_unknown_run_is_one_line(capsys):
  assert lm_study.main(["--runs", "nope"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown run(s) nope") and err.count("\n") == 1
