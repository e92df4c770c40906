"""Multi-tensor LARS kernels in Pallas, and the "pallas" backend built on them.

* ``elementwise``: the per-element math every kernel shares, and references.
* ``mosaic_gpu``: the kernels for NVIDIA Hopper (Pallas Mosaic GPU).
* ``mosaic_tpu``: the kernels for TPU (Pallas Mosaic TPU): a norm and an update pass.
* ``mosaic_tpu_fused``: the fused one-pass TPU kernel (w and g read once, kept in VMEM).
* ``backend``: the backend step (``reference_step``'s signature).
* ``gpu_check``: a script that checks and times the kernels on a GPU.
"""
