"""Image classifiers for the harness, in Flax NNX.

Every model takes NHWC float images (32x32x3 or 28x28x1) and returns logits. BatchNorm
layers get `axis_name`, so inside `shard_map` their batch statistics are averaged over
the data axis (synchronised BatchNorm); with `axis_name=None` they are per-device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _bn(features: int, axis_name: str | None, rngs: nnx.Rngs, zero_init: bool = False) -> nnx.BatchNorm:
  # momentum 0.9 like PyTorch's 0.1: short runs need running statistics that catch up.
  return nnx.BatchNorm(
      features, momentum=0.9, epsilon=1e-5, axis_name=axis_name, rngs=rngs,
      scale_init=nnx.initializers.zeros_init() if zero_init else nnx.initializers.ones_init())


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, stride: int = 1, groups: int = 1) -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding="SAME",
                  feature_group_count=groups, use_bias=False,
                  kernel_init=nnx.initializers.kaiming_normal(), rngs=rngs)


def _global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class PatchConv3x3(nnx.Module):
  """3x3 SAME convolution as one matmul over 9 shifted copies (im2col).

  XLA:CPU's convolution kernels, their backward pass above all, ran 1.5x slower than this
  single dot on this 2-core machine (measured with the SmallCNN at batch 256, 4 devices).
  The kernel is HWIO, like `nnx.Conv`'s.
  """

  def __init__(self, cin: int, cout: int, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.kaiming_normal()(rngs.params(), (3, 3, cin, cout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], -1)
    kernel = self.kernel[...].reshape(9 * c, -1)
    return (cols.reshape(b * h * w, 9 * c) @ kernel).reshape(b, h, w, -1)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  # A reshape + max instead of nnx.max_pool: XLA:CPU's select-and-scatter backward of
  # reduce_window made the whole SmallCNN step ~2x slower here. Odd sides are padded.
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    h, w = h + h % 2, w + w % 2
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nnx.Module):
  """conv16-pool-conv32-pool-dense128-dense: ~0.21 M parameters at 28x28, for quick runs."""

  def __init__(self, num_classes: int, in_channels: int, image_size: int, *,
               axis_name: str | None, rngs: nnx.Rngs):
    self.conv1 = PatchConv3x3(in_channels, 16, rngs)
    self.bn1 = _bn(16, axis_name, rngs)
    self.conv2 = PatchConv3x3(16, 32, rngs)
    self.bn2 = _bn(32, axis_name, rngs)
    side = -(-(-(-image_size // 2)) // 2)  # two 2x2 pools, rounding up
    self.fc1 = nnx.Linear(side * side * 32, 128, rngs=rngs)
    self.fc2 = nnx.Linear(128, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _max_pool_2x2(nnx.relu(self.bn1(self.conv1(x))))
    x = _max_pool_2x2(nnx.relu(self.bn2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    return self.fc2(nnx.relu(self.fc1(x)))


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, *, axis_name, rngs):
    self.conv1 = _conv(cin, planes, 3, rngs, stride)
    self.bn1 = _bn(planes, axis_name, rngs)
    self.conv2 = _conv(planes, planes, 3, rngs)
    self.bn2 = _bn(planes, axis_name, rngs, zero_init=True)
    self.shortcut = nnx.List([])  # empty: identity shortcut
    if stride != 1 or cin != planes:
      self.shortcut = nnx.List([_conv(cin, planes, 1, rngs, stride), _bn(planes, axis_name, rngs)])

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    s = self.shortcut[1](self.shortcut[0](x)) if len(self.shortcut) else x
    return nnx.relu(y + s)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, *, axis_name, rngs):
    out = planes * self.expansion
    self.conv1 = _conv(cin, planes, 1, rngs)
    self.bn1 = _bn(planes, axis_name, rngs)
    self.conv2 = _conv(planes, planes, 3, rngs, stride)
    self.bn2 = _bn(planes, axis_name, rngs)
    self.conv3 = _conv(planes, out, 1, rngs)
    self.bn3 = _bn(out, axis_name, rngs, zero_init=True)
    self.shortcut = nnx.List([])  # empty: identity shortcut
    if stride != 1 or cin != out:
      self.shortcut = nnx.List([_conv(cin, out, 1, rngs, stride), _bn(out, axis_name, rngs)])

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    s = self.shortcut[1](self.shortcut[0](x)) if len(self.shortcut) else x
    return nnx.relu(y + s)


class ResNet(nnx.Module):
  """CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool (kuangliu/pytorch-cifar's layout)."""

  def __init__(self, block, layers: Sequence[int], num_classes: int, in_channels: int,
               image_size: int, *, axis_name: str | None, rngs: nnx.Rngs):
    del image_size  # global pooling makes the head independent of the input side
    self.conv1 = _conv(in_channels, 64, 3, rngs)
    self.bn1 = _bn(64, axis_name, rngs)
    blocks, cin = [], 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(cin, planes, stride, axis_name=axis_name, rngs=rngs))
        cin = planes * block.expansion
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    for b in self.blocks:
      x = b(x)
    return self.fc(_global_avg_pool(x))


