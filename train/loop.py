"""`train_and_evaluate`: the whole run, from config to summary.json, for any task.

The task (`train/task.py`: image classification or language modelling, chosen by the
config's class in `train/tasks.py`) supplies data, model, optimizer, loss, evaluation and
the wording of the log; everything else here is shared: the mesh, the data-parallel step,
the log and its rates, the non-finite stop, checkpoints, resume and the time breakdown.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, TextIO

import hggjax
import jax
import numpy as np

from train import checkpoint
from train import diagnostics
from train import logs
from train import mesh as mesh_lib
from train import profile
from train import progress
from train import resume as resume_lib
from train import steps
from train import task as task_lib
from train import tasks
from train.config import Config, check_divisible
from train.errors import NonFiniteError, UsageError


def default_device_count() -> int:
  """All local devices (on a CPU-only host: the fake CPU devices the CLI configured)."""
  return jax.local_device_count()


def _format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


@dataclasses.dataclass
class _Run:
  """What the loop needs besides the state: sizes, files, and what is saved."""
  cfg: Config
  task: task_lib.Task
  log: logs.RunLog
  n_dev: int
  spe: int       # steps per epoch
  total: int     # steps of the whole run (the LR schedule's length)
  end: int       # where this call stops
  mngr: Any      # orbax CheckpointManager, or None with --no-checkpoint
  checkpoint_dir: str
  last_saved: int | None = None  # the newest checkpoint on disk that is known good


def train_and_evaluate(cfg: Config, *, argv: list[str] | None = None, resume: bool = False,
                       stop_after: int | None = None, dataset: Any = None,
                       stream: TextIO | None = None,
                       checkpoint_dir: str | None = None) -> dict[str, Any]:
  """Trains `cfg` and returns the summary (also written to <log_dir>/summary.json).

  Args:
    cfg: the resolved run configuration.
    argv: the command line, stored in argv.json.
    resume: continue the run in `cfg.log_dir` from its newest good checkpoint; `cfg` must
      be that run's config.json up to the fields `train.resume.CHANGEABLE` lists.
    stop_after: stop (and checkpoint) once this many steps are done, without changing
      the schedule; `None` trains to the end. Used to test resume.
    dataset: an already loaded dataset (`train.data.Dataset`) or corpus
      (`train.lm.data.TextCorpus`), as the task takes it; by default `cfg.dataset` is
      loaded.
    stream: where progress goes (default stdout).
    checkpoint_dir: where orbax keeps checkpoints (default <log_dir>/checkpoints). In a
      multi-process run every process passes the same directory: each writes its own
      shards there and process 0 the metadata.

  Raises:
    UsageError: a problem the user can fix, in one line.
    NonFiniteError: a non-finite loss or gradient with `on_nonfinite="stop"`; the run
      directory keeps the checkpoints from before it.
  """
  task = tasks.for_config(cfg, dataset)
  n_dev = cfg.devices or default_device_count()
  if n_dev > jax.device_count():
    raise UsageError(f"--devices {n_dev}: only {jax.device_count()} devices available")
  check_divisible(cfg, n_dev)
  spe = task.steps_per_epoch()
  total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
  if cfg.log_dir is None:
    cfg = dataclasses.replace(cfg, log_dir=logs.default_run_dir(cfg))
  changed = resume_lib.changes(cfg, cfg.log_dir) if resume else {}
  if not resume and logs.holds_run(cfg.log_dir):
    raise UsageError(f"{cfg.log_dir} already holds a run (config.json): pass --resume to "
                     "continue it, or use another --log-dir")
  created = not os.path.exists(cfg.log_dir)
  log = logs.RunLog(cfg.log_dir, stream)
  run = _Run(cfg, task, log, n_dev, spe, total,
             end=total if stop_after is None else min(total, stop_after), mngr=None,
             checkpoint_dir=checkpoint_dir or os.path.join(cfg.log_dir, "checkpoints"))
  try:
    try:
      state = _start(run, argv, resume, changed)
    except BaseException:
      if created:  # the run never started: leave nothing behind
        log.close()
        shutil.rmtree(cfg.log_dir, ignore_errors=True)
      raise
    return _train(run, state)
  finally:
    log.close()


def _start(run: _Run, argv, resume: bool, changed: dict) -> steps.TrainState:
  """The initial (or restored) state; writes the run's argv.json and config.json."""
  cfg, log = run.cfg, run.log
  mesh = mesh_lib.make_mesh(run.n_dev, cfg.hosts)
  state = steps.init_state(run.task, mesh, run.total)
  if cfg.checkpoint:
    run.mngr = checkpoint.manager(run.checkpoint_dir, cfg.keep_checkpoints)
  if not resume:
    log.write_run_info(argv or [], cfg)
    run.task.write_run_files(log)
    return state
  if run.mngr is None:
    raise UsageError(f"--resume: the run in {cfg.log_dir} keeps no checkpoints "
                     "(--no-checkpoint)")
  run.task.check_resume(cfg.log_dir)
  resharded: list[str] = []
  found = checkpoint.restore_latest(run.mngr, state.arrays(), log.line,
                                    adapt=_resharder(run, state, resharded))
  if found is None:
    raise UsageError(f"--resume: no usable checkpoint in {run.checkpoint_dir}")
  last, restored = found
  run.last_saved = last
  log.resume_at(last)
  if changed:
    log.write_json("config.json", dataclasses.asdict(cfg))
    log.line("resumed with " + ", ".join(f"{k} {old!r} -> {new!r}"
                                         for k, (old, new) in changed.items()))
  if resharded:
    log.line(resharded[-1])
  log.line(f"resumed from step {last}")
  return dataclasses.replace(state, step=last, **restored)


