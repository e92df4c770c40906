"""What a compiled step costs, read from XLA: kernel launches, memory, bytes.

Launches are counted in the optimized HLO text of the compiled executable
(``compiled.as_text()``): every instruction of the ENTRY computation is one
launch (a fusion, a custom call such as a Pallas/Triton kernel or a library
call, a copy, an unfused op), except the bookkeeping ops that run no code
(parameter, constant, tuple, get-tuple-element, bitcast, ...). A ``call``
(e.g. the command-buffer wrapper of the GPU backend) is replaced by the count
of the computation it calls; a ``while`` or ``conditional`` counts once (its
body is not unrolled). ``count_loop_launches`` counts one step of a step
compiled as a loop (``bench.steps.looped``), and ``loop_trip_count`` reads
whether XLA knows that loop's trip count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# Opcodes that launch nothing: they name, pack or reinterpret buffers.
NO_LAUNCH = frozenset(
    {
        "parameter",
        "constant",
        "get-tuple-element",
        "tuple",
        "bitcast",
        "after-all",
        "partition-id",
        "replica-id",
        "opt-barrier",
        "add-dependency",
    }
)

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TO_APPLY = re.compile(r"to_apply=%?([\w.\-]+)")
_BODY = re.compile(r"body=%?([\w.\-]+)")


def _split_type(rhs: str) -> str:
    """Drops the result type from ``type opcode(operands), attrs``."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[i + 1 :].lstrip()
        return ""
    return rhs.split(" ", 1)[1] if " " in rhs else ""


def parse_computations(hlo_text: str) -> tuple[str | None, dict[str, list[tuple[str, str]]]]:
    """Splits HLO text into computations.

    Returns:
      (name of the ENTRY computation or None, {computation name: [(opcode,
      instruction line), ...]}).
    """
    entry, comps, current = None, {}, None
    for raw in hlo_text.splitlines():
        line = raw.strip()
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("{", 1)[0].split("(", 1)[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line == "}":
            current = None
            continue
        if " = " not in line:
            continue
        rhs = line.removeprefix("ROOT ").split(" = ", 1)[1]
        rest = _split_type(rhs)
        opcode = rest.split("(", 1)[0].strip()
        if opcode:
            comps[current].append((opcode, line))
    return entry, comps


def _counter(comps: dict[str, list[tuple[str, str]]]) -> Callable[[str, int], int]:
    def count(name: str, depth: int) -> int:
        total = 0
        for opcode, line in comps.get(name, []):
            if opcode in NO_LAUNCH:
                continue
            callee = _TO_APPLY.search(line)
            if opcode == "call" and callee and depth < 8:
                total += count(callee.group(1), depth + 1)
            else:
                total += 1
        return total

    return count


def _with_entry(hlo_text: str) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """``parse_computations``, raising ValueError where there is no ENTRY computation."""
    entry, comps = parse_computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, comps


def count_launches(hlo_text: str) -> int:
    """Kernel launches per execution of a compiled program (see the module doc).

    Raises:
      ValueError: if the text has no ENTRY computation.
    """
    entry, comps = _with_entry(hlo_text)
    return _counter(comps)(entry, 0)


def count_loop_launches(hlo_text: str, steps: int) -> int:
    """Launches per step of a program that runs ``steps`` steps in one loop.

    The launches of the body of the outermost ``while`` (the first one met
    from the ENTRY computation through ``call``s; the loop counter's increment
    is included, what runs once around the loop is left out), or, where XLA
    unrolled the loop, the ENTRY's launches over ``steps`` (rounded up).

    Raises:
      ValueError: if the text has no ENTRY computation.
    """
    entry, comps = _with_entry(hlo_text)
    loop = _outer_while(comps, entry)
    if loop is not None:
        return _counter(comps)(_BODY.search(loop).group(1), 0)
    return -(-_counter(comps)(entry, 0) // steps)


def _outer_while(comps: dict[str, list[tuple[str, str]]], entry: str) -> str | None:
    """The line of the outermost ``while``: the first met from ``entry`` through ``call``s."""

    def find(name: str, depth: int) -> str | None:
        for opcode, line in comps.get(name, []):
            if opcode == "while" and _BODY.search(line):
                return line
            callee = _TO_APPLY.search(line) if opcode == "call" else None
            if callee and depth < 8:
                found = find(callee.group(1), depth + 1)
                if found:
                    return found
        return None

    return find(entry, 0)


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_trip_count(hlo_text: str) -> int | None:
    """The trip count XLA knows for the outermost ``while`` (its backend config); None if none.

    On a GPU, XLA's while loop with a known trip count runs its body that many
    times from the host without reading a condition back; without one, every
    step copies the condition to the host and waits for it (``WhileThunk`` at
    the XLA that jax 0.11 pins), which a timed loop would count per step.

    Raises:
      ValueError: if the text has no ENTRY computation.
    """
    entry, comps = _with_entry(hlo_text)
    loop = _outer_while(comps, entry)
    found = _TRIP_COUNT.search(loop) if loop is not None else None
    return int(found.group(1)) if found else None


def cost_bytes_accessed(compiled: Any) -> float:
    """XLA's own estimate of the bytes the program reads and writes (NaN if none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "bytes accessed" not in cost:
        return float("nan")
    return float(cost["bytes accessed"])


def temp_bytes(compiled: Any) -> float:
    """``memory_analysis().temp_size_in_bytes`` of the compiled program (NaN if none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return float("nan")
    if stats is None:
        return float("nan")
    return float(stats.temp_size_in_bytes)
