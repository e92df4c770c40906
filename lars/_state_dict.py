"""Checkpoints of :class:`lars.Lars` in ``braintools.optim.Lars``'s layout (0.4.0).

``state_dict()`` writes braintools' keys, plus two of its own::

  step_count                int
  lr, base_lr               float (the current rate of group 0, the base rate)
  param_groups              {'0': {'params': values, 'lr', 'weight_decay', ...}, '1': ...}
  opt_state                 group 0's state as braintools' optax chain:
                            (EmptyState() per clip_by_global_norm / clip /
                             add_decayed_weights (weight_decay > 0) /
                             scale_by_trust_ratio, TraceState(trace=momentum),
                             ScaleByScheduleState(count))
  param_groups_opt_states   {'0': the same chain for group 1, ...}
  scheduler                 the scheduler's state_dict (None for a schedule function)
  lars                      {'trust_ratio': {'0': per-leaf ratios, ...},
                             'skipped': {'0': skipped steps, ...}}

Arrays are NumPy arrays and numbers Python numbers, so the dict saves with
``braintools.file.msgpack_save``, orbax's ``StandardCheckpointer``, pickle or
``numpy.savez``, and ``braintools.optim.Lars.load_state_dict`` reads it (its
added groups are Adam, so only a one-group state carries over to it).
Group entries that are not numbers (a group's ``'name'``, masks) are left out:
orbax stores no strings. On several processes (``jax.distributed``), arrays
sharded across them are gathered whole into every process, so there
``state_dict()`` is a collective: call it on every process (``load_state_dict``
puts each array back on the sharding of the one it replaces).

``load_state_dict`` reads that layout, braintools' own (no ``scheduler`` and
no ``lars``: the scheduler then gets ``lr`` as its current rate, as braintools
does, and the trust ratios and skip counters stay as they are, braintools
keeps none) and ``lars`` 0.1.0's (``opt_state`` as a ``LarsState`` dict; one
group), in each form the formats above give back (see :mod:`lars._restore`).
Saved ``params`` are not loaded (braintools neither). It checks everything
first and only then writes, so a load that raises changes nothing.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from lars._groups import build, group_lr, group_options
from lars._holder import is_state_object
from lars._restore import array_like, as_int, as_list, as_mapping, as_real, describe, restore_like
from lars._transform import LarsState
from lars.schedules import LRScheduler, check_state

_LEGACY = ("count", "momentum", "trust_ratio", "skipped")


def _chain_names(options: Mapping[str, Any]) -> list[str]:
    """The transformations of braintools.optim.Lars's optax chain for these options."""
    names = []
    if options["grad_clip_norm"] is not None:
        names.append("clip_by_global_norm")
    if options["grad_clip_value"] is not None:
        names.append("clip")
    decay = options["weight_decay"]
    if callable(decay) or decay > 0:  # a schedule (lars only) counts as decay
        names.append("add_decayed_weights")
    return [*names, "scale_by_trust_ratio", "trace", "scale_by_schedule"]


