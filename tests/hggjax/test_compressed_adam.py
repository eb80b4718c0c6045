"""`hggjax.adamw`: AdamW around a compressor, each mechanism against an exact reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hggjax
from hggjax import compressed_adam
from tests.conftest import NUM_DEVICES
from tests.hggjax import helpers

SHAPES = {"b": (16,), "w": (24, 16)}
LR, WD = 1e-2, 0.1


def _mesh():
  return jax.make_mesh((NUM_DEVICES,), ("data",), devices=jax.devices()[:NUM_DEVICES])


def _params():
  return {k: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s)
          for k, s in SHAPES.items()}


def _device_grads(t: int) -> list[dict]:
  return [helpers.gradients(100 * t + d, shapes=SHAPES) for d in range(NUM_DEVICES)]


def _sharded_step(tx):
  """The step under shard_map: this device's gradients (its slice of the stacked ones)
  -> (mean updates, state)."""
  def step(grads, state, params):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state, params)
  return step


def _run_sharded(tx, steps: int, grads_of=_device_grads, *, state=None, first: int = 0):
  """(updates of steps first .. first + steps - 1, the state after them) on 4 devices,
  from `state` (default: tx.init's, sharded)."""
  mesh = _mesh()
  params = _params()
  if state is None:
    state = hggjax.shard_state(tx.init(params), mesh, "data")
  specs = hggjax.state_specs(state, "data")
  step = jax.jit(jax.shard_map(_sharded_step(tx), mesh=mesh,
                               in_specs=(P("data"), specs, P()), out_specs=(P(), specs)))
  outs = []
  for t in range(first, first + steps):
    per = grads_of(t)
    stacked = {k: np.stack([g[k] for g in per]) for k in SHAPES}
    u, state = step(jax.device_put(stacked, NamedSharding(mesh, P("data"))), state, params)
    outs.append(jax.tree.map(np.asarray, u))
  return outs, state


def test_no_compression_is_optax_adamw_on_the_mean_gradient():
  tx = hggjax.adamw(LR, compressor="none", axis_name="data", weight_decay=WD)
  ref = optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=WD)
  outs, _ = _run_sharded(tx, 4)
  params, ref_state = _params(), ref.init(_params())
  for t, out in enumerate(outs):
    mean = {k: np.mean([g[k] for g in _device_grads(t)], axis=0) for k in SHAPES}
    want, ref_state = ref.update(mean, ref_state, params)
    for k in SHAPES:
      np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=1e-8)


def _adam_reference(per_device_grads, b1=0.9, b2=0.95, eps=1e-8):
  """Per device: numpy Adam moments over the steps given; yields (mu_hat, nu_hat) lists."""
  mu = [{k: np.zeros(s, np.float64) for k, s in SHAPES.items()} for _ in range(NUM_DEVICES)]
  nu = [{k: np.zeros(s, np.float64) for k, s in SHAPES.items()} for _ in range(NUM_DEVICES)]
  for t, per in enumerate(per_device_grads, start=1):
    for d in range(NUM_DEVICES):
      for k in SHAPES:
        mu[d][k] = b1 * mu[d][k] + (1 - b1) * per[d][k]
        nu[d][k] = b2 * nu[d][k] + (1 - b2) * per[d][k] ** 2
    yield ([{k: m[k] / (1 - b1 ** t) for k in SHAPES} for m in mu],
           [{k: v[k] / (1 - b2 ** t) for k in SHAPES} for v in nu])


def test_density_one_local_is_the_mean_of_each_devices_adamw_step():
  """Nothing left behind: the mean over devices of lr * m_d / (sqrt(v_d) + eps), then the
  decoupled decay. (Not optax.adamw on the mean: Adam is not linear in the gradient.)"""
  tx = hggjax.adamw(LR, compressor="topk", density=1.0, axis_name="data", weight_decay=WD,
                    **helpers.EXACT_WIRE)
  outs, _ = _run_sharded(tx, 4)
  params = _params()
  moments = _adam_reference([_device_grads(t) for t in range(4)])
  for out, (mu, nu) in zip(outs, moments):
    for k in SHAPES:
      steps = [-LR * mu[d][k] / (np.sqrt(nu[d][k]) + 1e-8) for d in range(NUM_DEVICES)]
      np.testing.assert_allclose(out[k], np.mean(steps, axis=0) - LR * WD * params[k],
                                 rtol=2e-5, atol=1e-8)


