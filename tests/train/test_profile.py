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
                              "momentum": cfg.momentum, "exchange": cfg.exchange,
                              "scope": cfg.scope, "value_dtype": cfg.value_dtype,
                              "scale_group": cfg.scale_group, "index_coding": cfg.index_coding}

  with open(os.path.join(cfg.log_dir, "timing.json")) as f:
    timing = json.load(f)
  assert timing == summary["timing"]
  for key in ("step_s", "compute_s", "compressor_update_s", "exchange_and_update_s",
              "dense_allreduce_s"):
    assert math.isfinite(timing[key]) and timing[key] >= 0, key
  assert timing["step_s"] > 0 and timing["compute_s"] > 0 and timing["compressor_update_s"] > 0


def test_a_negative_derived_time_is_never_printed():
  from train import profile  # pylint: disable=import-outside-toplevel
  timing = profile.summarize({"step": 0.050, "compute": 0.045, "compressor_update": 0.010,
                              "dense_allreduce": 0.004}, reps=3, devices=4, global_batch=16)
  assert timing["exchange_and_update_s"] == 0.0 and timing["exchange_and_update_below_noise"]
  text = profile.describe(timing)
  assert "compressor update (local, no exchange) 10.0 ms" in text
  assert "exchange and update ~0 ms (derived; below the measurement noise)" in text
  assert "-" not in text.replace("all-reduce", "")
  timing = profile.summarize({"step": 0.050, "compute": 0.030, "compressor_update": 0.010,
                              "dense_allreduce": 0.004}, reps=3, devices=4, global_batch=16)
  assert "exchange and update 10.0 ms (derived)" in profile.describe(timing)


def test_the_timing_pass_runs_by_default_only_when_cheap():
  from train import profile  # pylint: disable=import-outside-toplevel
  # ResNet-18 on 2 CPU cores: ~90 s to compile, 3 s a step, 4 minutes of training.
  cheap, estimate = profile.wanted(90.0, 3.0, 20, 240.0)
  assert not cheap and estimate == 3 * 90.0 + 4 * 21 * 3.0
  assert profile.wanted(5.0, 0.05, 20, 170.0)[0]  # the main job: well under a minute
  assert profile.wanted(90.0, 3.0, 20, 6000.0)[0]  # under a tenth of a long run
