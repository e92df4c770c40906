"""Sphinx configuration of the API reference (``make docs``).

The pages are the README (``index.md`` includes it whole, so README.md stays
the one source of the usage text), the reference of every public symbol
(``api.rst``, autodoc with napoleon for the Google-style docstrings) and the
design notes in this folder. The examples in the docstrings are run as
doctests by ``tests/test_doctests.py``; ``tests/test_docs.py`` builds these
pages with warnings as errors and checks that every name of ``lars.__all__``,
``lars.schedules.__all__`` and ``lars.contract.__all__`` (and the native
backend's settings) is in the reference.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The checkout's lars (with its kernels) is what is documented, installed or not.
sys.path.insert(0, str(ROOT))

import lars  # noqa: E402

project = "lars"
author = "The lars authors"
copyright = "The lars authors"
release = lars.__version__
version = lars.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Every cross-reference must resolve (make docs runs sphinx-build -W). The
# build runs offline, so there is no intersphinx: names of Python, NumPy, JAX
# and optax in signatures are left as plain text instead of links.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|optax|numpy|np|collections|typing|enum|types|dataclasses)(\..*)?"),
    ("py:.*", r"(int|float|bool|str|bytes|object|tuple|list|dict|set|frozenset|type|None)"),
    ("py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|Ellipsis)"),
]

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": False,
}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
add_module_names = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lars {release}"
html_static_path: list[str] = []


# Links of the README to files of the repository outside these pages
# (bench/README.md, examples/results/, ...) become their paths as text;
# images and links to docs/ pages (made relative by the include) stay.
_LINK = re.compile(r"(?<!!)\[([^\[\]]+)\]\(([^()\s]+)\)")


def _repository_links_as_text(app, relative_path, parent_docname, content) -> None:
    def replace(match: re.Match) -> str:
        text, target = match.groups()
        if "://" in target or target.startswith(("#", "docs/", "mailto:")):
            return match.group(0)
        return f"`{target}`" if text == target else f"{text} (`{target}`)"

    content[0] = _LINK.sub(replace, content[0])


def setup(app):
    app.connect("include-read", _repository_links_as_text)