def test_density_one_shared_is_adam_of_the_mean_momentum_under_the_mean_second_moment():
  """Refreshed every step, the shared second moment is the devices' mean v: the update is
  lr * mean(m_d) / (sqrt(mean(v_d)) + eps), the same on every device (linear in g)."""
  tx = hggjax.adamw(LR, compressor="topk", density=1.0, axis_name="data",
                    second_moment="shared", refresh_every=1, **helpers.EXACT_WIRE)
  outs, state = _run_sharded(tx, 4)
  moments = _adam_reference([_device_grads(t) for t in range(4)])
  for out, (mu, nu) in zip(outs, moments):
    for k in SHAPES:
      m = np.mean([mu[d][k] for d in range(NUM_DEVICES)], axis=0)
      v = np.mean([nu[d][k] for d in range(NUM_DEVICES)], axis=0)
      np.testing.assert_allclose(out[k], -LR * m / (np.sqrt(v) + 1e-8), rtol=2e-5, atol=1e-8)
  assert np.all(np.asarray(hggjax.stats(state)["refresh_bytes"]) == 4 * 4 * (16 + 24 * 16))


def test_refresh_schedule_doubles_then_is_periodic_and_freezes():
  def steps(every, freeze=None, n=40):
    return [c + 1 for c in range(n)
            if bool(compressed_adam._refresh_now(jnp.int32(c), every, freeze))]
  assert steps(8) == [1, 2, 4, 8, 16, 24, 32, 40]
  assert steps(8, freeze=20) == [1, 2, 4, 8, 16]
  assert steps(1, n=5) == [1, 2, 3, 4, 5]


def test_shared_second_moment_is_frozen_between_refreshes():
  """Between refreshes the step is lr * mean(m_d) / (sqrt(v_at_refresh) + eps)."""
  tx = hggjax.adamw(LR, compressor="topk", density=1.0, axis_name="data",
                    second_moment="shared", refresh_every=2,  # refreshes after 1, 2, 4
                    **helpers.EXACT_WIRE)
  outs, _ = _run_sharded(tx, 3)
  moments = list(_adam_reference([_device_grads(t) for t in range(3)]))
  frozen = moments[1][1]  # refreshed after step 2, used again at step 3
  mu = moments[2][0]
  for k in SHAPES:
    m = np.mean([mu[d][k] for d in range(NUM_DEVICES)], axis=0)
    v = np.mean([frozen[d][k] for d in range(NUM_DEVICES)], axis=0)  # bias-corrected at 2
    np.testing.assert_allclose(outs[2][k], -LR * m / (np.sqrt(v) + 1e-8), rtol=2e-5, atol=1e-8)


def _local_chain_identity(parts, grads, decay=1.0, lowpass=1.0):
  """Runs `parts` without an axis and checks the compressor's error feedback exactly:
  acc = what it received + decay * residual; with lowpass 1, acc == what it sent + the
  new residual, bit for bit; below, the new residual is (1 - lowpass) x the old one +
  lowpass x (acc - sent) (to float32 rounding: XLA may fuse the multiply-add)."""
  before = optax.chain(*parts.before) if parts.before else optax.identity()
  params = _params()
  b_state, c_state = before.init(params), parts.compressor.init(params)
  for g in grads:
    x, b_state = before.update(g, b_state, params)
    acc = hggjax.accumulated(x, c_state, residual_decay=decay)
    old = c_state.residual
    sent, c_state = parts.compressor.update(x, c_state, params)
    residual = c_state.residual
    for i, k in enumerate(sorted(SHAPES)):
      kept = np.asarray(acc[k]) - np.asarray(sent[k])
      if lowpass == 1.0:
        np.testing.assert_array_equal(np.asarray(acc[k]),
                                      np.asarray(sent[k]) + np.asarray(residual[i]), err_msg=k)
      else:
        np.testing.assert_allclose(np.asarray(residual[i]),
                                   (1 - lowpass) * np.asarray(old[i]) + lowpass * kept,
                                   rtol=1e-6, atol=1e-9, err_msg=k)
  return c_state


