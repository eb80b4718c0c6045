"""What a train step pays for compression: the whole jitted ``tx.update``, next to its selector.

    python -m benchmarks.update                                  # the default rows (~10 min on 2 cores)
    python -m benchmarks.update --sizes 1e6,1e7,2.5e7 --densities 0.01,0.05 \\
        --methods hggtopk,topk --momentum 0,0.9 --axis none,shard_map --pytree resnet18
    python -m benchmarks.update --render benchmarks/results/update_cpu_hggtopk.json

Per row (a compressor on one float32 leaf of n elements, or on the ResNet-18 CIFAR
parameter shapes, at one density, momentum and axis):

- ``update``: ``jax.jit(tx.update)`` with the state donated, as a train step runs it
  (``--no-donate``: as a loop that does not donate it runs it, a fresh state each call);
  the updates it returns are a fresh buffer (the dense output every optax transform
  writes).
- ``in_step``: the same update followed by ``optax.apply_updates`` into donated
  parameters: a train step without the gradient computation. ``apply`` is that
  step with the gradient applied directly (no compressor), so ``in_step - apply``
  is what compression adds to a step.
- ``selector``: the selection kernel alone on the accumulated vector (one leaf);
  ``lax.top_k`` of |x|; ``floor``: one pass, ``jnp.max(jnp.abs(x))``.
- the breakdown (``--breakdown``, one leaf, no axis): the update's steps each jitted
  on its own, in order: finite check, accumulate, select, payload, exchange (the
  densified mean), keep (the residual write), statistics. Their sum next to the whole.
- memory: ``compiled.memory_analysis()`` of the update: temporaries (``temp_MB``,
  every branch included, also those that rarely run) and that as n-sized float32
  buffers beyond the state and its output; ``faults``: the 4 KiB pages the kernel
  mapped in per update call (``getrusage`` minor faults), in n-sized float32 buffers.
- ``--malloc``: ``reuse`` (default) keeps freed host memory in the process as the
  training harness does (``hggjax.cpu_host.reuse_freed_memory``); ``system`` leaves
  glibc's defaults, which return blocks of 32 MB and more to the kernel after each call.

Every time is the median of ``--reps`` calls, the compared functions interleaved
call by call so that load on a shared machine hits them alike; each call ends in
``block_until_ready``. ``shard_map`` rows run over ``--devices`` devices (fake CPU
devices here: they share the machine's cores, so compare their ratio to the
one-device row with the core count in mind). Prints a table and writes JSON.
"""

import argparse
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time

from benchmarks.wire_study import WIRES
from hggjax import cpu_host

ARGS = None  # parsed before JAX starts: the fake CPU device count must come first


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1e7,2.5e7", help="leaf sizes n")
  p.add_argument("--densities", default="0.01")
  p.add_argument("--methods", default="all", help="compressor names, comma-separated, or all")
  p.add_argument("--momentum", default="0", help="momentum values, e.g. 0,0.9")
  p.add_argument("--axis", default="none", help="none, shard_map, or both comma-separated")
  p.add_argument("--pytree", default="", help="resnet18: also the ResNet-18 CIFAR parameter shapes")
  p.add_argument("--pipeline", action="store_true", help="add hggtopk(pipeline=True) rows")
  p.add_argument("--wire", default="int32", help="wire formats, comma-separated: "
                 + ", ".join(WIRES) + " (compressors' value_dtype/scale_group/index_coding)")
  p.add_argument("--breakdown", default="hggtopk", help="methods whose update is timed step by step")
  p.add_argument("--devices", type=int, default=4, help="devices of the shard_map rows")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--topk-reps", type=int, default=3, help="timed lax.top_k calls")
  p.add_argument("--out", default="benchmarks/results/update.json")
  p.add_argument("--render", metavar="JSON", help="print the table of a saved run and exit")
  p.add_argument("--donate", action=argparse.BooleanOptionalAction, default=True,
                 help="donate the state (and parameters) to the jitted update and step, "
                 "as the training harness does; --no-donate: a plain jax.jit")
  p.add_argument("--malloc", choices=("reuse", "system"), default="reuse",
                 help="reuse: keep freed host memory for the next call, as the training "
                 "harness does (hggjax.cpu_host.reuse_freed_memory); system: glibc's defaults")
  return p.parse_args(argv)


