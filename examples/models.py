"""ResNets in Flax NNX: a small one for 16x16 digits and ResNet-50 for ImageNet shapes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# He (Kaiming) normal initialisation, fan-out, as in torchvision's ResNets.
_KAIMING = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs, dtype) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding="SAME",
        use_bias=False,
        kernel_init=_KAIMING,
        dtype=dtype,
        rngs=rngs,
    )


def _norm(features: int, rngs: nnx.Rngs, dtype, bn_momentum: float) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=bn_momentum, dtype=dtype, rngs=rngs)


def _shortcut(cin, cout, stride, rngs, dtype, bn_momentum) -> tuple:
    """(1x1 projection, its BatchNorm) where the shape changes, else (None, None)."""
    if stride == 1 and cin == cout:
        return None, None
    return _conv(cin, cout, 1, stride, rngs, dtype), _norm(cout, rngs, dtype, bn_momentum)


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(
        self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype=None, bn_momentum=0.9
    ) -> None:
        self.conv1 = _conv(cin, cout, 3, stride, rngs, dtype)
        self.bn1 = _norm(cout, rngs, dtype, bn_momentum)
        self.conv2 = _conv(cout, cout, 3, 1, rngs, dtype)
        self.bn2 = _norm(cout, rngs, dtype, bn_momentum)
        self.proj, self.proj_bn = _shortcut(cin, cout, stride, rngs, dtype, bn_momentum)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (4x wider) bottleneck block of ResNet-50 (v1.5)."""

    def __init__(
        self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs, dtype=None, bn_momentum=0.9
    ) -> None:
        cout = 4 * width
        self.conv1 = _conv(cin, width, 1, 1, rngs, dtype)
        self.bn1 = _norm(width, rngs, dtype, bn_momentum)
        self.conv2 = _conv(width, width, 3, stride, rngs, dtype)
        self.bn2 = _norm(width, rngs, dtype, bn_momentum)
        self.conv3 = _conv(width, cout, 1, 1, rngs, dtype)
        self.bn3 = _norm(cout, rngs, dtype, bn_momentum)
        self.proj, self.proj_bn = _shortcut(cin, cout, stride, rngs, dtype, bn_momentum)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(y + shortcut)


class SmallResNet(nnx.Module):
    """A CIFAR-style ResNet for small images: 3x3 stem, stages of basic blocks, linear head.

    With ``widths=(16, 32, 64)`` and one block per stage it is a ResNet-8
    (1 + 2 * 3 convolutions + 1 linear layer); each later stage halves the
    resolution and doubles the width.

    Args:
      num_classes: Output logits.
      widths: Channels of each stage.
      blocks_per_stage: Basic blocks in each stage.
      in_channels: Input channels (1 for grey-scale digits).
      bn_momentum: BatchNorm running-average momentum.
      rngs: Random streams for initialisation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        in_channels: int = 1,
        bn_momentum: float = 0.9,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.stem = _conv(in_channels, widths[0], 3, 1, rngs, None)
        self.stem_bn = _norm(widths[0], rngs, None, bn_momentum)
        blocks = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, width, stride, rngs=rngs, bn_momentum=bn_momentum))
                cin = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


class ResNet50(nnx.Module):
    """ResNet-50 (v1.5: stride on the 3x3 convolution) for NHWC images.

    Args:
      num_classes: Output logits (1000 for ImageNet).
      dtype: Computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      rngs: Random streams for initialisation.
    """

    def __init__(self, num_classes: int = 1000, dtype=None, *, rngs: nnx.Rngs) -> None:
        self.stem = _conv(3, 64, 7, 2, rngs, dtype)
        self.stem_bn = _norm(64, rngs, dtype, 0.9)
        blocks = []
        cin = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, width, stride, rngs=rngs, dtype=dtype))
                cin = 4 * width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
