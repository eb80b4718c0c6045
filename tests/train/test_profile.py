"""The time breakdown after training: timing.json, timed on the compressor the run trains."""

import io
import json
import math
import os

from train.loop import train_and_evaluate


def test_timing_pass_times_the_trained_compressor(tiny_config, tiny_dataset, compressor_calls):
  cfg = tiny_config(profile=True, profile_reps=1, compressor="topk")
  summary = train_and_evaluate(cfg, dataset=tiny_dataset, stream=io.StringIO())

  (trained, trained_options), (profiled, profiled_options) = compressor_calls
  assert trained_options.pop("axis_name") == "data"
  assert profiled_options.pop("axis_name") is None  # local: no exchange to time
  assert (profiled, profiled_options) == (trained, trained_options)
  assert profiled_options == {"density": cfg.density, "min_size": cfg.min_size,
                              "momentum": cfg.momentum, "exchange": cfg.exchange}

  with open(os.path.join(cfg.log_dir, "timing.json")) as f:
    timing = json.load(f)
  assert timing == summary["timing"]
  for key in ("step_s", "compute_s", "selection_s", "exchange_and_update_s", "dense_allreduce_s"):
    assert math.isfinite(timing[key])
  assert timing["step_s"] > 0 and timing["compute_s"] > 0 and timing["selection_s"] > 0
