"""Parameter groups of :class:`lars.Lars`, with braintools' semantics.

``param_groups`` is braintools' list of dicts: group 0 holds the registered
params (``{'params', 'lr', 'weight_decay'}``), each ``add_param_group`` call
appends ``{'params', 'lr', 'weight_decay', **options}``. Every group is its
own :func:`lars.lars` step over its leaves: its hyperparameters are the
optimizer's, overridden by the option keys (:data:`OPTIONS`) present in its
dict, read at every update (a change recompiles once); other keys are kept
and ignored, as braintools does. A group's ``'lr'`` is read at every update
and passed to the compiled step as a float32 argument, so changing it never
recompiles. Group 0's rate is the scheduler's current rate (``'lr'`` is a
view of it, as braintools' ``_current_lr`` state).

Gradients are split by the groups' top-level keys: a gradient whose key no
group holds is ignored (a frozen layer), a registered key without a gradient
raises (braintools raises too).
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lars._config import check_learning_rate
from lars._holder import is_state_object
from lars._transform import LarsTransformation, LarsUpdate, lars
from lars._trees import check_params

# The keyword options of lars.lars a param group may override.
OPTIONS = (
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "eps",
    "nesterov",
    "weight_decay_mask",
    "trust_ratio_mask",
    "trust_clip",
    "grad_clip_norm",
    "grad_clip_value",
    "lr_inside_momentum",
    "skip_nonfinite",
    "backend",
    "backend_options",
)


_STANDARD_DICTS = (dict, collections.OrderedDict, collections.defaultdict)


def plain_dicts(tree: Any) -> Any:
    """Rebuilds dict subclasses that JAX flattens as custom nodes as plain dicts.

    ``brainstate``'s ``model.states(...)`` is a ``FlattedDict`` (a custom pytree
    node) while ``brainstate.transform.grad`` returns a plain dict with the same
    keys; like braintools, the weights are registered as a plain dict.
    """
    if not isinstance(tree, dict):
        return tree
    if type(tree) in _STANDARD_DICTS:
        out = copy.copy(tree)
        for k in out:
            out[k] = plain_dicts(out[k])
        return out
    return {k: plain_dicts(v) for k, v in tree.items()}


def values_of(targets: Any) -> Any:
    """The values of a pytree of state objects and arrays, checked as params."""
    values = jax.tree.map(
        lambda t: t.value if is_state_object(t) else t, targets, is_leaf=is_state_object
    )
    check_params(values)
    return values


def plain_values(targets: Any) -> Any:
    """The plain-array leaves' values (None where a state object holds the value)."""
    return jax.tree.map(
        lambda t: None if is_state_object(t) else jnp.asarray(t), targets, is_leaf=is_state_object
    )


def group_values(targets: Any, values: Any, *, states: bool = False) -> Any:
    """A group's current params: state objects read out (or kept, ``states=True``)."""
    return jax.tree.map(
        lambda t, a: (t if states else t.value) if is_state_object(t) else a,
        targets,
        values,
        is_leaf=lambda x: is_state_object(x) or x is None,
    )


def check_disjoint(groups: list[dict], params: Any, skip: int | None) -> None:
    """Raises if ``params`` shares a key or a state object with a group (but ``skip``)."""
    ids = {id(x) for x in jax.tree.leaves(params, is_leaf=is_state_object) if is_state_object(x)}
    for j, group in enumerate(groups):
        if j == skip:
            continue
        for k in params if isinstance(params, Mapping) else ():
            if k in group["params"]:
                raise ValueError(f"params key {k!r} is already in param_groups[{j}]")
        for x in jax.tree.leaves(group["params"], is_leaf=is_state_object):
            if is_state_object(x) and id(x) in ids:
                raise ValueError(f"a state object of params is already in param_groups[{j}]")


class SchedulerLR:
    """``param_groups[0]['lr']`` (and ``_current_lr``): a view of the optimizer's rate.

    Reading gives the rate the next update applies to group 0; writing sets
    the scheduler's current rate (what ``current_lr = x`` does). Traced values
    (a scheduler stepped inside ``jit``) pass through unchecked.
    """

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    @property
    def value(self) -> Any:
        opt = self._optimizer
        if opt._schedule_fn is not None:
            return opt._schedule_fn(opt._count())
        return opt._scheduler.current_lrs.value[0]

    @value.setter
    def value(self, lr: Any) -> None:
        opt = self._optimizer
        if opt._schedule_fn is not None:
            raise TypeError("the learning rate cannot be set when lr is a schedule function")
        if not isinstance(lr, jax.core.Tracer):
            check_learning_rate(lr, "current_lr")
        lrs = list(opt._scheduler.current_lrs.value)
        lrs[0] = lr
        opt._scheduler.current_lrs.value = lrs

    def __repr__(self) -> str:
        return f"SchedulerLR({self.value!r})"


