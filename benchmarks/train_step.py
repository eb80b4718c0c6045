"""A ResNet-18 train step on one device: dense SGD vs the same step with a compressor.

    python -m benchmarks.train_step                          # ResNet-18, CIFAR shapes
    python -m benchmarks.train_step --model cnn --batch 64   # the small CNN (quick, CPU)

One device and no axis, so it measures what the compressor itself adds to a step
(selection, error feedback, the densified update), not a network. Synthetic CIFAR-
shaped data; Flax's ResNet-18 from `train.models` (BatchNorm statistics kept local).
Each step is ``jax.jit`` of forward + backward + ``tx.update`` + apply, with params,
batch statistics and optimizer state donated, as the harness runs it. Rows: dense
``optax.sgd(lr, momentum=0.9)`` and, per compressor, ``optax.chain(compressor(density,
momentum=0.9), optax.sgd(lr))`` (momentum correction, the harness's default); steps
alternate between them so load drifts hit all alike; each row is the median of
``--steps`` timed steps after two warm-up steps. Prints a table, writes JSON.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import hggjax
from benchmarks.wire_study import WIRES, add_wire_flag
from train import models


def _args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.train_step")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image", default="32,32,3", help="image shape H,W,C")
  p.add_argument("--methods", default="hggtopk", help="compressors besides dense")
  p.add_argument("--density", type=float, default=0.01)
  add_wire_flag(p)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default="benchmarks/results/train_step.json")
  return p.parse_args(argv)


def make_step(graphdef, tx):
  """jit(step): forward + backward + tx.update + apply, state donated."""

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    model.train()
    logits = model(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, nnx.state(model, nnx.BatchStat)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, images, labels):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


def run(args) -> dict:
  shape = tuple(int(s) for s in args.image.split(","))
  model = models.create_model(args.model, num_classes=10, image_shape=shape, axis_name=None,
                              seed=0)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  key = jax.random.PRNGKey(0)
  images = jax.random.normal(key, (args.batch,) + shape, jnp.float32)
  labels = jax.random.randint(key, (args.batch,), 0, 10)
  txs = {"dense": optax.sgd(0.1, momentum=0.9)}
  for name in args.methods.split(","):
    txs[f"{name}@{args.density:g}"] = optax.chain(
        hggjax.get_compressor(name, density=args.density, momentum=0.9, **WIRES[args.wire]),
        optax.sgd(0.1))
  live = {}
  for name, tx in txs.items():
    step = make_step(graphdef, tx)
    state = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, batch_stats)]
    state.append(tx.init(state[0]))
    for _ in range(2):  # compile, then one warm step
      *state, loss = step(*state, images, labels)
      jax.block_until_ready(loss)
    live[name] = (step, state)
  times = {name: [] for name in txs}
  for _ in range(args.steps):
    for name, (step, state) in live.items():
      start = time.perf_counter()
      *state, loss = step(*state, images, labels)
      jax.block_until_ready((state, loss))
      times[name].append(time.perf_counter() - start)
      live[name] = (step, state)
  rows = [dict(method=name, step_ms=1e3 * statistics.median(t)) for name, t in times.items()]
  dense = rows[0]["step_ms"]
  for r in rows:
    r["x_dense"] = r["step_ms"] / dense
  return dict(model=args.model, params=n_params, batch=args.batch, image=shape, rows=rows)


def main(argv=None):
  args = _args(argv)
  start = time.perf_counter()
  result = run(args)
  device = jax.devices()[0]
  result["machine"] = dict(platform=device.platform, device=device.device_kind,
                           jax=jax.__version__, python=platform.python_version(),
                           wall_s=time.perf_counter() - start)
  print(f"{result['model']} ({result['params']:,} parameters), batch {result['batch']}, "
        f"{device.device_kind}:")
  for r in result["rows"]:
    print(f"  {r['method']:>14}  {r['step_ms']:8.2f} ms  {r['x_dense']:5.2f}x dense")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
