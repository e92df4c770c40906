"""lars: exact, safe and fast LARS (Layer-wise Adaptive Rate Scaling) for JAX.

Two front doors:

* :func:`lars.lars` -- an ``optax.GradientTransformation``.
* :class:`lars.Lars` -- the ``braintools.optim.Lars`` interface.

Both reproduce ``braintools.optim.Lars`` by default; with
``lr_inside_momentum=True, eps=0.0`` they reproduce ``optax.lars``.
"""

from lars import schedules
from lars._config import LarsConfig
from lars._dispatch import available_backends
from lars._optimizer import Lars
from lars._transform import LarsState, LarsTransformation, lars
from lars._trees import exclude_bias_and_norm

__all__ = [
    "Lars",
    "LarsConfig",
    "LarsState",
    "LarsTransformation",
    "available_backends",
    "exclude_bias_and_norm",
    "lars",
    "schedules",
]

__version__ = "0.1.0"
