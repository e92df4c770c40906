"""The "triton" backend: the multi-tensor LARS step on Triton kernels, launched by jax-triton.

A step is one fused launch per (param dtype, grad dtype) group and 192
leaves (plus a global-norm pass with ``grad_clip_norm``): norms, trust ratios
and update, one launch for ResNet-50's 161 float32 leaves. ``Tuning(fused=False)``
splits it into a norm pass and an update pass. See ``plan.py`` for the launch
design and ``kernels.py`` for the kernels.

Bytes moved from HBM per float32 parameter in the in-place form
(:func:`triton_apply`): read w, g, v and write w, v, 20 B, when the second
read of a layer's w and g hits L2 as the fused schedule intends (unmeasured);
28 B in the two-pass form. :func:`triton_step` writes the update instead of
the new param, and ``optax.apply_updates`` then reads w and the update and
writes w (12 B more). Momentum (and in :func:`triton_apply` the params) are
aliased to the kernel outputs (``input_output_aliases``): with donated
buffers the in-place form allocates nothing per parameter, the other form
only its updates.

Numerics: float32 arithmetic in the reference's order, with floating-point
contraction off (``enable_fp_fusion=False``): no multiply-add is fused, so a
kernel rounds exactly where the reference's operations do. The norms are
summed in a different order (per-chunk vector partial sums, then a fixed-order
reduction): trust ratios agree to float32 rounding, not bitwise.

jax-triton 0.3.1 is the release that fits: it requires ``jax>=0.8.2`` and
``triton>=3.6`` (0.4.x require triton 3.7, the device images have 3.6.0); it
is a pure-Python wheel (``jax_triton-0.3.1-py3-none-any.whl``) but imports only
with a CUDA/ROCm jaxlib. Later releases renamed ``out_shape`` to ``out_type``
and moved ``enable_fp_fusion`` into ``backend_options``; the launcher adapts
to both (only 0.3.1's path has been exercised: 0.4 cannot be installed beside
Triton 3.6).

Not yet run or timed on a GPU: checked by running the same kernels in Triton's
interpreter (``interpret.py``), by compiling them for sm_90 (``aot.py``), and by
lowering this backend's step for CUDA through jax-triton on a CPU.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lars._autodiff import finite_args, with_finite, with_reference_jvp
from lars._config import LarsConfig
from lars._reference import StepResult, reference_update_with_ratios

from . import plan as P
from . import step as S

# The jax-triton release this backend is written and checked against.
JAX_TRITON_VERSION = "0.3.1"


@functools.cache
def _import_problem() -> str | None:
    """None if triton and jax-triton import, else a sentence naming what is missing."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    try:
        import jax_triton  # noqa: F401
    except ModuleNotFoundError:
        return f"jax-triton is not installed (pip install jax-triton=={JAX_TRITON_VERSION})"
    except ImportError as e:  # jax-triton needs a jaxlib with GPU support
        return f"jax-triton cannot be imported: {e}"
    return None


def unavailable() -> str | None:
    """None if the backend can run here, else a sentence saying what is missing."""
    platform = jax.default_backend()
    if platform != "gpu":
        return f"no GPU: the Triton kernels run on an NVIDIA GPU (JAX's platform is {platform!r})"
    return _import_problem()


def unsupported(config: LarsConfig) -> str | None:
    """Every option of LarsConfig is supported."""
    del config
    return None


def _default_triton_call() -> Callable:
    """``jax_triton.triton_call`` (imported on first use: it needs a GPU jaxlib)."""
    import jax_triton

    return jax_triton.triton_call


def _launcher(triton_call: Callable, num_warps: int, compute_capability: int | None) -> S.Launcher:
    """A ``step.Launcher`` that launches with ``triton_call`` (jax-triton's)."""
    from . import kernels

    parameters = inspect.signature(triton_call).parameters

    def launch(spec, inputs, outputs, aliases, grid, constexprs, zeroed=()):
        out = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outputs]
        if "out_type" in parameters:  # jax-triton >= 0.4
            options = {"out_type": out, "backend_options": {"enable_fp_fusion": False}}
        else:
            options = {"out_shape": out, "enable_fp_fusion": False}
        results = triton_call(
            *inputs,
            kernel=kernels.get_kernel(spec),
            grid=(grid,),
            num_warps=num_warps,
            input_output_aliases=aliases,
            zeroed_outputs=tuple(zeroed),  # memset inside the custom call, no extra launch
            compute_capability=compute_capability,
            **options,
            **constexprs,
        )
        return list(results)

    return launch


@functools.partial(jax.jit, static_argnames=("plan", "triton_call", "compute_capability"))
def _run(params, grads, momentum, lr, hyper, *, plan, triton_call, compute_capability):
    """The traced step (jitted so that eager calls reuse the compiled kernels)."""
    launch = _launcher(triton_call, plan.tuning.num_warps, compute_capability)
    return S.run_step(params, grads, momentum, lr, hyper, plan=plan, launch=launch, xp=jnp)


@functools.partial(jax.jit, static_argnames=("plan", "triton_call", "compute_capability"))
def _run_given(
    params,
    grads,
    momentum,
    lr,
    hyper,
    ratios,
    global_norm,
    *,
    plan,
    triton_call,
    compute_capability,
):
    """The traced update half with given ratios (see :func:`triton_update_with_ratios`)."""
    launch = _launcher(triton_call, plan.tuning.num_warps, compute_capability)
    return S.run_update_given(
        params, grads, momentum, lr, hyper, ratios, global_norm, plan=plan, launch=launch, xp=jnp
    )


