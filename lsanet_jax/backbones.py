"""CNN backbones as Flax linen modules, each split into a stem and stages so that LSANet can attach
auxiliary branches (copies of the later stages) after any intermediate stage.

ResNet-18/50 follow torchvision (v1.5: stride on the 3x3 conv of the bottleneck); `stem="224"` is
torchvision's 7x7/2 conv + 3x3/2 max-pool, `stem="28"` is MedMNIST's 3x3/1 conv without max-pool.
VGG-16-BN keeps the 13 conv layers and replaces the 4096-wide FC classifier by global average
pooling and one linear layer (so it fits 28 px inputs; its parameter count is not torchvision's).
MobileNetV2 follows torchvision's inverted-residual table; the 28 px form uses stride 1 in the stem
and in the first stride-2 stage.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lsanet_jax.attention import ATTENTION_KINDS, apply_attention

BACKBONES = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2")
STEMS = ("28", "224")

# torchvision initialises convs with Kaiming normal, fan_out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype, name=None, scale_init=nn.initializers.ones):
  # momentum 0.9 / eps 1e-5 are PyTorch's BatchNorm defaults (momentum 0.1 there).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=scale_init, name=name)


def conv(features, kernel, strides=1, groups=1, dtype=jnp.float32, name=None):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=[(pad, pad), (pad, pad)], feature_group_count=groups, use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


def scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


# ----------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = conv(self.features, 3, self.strides, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    y = apply_attention(self.attention, y, dtype=self.dtype)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, 1, self.strides, dtype=self.dtype, name="downsample_conv")(x)
      residual = batch_norm(train, self.dtype, "downsample_bn")(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  features: int  # width of the 3x3 conv; the block outputs 4x this
  strides: int = 1
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.features * self.expansion
    residual = x
    y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, self.strides, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(out_features, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    y = apply_attention(self.attention, y, dtype=self.dtype)
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = conv(out_features, 1, self.strides, dtype=self.dtype, name="downsample_conv")(x)
      residual = batch_norm(train, self.dtype, "downsample_bn")(residual)
    return nn.relu(y + residual)


class ResNetStem(nn.Module):
  features: int
  form: str = "28"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.form == "224":
      x = conv(self.features, 7, 2, dtype=self.dtype, name="conv")(x)
      x = nn.relu(batch_norm(train, self.dtype, "bn")(x))
      return nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    x = conv(self.features, 3, 1, dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


class ResNetStage(nn.Module):
  block: str
  num_blocks: int
  features: int
  strides: int
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    for i in range(self.num_blocks):
      x = block_cls(self.features, self.strides if i == 0 else 1, self.attention, self.dtype,
                    name=f"block{i + 1}")(x, train)
    return x


# -------------------------------------------------------------------------------------------- VGG
class VGGStage(nn.Module):
  num_convs: int
  features: int
  pool: bool
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.pool:  # pool first so that the stage output is the conv block's features
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    for i in range(self.num_convs):
      x = nn.Conv(self.features, (3, 3), padding=[(1, 1), (1, 1)], kernel_init=conv_init,
                  dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = nn.relu(batch_norm(train, self.dtype, f"bn{i + 1}")(x))
      x = apply_attention(self.attention, x, dtype=self.dtype, name=f"attention{i + 1}")
    return x


class IdentityStem(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return x


# ------------------------------------------------------------------------------------ MobileNetV2
def make_divisible(value: float, divisor: int = 8) -> int:
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
  features: int
  strides: int
  expand_ratio: int
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    in_features = x.shape[-1]
    hidden = int(round(in_features * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = conv(hidden, 1, dtype=self.dtype, name="expand_conv")(y)
      y = nn.relu6(batch_norm(train, self.dtype, "expand_bn")(y))
    y = conv(hidden, 3, self.strides, groups=hidden, dtype=self.dtype, name="depthwise_conv")(y)
    y = nn.relu6(batch_norm(train, self.dtype, "depthwise_bn")(y))
    y = apply_attention(self.attention, y, dtype=self.dtype)
    y = conv(self.features, 1, dtype=self.dtype, name="project_conv")(y)
    y = batch_norm(train, self.dtype, "project_bn")(y)
    if self.strides == 1 and in_features == self.features:
      y = y + x
    return y


class MobileNetStem(nn.Module):
  features: int
  strides: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, 3, self.strides, dtype=self.dtype, name="conv")(x)
    return nn.relu6(batch_norm(train, self.dtype, "bn")(x))


class MobileNetStage(nn.Module):
  settings: tuple  # ((expand_ratio, features, repeats, strides), ...)
  final_features: int = 0  # > 0: the closing 1x1 conv of the network
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    i = 0
    for t, c, n, s in self.settings:
      for r in range(n):
        i += 1
        x = InvertedResidual(c, s if r == 0 else 1, t, self.attention, self.dtype,
                             name=f"block{i}")(x, train)
    if self.final_features:
      x = conv(self.final_features, 1, dtype=self.dtype, name="final_conv")(x)
      x = nn.relu6(batch_norm(train, self.dtype, "final_bn")(x))
    return x


# ------------------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build a backbone piece by piece. Each factory takes the submodule name."""
  name: str
  make_stem: Callable[[str], nn.Module]
  make_stage: Callable[[int, str], nn.Module]  # 0-based stage index
  stage_features: tuple[int, ...]

  @property
  def num_stages(self) -> int:
    return len(self.stage_features)