@pytest.mark.parametrize("kwargs, decay, lowpass", [
    ({}, 1.0, compressed_adam.DEFAULT_LOWPASS),  # the default: ScaleCom's filter
    ({"residual_lowpass": 1.0}, 1.0, 1.0),        # plain error feedback
    ({"residual_lowpass": 0.3, "scope": "leaf"}, 1.0, 0.3),
    ({"second_moment": "shared", "refresh_every": 2, "residual_lowpass": 1.0}, 1.0, 1.0),
    ({"basis": "dct", "chunk": 8, "residual_lowpass": 1.0}, 1.0, 1.0),
    ({"method": "demo", "basis": "dct", "chunk": 8}, 0.9, 1.0),  # no filter by default
    ({"method": "demo"}, 0.9, 1.0),
    ({"residual_decay": 0.99, "residual_lowpass": 1.0}, 0.99, 1.0),
    ({"scope": "global", "residual_decay": 0.9}, 0.9, compressed_adam.DEFAULT_LOWPASS),
    ({"scope": "leaf", "residual_lowpass": 1.0}, 1.0, 1.0),
])
def test_error_feedback_is_exact_for_every_mechanism(kwargs, decay, lowpass):
  parts = hggjax.adamw_parts(LR, compressor="topk", density=0.1, weight_decay=WD, **kwargs)
  state = _local_chain_identity(parts, [helpers.gradients(t, shapes=SHAPES) for t in range(4)],
                                decay, lowpass)
  assert int(state.stats.selected) > 0


def _residual_after_two_steps(**kwargs):
  tx = hggjax.adamw(LR, compressor="topk", density=0.1, eps=0.5, **kwargs)
  params = _params()
  state = tx.init(params)
  for t in range(2):
    _, state = tx.update(helpers.gradients(t, shapes=SHAPES), state, params)
  return hggjax.compression_state(state).residual


@pytest.mark.parametrize("kwargs, filtered", [
    ({}, True), ({"scope": "leaf"}, True), ({"method": "demo"}, False),
    ({"mask_momentum": True}, False),
])
def test_the_low_pass_filter_is_on_by_default_only_where_it_applies(kwargs, filtered):
  """By default the residual is the one of residual_lowpass=0.5 with Adam before the
  compressor, of plain error feedback for DeMo (its residual is its momentum) and with
  momentum masking; compressors without error feedback build as before."""
  got = _residual_after_two_steps(**kwargs)
  want = _residual_after_two_steps(
      residual_lowpass=compressed_adam.DEFAULT_LOWPASS if filtered else 1.0, **kwargs)
  chex.assert_trees_all_equal(got, want)
  if not kwargs.get("mask_momentum"):  # (masking refuses the filter) the two differ
    other = _residual_after_two_steps(
        residual_lowpass=1.0 if filtered else compressed_adam.DEFAULT_LOWPASS, **kwargs)
    assert any(not np.array_equal(a, b) for a, b in zip(got, other) if a is not None)
  assert hggjax.compression_state(hggjax.adamw(LR, compressor="topk2").init(_params())).residual is None


def test_demo_steps_by_the_sign_of_the_mean():
  tx = hggjax.adamw(LR, compressor="topk", density=0.25, axis_name="data", method="demo")
  outs, _ = _run_sharded(tx, 3)
  for out in outs:
    for k in SHAPES:
      assert set(np.unique(np.abs(out[k]))) <= {0.0, np.float32(LR)}
      assert np.count_nonzero(out[k]) > 0


def test_sharded_equals_each_device_alone():
  """Under shard_map the update is the mean of what each device's own chain (no axis,
  the same mechanisms) would send, followed by the same decay."""
  kwargs = dict(compressor="topk", density=0.1, weight_decay=WD, basis="dct", chunk=8)
  outs, _ = _run_sharded(hggjax.adamw(LR, axis_name="data", **kwargs), 3)
  parts = hggjax.adamw_parts(LR, **kwargs)
  before, comp = optax.chain(*parts.before), parts.compressor
  after = optax.chain(*parts.after)
  params = _params()
  states = [(before.init(params), comp.init(params)) for _ in range(NUM_DEVICES)]
  a_state = after.init(params)
  for t in range(3):
    sent = []
    for d, g in enumerate(_device_grads(t)):
      x, b = before.update(g, states[d][0], params)
      s, c = comp.update(x, states[d][1], params)
      states[d] = (b, c)
      sent.append(s)
    mean = {k: np.mean([np.asarray(s[k]) for s in sent], axis=0) for k in SHAPES}
    want, a_state = after.update(mean, a_state, params)
    for k in SHAPES:
      np.testing.assert_allclose(outs[t][k], want[k], rtol=1e-5, atol=1e-7)