def triton_update_with_ratios(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    ratios: jax.Array,
    global_norm: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool = False,
    tuning: P.Tuning | None = None,
    triton_call: Callable | None = None,
    compute_capability: int | None = None,
) -> StepResult:
    """The update pass alone, with trust ratios the caller computed.

    Written for sharded params (``lars._sharded``): each shard would run the
    update kernel on its own elements with the ratios of whole layers. It is
    not registered as the backend's ``update_with_ratios`` yet: it has been
    checked in Triton's interpreter on one device only (a ``pure_callback``
    inside a custom-partitioned op crashes jax 0.11.2 on CPU, so the interpreter
    cannot run it sharded), and never on GPUs. Until then a mesh gathers the
    Triton backend's leaves (correct, replicated). Inside the user's
    ``shard_map`` the update runs in XLA (jax-triton's custom call is not
    checked against ``shard_map``'s varying axes).

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask, tuning,
        triton_call, compute_capability: As in :func:`run`.
      ratios: One trust ratio per leaf (float32; 1 outside the trust mask).
      global_norm: The global gradient norm, used with ``grad_clip_norm``.
      write_params: Return the new params (in place) instead of the updates.
    """
    if jax.sharding.get_abstract_mesh().manual_axes:
        return reference_update_with_ratios(
            params,
            grads,
            momentum,
            lr,
            ratios,
            global_norm,
            config=config,
            decay_mask=decay_mask,
            trust_mask=trust_mask,
            write_params=write_params,
        )
    plan, hyper = S.prepare(
        params,
        grads,
        momentum,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
        tuning=tuning,
        xp=jnp,
    )
    triton_call = triton_call or _default_triton_call()
    first, new_momentum, out_ratios = _run_given(
        list(params),
        list(grads),
        list(momentum),
        jnp.asarray(lr, jnp.float32),
        hyper,
        jnp.asarray(ratios, jnp.float32),
        jnp.asarray(global_norm, jnp.float32),
        plan=plan,
        triton_call=triton_call,
        compute_capability=compute_capability,
    )
    return StepResult(list(first), list(new_momentum), list(out_ratios))


def run(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    write_params: bool,
    tuning: P.Tuning | None = None,
    triton_call: Callable | None = None,
    compute_capability: int | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """The step, with the launch made explicit (``triton_step`` is this with defaults).

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask: As in
        ``lars._reference.reference_step``.
      write_params: Write the new params (over the old: in place) instead of
        the updates.
      tuning: The launch geometry (``plan.Tuning()`` by default).
      triton_call: ``jax_triton.triton_call`` (the default) or a function with
        its signature.
      compute_capability: The GPU's (e.g. 90); None asks jax-triton for device 0's.
      finite: Optional bool scalar (``skip_nonfinite``): when False the kernels
        leave params and momenta as they were (updates -0.0, ratios 1), so a
        skipped step needs no copies of them.
    """
    plan, hyper = S.prepare(
        params,
        grads,
        momentum,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
        tuning=tuning,
        xp=jnp,
        skip_nonfinite=finite is not None,
    )
    triton_call = triton_call or _default_triton_call()
    kernel_step = with_reference_jvp(
        lambda p, g, v, lr, *finite: _run(
            p,
            g,
            v,
            lr,
            with_finite(hyper, finite),
            plan=plan,
            triton_call=triton_call,
            compute_capability=compute_capability,
        ),
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=write_params,
    )
    first, new_momentum, ratios = kernel_step(
        list(params),
        list(grads),
        list(momentum),
        jnp.asarray(lr, jnp.float32),
        *finite_args(finite),
    )
    return StepResult(list(first), list(new_momentum), list(ratios))


def triton_step(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    tuning: P.Tuning | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """One LARS step over all leaves on the Triton kernels (GPU).

    Args:
      params, grads, momentum, lr, config, decay_mask, trust_mask: As in
        ``lars._reference.reference_step``.
      tuning: The launch geometry (``plan.Tuning()`` by default).
      finite: Optional bool scalar: False skips the step in the kernels (see
        :func:`run`).

    Returns:
      A ``StepResult`` (updates, new momenta, trust ratios).

    Raises:
      TypeError: naming the leaf, for a dtype the kernels do not handle (float64).
    """
    return run(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=False,
        tuning=tuning,
        finite=finite,
    )


def triton_apply(
    params: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    momentum: Sequence[jax.Array],
    lr: jax.Array,
    *,
    config: LarsConfig,
    decay_mask: Sequence[bool],
    trust_mask: Sequence[bool],
    tuning: P.Tuning | None = None,
    finite: jax.Array | None = None,
) -> StepResult:
    """Like :func:`triton_step`, but the first field holds the new params.

    They are written over the params' buffers (donate them to ``jax.jit``) and
    equal ``optax.apply_updates(params, updates)`` where XLA adds in float32
    and rounds once (always for float32 params).
    """
    return run(
        params,
        grads,
        momentum,
        lr,
        config=config,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=True,
        tuning=tuning,
        finite=finite,
    )


def count_launches(plan: P.StepPlan) -> dict[str, int]:
    """Triton launches per pass of a step."""
    return {kind: len(plan.launches(kind)) for kind in plan.passes()}