def _setup_jax(devices: int):
  import jax  # pylint: disable=import-outside-toplevel
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_num_cpu_devices", max(devices, 1))
  return jax


def _median_ms(times):
  return 1e3 * statistics.median(times)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(pieces: dict, reps: int, faults: dict | None = None) -> dict:
  """Median ms per piece; `pieces` maps name -> (fn, args, feed) where feed(args, out)
  gives the next call's args (for donated state) or None to reuse them. `faults`, when
  given, receives each piece's mean page faults per call (memory the kernel maps in)."""
  import jax  # pylint: disable=import-outside-toplevel
  live = {}
  counted = {name: 0 for name in pieces}
  for name, (fn, args, feed) in pieces.items():  # compile and warm up
    out = jax.block_until_ready(fn(*args))
    live[name] = feed(args, out) if feed else args
  times = {name: [] for name in pieces}
  for _ in range(reps):
    for name, (fn, _, feed) in pieces.items():
      args = live[name]
      before, start = _minor_faults(), time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
      counted[name] += _minor_faults() - before
      live[name] = feed(args, out) if feed else args
  if faults is not None:
    faults.update({name: c / reps for name, c in counted.items()})
  return {name: _median_ms(t) for name, t in times.items()}


def resnet18_shapes():
  """The ResNet-18 CIFAR-10 parameter shapes (train.models, no arrays allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from train import models  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: models.create_model(
      "resnet18", num_classes=10, image_shape=(32, 32, 3), axis_name=None, seed=0))
  params = nnx.state(abstract, nnx.Param)
  return [tuple(x.shape) for x in jax.tree.leaves(params)]


def run(args):
  jax = _setup_jax(args.devices if "shard_map" in args.axis else 1)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import hggjax  # pylint: disable=import-outside-toplevel
  from hggjax import error_feedback as ef  # pylint: disable=import-outside-toplevel
  from hggjax import exchange, selectors, transform  # pylint: disable=import-outside-toplevel

  names = sorted(hggjax.compressors) if args.methods == "all" else args.methods.split(",")
  variants = [(m, False) for m in names] + ([("hggtopk", True)] if args.pipeline else [])
  momenta = [float(m) for m in args.momentum.split(",")]
  wires = args.wire.split(",")
  axes = args.axis.split(",")
  shapes = [((int(float(s)),), f"{float(s):.2g}") for s in args.sizes.split(",")]
  if args.pytree == "resnet18":
    shapes.append((resnet18_shapes(), "resnet18"))
  devices = min(args.devices, jax.device_count())
  rows = []
  sharded = {}  # (method, pipeline, density, momentum) -> {wire: update ms}

  def grads_of(layout, seed):
    leaves = layout if isinstance(layout[0], tuple) else [layout]
    key = jax.random.PRNGKey(seed)
    return {f"l{i:02d}": jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)
            for i, s in enumerate(leaves)}

  def build(name, pipeline, density, momentum, axis_name, wire="int32"):
    kwargs = {"momentum": momentum, "axis_name": axis_name}
    if name != "none":
      kwargs.update(density=density, **WIRES[wire])
    if pipeline:
      kwargs["pipeline"] = True
    return hggjax.get_compressor(name, **kwargs)

  for layout, label in shapes:
    gs = [grads_of(layout, s) for s in range(3)]
    n_total = sum(x.size for x in gs[0].values())
    one_leaf = len(gs[0]) == 1
    for density in [float(d) for d in args.densities.split(",")]:
      base = dict(shape=label, n=n_total, density=density)
      # References on the first leaf (one leaf) or the largest (pytree).
      x = max(gs[0].values(), key=lambda v: v.size).ravel()
      k = max(1, round(density * x.size))
      refs = interleaved({
          "floor": (jax.jit(lambda v: jnp.max(jnp.abs(v))), (x,), None),
      }, args.reps)
      refs.update(interleaved({
          "lax.top_k": (jax.jit(lambda v: jax.lax.top_k(jnp.abs(v), k)[1]), (x,), None),
      }, args.topk_reps))
      rows.append(dict(base, method="(references)", floor_ms=refs["floor"],
                       topk_ms=refs["lax.top_k"], k=k))
      print(_format(rows[-1]), flush=True)
      for (name, pipeline), wire in itertools.product(variants, wires):
        if name == "none" and wire != wires[0]:
          continue  # a dense mean has no wire format
        for momentum in momenta:
          for axis in axes:
            if axis == "shard_map" and devices < 2:
              continue
            method = name + ("+pipeline" if pipeline else "") + (
                "" if wire == "int32" or name == "none" else f"+{wire}")
            row = dict(base, method=method, momentum=momentum, wire=wire,
                       axis=axis, devices=devices if axis == "shard_map" else 1, k=k,
                       floor_ms=refs["floor"], topk_ms=refs["lax.top_k"])
            if axis == "none":
              row.update(_time_local(jax, jnp, optax,
                                     build(name, pipeline, density, momentum, None, wire),
                                     gs, args.reps, args.donate))
              if one_leaf and name != "none":
                sel = _selector_for(selectors, name, pipeline)
                row["selector_ms"] = _time_selector(jax, jnp, sel, hggjax, build(
                    name, pipeline, density, momentum, None), gs, k, args.reps)
              if (one_leaf and name != "none" and name in args.breakdown.split(",")
                  and not pipeline and momentum == 0):
                row["breakdown"] = _breakdown(jax, jnp, ef, exchange, transform,
                                              build(name, False, density, 0.0, None),
                                              _selector_for(selectors, name, False), gs, args.reps)
            else:
              # Every wire of one method timed interleaved in one call: the shard_map
              # rows' ratios move by tens of percent between calls on a busy machine.
              group = (name, pipeline, density, momentum)
              if group not in sharded:
                txs = {w: build(name, pipeline, density, momentum, "data", w) for w in
                       (wires[:1] if name == "none" else wires)}
                sharded[group] = _time_sharded(jax, jnp, P, NamedSharding, hggjax, txs,
                                               gs, devices, args.reps, args.donate)
              row.update(update_ms=sharded[group][wire])
            rows.append(row)
            print(_format(row), flush=True)
  return rows


def _selector_for(selectors, name, pipeline):
  if pipeline:
    return selectors.hgg_topk_pipelined()
  return {
      "topk": selectors.exact_topk, "topk2": selectors.exact_topk,
      "gaussian": selectors.gaussian, "gaussian2": selectors.gaussian,
      "randomk": selectors.random_k, "randomkec": selectors.random_k,
      "dgcsampling": selectors.dgc_sampling, "redsync": selectors.redsync,
      "redsynctrim": selectors.redsync_trim, "hggtopk": selectors.hgg_topk,
  }[name]()


def _time_local(jax, jnp, optax, tx, gs, reps, donate=True):
  """update / in_step / apply medians and the compiled update's memory."""
  params = jax.tree.map(jnp.zeros_like, gs[0])
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s)[::-1], donate_argnums=(1,) if donate else ())

  def step(p, s, g):
    u, s = tx.update(g, s)
    return optax.apply_updates(p, u), s

  in_step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  apply = jax.jit(lambda p, g: optax.apply_updates(p, g), donate_argnums=(0,) if donate else ())
  compiled = update.lower(gs[0], state).compile()
  memory = compiled.memory_analysis()
  counter = {"i": 0}

  def next_g():
    counter["i"] += 1
    return gs[counter["i"] % len(gs)]

  faults = {}
  t = interleaved({
      "update": (update, (gs[0], tx.init(params)), lambda a, o: (next_g(), o[0])),
      "in_step": (in_step, (jax.tree.map(jnp.copy, params), tx.init(params), gs[1]),
                  lambda a, o: (o[0], o[1], next_g())),
      "apply": (apply, (jax.tree.map(jnp.copy, params), gs[2]), lambda a, o: (o, next_g())),
  }, reps, faults)
  n = sum(x.size for x in gs[0].values())
  return dict(update_ms=t["update"], in_step_ms=t["in_step"], apply_ms=t["apply"],
              temp_MB=memory.temp_size_in_bytes / 1e6,
              temp_buffers=memory.temp_size_in_bytes / (4 * n),
              # pages of 4 KiB the kernel mapped in per update call, in float32[n] buffers
              fault_buffers=faults["update"] * 4096 / (4 * n))