def test_a_nonfinite_gradient_on_one_device_changes_none_of_its_state():
  def grads_of(t):
    per = _device_grads(t)
    if t == 1:
      per[2] = {k: np.full_like(v, np.nan) for k, v in per[2].items()}
    return per
  tx = hggjax.adamw(LR, compressor="hggtopk", density=0.1, axis_name="data",
                    second_moment="shared", refresh_every=2)
  outs, state = _run_sharded(tx, 3, grads_of)
  for out in outs:
    assert all(np.all(np.isfinite(out[k])) for k in SHAPES)
  adam = state[0].inner  # no clipping: (moments, learning rate, compressor, ...)
  assert isinstance(adam, hggjax.AdamState)
  assert np.all(np.isfinite(np.asarray(adam.mu["w"])))
  np.testing.assert_array_equal(np.asarray(adam.count), [3] * NUM_DEVICES)
  # Device 2 skipped step 1: its first moment saw steps 0 and 2 only.
  g0, g2 = _device_grads(0)[2]["w"], _device_grads(2)[2]["w"]
  np.testing.assert_allclose(np.asarray(adam.mu["w"])[2], 0.9 * 0.1 * g0 + 0.1 * g2,
                             rtol=1e-5, atol=1e-7)
  assert int(np.asarray(hggjax.stats(state)["nonfinite"]).sum()) == 0  # the last step


def test_a_built_compressor_is_used_as_it_is():
  built = hggjax.topk(0.1, axis_name="data")
  parts = hggjax.adamw_parts(LR, compressor=built, axis_name="data")
  assert parts.compressor is built
  with pytest.raises(ValueError, match="constructor"):
    hggjax.adamw_parts(LR, compressor=built, scope="leaf")


@pytest.mark.parametrize("scope, groups", [(None, 1), ("global", 1), ("leaf", len(SHAPES))])
def test_a_named_compressor_selects_over_all_leaves_unless_told_per_leaf(scope, groups):
  """One selection group (one threshold) by default; scope="leaf" gives one per leaf."""
  tx = hggjax.adamw(LR, compressor="topk", density=0.1, scope=scope)
  assert np.shape(hggjax.stats(tx.init(_params()))["threshold"]) == (groups,)


@pytest.mark.parametrize("kwargs, match", [
    ({"compressor": "nope"}, "unknown compressor"),
    ({"method": "sgd"}, "method"),
    ({"second_moment": "global"}, "second_moment"),
    ({"basis": "fft"}, "basis"),
    ({"method": "demo", "second_moment": "shared"}, "demo"),
    ({"method": "demo", "b1": 0.0}, "b1"),
    ({"b2": 1.0}, "b2"),
    ({"refresh_every": 0}, "refresh_every"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"momentum": 0.9}, "momentum"),
    ({"method": "demo", "residual_decay": 0.9}, "decays the residual by b1"),
    ({"residual_decay": 1.5}, "residual_decay"),
    ({"compressor": hggjax.topk(0.1), "method": "demo"}, "by name"),
    ({"compressor": 3}, "compressor must be"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hggjax.adamw(LR, **kwargs)


def test_residual_decay_needs_error_feedback():
  with pytest.raises(ValueError, match="error_feedback"):
    hggjax.topk2(0.1, residual_decay=0.9)
  with pytest.raises(ValueError, match="residual_decay"):
    hggjax.topk(0.1, residual_decay=0.0)


def test_state_round_trips_through_a_checkpoint_bit_identically(tmp_path):
  """Continuing from a saved and restored state gives the same updates, bit for bit."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tx = hggjax.adamw(LR, compressor="hggtopk", density=0.1, axis_name="data",
                    second_moment="shared", refresh_every=2, basis="dct", chunk=8,
                    weight_decay=WD)
  _, state = _run_sharded(tx, 3)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "s", state)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "s", state)
  a, _ = _run_sharded(tx, 3, state=state, first=3)
  b, _ = _run_sharded(tx, 3, state=restored, first=3)
  for x, y in zip(a, b):
    for k in SHAPES:
      np.testing.assert_array_equal(x[k], y[k])


def test_flax_nnx_optimizer_takes_it():
  """One line in a flax training script: nnx.Optimizer with hggjax.adamw (one device)."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, hggjax.adamw(1e-2, compressor="hggtopk", density=0.1,
                                                weight_decay=0.1), wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32)), jnp.float32)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]


def test_stats_on_a_two_level_mesh_count_the_shared_refreshes():
  """Moments per device, the compressor's state per host: stats still add up."""
  axis = ("hosts", "local")
  mesh = jax.make_mesh((2, 2), axis, devices=jax.devices()[:4])
  tx = hggjax.adamw(LR, compressor="topk", density=0.25, axis_name=axis,
                    second_moment="shared")
  params = _params()
  state = hggjax.shard_state(tx.init(params), mesh, axis)
  specs = hggjax.state_specs(state, axis)
  step = jax.jit(jax.shard_map(_sharded_step(tx), mesh=mesh,
                               in_specs=(P(axis), specs, P()), out_specs=(P(), specs)))
  per = _device_grads(0)
  stacked = {k: np.stack([g[k] for g in per]) for k in SHAPES}
  _, state = step(jax.device_put(stacked, NamedSharding(mesh, P(axis))), state, params)
  refresh = np.asarray(hggjax.stats(state)["refresh_bytes"])
  dense = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
  np.testing.assert_array_equal(refresh, np.full(refresh.shape, dense, np.float32))  # step 1


