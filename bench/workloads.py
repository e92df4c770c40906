"""The parameter sets a LARS step is timed on.

Shapes follow the real architectures (convolution kernels in HWIO layout,
dense kernels as (in, out)); the counts of arrays and parameters are checked
against the published figures when the module is imported.
"""

from __future__ import annotations

import dataclasses
import math

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named list of parameter shapes.

    Attributes:
      name: Short name used on the command line and in the results.
      group: "model", "sweep" (one array of a given size) or "small" (many
        small arrays).
      shapes: The parameter arrays' shapes, in order.
      description: One line for the table and ``--list``.
    """

    name: str
    group: str
    shapes: tuple[Shape, ...]
    description: str

    @property
    def n_arrays(self) -> int:
        """Number of parameter arrays."""
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        """Total number of parameters (elements over all arrays)."""
        return sum(math.prod(s) for s in self.shapes)


def _conv_bn(shapes: list[Shape], kh: int, kw: int, cin: int, cout: int) -> None:
    """Appends a bias-free conv kernel (HWIO) and its BatchNorm scale and offset."""
    shapes.extend([(kh, kw, cin, cout), (cout,), (cout,)])


def resnet50_shapes() -> tuple[Shape, ...]:
    """ResNet-50 (v1.5, torchvision layout): 53 convs, 53 BatchNorms, the fc layer.

    Returns:
      161 shapes: 53 conv kernels, 106 BatchNorm scales/offsets, fc weight
      (2048, 1000) and bias (1000,); 25,557,032 parameters.
    """
    shapes: list[Shape] = []
    _conv_bn(shapes, 7, 7, 3, 64)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            _conv_bn(shapes, 1, 1, cin, width)
            _conv_bn(shapes, 3, 3, width, width)
            _conv_bn(shapes, 1, 1, width, 4 * width)
            if b == 0:  # projection shortcut
                _conv_bn(shapes, 1, 1, cin, 4 * width)
            cin = 4 * width
    shapes.extend([(2048, 1000), (1000,)])
    return tuple(shapes)


def resnet18_shapes() -> tuple[Shape, ...]:
    """ResNet-18 (torchvision layout): 20 convs, 20 BatchNorms, the fc layer.

    Returns:
      62 shapes; 11,689,512 parameters.
    """
    shapes: list[Shape] = []
    _conv_bn(shapes, 7, 7, 3, 64)
    cin = 64
    for width in (64, 128, 256, 512):
        for b in range(2):
            _conv_bn(shapes, 3, 3, cin, width)
            _conv_bn(shapes, 3, 3, width, width)
            if b == 0 and cin != width:  # projection shortcut
                _conv_bn(shapes, 1, 1, cin, width)
            cin = width
    shapes.extend([(512, 1000), (1000,)])
    return tuple(shapes)


def transformer_shapes(layers: int = 12, d: int = 768) -> tuple[Shape, ...]:
    """The blocks of a GPT-2-small-like transformer (no embeddings).

    Per layer: two LayerNorms (scale, offset), fused QKV (d, 3d) and bias,
    attention output (d, d) and bias, MLP (d, 4d), (4d, d) and biases; then a
    final LayerNorm.

    Returns:
      12 * layers + 2 shapes; 85,056,000 parameters for 12 x 768.
    """
    shapes: list[Shape] = []
    for _ in range(layers):
        shapes.extend([(d,), (d,)])
        shapes.extend([(d, 3 * d), (3 * d,), (d, d), (d,)])
        shapes.extend([(d,), (d,)])
        shapes.extend([(d, 4 * d), (4 * d,), (4 * d, d), (d,)])
    shapes.extend([(d,), (d,)])
    return tuple(shapes)


def _size_label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


SWEEP_SIZES = (
    1_000,
    4_000,
    16_000,
    64_000,
    250_000,
    1_000_000,
    4_000_000,
    16_000_000,
    64_000_000,
)


def sweep_workload(n: int) -> Workload:
    """One float array of ``n`` elements."""
    return Workload(
        name=f"array-{_size_label(n)}",
        group="sweep",
        shapes=((n,),),
        description=f"one array of {n:,} elements",
    )


def small_arrays_workload(count: int = 1000, size: int = 1000) -> Workload:
    """``count`` arrays of ``size`` elements each (launch and dispatch overhead)."""
    return Workload(
        name=f"small-{count}x{size}",
        group="small",
        shapes=((size,),) * count,
        description=f"{count:,} arrays of {size:,} elements",
    )


RESNET50 = Workload(
    "resnet50", "model", resnet50_shapes(), "ResNet-50: 53 convs, 53 BatchNorms, fc"
)
RESNET18 = Workload(
    "resnet18", "model", resnet18_shapes(), "ResNet-18: 20 convs, 20 BatchNorms, fc"
)
TRANSFORMER = Workload(
    "transformer-12x768",
    "model",
    transformer_shapes(),
    "12 transformer blocks, d=768 (GPT-2 small, no embeddings)",
)


def _check_counts() -> None:
    """Checks the model sets against the published counts (a wrong shape fails at import)."""
    checks = {
        "ResNet-50 arrays": (RESNET50.n_arrays, 161),
        "ResNet-50 params": (RESNET50.n_params, 25_557_032),
        "ResNet-50 conv kernels": (sum(len(s) == 4 for s in RESNET50.shapes), 53),
        "ResNet-50 BatchNorm arrays": (sum(len(s) == 1 for s in RESNET50.shapes[:-2]), 106),
        "ResNet-18 arrays": (RESNET18.n_arrays, 62),
        "ResNet-18 params": (RESNET18.n_params, 11_689_512),
        "transformer arrays": (TRANSFORMER.n_arrays, 146),
        "transformer params": (TRANSFORMER.n_params, 85_056_000),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise RuntimeError(f"{what}: {got}, expected {want}")


_check_counts()


def full_workloads() -> list[Workload]:
    """Every workload of ``python -m bench``."""
    return [
        RESNET50,
        RESNET18,
        TRANSFORMER,
        *(sweep_workload(n) for n in SWEEP_SIZES),
        small_arrays_workload(1000, 1000),
    ]


QUICK_SWEEP_SIZES = (1_000, 16_000, 250_000, 1_000_000)


def quick_workloads() -> list[Workload]:
    """The smaller set of ``python -m bench --quick``."""
    return [
        RESNET18,
        *(sweep_workload(n) for n in QUICK_SWEEP_SIZES),
        small_arrays_workload(100, 1000),
    ]


def select(workloads: list[Workload], spec: str | None) -> list[Workload]:
    """Filters ``workloads`` by a comma-separated list of names or groups.

    Args:
      workloads: The candidates.
      spec: e.g. "resnet50,sweep"; None or "" keeps all.

    Raises:
      ValueError: for a name that matches no workload and no group.
    """
    if not spec:
        return list(workloads)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {w.name for w in workloads} | {w.group for w in workloads}
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return [w for w in workloads if w.name in wanted or w.group in wanted]
