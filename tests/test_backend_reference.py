"""The shared backend suite, run on the pure-JAX reference backend."""

from backend_base import BackendTests


class TestReferenceBackend(BackendTests):
    backend = "reference"
