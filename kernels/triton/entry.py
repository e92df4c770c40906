"""The generated ``@triton.jit`` entry points: one per (pass, number of slots, params passed).

jax-triton passes every array as its own named pointer argument and Triton has
no variadic kernels, so a launch serving ``slots`` leaves runs an entry point
generated for that number: its signature, the selection of the program's slot
pointers (a chain of scalar selects on the table's slot column) and a call of
the pass's program (``programs.py``). :func:`get_kernel` builds it once per
process, in the mode the kernels were imported in (``kernels.INTERPRETED``).

A fused entry point claims a table row with an atomic counter and returns at
once when the row is at or past the table's item count (``plan.COL_ITEMS``:
a grid larger than the table does no harm). It calls its program in two
halves (sums, then update), each after its own load of the slot and
selection of the pointers it takes. With one selection for both halves, LLVM
sank the select chains of the pointers only the update uses into its branch,
so the ``slots - 1`` comparisons of the slot stayed live across the sums
loop: 244 registers per thread at 192 slots on sm_90, 56 with a selection per
half (docs/triton.md).
"""

from __future__ import annotations

import functools
import linecache

import triton
import triton.language as tl

from . import kernels, programs
from . import plan as P

_ARG_COMMENTS = {
    "table_ptr": "int32 (programs, TABLE_COLUMNS): slot, chunk, length, decay",
    "scalars_ptr": "float32 (NUM_SCALARS,): lr, momentum, decay, clip scalars",
    "ratios_ptr": "float32 (slots,): trust ratios",
    "partials_ptr": "out: float32 (rows, 2) partial sums",
    "ratios_out_ptr": "out: float32 (slots,) trust ratios",
    "sync_ptr": "out: int32 (plan.sync_words), zeroed: item counter, arrivals, flags",
    "w": "params",
    "g": "gradients",
    "v": "momentum",
    "out": "out: updates, or new params if WRITE_PARAMS",
    "v_out": "out: new momentum",
}


def entry_source(spec: P.KernelSpec) -> str:
    """The Python source of the ``@triton.jit`` entry point for ``spec``.

    For ``KernelSpec(SUMS, 2, with_params=True)`` it reads::

        @triton.jit
        def lars_sums_2_w(
            table_ptr,  # int32 (programs, TABLE_COLUMNS): slot, chunk, length, decay
            scalars_ptr,  # float32 (NUM_SCALARS,): ...
            w_0, w_1,  # params
            g_0, g_1,  # gradients
            partials_ptr,  # out: float32 (programs, 2) partial sums
            GLOBAL: tl.constexpr,
            ...
        ):
            row = tl.program_id(0)  # a FUSED entry claims its row: tl.atomic_add(sync_ptr, 1),
            # returns if row >= the table's COL_ITEMS, then selects w and g, calls
            # fused_sums, selects all five, calls fused_update
            slot = tl.load(table_ptr + row * _TABLE_COLUMNS + _COL_SLOT)
            is_1 = slot == 1
            w_ptr = w_0
            w_ptr = tl.where(is_1, w_1, w_ptr)
            g_ptr = g_0
            g_ptr = tl.where(is_1, g_1, g_ptr)
            sums_program(table_ptr, scalars_ptr, w_ptr, g_ptr, partials_ptr, GLOBAL, ...)
    """
    lines = ["@triton.jit", f"def {spec.name}("]
    for arg in spec.scalar_args():
        lines.append(f"    {arg},  # {_ARG_COMMENTS[arg]}")
    for role in spec.pointer_roles():
        names = ", ".join(f"{role}_{k}" for k in range(spec.slots))
        lines.append(f"    {names},  # {_ARG_COMMENTS[role]}")
    for arg in spec.output_args():
        lines.append(f"    {arg},  # {_ARG_COMMENTS[arg]}")
    for name in spec.constexpr_names():
        lines.append(f"    {name}: tl.constexpr,")
    lines.append("):")
    if spec.kind == P.FUSED:  # items start in table order, whichever program runs first
        lines.append("    row = tl.atomic_add(sync_ptr, 1, sem='relaxed')")
        lines.append(
            "    if row >= tl.load(table_ptr + _COL_ITEMS):  # past the table: nothing to do"
        )
        lines.append("        return")
        _pointers(lines, spec, ("w", "g"), publish=True)
        sums = (
            "CLIP_NORM",
            "CLIP_VALUE",
            "HAS_DECAY",
            "TRUST_CLIP",
            "CHUNK",
            "BLOCK",
            "REDUCE_BLOCK",
            "SPIN_LIMIT",
        )
        lines.append(
            "    s_w, s_u = fused_sums(row, table_ptr, scalars_ptr, slot, w_ptr, g_ptr, "
            f"partials_ptr, ratios_out_ptr, sync_ptr, {', '.join(sums)})"
        )
        _pointers(lines, spec, spec.pointer_roles(), publish=False)
        update = tuple(
            n for n in spec.constexpr_names() if n not in ("REDUCE_BLOCK", "POINTER_TABLE")
        )
        lines.append(
            "    fused_update(row, table_ptr, scalars_ptr, slot, w_ptr, g_ptr, v_ptr, out_ptr, "
            f"v_out_ptr, ratios_out_ptr, sync_ptr, s_w, s_u, {', '.join(update)})"
        )
        return "\n".join(lines) + "\n"
    lines.append("    row = tl.program_id(0)")
    _select(lines, spec, spec.pointer_roles())
    if not spec.with_params:
        lines.append("    w_ptr = g_ptr  # not read")
    constexprs = ", ".join(spec.constexpr_names())
    if spec.kind == P.UPDATE:
        lines.append(
            "    update_program(table_ptr, scalars_ptr, ratios_ptr, slot, w_ptr, g_ptr, v_ptr, "
            f"out_ptr, v_out_ptr, {constexprs})"
        )
    else:
        lines.append(
            f"    sums_program(table_ptr, scalars_ptr, w_ptr, g_ptr, partials_ptr, {constexprs})"
        )
    return "\n".join(lines) + "\n"