def group_lr(group: Mapping[str, Any]) -> Any:
    """The rate in a group's ``'lr'`` entry (a state object's value or a number)."""
    lr = group["lr"]
    return lr.value if is_state_object(lr) else lr


def group_options(defaults: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
    """The lars.lars options of a group: the optimizer's, overridden by the group's keys."""
    return {k: group[k] if k in group else defaults[k] for k in OPTIONS}


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def same_options(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two option dicts give the same step (identity or equality per entry)."""
    return all(_same(a[k], b[k]) for k in OPTIONS)


def build(index: int, options: Mapping[str, Any], lr: Any) -> LarsTransformation:
    """``lars.lars(lr, **options)``; an error names the group."""
    try:
        return lars(lr, **options)
    except (TypeError, ValueError) as e:
        raise type(e)(f"param_groups[{index}]: {e}") from e


def make_step(updates: tuple[LarsUpdate, ...], scheduled: bool, donate: bool) -> Any:
    """The jitted step over all groups.

    With one group it is ``(params, grads, state, lr) -> (params, state)``;
    with several, each argument and result is a tuple with one entry per
    group. ``scheduled``: group 0's rate comes from its own schedule function
    (its ``lr`` argument is unused).
    """

    def one(i: int, params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
        update = updates[i]
        if i == 0 and scheduled:
            return update.apply_gradients(params, state, grads)
        return LarsUpdate(lr, update.spec).apply_gradients(params, state, grads)

    if len(updates) == 1:

        def run(params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
            return one(0, params, grads, state, lr)

    else:

        def run(params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
            out = [
                one(i, *args) for i, args in enumerate(zip(params, grads, state, lr, strict=True))
            ]
            return tuple(o[0] for o in out), tuple(o[1] for o in out)

    # Donated buffers come in the order of the results, so each is reused for its own.
    return jax.jit(run, donate_argnums=(0, 2) if donate else ())


def split_grads(targets: list[Any], grads: Any) -> list[Any]:
    """The gradients of each group, with the keys no group holds left out.

    With one group whose params are a dict, the grads are filtered by its
    top-level keys (braintools: ``{k: grads[k] for k in params if k in
    grads}``); with several groups, each group's grads are its keys' entries.
    Anything else is passed on whole and must match the params' structure.
    """
    if len(targets) == 1 and not (isinstance(targets[0], Mapping) and isinstance(grads, Mapping)):
        return [grads]
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"with several param groups, grads must be a dict keyed like the params, "
            f"got {type(grads).__name__}"
        )
    out = []
    for params in targets:
        if all(k in params for k in grads):
            out.append(grads)
            continue
        sub = copy.copy(grads)
        for k in list(sub):
            if k not in params:
                del sub[k]
        out.append(sub)
    return out


def merged(trees: list[Any]) -> Any:
    """One group's tree as it is; several groups' dicts as one dict."""
    if len(trees) == 1:
        return trees[0]
    out: dict = {}
    for tree in trees:
        out.update(tree)
    return out


def _path_string(path: tuple) -> str:
    """braintools' ``UniqueStateManager`` form of a path: ``a.b[0]``."""
    text = ""
    for i, key in enumerate(path):
        if hasattr(key, "key"):
            part = str(key.key)
        elif hasattr(key, "idx"):
            part = f"[{key.idx}]"
        else:
            part = str(key)
        text += part if part.startswith("[") or i == 0 else "." + part
    return text


class ParamStates:
    """The registered weights of every group (braintools' ``UniqueStateManager`` reads).

    Args:
      tree: The groups' params merged (a pytree of state objects and arrays).
    """

    def __init__(self, tree: Any) -> None:
        self._tree = tree
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state_object)[0]
        self.unique_paths = [path for path, _ in flat]
        self.unique_states = [leaf for _, leaf in flat]

    def to_pytree(self) -> Any:
        """The weights as registered (state objects or arrays)."""
        return self._tree

    def to_pytree_value(self) -> Any:
        """The weights' current values."""
        return jax.tree.map(
            lambda x: x.value if is_state_object(x) else x, self._tree, is_leaf=is_state_object
        )

    def to_dict(self) -> dict[str, Any]:
        """``{'a.b': weight}`` by path string, as braintools."""
        return {
            _path_string(p): s for p, s in zip(self.unique_paths, self.unique_states, strict=True)
        }

    def to_dict_value(self) -> dict[str, Any]:
        """``{'a.b': value}`` by path string."""
        return {
            _path_string(p): s.value if is_state_object(s) else s
            for p, s in zip(self.unique_paths, self.unique_states, strict=True)
        }

    @property
    def num_unique_states(self) -> int:
        """The number of registered weights."""
        return len(self.unique_states)

    def __len__(self) -> int:
        return len(self.unique_states)
