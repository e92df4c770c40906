"""``lars.lars``: LARS as an ``optax.GradientTransformationExtraArgs``.

The contract with optax users: ``lars.lars(...)`` is what ``optax.lars``
returns, a ``GradientTransformationExtraArgs`` whose ``update(grads, state,
params, **extra_args)`` ignores the keyword arguments ``optax.chain``,
``optax.inject_hyperparams`` and their kind pass along (``value=loss``, ...);
the learning rate and the weight decay may be optax schedules of the step
count; float and complex params are updated (complex ones on the reference
backend). Every check happens before anything is computed, so a refused call
changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lars import _dispatch
from lars._config import LarsConfig, check_learning_rate
from lars._reference import negative_zeros_like
from lars._trees import MaskOrFn, check_like_params, check_params, resolve_mask
from lars.contract import Backend, StepInputs, StepSpec, compute_dtype

Schedule = Callable[[jax.Array], Any]


class LarsState(NamedTuple):
    """State of :func:`lars.lars` (and of :class:`lars.Lars`).

    The trust ratios are one float32 vector, not a tree of scalars: every
    array in the state crosses the boundary of a jitted step as a buffer of
    its own, and on a CPU ResNet-50's 161 ratios as scalars cost 0.2-1.3 ms a
    step to pass in and out (docs/native.md). :meth:`trust_ratio_tree` gives
    them the params' structure.

    Example:
      >>> import jax.numpy as jnp, lars
      >>> opt = lars.lars(0.1)
      >>> params = {"b": jnp.zeros(2), "w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> _, state = opt.update({"b": jnp.ones(2), "w": jnp.ones(3)}, state, params)
      >>> state.trust_ratio.shape
      (2,)
      >>> {k: round(float(r), 6) for k, r in state.trust_ratio_tree().items()}
      {'b': 1.0, 'w': 0.001}
    """

    count: jax.Array  #: The number of steps taken so far (int32 scalar).
    #: Per-leaf momentum v (float32; float64 for float64 and complex for complex params).
    momentum: optax.Updates
    #: The ratio r of the last step, one float32 per params leaf in the order
    #: of ``jax.tree.leaves(params)`` (shape ``(number of leaves,)``; 1 before
    #: the first step).
    trust_ratio: jax.Array
    skipped: jax.Array  #: Steps skipped for a non-finite gradient (int32; skip_nonfinite).

    def trust_ratio_tree(self) -> Any:
        """The trust ratios as a tree shaped like the params (and the momentum).

        Returns:
          The momentum's structure with a float32 scalar per leaf: the ratio of
          the last step (1 before the first).

        Raises:
          TypeError, ValueError: when ``trust_ratio`` is not a float32 vector
            with one entry per momentum leaf.
        """
        leaves, treedef = jax.tree.flatten(self.momentum)
        check_ratio_vector(self.trust_ratio, len(leaves), "state.trust_ratio")
        return treedef.unflatten(list(self.trust_ratio))


def check_ratio_vector(ratios: Any, n: int, what: str) -> None:
    """Checks that ``ratios`` is a float32 vector of ``n`` trust ratios.

    Raises:
      TypeError: not an array, or not float32 (a tree of per-leaf scalars, as
        states kept before the ratios became one vector, says how to convert).
      ValueError: another shape.
    """
    if not hasattr(ratios, "shape") or not hasattr(ratios, "dtype"):
        hint = ""
        if isinstance(ratios, (Mapping, list, tuple)):
            hint = (
                " (a tree of per-leaf ratios, as earlier versions of lars kept, converts with "
                "jnp.stack(jax.tree.leaves(tree)).astype(jnp.float32))"
            )
        raise TypeError(
            f"{what} must be a float32 array of shape ({n},), one ratio per params leaf; "
            f"got a {type(ratios).__name__}{hint}"
        )
    if jnp.shape(ratios) != (n,):
        raise ValueError(
            f"{what} must have shape ({n},), one ratio per params leaf; got shape "
            f"{jnp.shape(ratios)}"
        )
    if jnp.result_type(ratios) != jnp.float32:
        raise TypeError(f"{what} must be float32, got {jnp.result_type(ratios)}")


def _ratio_vector(ratios: list[Any]) -> jax.Array:
    """The backend's per-leaf ratios as the state's float32 vector."""
    if not ratios:
        return jnp.ones((0,), jnp.float32)
    return jnp.stack([jnp.asarray(r, jnp.float32).reshape(()) for r in ratios])


@dataclasses.dataclass(frozen=True)
class LarsSpec:
    """Everything a step needs besides arrays: hyperparameters, masks, backend."""

    config: LarsConfig
    backend: Backend
    weight_decay_mask: MaskOrFn = None
    trust_ratio_mask: MaskOrFn = None
    skip_nonfinite: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # the backend's, normalised
    auto: bool = False  # backend="auto": the reference runs what the backend cannot
    # A schedule of the step count for the weight decay (config.weight_decay is
    # then replaced by its value at each step).
    weight_decay_schedule: Schedule | None = None


def make_spec(
    config: LarsConfig,
    *,
    weight_decay_mask: MaskOrFn,
    trust_ratio_mask: MaskOrFn,
    skip_nonfinite: bool,
    backend: str,
    backend_options: Mapping[str, Any] | None = None,
    weight_decay_schedule: Schedule | None = None,
) -> LarsSpec:
    """Checks the options besides the hyperparameters and resolves the backend."""
    if backend_options is not None and not isinstance(backend_options, Mapping):
        raise TypeError(f"backend_options must be a mapping, got {backend_options!r}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    resolved = _dispatch.resolve(backend, dict(backend_options or {}))
    options = resolved.options(dict(backend_options or {}))
    return LarsSpec(
        config=config,
        backend=resolved,
        weight_decay_mask=weight_decay_mask,
        trust_ratio_mask=trust_ratio_mask,
        skip_nonfinite=skip_nonfinite,
        options=tuple(sorted(options.items())),
        auto=backend == "auto",
        weight_decay_schedule=weight_decay_schedule,
    )


def _step_config(spec: LarsSpec, count: jax.Array) -> tuple[LarsConfig, tuple[str, ...]]:
    """The step's hyperparameters, and the names of those that change from step to step.

    With a weight-decay schedule, its value at ``count`` (as
    ``optax.add_decayed_weights`` evaluates it: before the count advances).
    """
    schedule = spec.weight_decay_schedule
    if schedule is None:
        return spec.config, ()
    value = schedule(count)
    dtype = jnp.result_type(value)
    if jnp.shape(value) != () or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise TypeError(
            "the weight_decay schedule must return a real scalar, got an array of shape "
            f"{jnp.shape(value)} and dtype {dtype}"
        )
    try:
        config = dataclasses.replace(spec.config, weight_decay=jnp.asarray(value))
    except ValueError as e:  # a concrete value out of range (eager steps)
        step = count if isinstance(count, jax.core.Tracer) else int(count)
        raise ValueError(f"the weight_decay schedule's value at step {step}: {e}") from None
    return config, ("weight_decay",)


def _check_complex_options(paths: list[str], leaves: list[Any], config: LarsConfig) -> None:
    """Refuses value clipping on complex leaves (``optax.clip`` raises there too)."""
    if config.grad_clip_value is None:
        return
    for path, leaf in zip(paths, leaves, strict=True):
        if jnp.iscomplexobj(leaf):
            raise ValueError(
                f"grad_clip_value cannot clip the complex params leaf at {path}: complex "
                "numbers have no order (use grad_clip_norm, or clip real params only)"
            )


def init_state(params: Any) -> LarsState:
    """Zero momentum (``compute_dtype`` of each param), ratios of 1, count 0; checks the leaves."""
    check_params(params)
    return LarsState(
        count=jnp.zeros((), jnp.int32),
        # zeros_like keeps a sharded param's sharding for its momentum.
        momentum=jax.tree.map(
            lambda p: jnp.zeros_like(p, dtype=compute_dtype(jnp.result_type(p))), params
        ),
        trust_ratio=jnp.ones((len(jax.tree.leaves(params)),), jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _lars_step(
    grads: Any, state: LarsState, params: Any, lr: jax.Array, spec: LarsSpec, *, emit_params: bool
) -> tuple[Any, LarsState]:
    """Checks the inputs, calls the backend on all leaves, handles skipped steps.

    With ``emit_params`` the first result is the new params (through the
    backend's in-place ``apply`` form where it has one), else the updates.
    """
    if params is None:
        raise ValueError("lars needs params: call update(grads, state, params)")
    if not isinstance(state, LarsState):
        raise TypeError(f"state must be a LarsState, got {type(state).__name__}")
    paths, leaves, _ = check_params(params)
    check_like_params("grads", grads, params)
    check_like_params("state.momentum", state.momentum, params, grads=False)
    check_ratio_vector(state.trust_ratio, len(paths), "state.trust_ratio")
    decay_mask = resolve_mask(spec.weight_decay_mask, params, "weight_decay_mask")
    trust_mask = resolve_mask(spec.trust_ratio_mask, params, "trust_ratio_mask")
    config, runtime = _step_config(spec, state.count)
    _check_complex_options(paths, leaves, config)

    p_leaves, treedef = jax.tree.flatten(params)
    p_leaves = [jnp.asarray(p) for p in p_leaves]
    g_leaves = [jnp.asarray(g) for g in treedef.flatten_up_to(grads)]
    v_leaves = treedef.flatten_up_to(state.momentum)
    step_spec = StepSpec.build(
        config,
        p_leaves,
        g_leaves,
        decay_mask=decay_mask,
        trust_mask=trust_mask,
        write_params=emit_params,
        options=spec.options,
    )
    backend = _dispatch.check_step(spec.backend, step_spec, paths, auto=spec.auto, runtime=runtime)
    ok = _dispatch.all_finite(g_leaves) if spec.skip_nonfinite else None
    inputs = StepInputs(p_leaves, g_leaves, v_leaves, jnp.asarray(lr, jnp.float32), finite=ok)
    result, in_place, skips_itself = _dispatch.run_step(backend, step_spec, paths, inputs)
    out, momentum = list(result.updates), list(result.momentum)
    ratios = _ratio_vector(list(result.trust_ratio))
    if emit_params and not in_place:
        out = [(p + u).astype(p.dtype) for p, u in zip(p_leaves, out, strict=True)]
    count = optax.safe_increment(state.count)
    skipped = state.skipped
    if ok is not None:
        # A skipped step leaves params and momentum bitwise as they were: the
        # update is -0.0 (x + -0.0 == x for every x, signed zeros included).
        if not emit_params:
            out = [jnp.where(ok, u, negative_zeros_like(u)) for u in out]
        elif not skips_itself:
            out = [jnp.where(ok, a, b) for a, b in zip(out, p_leaves, strict=True)]
        if not skips_itself:
            momentum = [jnp.where(ok, a, b) for a, b in zip(momentum, v_leaves, strict=True)]
        ratios = jnp.where(ok, ratios, state.trust_ratio)
        count = jnp.where(ok, count, state.count)
        skipped = skipped + jnp.where(ok, 0, 1).astype(skipped.dtype)
    new_state = LarsState(
        count=count,
        momentum=treedef.unflatten(momentum),
        trust_ratio=ratios,
        skipped=skipped,
    )
    return treedef.unflatten(out), new_state


class LarsUpdate:
    """The ``update`` function of :func:`lars.lars`, and its in-place twin.

    Calling it is optax's ``update(grads, state, params, **extra_args)``;
    :meth:`apply_gradients` is the same step returning new params.
    """

    def __init__(self, learning_rate: float | Callable[[jax.Array], jax.Array], spec: LarsSpec):
        self.learning_rate = learning_rate
        self.spec = spec

    def _lr(self, state: LarsState) -> Any:
        if not callable(self.learning_rate):
            return self.learning_rate
        if not isinstance(state, LarsState):
            raise TypeError(f"state must be a LarsState, got {type(state).__name__}")
        return self.learning_rate(state.count)

    def __call__(
        self, grads: Any, state: LarsState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LarsState]:
        """One LARS step as optax updates: ``params + updates`` are the new params.

        Args:
          grads: The gradients, shaped like ``params``.
          state: The :class:`LarsState`.
          params: The params (required).
          **extra_args: Ignored, as optax's aliases ignore them: what
            ``optax.chain`` and other ``GradientTransformationExtraArgs``
            pass along (e.g. ``value=loss``).

        Raises:
          ValueError, TypeError: on malformed input, naming the offending leaf.
        """
        del extra_args
        return _lars_step(grads, state, params, self._lr(state), self.spec, emit_params=False)

    def apply_gradients(self, params: Any, state: LarsState, grads: Any) -> tuple[Any, LarsState]:
        """The step returning (new params, new state); see ``LarsTransformation``."""
        return _lars_step(grads, state, params, self._lr(state), self.spec, emit_params=True)


class LarsTransformation(optax.GradientTransformationExtraArgs):
    """``lars.lars``'s transformation: an optax ``(init, update)`` pair, plus
    :meth:`apply_gradients`, the step that returns new params directly.

    It is an ``optax.GradientTransformationExtraArgs`` (a NamedTuple of
    ``init`` and ``update``), as ``optax.lars`` is: it chains, unpacks and
    wraps as any other, and ``update`` takes (and ignores) extra keyword
    arguments.
    """

    def apply_gradients(self, params: Any, state: LarsState, grads: Any) -> tuple[Any, LarsState]:
        """One step that returns the new params and state instead of updates.

        Equal, bit for bit, to ``optax.apply_updates(params, updates)`` after
        ``update(grads, state, params)``. Backends with an in-place form write
        the new params over the params' buffers: in ``jax.jit`` with params and
        state donated (``donate_argnums=(0, 1)``: the arguments come in the
        order of the results, so JAX pairs each donated buffer with its own
        result), the native backend's step allocates nothing and moves 20 bytes
        per float32 parameter where the leaves fit in cache.

        Example:
          >>> import jax, jax.numpy as jnp, lars
          >>> opt = lars.lars(0.1)
          >>> params = {"w": jnp.ones(3)}
          >>> state = opt.init(params)
          >>> step = jax.jit(opt.apply_gradients, donate_argnums=(0, 1))
          >>> params, state = step(params, state, {"w": jnp.full(3, 0.5)})
          >>> print(params["w"])
          [0.9999 0.9999 0.9999]
        """
        return self.update.apply_gradients(params, state, grads)


def lars(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    momentum: float = 0.9,
    weight_decay: float | Callable[[jax.Array], jax.Array] = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    *,
    nesterov: bool = False,
    weight_decay_mask: MaskOrFn = None,
    trust_ratio_mask: MaskOrFn = None,
    trust_clip: float | None = None,
    grad_clip_norm: float | None = None,
    grad_clip_value: float | None = None,
    lr_inside_momentum: bool = False,
    skip_nonfinite: bool = False,
    backend: str = "auto",
    backend_options: Mapping[str, Any] | None = None,
) -> LarsTransformation:
    r"""LARS: layer-wise adaptive rate scaling, as an optax transformation.

    By default this is exactly ``braintools.optim.Lars`` (0.4.0)::

      g  <- clip_by_global_norm(g), clip(g)          (when asked for)
      g  <- g + weight_decay * w                     (coupled decay)
      r  =  trust_coefficient * ||w|| / (||g|| + eps), per array leaf
      r  =  1 where ||w|| == 0 or ||g|| == 0
      v  <- momentum * v + r * g
      w  <- w - lr_t * v

    With ``lr_inside_momentum=True`` and ``eps=0.0`` it is ``optax.lars``
    (``v <- momentum * v + lr_t * r * g; w <- w - v``).

    Args:
      learning_rate: A float, or an optax schedule (a callable of the step
        count, evaluated before the count is advanced).
      momentum: Momentum factor, in [0, 1).
      weight_decay: Coupled L2 decay added to the gradient before the trust
        ratio, >= 0; or an optax schedule (a callable of the step count,
        evaluated as the learning rate is), as ``optax.lars`` takes. A
        schedule's values are run-time values: backends that compile
        hyperparameters in (``native``) refuse them and ``"auto"`` runs the
        step on one that takes them.
      trust_coefficient: eta, > 0.
      eps: Added to ``||g||`` in the ratio's denominator, >= 0.
      nesterov: Step along ``r*g + momentum*v_new`` (optax/PyTorch Nesterov).
      weight_decay_mask: Pytree of bools (or a prefix of params), or a callable
        ``params -> such a pytree``; where False, no weight decay.
      trust_ratio_mask: Same form; where False, ``r = 1``.
        :func:`lars.exclude_bias_and_norm` is a ready mask for both.
      trust_clip: If set, ``r = min(r, trust_clip)`` on every leaf whose ratio
        is adaptive (``trust_clip=1.0`` is LARC clipping).
      grad_clip_norm: If set, clip all gradients to this global L2 norm first.
      grad_clip_value: If set, then clip every entry to ``[-v, v]``.
      lr_inside_momentum: The optax.lars form of momentum (see above).
      skip_nonfinite: If True, a step whose gradients hold any NaN or Inf
        leaves params, momentum, trust ratios and the step count bitwise
        unchanged (the updates are -0.0) and adds one to ``state.skipped``.
        If False (the default, as braintools and optax), NaN/Inf propagate into
        the params and momentum.
      backend: "auto" or a backend name (see :func:`lars.available_backends`).
      backend_options: Options of the named backend (not with "auto"), e.g.
        ``{"fused": False}`` for ``pallas`` or ``{"slots": 64}`` for
        ``triton``; each backend's ``options`` lists and checks them.

    Returns:
      A :class:`LarsTransformation` (an ``optax.GradientTransformationExtraArgs``)
      whose state is a :class:`LarsState`. ``update(grads, state, params)``
      needs ``params`` and ignores extra keyword arguments;
      ``apply_gradients(params, state, grads)`` returns the new params and
      state (in place on backends that can).

    Params may be floating-point or complex (complex64/complex128, computed as
    ``optax.lars`` does, with norms of ``|x|``); complex leaves run on the
    reference backend (``"auto"`` picks it; another named backend refuses,
    naming the leaf).

    Raises:
      ValueError, TypeError: for a hyperparameter out of range or of the wrong
        type, or an unknown backend; RuntimeError for a backend that cannot run
        on this machine.

    Example:
      >>> import jax.numpy as jnp, optax, lars
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> opt = lars.lars(0.1, weight_decay=1e-4)
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> print(state.count, params["b"])
      1 [-0.1 -0.1 -0.1]

    References:
      You, Gitman & Ginsburg, `Large Batch Training of Convolutional Networks
      <https://arxiv.org/abs/1708.03888>`_, 2017.
    """
    # A scheduler object (braintools', lars.schedules'): braintools' ones are
    # callable but return -lr for optax.scale_by_schedule, so a call would step
    # uphill; they are refused whether callable or not.
    if hasattr(learning_rate, "get_lr"):
        raise TypeError(
            "learning_rate is a scheduler object; lars.lars takes a float or an optax "
            "schedule (a callable of the step count). Use lars.Lars for scheduler objects."
        )
    if not callable(learning_rate):
        check_learning_rate(learning_rate)
    weight_decay_schedule = None
    if hasattr(weight_decay, "get_lr"):
        raise TypeError(
            "weight_decay is a scheduler object; lars.lars takes a float or an optax "
            "schedule (a callable of the step count) for weight_decay"
        )
    if callable(weight_decay):
        # The config's value stands in until each step replaces it.
        weight_decay_schedule, weight_decay = weight_decay, 0.0
    config = LarsConfig(
        momentum=momentum,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        nesterov=nesterov,
        trust_clip=trust_clip,
        grad_clip_norm=grad_clip_norm,
        grad_clip_value=grad_clip_value,
        lr_inside_momentum=lr_inside_momentum,
    )
    spec = make_spec(
        config,
        weight_decay_mask=weight_decay_mask,
        trust_ratio_mask=trust_ratio_mask,
        skip_nonfinite=skip_nonfinite,
        backend=backend,
        backend_options=backend_options,
        weight_decay_schedule=weight_decay_schedule,
    )
    return LarsTransformation(init_state, LarsUpdate(learning_rate, spec))
