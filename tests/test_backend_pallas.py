"""The shared backend suite on the "pallas" backend (interpret mode on a CPU)."""

from backend_base import BackendTests


class TestPallasBackend(BackendTests):
    backend = "pallas"
    big = 4099
    mid = 1025
