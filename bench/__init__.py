"""A roofline benchmark of the LARS step: ``python -m bench`` (``--help`` for options).

It times every available ``lars`` backend beside ``jax.jit(optax.lars)`` and a
device-to-device copy of the same bytes, on ResNet-50, ResNet-18 and
transformer parameter sets, a sweep of single arrays and many small arrays,
with float32 and bfloat16 gradients. See ``bench/README.md``.
"""