def _first_moment(state):
  """This chain state's AdamState (anywhere inside it)."""
  is_adam = lambda x: isinstance(x, hggjax.AdamState)  # noqa: E731
  return next(x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x))


@pytest.mark.parametrize("wire", [helpers.EXACT_WIRE, {}], ids=["exact", "default"])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_mask_momentum_zeroes_the_first_moment_exactly_where_this_device_sent(wire, decay):
  """DGC's momentum factor masking: the same steps as without it on the first step, and
  the first moment is the unmasked one with 0 where the step's update is not 0 (one
  device: the update is what it sent), on later steps too."""
  # eps near the gradients' size: Adam's first steps are then not all +-lr (ties in top-k).
  kwargs = dict(compressor="topk", density=0.1, min_size=32, residual_decay=decay, eps=0.5,
                **wire)
  masked = hggjax.adamw(LR, mask_momentum=True, **kwargs)
  plain_parts = hggjax.adamw_parts(LR, **kwargs)
  params = _params()
  state = masked.init(params)
  for t in range(3):
    g = _device_grads(t)[0]
    # The reference: this step without masking, from the masked chain's own state.
    moments, scale, comp = state[0]  # the chain's one part (no clipping, no decay)
    x, m_ref = plain_parts.before[0].update(g, moments, params)
    x, _ = plain_parts.before[1].update(x, scale, params)
    want, _ = plain_parts.compressor.update(x, comp, params)
    got, state = masked.update(g, state, params)
    for k in SHAPES:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    mu, mu_ref = _first_moment(state).mu["w"], m_ref.inner.mu["w"]
    sent = np.asarray(want["w"]) != 0
    assert sent.sum() == round(0.1 * mu.size)
    np.testing.assert_array_equal(np.asarray(mu), np.where(sent, 0.0, np.asarray(mu_ref)))
    # "b" (16 elements) is below min_size: sent dense every step, never masked.
    np.testing.assert_array_equal(np.asarray(_first_moment(state).mu["b"]),
                                  np.asarray(m_ref.inner.mu["b"]))


def test_mask_momentum_on_a_nonfinite_step_masks_nothing():
  tx = hggjax.adamw(LR, compressor="topk", density=0.1, mask_momentum=True)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_device_grads(0)[0], state, params)
  before = np.asarray(_first_moment(state).mu["w"])
  nan = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
  _, state = tx.update(nan, state, params)
  np.testing.assert_array_equal(np.asarray(_first_moment(state).mu["w"]), before)


def test_mask_momentum_sharded_equals_each_device_alone():
  """Under shard_map each device masks its own first moment where it sent: the update
  is the mean of the devices' own chains (no axis), each device's moment its chain's."""
  kwargs = dict(compressor="topk", density=0.1, mask_momentum=True, eps=0.5,
                **helpers.EXACT_WIRE)  # eps: no ties in the first steps (above)
  outs, state = _run_sharded(hggjax.adamw(LR, axis_name="data", **kwargs), 3)
  alone = hggjax.adamw(LR, **kwargs)
  params = _params()
  states = [alone.init(params) for _ in range(NUM_DEVICES)]
  for t in range(3):
    sent = []
    for d, g in enumerate(_device_grads(t)):
      s, states[d] = alone.update(g, states[d], params)
      sent.append(s)
    for k in SHAPES:
      np.testing.assert_allclose(outs[t][k], np.mean([np.asarray(s[k]) for s in sent], axis=0),
                                 rtol=1e-5, atol=1e-7)
  mu = np.asarray(_first_moment(state).mu["w"])
  for d in range(NUM_DEVICES):  # the same zeros; the rest to rounding (two programs)
    own = np.asarray(_first_moment(states[d]).mu["w"])
    np.testing.assert_array_equal(mu[d] == 0, own == 0)
    np.testing.assert_allclose(mu[d], own, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [
    {"compressor": "none"}, {"compressor": "topk2"}, {"method": "demo"}, {"basis": "dct"},
    {"compressor": hggjax.topk(0.1)}, {"error_feedback": False}, {"mask_momentum": 1},
])
def test_mask_momentum_needs_adam_and_a_residual(kwargs):
  with pytest.raises(ValueError, match="mask_momentum"):
    hggjax.adamw(LR, **{"mask_momentum": True, **kwargs})