def _select(
    lines: list[str], spec: P.KernelSpec, roles: tuple[str, ...], indent: str = "    "
) -> None:
    """Appends the loading of the row's slot and the selection of its ``roles``' pointers."""
    lines.append(f"{indent}slot = tl.load(table_ptr + row * _TABLE_COLUMNS + _COL_SLOT)")
    for k in range(1, spec.slots):
        lines.append(f"{indent}is_{k} = slot == {k}")
    for role in roles:
        lines.append(f"{indent}{role}_ptr = {role}_0")
        for k in range(1, spec.slots):
            lines.append(f"{indent}{role}_ptr = tl.where(is_{k}, {role}_{k}, {role}_ptr)")


def _pointers(
    lines: list[str], spec: P.KernelSpec, roles: tuple[str, ...], *, publish: bool
) -> None:
    """A fused entry's ``roles``' pointers for the claimed row: from the pointer
    table (``POINTER_TABLE``; with ``publish``, item 0's program first writes
    it and the others wait for it), else by the select chain."""
    every = spec.pointer_roles()
    lines.append("    if POINTER_TABLE:")
    lines.append(f"        table = slot_words(sync_ptr, SPIN_LIMIT) + {2 * spec.slots}  # its flag")
    if publish:
        lines.append("        if row == 0:  # one program writes every address, then the flag")
        for r, role in enumerate(every):
            for k in range(spec.slots):
                at = 1 + 2 * (r * spec.slots + k)
                lines.append(f"            publish_address(table + {at}, {role}_{k})")
        lines.append("            tl.debug_barrier()")
        lines.append("            tl.atomic_xchg(table, 1, sem='release')")
        lines.append("            ok = tl.full((), 1, tl.int32)")
        lines.append("        else:")
        lines.append("            ok = await_table(table, sync_ptr, SPIN_LIMIT)")
        lines.append("        if ok == 0:  # a bounded wait gave up (the launch is flagged)")
        lines.append("            return")
    lines.append("        slot = tl.load(table_ptr + row * _TABLE_COLUMNS + _COL_SLOT)")
    for role in roles:
        r = every.index(role)
        at = f"table + 1 + 2 * ({r * spec.slots} + slot)"
        lines.append(f"        {role}_ptr = table_pointer({at}, {role}_0)")
    lines.append("    else:")
    _select(lines, spec, roles, indent="        ")


@functools.cache
def get_kernel(spec: P.KernelSpec):
    """The ``@triton.jit`` entry point for ``spec`` (generated once per process).

    The source is registered with ``linecache`` so that Triton (compiler and
    interpreter alike) can read it back as it reads any kernel's source.
    """
    if bool(triton.knobs.runtime.interpret) != kernels.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET changed after lars.kernels.triton.kernels was imported; "
            "the kernels exist in one mode per process"
        )
    source = entry_source(spec)
    filename = f"<lars.kernels.triton: {spec.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {
        "triton": triton,
        "tl": tl,
        "sums_program": programs.sums_program,
        "update_program": programs.update_program,
        "fused_sums": programs.fused_sums,
        "fused_update": programs.fused_update,
        "slot_words": programs.slot_words,
        "publish_address": programs.publish_address,
        "table_pointer": programs.table_pointer,
        "await_table": programs.await_table,
        "_TABLE_COLUMNS": programs._TABLE_COLUMNS,
        "_COL_SLOT": programs._COL_SLOT,
        "_COL_ITEMS": programs._COL_ITEMS,
    }
    exec(compile(source, filename, "exec"), namespace)
    return namespace[spec.name]