def _whole(x: Any) -> np.ndarray:
    """The whole array in NumPy; one sharded over several processes is gathered from all."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _host(tree: Any) -> Any:
    """The tree with NumPy arrays for its leaves (0-d ones too: orbax takes no NumPy scalars)."""
    return jax.tree.map(_whole, tree)


def _number(value: Any) -> Any:
    """A Python number (or string) for a scalar of any kind."""
    return np.asarray(value).item()


def _chain(options: Mapping[str, Any], state: LarsState) -> tuple:
    empty = [optax.EmptyState()] * (len(_chain_names(options)) - 2)
    return (
        *empty,
        optax.TraceState(trace=_host(state.momentum)),
        optax.ScaleByScheduleState(count=np.asarray(state.count)),
    )


def _group_entry(opt: Any, index: int, group: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in group.items():
        if key == "params":
            out[key] = _host(opt._group_values(index))
        elif key == "lr":
            out[key] = float(np.asarray(group_lr(group)))
        elif value is None or isinstance(value, (bool, np.bool_, numbers.Real)):
            out[key] = value if value is None else _number(value)
    return out


def state_dict(opt: Any) -> dict[str, Any]:
    """The checkpoint of ``opt`` (see the module docstring)."""
    holders = opt._holders()
    options = [group_options(opt._defaults, g) for g in opt.param_groups]
    states = [h.value for h in holders]
    sched = opt._scheduler
    return {
        "step_count": int(np.asarray(opt.step_count.value)),
        "lr": float(np.asarray(opt.current_lr)),
        "base_lr": float(opt.base_lr),
        "param_groups": {str(i): _group_entry(opt, i, g) for i, g in enumerate(opt.param_groups)},
        "param_groups_opt_states": {
            str(i - 1): _chain(options[i], states[i]) for i in range(1, len(states))
        },
        "opt_state": _chain(options[0], states[0]) if states else None,
        "scheduler": None if sched is None else jax.tree.map(_number, sched.state_dict()),
        "lars": {
            "trust_ratio": {str(i): _host(s.trust_ratio_tree()) for i, s in enumerate(states)},
            "skipped": {str(i): int(s.skipped) for i, s in enumerate(states)},
        },
    }


def _empty(entry: Any) -> bool:
    return entry is None or (isinstance(entry, (Mapping, list, tuple)) and len(entry) == 0)


def _field(entry: Any, name: str, what: str) -> Any:
    if isinstance(entry, Mapping) and [str(k) for k in entry] == [name]:
        return next(iter(entry.values()))
    if isinstance(entry, tuple) and getattr(entry, "_fields", None) == (name,):
        return entry[0]
    raise TypeError(f"{what} must be an optax state holding only {name!r}, got {describe(entry)}")


def _read_chain(saved: Any, what: str, options: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(momentum, count)`` from braintools' chain state, checked against its layout."""
    names = _chain_names(options)
    entries = as_list(saved, what)
    if len(entries) != len(names):
        raise ValueError(
            f"{what} has {len(entries)} entries; the state of braintools.optim.Lars with these "
            f"settings (grad_clip_norm={options['grad_clip_norm']}, grad_clip_value="
            f"{options['grad_clip_value']}, weight_decay={options['weight_decay']}) has "
            f"{len(names)}: {names}"
        )
    for j, entry in enumerate(entries[:-2]):
        if not _empty(entry):
            raise ValueError(
                f"{what}[{j}] ({names[j]}) must be an empty state, got {describe(entry)}"
            )
    n = len(entries)
    return _field(entries[-2], "trace", f"{what}[{n - 2}]"), _field(
        entries[-1], "count", f"{what}[{n - 1}]"
    )


def _is_legacy(saved: Any) -> bool:
    return isinstance(saved, LarsState) or (isinstance(saved, Mapping) and "momentum" in saved)


def _new_state(current: LarsState, parts: Mapping[str, Any], whats: Mapping[str, str]) -> LarsState:
    """A LarsState from saved parts (trust_ratio and skipped optional), checked.

    ``whats`` names each part's place in the state dict for error messages.
    """
    count = as_int(parts["count"], whats["count"])
    momentum = restore_like(current.momentum, parts["momentum"], whats["momentum"], array_like)
    trust = current.trust_ratio
    if "trust_ratio" in parts:
        saved = parts["trust_ratio"]
        if isinstance(saved, (np.ndarray, jax.Array)) and np.ndim(saved) == 1:
            # A LarsState saved whole: the ratios as the state's vector.
            trust = array_like(trust, saved, whats["trust_ratio"])
        else:  # the state dict's per-leaf tree
            tree = restore_like(current.trust_ratio_tree(), saved, whats["trust_ratio"], array_like)
            leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
            vector = np.stack(leaves) if leaves else np.ones((0,), np.float32)
            trust = array_like(trust, vector, whats["trust_ratio"])  # on trust's sharding
    skipped = current.skipped
    if "skipped" in parts:
        skipped = jnp.asarray(as_int(parts["skipped"], whats["skipped"]), jnp.int32)
    return LarsState(jnp.asarray(count, jnp.int32), momentum, trust, skipped)


