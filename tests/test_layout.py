"""The layout rules of docs/ARCHITECTURE.md, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FILES = sorted([*(ROOT / "lars").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])
KERNEL_FILES = sorted((ROOT / "kernels").rglob("*.py"))
# Every module of the source tree is held to one size: the package, the
# benchmarks, the examples and the tests (their cases and helpers too) in
# Python, and the C++ and CUDA sources of the native library and the benchmarks.
NATIVE_SUFFIXES = (".cc", ".h", ".cu", ".cuh")
SOURCE_FILES = sorted(
    {
        *PACKAGE_FILES,
        *(p for d in ("bench", "examples", "tests") for p in (ROOT / d).rglob("*.py")),
        *(
            p
            for d in ("kernels", "bench")
            for p in (ROOT / d).rglob("*")
            if p.suffix in NATIVE_SUFFIXES
        ),
    }
)
MAX_LINES = 520


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_backends_import_only_the_contract_of_lars(path: Path):
    def allowed(module: str) -> bool:
        return module == "lars" or module.startswith(("lars.contract", "lars.kernels"))

    own = {m for m in imported_modules(path) if m == "lars" or m.startswith("lars.")}
    bad = sorted(m for m in own if not allowed(m))
    assert not bad, f"{path.name} imports {bad}; a backend may import only lars.contract"
    plain = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)]
    assert not any(a.name == "lars" for n in plain for a in n.names), f"{path.name}: import lars"


def test_the_front_end_does_not_import_the_kernels():
    for path in sorted((ROOT / "lars").rglob("*.py")):
        kernels = [m for m in imported_modules(path) if m.startswith("lars.kernels")]
        assert not kernels, f"{path.name} imports {kernels}: backends load by module path"


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_no_scripts_in_the_package():
    scripts = [p for p in PACKAGE_FILES if 'if __name__ == "__main__"' in p.read_text()]
    assert not scripts, f"scripts belong in bench/: {scripts}"