def backbone_spec(name: str, *, stem: str = "28", width: float = 1.0, attention: str = "none",
                  dtype=jnp.float32) -> BackboneSpec:
  """Returns the stem/stage factories of a backbone. Raises ValueError on unknown names."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; choose '28' (MedMNIST 28 px) or '224'")
  if attention not in ATTENTION_KINDS:
    raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
  if not width > 0:
    raise ValueError(f"width multiplier must be positive, got {width}")

  if name in ("resnet18", "resnet50"):
    block, repeats = ("basic", (2, 2, 2, 2)) if name == "resnet18" else ("bottleneck", (3, 4, 6, 3))
    expansion = 1 if block == "basic" else Bottleneck.expansion
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    return BackboneSpec(
        name,
        make_stem=lambda n: ResNetStem(scaled(64, width), stem, dtype, name=n),
        make_stage=lambda i, n: ResNetStage(block, repeats[i], widths[i], 1 if i == 0 else 2,
                                            attention, dtype, name=n),
        stage_features=tuple(w * expansion for w in widths))

  if name == "vgg16_bn":
    convs = (2, 2, 3, 3, 3)
    widths = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
    # 28 px: pools before stages 2-4 only (28->14->7->3); 224 px: before stages 2-5 and after
    # the last one is replaced by global average pooling.
    pools = (False, True, True, True, stem == "224")
    return BackboneSpec(
        name,
        make_stem=lambda n: IdentityStem(name=n),
        make_stage=lambda i, n: VGGStage(convs[i], widths[i], pools[i], attention, dtype, name=n),
        stage_features=tuple(widths))

  # mobilenet_v2: four stages grouped at the resolution changes of torchvision's table.
  c = lambda v: make_divisible(v * width)
  first_stride = 2 if stem == "224" else 1
  table = (
      ((1, c(16), 1, 1), (6, c(24), 2, first_stride)),
      ((6, c(32), 3, 2),),
      ((6, c(64), 4, 2), (6, c(96), 3, 1)),
      ((6, c(160), 3, 2), (6, c(320), 1, 1)),
  )
  last = make_divisible(1280 * width)
  return BackboneSpec(
      name,
      make_stem=lambda n: MobileNetStem(c(32), first_stride, dtype, name=n),
      make_stage=lambda i, n: MobileNetStage(table[i], last if i == 3 else 0, attention, dtype,
                                             name=n),
      stage_features=(c(24), c(32), c(96), last))


class Classifier(nn.Module):
  """A plain backbone: stem, stages, global average pooling, linear classifier.

  Returns (logits, stage_outputs)."""
  backbone: str
  num_classes: int
  stem: str = "28"
  width: float = 1.0
  attention: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = backbone_spec(self.backbone, stem=self.stem, width=self.width,
                         attention=self.attention, dtype=self.dtype)
    x = spec.make_stem("stem")(x, train)
    stages = []
    for i in range(spec.num_stages):
      x = spec.make_stage(i, f"stage{i + 1}")(x, train)
      stages.append(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32), stages


def count_params(params) -> int:
  import jax
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