def _scheduler_commit(sched: Any, saved: Any) -> Callable[[], None]:
    """Checks a scheduler state now; the returned function writes it."""
    what = "state_dict['scheduler']"
    if isinstance(sched, LRScheduler):
        checked = sched.checked_state(saved, what)
        return lambda: sched.restore_checked(checked)
    last_epoch, base_lrs, current_lrs = check_state(saved, what)
    normal = {**saved, "last_epoch": last_epoch, "base_lrs": base_lrs, "current_lrs": current_lrs}

    def commit() -> None:  # another library's scheduler: restore it if its load fails
        before = (sched.last_epoch.value, list(sched.base_lrs), list(sched.current_lrs.value))
        try:
            sched.load_state_dict(normal)
        except Exception:
            sched.last_epoch.value, sched.base_lrs, sched.current_lrs.value = before
            raise

    return commit


def _required(sd: Mapping, keys: tuple[str, ...], layout: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state_dict lacks {missing} ({layout})")


def prepare_load(opt: Any, sd: Any) -> Callable[[], None]:
    """Checks ``sd`` against ``opt`` and returns the function that writes it (cannot fail
    but for another library's scheduler, whose load is undone if it raises).

    Raises:
      TypeError, ValueError: naming the bad entry.
    """
    sd = as_mapping(sd, "state_dict")
    _required(sd, ("step_count", "lr", "base_lr", "opt_state"), "every layout")
    saved_state = sd["opt_state"]
    ours = "scheduler" in sd or "lars" in sd
    legacy = _is_legacy(saved_state) or (
        saved_state is None and "scheduler" in sd and not {"lars", "param_groups"} & set(sd)
    )
    if legacy:
        _required(sd, ("scheduler",), "lars 0.1.0's layout")
    elif ours:
        keys = ("param_groups", "param_groups_opt_states", "scheduler", "lars")
        _required(sd, keys, "lars's layout")
    else:
        _required(sd, ("param_groups", "param_groups_opt_states"), "braintools' layout")
    step_count = as_int(sd["step_count"], "state_dict['step_count']", maximum=2**63 - 1)
    lr = as_real(sd["lr"], "state_dict['lr']")
    base_lr = as_real(sd["base_lr"], "state_dict['base_lr']")

    commits: list[Callable[[], None]] = []
    if "scheduler" in sd:
        if (sd["scheduler"] is None) != (opt._scheduler is None):
            raise ValueError("state_dict's scheduler does not match this optimizer's lr")
        if opt._scheduler is not None:
            commits.append(_scheduler_commit(opt._scheduler, sd["scheduler"]))
    elif opt._scheduler is not None:

        def set_lr() -> None:  # braintools: the saved rate becomes the current one
            lrs = list(opt._scheduler.current_lrs.value)
            lrs[0] = lr
            opt._scheduler.current_lrs.value = lrs

        commits.append(set_lr)

    holders = opt._holders()
    n = len(holders)
    if (saved_state is None) != (n == 0):
        raise ValueError(
            "register_trainable_weights(params) before load_state_dict"
            if n == 0
            else "state_dict holds no optimizer state (saved before register_trainable_weights)"
        )
    if legacy:
        if n > 1:
            raise ValueError(
                f"state_dict holds one param group (lars 0.1.0); this optimizer has {n}"
            )
        if n:
            parts = as_mapping(
                saved_state._asdict() if isinstance(saved_state, LarsState) else saved_state,
                "state_dict['opt_state']",
            )
            if set(map(str, parts)) != set(_LEGACY):
                raise ValueError(f"state_dict['opt_state'] must have the keys {list(_LEGACY)}")
            whats = {k: f"state_dict['opt_state'][{k!r}]" for k in _LEGACY}
            new = _new_state(holders[0].value, parts, whats)
            commits.append(lambda: setattr(holders[0], "value", new))
    else:
        commits.extend(_groups_commits(opt, sd, holders))

    def commit() -> None:
        for c in commits:
            c()
        opt._base_lr = base_lr
        opt.step_count.value = step_count

    return commit


def _groups_commits(opt: Any, sd: Mapping, holders: list) -> list[Callable[[], None]]:
    """Checks the groups' rates, decays and states of braintools' layout."""
    n = len(holders)
    saved_groups = as_list(sd["param_groups"], "state_dict['param_groups']")
    saved_states = as_list(sd["param_groups_opt_states"], "state_dict['param_groups_opt_states']")
    if len(saved_groups) != n or len(saved_states) != max(n - 1, 0):
        raise ValueError(
            f"state_dict holds {len(saved_groups)} param groups and "
            f"{len(saved_states)} group states; this optimizer has {n} groups"
        )
    extra = None
    if "lars" in sd:
        extra = as_mapping(sd["lars"], "state_dict['lars']")
        _required(extra, ("trust_ratio", "skipped"), "state_dict['lars']")
        extra = {
            k: as_list(extra[k], f"state_dict['lars'][{k!r}]") for k in ("trust_ratio", "skipped")
        }
        if any(len(v) != n for v in extra.values()):
            raise ValueError(f"state_dict['lars'] must hold one entry per param group ({n})")
    commits = []
    for i, group in enumerate(opt.param_groups):
        what = f"state_dict['param_groups']['{i}']"
        saved = as_mapping(saved_groups[i], what)
        scheduled_decay = callable(group_options(opt._defaults, group)["weight_decay"])
        _required(saved, ("lr",) if scheduled_decay else ("lr", "weight_decay"), what)
        lr = as_real(saved["lr"], f"{what}['lr']")  # group 0's is checked, the scheduler's used
        if scheduled_decay:  # a schedule is not saved; the group keeps its own
            decay = group_options(opt._defaults, group)["weight_decay"]
        else:
            decay = as_real(saved["weight_decay"], f"{what}['weight_decay']")
        options = group_options(opt._defaults, {**group, "weight_decay": decay})
        build(i, options, 0.0)  # the group's settings with the saved decay are valid
        where = (
            "state_dict['opt_state']"
            if i == 0
            else f"state_dict['param_groups_opt_states']['{i - 1}']"
        )
        saved_state = saved_states[i - 1] if i else sd["opt_state"]
        momentum, count = _read_chain(saved_state, where, options)
        last = len(_chain_names(options)) - 1
        parts = {"momentum": momentum, "count": count}
        whats = {
            "momentum": f"{where}['{last - 1}']['trace']",
            "count": f"{where}['{last}']['count']",
        }
        if extra is not None:
            parts.update(trust_ratio=extra["trust_ratio"][i], skipped=extra["skipped"][i])
            whats.update(
                trust_ratio=f"state_dict['lars']['trust_ratio']['{i}']",
                skipped=f"state_dict['lars']['skipped']['{i}']",
            )
        new = _new_state(holders[i].value, parts, whats)
        current = group.get("weight_decay")
        same = scheduled_decay or (
            isinstance(current, numbers.Real)
            and not isinstance(current, bool)
            and float(current) == decay
        )
        commits.append(
            _group_commit(group, holders[i], new, lr if i else None, None if same else decay)
        )
    return commits


def _group_commit(group: dict, holder: Any, new: LarsState, lr: Any, decay: Any) -> Callable:
    """Writes a group's checked state, rate (None: group 0's is the scheduler's) and decay
    (None: unchanged)."""

    def commit() -> None:
        holder.value = new
        if decay is not None:
            group["weight_decay"] = decay
        if lr is not None:
            if is_state_object(group["lr"]):
                group["lr"].value = lr
            else:
                group["lr"] = lr

    return commit
