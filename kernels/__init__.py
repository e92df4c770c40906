"""Fused LARS kernels, installed as ``lars.kernels``.

Each kernel module holds the kernel, its launcher and a ``*_reference`` beside
it; backends register themselves with ``lars._dispatch``.
"""
