"""python -m train.plot on schema-valid log directories written here, and its errors.

No JAX: the run directories are fabricated following docs/training.md's schema (the real
harness output is plotted in test_compare.py).
"""

import json
import os
import struct

import pytest

from train.report import plot, reader, style

STEPS, BATCH = 40, 64
RUNS = [("none", 1.0), ("topk", 0.01), ("topk", 0.05), ("hggtopk", 0.01), ("hggtopk", 0.05),
        ("randomk", 0.01)]


def _write_run(path, compressor, density, *, timing=True):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"compressor": compressor, "density": density, "batch_size": BATCH,
               "dataset": "fashion_mnist", "model": "cnn", "devices": 4}, f)
  dense = 827880.0
  k = 0 if compressor == "none" else int(density * 200000)
  lines = []
  for step in range(10, STEPS + 1, 10):
    lines.append({"kind": "train", "step": step, "epoch": step / 100, "loss": 2.0 / step,
                  "accuracy": 0.5 + step / 100, "lr": 0.05, "samples_per_s": 640.0,
                  "selected": k, "k": k, "history_hits": 0, "threshold_leaf": "fc1",
                  "sent_bytes": dense if k == 0 else k * 8.0, "dense_bytes": dense,
                  "threshold_rel_err": None if k == 0 else 1e-3 * step})
  lines.append({"kind": "eval", "step": STEPS, "epoch": 0.4, "test_accuracy": 0.8,
                "test_loss": 0.5})
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
  if timing:
    with open(os.path.join(path, "timing.json"), "w") as f:
      json.dump({"step_s": 0.05, "compute_s": 0.03, "compressor_update_s": 0.015,
                 "exchange_and_update_s": -0.001 if k == 0 else 0.005, "devices": 4}, f)
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({"step": STEPS, "total_steps": STEPS, "devices": 4, "train_wall_s": 4.0}, f)


def _fabricate(root):
  for compressor, density in RUNS:
    name = "none" if compressor == "none" else f"{compressor}-d{density:g}"
    # One run skipped the timing pass: the time chart leaves it out, the others keep it.
    _write_run(os.path.join(root, name), compressor, density,
               timing=(compressor, density) != ("randomk", 0.01))
  return root


