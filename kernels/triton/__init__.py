"""Multi-tensor LARS kernels in Triton, and the "triton" backend built on them.

* ``plan``: the launch plan (dtype groups, leaves per launch, tile tables);
  plain Python and NumPy.
* ``kernels``: the ``@triton.jit`` kernels and their NumPy references.
* ``step``: the step driver shared by both launchers.
* ``backend``: the GPU backend (``jax_triton.triton_call``): ``triton_step``,
  ``triton_apply``, ``unavailable``, ``unsupported``.
* ``interpret``: the same kernels in Triton's interpreter on NumPy arrays
  (``TRITON_INTERPRET=1``, CPU): ``triton_step_interpret``.
* ``aot``: compiles the kernels for a GPU target without a GPU (PTX, cubin).

Nothing here imports triton or jax-triton until a module that needs it is used.
"""