_VGG_CFG = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


class VGG(nnx.Module):
  """VGG with BatchNorm; SAME pooling so 28x28 inputs survive five pools (28->1)."""

  def __init__(self, cfg: Sequence, num_classes: int, in_channels: int, image_size: int, *,
               axis_name: str | None, rngs: nnx.Rngs):
    del image_size
    convs, bns, cin = [], [], in_channels
    self.plan = tuple(v == "M" for v in cfg)
    for v in cfg:
      if v == "M":
        continue
      convs.append(_conv(cin, v, 3, rngs))
      bns.append(_bn(v, axis_name, rngs))
      cin = v
    self.convs, self.bns = nnx.List(convs), nnx.List(bns)
    self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x):
    i = 0
    for is_pool in self.plan:
      if is_pool:
        x = nnx.max_pool(x, (2, 2), (2, 2), padding="SAME")
      else:
        x = nnx.relu(self.bns[i](self.convs[i](x)))
        i += 1
    return self.fc(_global_avg_pool(x))


class InvertedResidual(nnx.Module):

  def __init__(self, cin: int, cout: int, expansion: int, stride: int, *, axis_name, rngs):
    hidden = cin * expansion
    self.stride, self.use_res = stride, (stride == 1 and cin == cout)
    self.expand = _conv(cin, hidden, 1, rngs)
    self.bn1 = _bn(hidden, axis_name, rngs)
    self.depthwise = _conv(hidden, hidden, 3, rngs, stride, groups=hidden)
    self.bn2 = _bn(hidden, axis_name, rngs)
    self.project = _conv(hidden, cout, 1, rngs)
    self.bn3 = _bn(cout, axis_name, rngs)

  def __call__(self, x):
    y = nnx.relu6(self.bn1(self.expand(x)))
    y = nnx.relu6(self.bn2(self.depthwise(y)))
    y = self.bn3(self.project(y))
    return x + y if self.use_res else y


# (expansion, out_channels, num_blocks, stride); strides of the first two stages are 1
# for 32x32 inputs, as in kuangliu/pytorch-cifar's CIFAR MobileNetV2.
_MBV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nnx.Module):

  def __init__(self, num_classes: int, in_channels: int, image_size: int, *,
               axis_name: str | None, rngs: nnx.Rngs):
    del image_size
    self.conv1 = _conv(in_channels, 32, 3, rngs)
    self.bn1 = _bn(32, axis_name, rngs)
    blocks, cin = [], 32
    for expansion, cout, n, stride in _MBV2_CFG:
      for j in range(n):
        blocks.append(InvertedResidual(cin, cout, expansion, stride if j == 0 else 1,
                                       axis_name=axis_name, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.conv2 = _conv(cin, 1280, 1, rngs)
    self.bn2 = _bn(1280, axis_name, rngs)
    self.fc = nnx.Linear(1280, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    for b in self.blocks:
      x = b(x)
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.fc(_global_avg_pool(x))


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "cnn": SmallCNN,
    "resnet18": functools.partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet50": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    "vgg11": functools.partial(VGG, _VGG_CFG["vgg11"]),
    "vgg16": functools.partial(VGG, _VGG_CFG["vgg16"]),
    "mobilenetv2": MobileNetV2,
}


def create_model(name: str, *, num_classes: int, image_shape: Sequence[int],
                 axis_name: str | None, seed: int) -> nnx.Module:
  """Builds a model by name for images of `image_shape` (H, W, C)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
  h, _, c = image_shape
  return MODELS[name](num_classes, c, h, axis_name=axis_name, rngs=nnx.Rngs(seed))