def _time_selector(jax, jnp, selector, hggjax, tx, gs, k, reps):
  """The selector alone on the vector the update selects from (warm carry)."""
  state = tx.init(gs[0])
  _, state = jax.jit(tx.update)(gs[0], state)
  acc = hggjax.accumulated(gs[1], state)
  x = next(iter(acc.values())).ravel()
  carry = jax.tree.map(lambda c: c[0], state.carry) if state.carry != () else ()
  fn = jax.jit(lambda v, c: selector.select(v, k, c, jax.random.PRNGKey(0))[0])
  return interleaved({"selector": (fn, (x, carry), None)}, reps)["selector"]


def _breakdown(jax, jnp, ef, exchange, transform, tx, sel_fn, gs, reps):
  """The update's steps on one leaf, each jitted alone, in the update's order
  (`sel_fn` is the selector `tx` was built with)."""
  params = gs[0]
  (_, g), = gs[1].items()
  state = tx.init(params)
  _, state = jax.jit(tx.update)(gs[0], state)  # a warm carry
  n = g.size
  k = int(state.stats.k)
  ok = jnp.bool_(True)
  finite = jax.jit(lambda g: ef.all_finite([g]))
  accumulate = jax.jit(lambda g, r: ef.accumulate([g], [(0,)], (r,), (r,), True, ok)[1],
                       donate_argnums=(1,))
  ids, keys = jnp.asarray([0]), jax.random.PRNGKey(0)[None]
  select = jax.jit(lambda x, c: transform.select_rows(sel_fn, x, k, c, ids, keys, ok))
  payload = jax.jit(lambda x, i: transform.make_payload(x, i, ok, jnp.float32, [(0,)], [g]))
  mean = jax.jit(lambda p: exchange.sparse_mean(p, n, None))
  keep = jax.jit(lambda kept, p, t: ef.keep(kept.ravel()[None], kept, p.indices, p.values, t),
                 donate_argnums=(0,))
  acc = accumulate(g, state.residual[0] + 0)
  x = acc.ravel()[None]
  sel, _ = select(x, state.carry)
  pay = payload(x, sel.indices)
  record = jax.jit(lambda s, sel, p: transform._record(  # pylint: disable=protected-access
      s, ids, sel, p, ok, n, exchange.traffic("allgather", 1, 1, k, n, 4)))
  t = interleaved({
      "finite": (finite, (g,), None),
      "accumulate": (accumulate, (g, state.residual[0] + 0), lambda a, o: (a[0], o)),
      "select": (select, (x, state.carry), None),
      "payload": (payload, (x, sel.indices), None),
      "exchange": (mean, (pay,), None),
      "keep": (keep, (acc + 0, pay, sel.threshold), lambda a, o: (o, a[1], a[2])),
      "statistics": (record, (state.stats, sel, pay), None),
  }, reps)
  t["sum"] = sum(t.values())
  return t