def _resharder(run: _Run, state: steps.TrainState, said: list[str]):
  """`checkpoint.restore`'s adapt: the per-device optimizer state of a checkpoint saved on
  another number of devices or hosts, folded or split for this mesh by
  `hggjax.reshard_state` (docs/training.md states the rule); what it did goes to `said`."""
  hosts = run.cfg.hosts
  devices = run.n_dev if hosts is None else (hosts, run.n_dev // hosts)

  def adapt(tree):
    old = sorted({np.shape(x)[0] for x, t in zip(jax.tree.leaves(tree["opt_state"]),
                                                 jax.tree.leaves(state.opt_state))
                  if np.shape(x) != np.shape(t)})
    mesh = f"{run.n_dev} devices" + (f" in {hosts} hosts" if hosts is not None else "")
    said.append(f"per-device optimizer state resharded from a device axis of "
                f"{' and '.join(map(str, old))} to {mesh} (hggjax.reshard_state)")
    return {**tree, "opt_state": hggjax.reshard_state(tree["opt_state"], devices)}

  return adapt


class _Watch:
  """The per-step non-finite flags since the last check, read only at checks (log steps
  and before checkpoints): the loop never waits on the device for them."""

  def __init__(self):
    self.pending: list[tuple[int, jax.Array]] = []
    self.unreported = 0  # non-finite steps not yet counted in a metrics.jsonl line

  def add(self, step: int, flag: jax.Array) -> None:
    self.pending.append((step, flag))

  def check(self) -> list[int]:
    """The steps (counted from 1) whose loss or gradient was non-finite, since the last
    check."""
    flags = jax.device_get([f for _, f in self.pending])
    bad = [step for (step, _), f in zip(self.pending, flags) if f]
    self.pending.clear()
    self.unreported += len(bad)
    return bad


def _train(run: _Run, state: steps.TrainState) -> dict[str, Any]:
  cfg, task, log, mesh = run.cfg, run.task, run.log, state.mesh
  step_fn = steps.make_train_step(state)
  eval_fn = steps.make_eval_step(state)
  leaf_index, leaf_group, leaf_path = diagnostics.largest_leaf(state.params, cfg.min_size,
                                                                 cfg.scope)
  probe_fn = None
  if cfg.compressor != "none":
    probe_fn = diagnostics.make_threshold_probe(state, leaf_index, cfg)
  rows = mesh_lib.process_rows(mesh, cfg.batch_size)  # this process feeds only these rows
  schedule = task.lr_schedule(run.total)
  # XLA:CPU runs the fake devices' collectives on a shared thread pool: with several steps
  # in flight their rendezvous can wait on each other for good ("only 2 of 4 arrived"),
  # so on the CPU each step waits for the previous one. Accelerators stay asynchronous.
  sync_each_step = jax.devices()[0].platform == "cpu"
  name = cfg.compressor if cfg.compressor == "none" else f"{cfg.compressor}@{cfg.density:g}"
  log.line(f"{cfg.dataset} {cfg.model} {name} on {run.n_dev} "
           f"{jax.devices()[0].platform} devices: {run.total} steps ({run.spe}/epoch), "
           f"{task.describe_batch()}, log dir {cfg.log_dir}")

  def evaluate(epoch: float) -> dict[str, Any]:
    result = steps.evaluate(state, eval_fn, task)
    log.record({"kind": "eval", "step": state.step, "epoch": epoch, **result})
    log.line(f"eval step {state.step} epoch {epoch:g}: {task.describe_eval(result)}")
    return result

  def train_entry(metrics, exact, lap) -> dict[str, Any]:
    nonlocal last_stats
    metrics = jax.device_get(metrics)
    last_stats = diagnostics.compressor_stats(state.opt_state, leaf_group)
    thr = last_stats.pop("_threshold", None)
    rel_err = None
    if exact is not None and thr is not None:
      exact = np.asarray(exact, np.float64)
      if np.all(exact > 0) and thr.shape == exact.shape:
        rel_err = float(np.mean(np.abs(thr - exact) / exact))
    entry = {"kind": "train", "step": state.step, "epoch": state.step / run.spe,
             # loss first, then the task's other metrics (accuracy, ...)
             **{k: float(metrics[k])
                for k in ["loss"] + sorted(set(metrics) - {"loss", "nonfinite"})},
             "lr": float(schedule(state.step - 1)), **lap,
             "nonfinite_steps": watch.unreported, **last_stats,
             "threshold_rel_err": rel_err, "threshold_leaf": leaf_path}
    entry.update(task.train_extras(entry))
    watch.unreported = 0
    log.record(entry)
    return entry

  def stop(bad: list[int], metrics) -> None:
    """Ends the run after a non-finite step: its line, summary.json, then the error."""
    if not log_now:
      train_entry(metrics, None, {"steps_per_s": None, "samples_per_s": None, "eta_s": None})
    where = f"at step {bad[0]}" + (f" (and {len(bad) - 1} later)" if len(bad) > 1 else "")
    kept = (f"the last good checkpoint is step {run.last_saved} in {run.checkpoint_dir}"
            if run.last_saved is not None else "no checkpoint was saved before it")
    message = (f"non-finite loss or gradient {where}: stopped at step {state.step}; {kept} "
               "(--on-nonfinite skip trains on instead)")
    log.write_json("summary.json", {"step": state.step, "total_steps": run.total,
                                    "devices": run.n_dev, "log_dir": cfg.log_dir,
                                    "stopped": message})
    raise NonFiniteError(message)

  def save() -> None:
    checkpoint.save(run.mngr, state.step, state.arrays())
    run.last_saved = state.step

  last_eval: dict[str, Any] = {}
  last_stats: dict[str, Any] = {}
  compile_s = None
  text = ""
  clock = progress.Clock(cfg.batch_size, run.end)
  watch = _Watch()
  metrics = None
  t_start = time.perf_counter()
  while state.step < run.end:
    step = state.step
    batch = mesh_lib.shard_batch(mesh, cfg.batch_size, *task.train_batch(step, rows))
    log_now = (step + 1) % cfg.log_every == 0 or step + 1 == run.end
    exact = None
    if log_now and probe_fn is not None:
      exact = probe_fn(state.params, state.batch_stats, state.opt_state, np.int32(step), batch)
    t0 = time.perf_counter()
    state, metrics = steps.train_step(state, step_fn, *batch)
    watch.add(state.step, metrics["nonfinite"])
    if compile_s is None:
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t0  # first step: compilation plus one step
      clock.started(state.step)  # rates exclude the compiling step
    else:
      if sync_each_step:
        jax.block_until_ready(metrics["loss"])
      clock.stepped()
    if log_now:
      jax.block_until_ready(metrics)  # the interval below is honest wall time
      lap = clock.lap(state.step)
      bad = watch.check()
      entry = train_entry(metrics, exact, lap)
      if bad and cfg.on_nonfinite == "stop":
        stop(bad, metrics)
      skipped = f" ({entry['nonfinite_steps']} non-finite steps skipped)" if bad else ""
      text = (f"step {state.step}/{run.total} {task.describe_train(entry)} lr "
              f"{entry['lr']:.4g}{skipped}; " + progress.describe(entry)).rstrip("; ")
      if not log.tty:
        log.line(text)
    if log.tty:  # redrawn every step; the text changes at log steps (no extra host sync)
      log.progress(state.step, run.total, text)
    pause, eval_now = task.pause_at(state.step, run.spe)
    if pause and state.step < run.end:
      jax.block_until_ready(state.params)  # training up to here counts as training time
      t_pause = time.perf_counter()
      bad = watch.check()  # never checkpoint a state that followed a non-finite step
      if bad and cfg.on_nonfinite == "stop":
        stop(bad, metrics)
      if eval_now:
        whole = state.step % run.spe == 0
        last_eval = evaluate(state.step // run.spe if whole else state.step / run.spe)
      if run.mngr:
        save()
      clock.pause(time.perf_counter() - t_pause)
  train_s = time.perf_counter() - t_start

  log_now = True  # the last step logged its line: stop() adds none
  bad = watch.check()
  if bad and cfg.on_nonfinite == "stop":
    stop(bad, metrics)
  last_eval = evaluate(state.step / run.spe)
  if run.mngr and run.mngr.latest_step() != state.step:
    save()

  timing = None
  if state.step == run.total and cfg.profile is not False:
    timing = _profile(run, state, step_fn, rows, compile_s, clock.per_step_s(), train_s)

  summary = {"step": state.step, "total_steps": run.total, "train_wall_s": train_s,
             "first_step_s": compile_s, "devices": run.n_dev, "log_dir": cfg.log_dir,
             **last_eval, **last_stats, **task.summary_extras(), "timing": timing}
  if "run_sent_bytes" in last_stats and state.step:
    # The run's mean per step: every step's own bytes (a density warm-up's larger ones
    # included) and a shared second moment's dense refreshes, spread over the run.
    last_stats = {**last_stats, "sent_bytes": (last_stats["run_sent_bytes"]
                  + last_stats.get("refresh_bytes", 0.0)) / state.step}
    summary["mean_sent_bytes"] = last_stats["sent_bytes"]
  log.write_json("summary.json", summary)
  if "sent_bytes" in last_stats:
    ratio = last_stats["sent_bytes"] / max(1.0, last_stats["dense_bytes"])
    log.line(f"bytes per step per device: {_format_bytes(last_stats['sent_bytes'])} sent vs "
             f"{_format_bytes(last_stats['dense_bytes'])} dense ({ratio:.4f}x)")
  final = task.describe_final(last_eval, state.step, train_s)
  if final:
    log.line(final)
  return summary


def _profile(run: _Run, state, step_fn, rows, compile_s, per_step_s, train_s):
  """The time breakdown (timing.json): with --profile, or by default when it is cheap
  (`profile.wanted`)."""
  cfg = run.cfg
  if cfg.profile is None:
    if compile_s is None:  # resumed at the end: nothing was trained to compare it with
      return None
    cheap, estimate = profile.wanted(compile_s, per_step_s or compile_s, cfg.profile_reps,
                                     train_s)
    if not cheap:
      run.log.line(f"time breakdown skipped: it would take about {logs.duration(estimate)} "
                   f"after {logs.duration(train_s)} of training (--profile runs it anyway)")
      return None
  batch = mesh_lib.shard_batch(state.mesh, cfg.batch_size, *run.task.train_batch(0, rows))
  timing = profile.time_breakdown(state, cfg, batch, step_fn, reps=cfg.profile_reps)
  run.log.write_json("timing.json", timing)
  run.log.line(profile.describe(timing))
  return timing
