"""`train_and_evaluate`: the whole run, from config to summary.json."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, TextIO

import jax
import numpy as np

from train import checkpoint
from train import data as data_lib
from train import diagnostics
from train import logs
from train import mesh as mesh_lib
from train import optim
from train import profile
from train import steps
from train.config import Config, check_divisible
from train.errors import UsageError


def default_device_count() -> int:
  """All local devices (on a CPU-only host: the fake CPU devices the CLI configured)."""
  return jax.local_device_count()


def _format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def train_and_evaluate(cfg: Config, *, argv: list[str] | None = None, resume: bool = False,
                       stop_after: int | None = None, dataset: data_lib.Dataset | None = None,
                       stream: TextIO | None = None,
                       checkpoint_dir: str | None = None) -> dict[str, Any]:
  """Trains `cfg` and returns the summary (also written to <log_dir>/summary.json).

  Args:
    cfg: the resolved run configuration.
    argv: the command line, stored in argv.json.
    resume: continue from the latest checkpoint in `cfg.log_dir`.
    stop_after: stop (and checkpoint) once this many steps are done, without changing
      the schedule; `None` trains to the end. Used to test resume.
    dataset: an already loaded dataset (tests); by default `cfg.dataset` is loaded.
    stream: where progress goes (default stdout).
    checkpoint_dir: where orbax keeps checkpoints (default <log_dir>/checkpoints). In a
      multi-process run every process passes the same directory: each writes its own
      shards there and process 0 the metadata.
  """
  ds = dataset or data_lib.load_dataset(cfg.dataset, cfg.data_dir,
                                        synthetic_size=cfg.synthetic_size)
  n_dev = cfg.devices or default_device_count()
  if n_dev > jax.device_count():
    raise UsageError(f"--devices {n_dev}: only {jax.device_count()} devices available")
  check_divisible(cfg, n_dev)
  spe = data_lib.steps_per_epoch(ds, cfg.batch_size)
  if spe < 1:
    raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(ds.train_labels)} "
                     "training examples")
  total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
  end = total if stop_after is None else min(total, stop_after)
  do_augment = cfg.augment if cfg.augment is not None else cfg.dataset.startswith("cifar")
  if cfg.log_dir is None:
    cfg = dataclasses.replace(cfg, log_dir=logs.default_run_dir(cfg))
  log = logs.RunLog(cfg.log_dir, stream)

  mesh = mesh_lib.make_mesh(n_dev, cfg.hosts)
  state = steps.create_train_state(cfg, ds.image_shape, ds.num_classes, mesh, total)
  checkpoint_dir = checkpoint_dir or os.path.join(cfg.log_dir, "checkpoints")
  mngr = checkpoint.manager(checkpoint_dir) if cfg.checkpoint else None
  if resume:
    last = checkpoint.latest_step(mngr) if mngr else None
    if last is None:
      raise UsageError(f"--resume: no checkpoint in {checkpoint_dir}")
    restored = checkpoint.restore(mngr, last, state.arrays())
    state = dataclasses.replace(state, step=last, **restored)
    log.line(f"resumed from step {last}")
  log.write_run_info(argv or [], cfg)

  step_fn = steps.make_train_step(state)
  eval_fn = steps.make_eval_step(state)
  leaf_index, leaf_group, leaf_path = diagnostics.largest_leaf(state.params, cfg.min_size)
  probe_fn = None
  if cfg.compressor != "none":
    probe_fn = diagnostics.make_threshold_probe(state, leaf_index, cfg)
  rows = mesh_lib.process_rows(mesh, cfg.batch_size)  # this process feeds only these rows
  schedule = optim.lr_schedule(cfg, total)
  log.line(f"{cfg.dataset} {cfg.model} {cfg.compressor}@{cfg.density:g} on {n_dev} "
           f"{jax.devices()[0].platform} devices: {total} steps ({spe}/epoch), "
           f"batch {cfg.batch_size}, log dir {cfg.log_dir}")

  def evaluate(epoch: float) -> dict[str, Any]:
    result = steps.eval_step(state, eval_fn, ds, cfg.eval_batch_size)
    log.record({"kind": "eval", "step": state.step, "epoch": epoch, **result})
    log.line(f"eval step {state.step} epoch {epoch:g}: test accuracy "
             f"{100 * result['test_accuracy']:.2f}% loss {result['test_loss']:.4f}")
    return result

  last_eval: dict[str, Any] = {}
  last_stats: dict[str, Any] = {}
  compile_s = None
  text = ""
  t_mark, samples_since, paused = None, 0, 0.0  # paused: eval/checkpoint time, not training
  t_start = time.perf_counter()
  while state.step < end:
    step = state.step
    images, labels = mesh_lib.shard_batch(mesh, cfg.batch_size, *data_lib.train_batch(
        ds, step, cfg.batch_size, cfg.seed, do_augment, rows=rows))
    log_now = (step + 1) % cfg.log_every == 0 or step + 1 == end
    exact = None
    if log_now and probe_fn is not None:
      exact = probe_fn(state.params, state.batch_stats, state.opt_state, images, labels)
    t0 = time.perf_counter()
    state, metrics = steps.train_step(state, step_fn, images, labels)
    if compile_s is None:
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t0  # first step: compilation plus one step
      t_mark, samples_since = time.perf_counter(), 0  # rates exclude the compiling step
    else:
      samples_since += cfg.batch_size
    if log_now:
      metrics = jax.device_get(metrics)  # syncs: the interval below is honest wall time
      now = time.perf_counter()
      rate = samples_since / (now - t_mark - paused) if samples_since else None
      t_mark, samples_since, paused = now, 0, 0.0
      last_stats = diagnostics.compressor_stats(state.opt_state, leaf_group)
      thr = last_stats.pop("_threshold", None)
      rel_err = None
      if exact is not None and thr is not None:
        exact = np.asarray(exact, np.float64)
        if np.all(exact > 0) and thr.shape == exact.shape:
          rel_err = float(np.mean(np.abs(thr - exact) / exact))
      entry = {"kind": "train", "step": state.step, "epoch": state.step / spe,
               "loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
               "lr": float(schedule(step)),
               "samples_per_s": rate, **last_stats,
               "threshold_rel_err": rel_err, "threshold_leaf": leaf_path}
      log.record(entry)
      text = (f"step {state.step}/{total} loss {entry['loss']:.4f} acc "
              f"{100 * entry['accuracy']:.1f}% lr {entry['lr']:.4g}"
              + (f" {rate:.0f} samples/s" if rate else ""))
      if not log.tty:
        log.line(text)
    if log.tty:  # redrawn every step; the text changes at log steps (no extra host sync)
      log.progress(state.step, total, text)
    epoch_done = state.step % spe == 0
    if epoch_done and state.step < end:
      jax.block_until_ready(state.params)  # training up to here counts as training time
      t_pause = time.perf_counter()
      epoch = state.step // spe
      if epoch % cfg.eval_every == 0:
        last_eval = evaluate(epoch)
      if mngr:
        checkpoint.save(mngr, state.step, state.arrays())
      paused += time.perf_counter() - t_pause
  train_s = time.perf_counter() - t_start

  last_eval = evaluate(state.step / spe)
  if mngr and mngr.latest_step() != state.step:
    checkpoint.save(mngr, state.step, state.arrays())

  timing = None
  if cfg.profile and state.step == total:
    batch = mesh_lib.shard_batch(mesh, cfg.batch_size, *data_lib.train_batch(
        ds, 0, cfg.batch_size, cfg.seed, do_augment, rows=rows))
    timing = profile.time_breakdown(state, cfg, batch, step_fn, reps=cfg.profile_reps)
    log.write_json("timing.json", timing)
    log.line(profile.describe(timing))

  summary = {"step": state.step, "total_steps": total, "train_wall_s": train_s,
             "first_step_s": compile_s, "devices": n_dev, "log_dir": cfg.log_dir,
             **last_eval,
             **last_stats, "timing": timing}
  log.write_json("summary.json", summary)
  if "sent_bytes" in last_stats:
    ratio = last_stats["sent_bytes"] / max(1.0, last_stats["dense_bytes"])
    log.line(f"bytes per step per device: {_format_bytes(last_stats['sent_bytes'])} sent vs "
             f"{_format_bytes(last_stats['dense_bytes'])} dense ({ratio:.4f}x)")
  if "test_accuracy" in last_eval:
    log.line(f"final test accuracy {100 * last_eval['test_accuracy']:.2f}% after {state.step} "
             f"steps; training wall time {train_s:.1f} s")
  return summary