def _time_sharded(jax, jnp, P, NamedSharding, hggjax, txs, gs, devices, reps, donate=True):
  """{name: median update ms} of each transformation in `txs` under shard_map, interleaved."""
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  params = jax.tree.map(jnp.zeros_like, gs[0])
  sharding = NamedSharding(mesh, P("data"))
  stacked = [jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * devices), g), sharding)
             for g in gs]
  pieces = {}
  for name, tx in txs.items():
    state = hggjax.shard_state(tx.init(params), mesh, "data")
    specs = hggjax.state_specs(state, "data")

    @functools.partial(jax.jit, donate_argnums=(1,) if donate else ())
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), specs),
                       out_specs=(specs, P()))
    def update(g, s, tx=tx):
      u, s = tx.update(jax.tree.map(lambda v: v[0], g), s)
      return s, u

    counter = {"i": 0}

    def feed(a, o, counter=counter):
      counter["i"] += 1
      return stacked[counter["i"] % len(stacked)], o[0]

    pieces[name] = (update, (stacked[0], state), feed)
  return interleaved(pieces, reps)


HEADER = (f"{'shape':>9} {'dens':>5} {'method':>18} {'mom':>4} {'axis':>9} {'update':>8} "
          f"{'in step':>8} {'apply':>7} {'selector':>9} {'x floor':>7} {'x top_k':>7} {'temp':>6} "
          f"{'faults':>6}")


