"""The shared backend suite, run on the native (XLA FFI) backend."""

import pytest
from backend_base import BackendTests

import lars

pytestmark = pytest.mark.skipif(
    "native" not in lars.available_backends(),
    reason="the native library is not built (pip install -e . builds it)",
)


class TestNative(BackendTests):
    backend = "native"