@pytest.fixture
def log_dir(tmp_path):
  return _fabricate(str(tmp_path / "comparison"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  """The charts of the fabricated comparison, rendered once (rendering costs seconds)."""
  root = _fabricate(str(tmp_path_factory.mktemp("plot") / "comparison"))
  out = os.path.join(root, "png")
  assert plot.main(["--log-dir", root, "--out", out]) == 0
  return out


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n", path
  return struct.unpack(">II", head[16:24])  # IHDR width, height


# name -> width in pixels (heights grow with the number of runs)
EXPECTED = {"curves_step.png": 1100, "curves_time.png": 1100, "time_breakdown.png": 900,
            "bytes_per_step.png": 900, "selection_quality.png": 1100,
            "accuracy_vs_density.png": 800}


def test_every_chart_written(rendered):
  assert sorted(os.listdir(rendered)) == sorted(EXPECTED)
  for name, width in EXPECTED.items():
    path = os.path.join(rendered, name)
    w, h = _png_size(path)
    assert w == width and 300 <= h <= 1200, (name, w, h)
    assert 5_000 < os.path.getsize(path) < 150_000, name


def test_python_m_train_plot_is_these_charts():
  import train.plot  # pylint: disable=import-outside-toplevel
  assert train.plot.main is plot.main


def test_default_out_is_under_the_log_dir():
  args = plot.build_parser().parse_args(["--log-dir", "x/c"])
  assert plot.out_dir(args) == os.path.join("x", "c", "plots")
  assert plot.out_dir(plot.build_parser().parse_args([])) == os.path.join(
      "logs", "comparison", "plots")


def test_runs_without_timing_skip_only_that_chart(tmp_path, capsys):
  root = tmp_path / "c"
  _write_run(str(root / "topk-d0.01"), "topk", 0.01, timing=False)
  series, subtitle = plot.setup(reader.load_runs(str(root)))
  assert plot.time_breakdown(series, subtitle, str(tmp_path / "png")) is None
  assert "no run has timing.json" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "png")


def test_selection_benchmark_chart(tmp_path):
  rows = []
  for density in (0.01, 0.05):
    for n in (10**5, 10**6, 10**7):
      for dist in ("normal", "t3"):
        ref = {"n": n, "density": density, "distribution": dist, "method": "lax.top_k",
               "ms": n * 3e-5}
        if density == 0.01:  # the 0.05 panel says it has no floor instead of drawing one
          ref["floor_ms"] = n * 3e-7
        rows += [ref, {"n": n, "density": density, "distribution": dist, "method": "hggtopk",
                       "ms": n * 2e-6}]
  path = tmp_path / "selection_cpu.json"
  path.write_text(json.dumps({"machine": {"device": "cpu", "jax": "0.10.2", "cores": 2},
                              "rows": rows}))
  assert plot.main(["--selection", str(path), "--out", str(tmp_path / "png")]) == 0
  png = tmp_path / "png" / "selection_cpu.png"
  assert _png_size(str(png)) == (1280, 480) and 5_000 < png.stat().st_size < 150_000


def _bad_line(d):
  _write_run(os.path.join(d, "r"), "topk", 0.01)
  with open(os.path.join(d, "r", "metrics.jsonl"), "a") as f:
    f.write('{"kind": "train", "step": 1}\n')


def _no_config(d):
  os.makedirs(os.path.join(d, "r"))
  with open(os.path.join(d, "r", "metrics.jsonl"), "w") as f:
    f.write("")


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist; run python -m train.compare"),
    (lambda d: os.makedirs(d), "holds no runs"),
    (_bad_line, "metrics.jsonl line 6: train line lacks loss"),
    (_no_config, "has no config.json: not a run directory of python -m train.cifar or "
                 "python -m train.lm"),
])
def test_bad_log_dir_is_one_clear_line(tmp_path, capsys, make, message):
  d = str(tmp_path / "logs")
  make(d)
  assert plot.main(["--log-dir", d, "--out", str(tmp_path / "png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not os.path.exists(tmp_path / "png")


def test_selection_errors(tmp_path, capsys):
  assert plot.main(["--selection", str(tmp_path / "x.json")]) == 2
  assert "needs --out DIR" in capsys.readouterr().err
  bad = tmp_path / "bad.json"
  bad.write_text('{"rows": [{"n": 1}]}')
  assert plot.main(["--selection", str(bad), "--out", str(tmp_path)]) == 2
  assert "is not a benchmarks.selection result" in capsys.readouterr().err


def test_one_colour_per_compressor_everywhere():
  names = ["none", "topk", "topk2", "gaussian", "gaussian2", "randomk", "randomkec",
           "dgcsampling", "redsync", "redsynctrim", "hggtopk", "lax.top_k"]
  everything = style.colors_for(names + ["newmethod"])
  assert len(set(everything.values())) == len(everything)  # all distinct
  assert style.colors_for(["hggtopk", "newmethod"]) == {
      k: everything[k] for k in ("hggtopk", "newmethod")}


def test_numbers_read_from_the_logs(log_dir):
  runs = {r.name: r for r in reader.load_runs(log_dir)}
  assert set(runs) == {"none", "topk-d0.01", "topk-d0.05", "hggtopk-d0.01", "hggtopk-d0.05",
                       "randomk-d0.01"}
  m = reader.metrics(runs["topk-d0.05"])
  assert m["final_test_accuracy"] == m["best_test_accuracy"] == 0.8
  assert m["bytes_ratio"] == pytest.approx(10000 * 8 / 827880)
  assert m["count_over_k"] == 1.0
  assert m["threshold_rel_err_median"] == pytest.approx(0.025)  # median of 0.01..0.04
  assert m["exchange_and_update_s"] == 0.005 and m["finished"]
  assert reader.metrics(runs["none"])["count_over_k"] is None
  # 640 samples/s at batch 64: 10 steps per second; the first line covers steps 2..10.
  assert reader.train_wall_s(runs["none"]) == pytest.approx([0.9, 1.9, 2.9, 3.9])
