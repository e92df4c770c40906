"""lars: exact, safe and fast LARS (Layer-wise Adaptive Rate Scaling) for JAX.

Two front doors:

* :func:`lars.lars` -- an ``optax.GradientTransformation``.
* :class:`lars.Lars` -- the ``braintools.optim.Lars`` interface.

Both reproduce ``braintools.optim.Lars`` by default; with
``lr_inside_momentum=True, eps=0.0`` they reproduce ``optax.lars``.
"""

import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys


def _source_tree_kernels() -> None:
    """In a source tree, makes the top-level ``kernels/`` folder ``lars.kernels``.

    Installed, the kernels are the subpackage ``lars/kernels``. In a checkout
    they live beside ``lars/``; ``lars.kernels`` is then loaded from there, so
    the package imports the same way with an editable install, with
    ``PYTHONPATH=.``, and from the repository root with a regular install
    (where the checkout's ``lars/`` comes first on ``sys.path``).
    """
    here = _pathlib.Path(__file__).resolve().parent
    if "lars.kernels" in _sys.modules or (here / "kernels" / "__init__.py").exists():
        return
    source = here.parent / "kernels"
    if not (source / "__init__.py").exists():
        return
    spec = _importlib_util.spec_from_file_location(
        "lars.kernels", source / "__init__.py", submodule_search_locations=[str(source)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["lars.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_source_tree_kernels()

from lars import contract, schedules  # noqa: E402
from lars._config import LarsConfig  # noqa: E402
from lars._dispatch import available_backends  # noqa: E402
from lars._optimizer import Lars  # noqa: E402
from lars._transform import LarsState, LarsTransformation, lars  # noqa: E402
from lars._trees import exclude_bias_and_norm  # noqa: E402

__all__ = [
    "Lars",
    "LarsConfig",
    "LarsState",
    "LarsTransformation",
    "available_backends",
    "contract",
    "exclude_bias_and_norm",
    "lars",
    "schedules",
]

# The one source of the version: the build backend reads it into the package
# metadata (pyproject.toml, [tool.scikit-build.metadata.version]).
__version__ = "0.1.0"