def _format(r) -> str:
  if r["method"] == "(references)":
    return (f"{r['shape']:>9} {r['density']:>5.2f} {'one pass / top_k':>18} "
            f"{'':>4} {'':>9} {r['floor_ms']:>8.2f} {'':>8} {'':>7} {'':>9} {'':>7} "
            f"{r['topk_ms']:>7.1f}")
  sel = f"{r['selector_ms']:>9.2f}" if "selector_ms" in r else f"{'':>9}"
  in_step = f"{r['in_step_ms']:>8.2f}" if "in_step_ms" in r else f"{'':>8}"
  apply = f"{r['apply_ms']:>7.2f}" if "apply_ms" in r else f"{'':>7}"
  temp = f"{r['temp_buffers']:>6.2f}" if "temp_buffers" in r else f"{'':>6}"
  temp += f" {r['fault_buffers']:>6.2f}" if "fault_buffers" in r else ""
  s = (f"{r['shape']:>9} {r['density']:>5.2f} {r['method']:>18} {r['momentum']:>4.1f} "
       f"{r['axis']:>9} {r['update_ms']:>8.2f} {in_step} {apply} {sel} "
       f"{r['update_ms'] / r['floor_ms']:>7.1f} {r['topk_ms'] / r['update_ms']:>7.1f} {temp}")
  if "breakdown" in r:
    s += "\n" + " " * 10 + "breakdown ms: " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["breakdown"].items())
  return s


def table(rows) -> str:
  return "\n".join([HEADER] + [_format(r) for r in rows])


def wire_ratios(rows) -> list[str]:
  """One line per row of a format other than the first: its update time over the same
  method's (shape, density, momentum, axis) row in the first format of the run."""
  timed = [r for r in rows if "wire" in r]
  first = timed[0]["wire"] if timed else None
  base = {(r["shape"], r["density"], r["method"], r["momentum"], r["axis"]): r["update_ms"]
          for r in timed if r["wire"] == first}
  lines = []
  for r in timed:
    plain = r["method"].removesuffix("+" + r["wire"])
    ref = base.get((r["shape"], r["density"], plain, r["momentum"], r["axis"]))
    if r["wire"] != first and ref:
      lines.append(f"{r['shape']:>9} {r['density']:>5.2f} {r['method']:>22} {r['axis']:>9}: "
                   f"{r['update_ms'] / ref:.2f}x the {first} row")
  return lines


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return dict(platform=device.platform, device=device.device_kind, devices=jax.device_count(),
              jax=jax.__version__, python=platform.python_version(),
              cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
              load_average=list(os.getloadavg()))


def main(argv=None):
  args = _parse(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    print(json.dumps(saved["machine"]))
    print(table(saved["rows"]))
    return 0
  unknown = [w for w in args.wire.split(",") if w not in WIRES]
  if unknown:
    print(f"error: unknown wire format(s) {', '.join(unknown)}; choose from {', '.join(WIRES)}",
          file=sys.stderr)
    return 2
  start = time.perf_counter()
  reused = args.malloc == "reuse" and cpu_host.reuse_freed_memory()  # before JAX starts
  rows = run(args)
  info = machine()
  info["malloc"] = "reuse" if reused else "system"
  info["donate"] = args.donate
  info["wall_s"] = time.perf_counter() - start
  print()
  print(table(rows))
  ratios = wire_ratios(rows)
  if ratios:
    print("\nupdate time against the first --wire format:")
    print("\n".join(ratios))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(machine=info, args=vars(args), rows=rows), f, indent=1)
  print(f"\nwrote {args.out} ({info['wall_s']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
