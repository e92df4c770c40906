"""Multi-tensor LARS kernels in Pallas, and the "pallas" backend built on them.

* ``elementwise``: the per-element math every kernel shares, and references.
* ``mosaic_gpu``: the kernels for NVIDIA Hopper (Pallas Mosaic GPU).
* ``mosaic_tpu``: the kernels for TPU (Pallas Mosaic TPU).
* ``backend``: the backend step (``reference_step``'s signature).
* ``gpu_check``: a script that checks and times the kernels on a GPU.
"""
