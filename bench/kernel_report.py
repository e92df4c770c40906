"""Static report of the GPU kernels compiled for sm_90 on the host (no GPU needed).

``python -m bench.kernel_report`` compiles every Triton entry point the launch
plan runs at its default tuning (each form: the fused pass and the two-pass
form with its global-norm pass; each dtype group; each flag set of
:data:`FLAG_SETS`) with Triton's whole pipeline and its bundled ``ptxas``,
and the CUDA handler (``kernels/native/lars_cuda.cu``) with ``nvcc`` when one
is found. Per kernel it records what ``ptxas -v`` and ``cuobjdump`` say:
registers per thread, spill stores/loads and stack frame (bytes), local
memory, shared memory, kernel-parameter bytes, the PTX ISA version, and
whether 16-byte global loads appear (``LDG.E.128`` in the SASS). It writes a
table, and JSON with ``--json PATH``.

Everything is compiled in a temporary directory (Triton's cache included):
nothing is written to the source tree and every figure comes from a fresh
``ptxas`` run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lars.contract import LeafSpec, StepFlags
from lars.kernels.triton import plan as P

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCE = ROOT / "kernels" / "native" / "lars_cuda.cu"
ARCH = "sm_90"

# (param dtype, grad dtype) groups a launch serves.
GROUPS: tuple[tuple[str, str], ...] = (
    ("float32", "float32"),
    ("float32", "bfloat16"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
)

# The switches compiled: the apply form (updates out) bare and with weight
# decay, the in-place step that skips non-finite steps, and every option on.
FLAG_SETS: dict[str, StepFlags] = {
    "apply": StepFlags(),
    "apply_decay": StepFlags(has_decay=True),
    "step_in_place": StepFlags(has_decay=True, write_params=True, skip_nonfinite=True),
    "all": StepFlags(**{f.name: True for f in dataclasses.fields(StepFlags)}),
}

FORMS = ("fused", "two_pass")

# The limits the test holds every default kernel to.
MAX_REGISTERS = 128


@dataclasses.dataclass(frozen=True)
class Case:
    """One Triton kernel to compile: an entry point, its dtype group and switches."""

    form: str
    spec: P.KernelSpec
    group: tuple[str, str]
    flags_name: str

    @property
    def name(self) -> str:
        return f"{self.spec.name}[{self.group[0]}/{self.group[1]},{self.flags_name}]"


def triton_cases(
    forms: Iterable[str] = FORMS,
    groups: Iterable[tuple[str, str]] = GROUPS,
    flag_sets: Iterable[str] = tuple(FLAG_SETS),
    tuning: P.Tuning | None = None,
) -> list[Case]:
    """The entry points the launch plan runs for a full launch of each case (no duplicates).

    The plan itself (``StepPlan.launches``, ``kernel_spec``) chooses them: a
    launch of ``tuning.slots`` multi-chunk leaves of one dtype group.
    """
    tuning = tuning or P.Tuning()
    cases: dict[tuple, Case] = {}
    for form in forms:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        form_tuning = dataclasses.replace(tuning, fused=form == "fused")
        for group in groups:
            for flags_name in flag_sets:
                flags = FLAG_SETS[flags_name]
                leaf = LeafSpec(
                    (2 * tuning.chunk,),
                    np.dtype(_numpy_dtype(group[0])),
                    np.dtype(_numpy_dtype(group[1])),
                    np.dtype(np.float32),
                    flags.has_decay,
                    True,
                )
                plan = P.StepPlan((leaf,) * tuning.slots, flags, form_tuning)
                for kind in plan.passes():
                    for launch in plan.launches(kind):
                        spec = P.kernel_spec(launch, flags)
                        key = (spec, group, tuple(spec.constexprs(flags, tuning).items()))
                        cases.setdefault(key, Case(form, spec, group, flags_name))
    return list(cases.values())


def _numpy_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


# --------------------------------------------------------------------------
# Reading ptxas and cuobjdump.


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per function (mangled name): registers, spills, stack, shared and constant bytes."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            current.update(
                stack_bytes=int(m.group(1)),
                spill_store_bytes=int(m.group(2)),
                spill_load_bytes=int(m.group(3)),
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return out


def cuobjdump_path() -> str:
    """Triton's bundled ``cuobjdump``, else one on PATH."""
    import triton.backends.nvidia as nvidia

    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither Triton's bundled one nor on PATH)")
    return found


def cubin_facts(cubin: Path) -> dict[str, dict[str, int]]:
    """Per function: local memory bytes, and 16-byte global loads/stores counted in its SASS."""
    tool = cuobjdump_path()
    usage = subprocess.run(
        [tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    facts: dict[str, dict[str, int]] = {}
    name = None
    for line in usage.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"LOCAL:(\d+)", line)
        if m and name:
            facts.setdefault(name, {})["local_bytes"] = int(m.group(1))
    sass = subprocess.run(
        [tool, "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split()[0]
        entry = facts.setdefault(name, {})
        # LDG.E.128, or with an eviction hint LDG.E.EF.128 (the same for STG).
        entry["ldg128"] = len(re.findall(r"\bLDG\.E(?:\.[A-Z]+)*\.128\b", chunk))
        entry["stg128"] = len(re.findall(r"\bSTG\.E(?:\.[A-Z]+)*\.128\b", chunk))
        # Every instruction, and the loads from the constant bank (kernel
        # parameters), predicated or not: a select over pointer arguments
        # compiles to predicated LDCs, all issued on every path.
        entry["sass_instructions"] = len(re.findall(r"(?m)^\s+/\*[0-9a-f]{4,}\*/\s", chunk))
        entry["const_loads"] = len(
            re.findall(r"(?m)^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?LDC\b", chunk)
        )
    return facts


def ptx_params_bytes(ptx: str, name: str) -> int:
    """Bytes of ``.param`` arguments of entry ``name`` in ``ptx``."""
    m = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    if not m:
        raise ValueError(f"entry {name} not in the PTX")
    total = 0
    for param in m.group(1).split(","):
        kind = re.search(
            r"\.param\s+(?:\.align\s+\d+\s+)?\.[ubsf](\d+)\b[^\[]*(?:\[(\d+)\])?", param
        )
        if kind:
            total += int(kind.group(1)) // 8 * int(kind.group(2) or 1)
    return total


def ptx_version(ptx: str) -> str:
    m = re.search(r"^\.version (\S+)", ptx, re.M)
    return m.group(1) if m else "?"


# --------------------------------------------------------------------------
# Compiling.


def compile_triton(case: Case, tuning: P.Tuning | None = None) -> dict:
    """Compiles one case in a fresh Triton cache; returns its row of the report."""
    import triton

    from lars.kernels.triton import aot

    tuning = tuning or P.Tuning()
    flags = FLAG_SETS[case.flags_name]
    knobs = triton.knobs
    saved = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="lars-kernel-report-") as tmp:
        knobs.cache.dir = tmp
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                compiled = aot.compile_kernel(case.spec, *case.group, flags, tuning)
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved
        seconds = time.perf_counter() - start
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        facts = cubin_facts(cubin).get(case.spec.name, {})
    ptx = compiled.asm["ptx"]
    stats = parse_ptxas_log(log.getvalue()).get(case.spec.name)
    if not stats or "registers" not in stats:
        raise RuntimeError(f"no ptxas -v figures for {case.name}:\n{log.getvalue()}")
    return {
        "kernel": case.name,
        "source": "triton",
        "form": case.form,
        "pass": case.spec.kind,
        "slots": case.spec.slots,
        "group": "/".join(case.group),
        "flags": case.flags_name,
        **_row({**stats, "shared_bytes": compiled.metadata.shared}, facts),
        "param_bytes": ptx_params_bytes(ptx, case.spec.name),
        "ptx_version": ptx_version(ptx),
        "vector_loads_ptx": bool(re.search(r"ld\.global(\.[\w:]+)*\.v4\.", ptx)),
        "compile_s": round(seconds, 2),
    }


def _row(stats: dict[str, int], facts: dict[str, int]) -> dict:
    return {
        "registers": stats["registers"],
        "spill_store_bytes": stats.get("spill_store_bytes", 0),
        "spill_load_bytes": stats.get("spill_load_bytes", 0),
        "stack_bytes": stats.get("stack_bytes", 0),
        "local_bytes": facts.get("local_bytes", 0),
        "shared_bytes": stats.get("shared_bytes", 0),
        "ldg128": facts.get("ldg128", 0),
        "stg128": facts.get("stg128", 0),
        "vector_loads": facts.get("ldg128", 0) > 0,
        "sass_instructions": facts.get("sass_instructions", 0),
        "const_loads": facts.get("const_loads", 0),
    }


def compile_cuda(source: Path = CUDA_SOURCE) -> list[dict]:
    """Compiles the CUDA handler for sm_90 with ``nvcc``; one row per kernel.

    Raises RuntimeError when nvcc is missing or fails (the message says which).
    """
    import jax.ffi

    nvcc = shutil.which("nvcc")
    if not nvcc:
        raise RuntimeError("nvcc not found on PATH")
    with tempfile.TemporaryDirectory(prefix="lars-kernel-report-") as tmp:
        fatbin = Path(tmp) / "lars_cuda.fatbin"
        cmd = [
            nvcc,
            "-std=c++17",
            "-O3",
            "-fatbin",
            "-gencode",
            "arch=compute_90,code=[sm_90,compute_90]",
            "-Xptxas",
            "-v",
            "-I",
            str(source.parent),
            "-I",
            jax.ffi.include_dir(),
            "-o",
            str(fatbin),
            str(source),
        ]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
        stats = parse_ptxas_log(done.stdout + done.stderr)
        facts = cubin_facts(fatbin)
        ptx = subprocess.run(
            [cuobjdump_path(), "-ptx", str(fatbin)], capture_output=True, text=True, check=True
        ).stdout
    rows = []
    for mangled, figures in sorted(stats.items()):
        if "registers" not in figures:
            continue
        rows.append(
            {
                "kernel": _demangle(mangled),
                "source": "cuda",
                "form": "native",
                "pass": "",
                "slots": 0,
                "group": "",
                "flags": "",
                **_row(figures, facts.get(mangled, {})),
                "param_bytes": ptx_params_bytes(ptx, mangled),
                "ptx_version": ptx_version(ptx),
                "vector_loads_ptx": None,
                "compile_s": round(seconds, 2),
            }
        )
    return rows


def tool_version(path: str | None) -> str:
    """The release line of a CUDA tool's ``--version`` (e.g. "release 12.8, V12.8.93")."""
    if not path or not Path(path).exists():
        return "not found"
    text = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [^\n]*", text)
    return m.group(0) if m else text.strip()[-80:]


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if not tool:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


# --------------------------------------------------------------------------
# The report.


def report(
    cases: Sequence[Case], *, cuda: bool = True, jobs: int = 1
) -> tuple[list[dict], list[str]]:
    """Rows for ``cases`` (compiled by ``jobs`` processes) and the CUDA handler; and errors."""
    errors: list[str] = []
    if jobs > 1 and len(cases) > 1:
        # Fresh processes (spawn, not fork: the caller may have started JAX's threads).
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_triton, cases))
    else:
        rows = [compile_triton(case) for case in cases]
    if cuda:
        try:
            rows += compile_cuda()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            errors.append(f"CUDA handler not compiled: {e}")
    return rows, errors


def violations(row: dict, max_registers: int = MAX_REGISTERS) -> list[str]:
    """Why ``row`` breaks the limits (spills, stack, local memory, registers); empty if none."""
    found = []
    if row["spill_store_bytes"] or row["spill_load_bytes"]:
        found.append(f"spills {row['spill_store_bytes']}/{row['spill_load_bytes']} B")
    if row["stack_bytes"] or row["local_bytes"]:
        found.append(f"stack {row['stack_bytes']} B, local {row['local_bytes']} B")
    if row["registers"] > max_registers:
        found.append(f"{row['registers']} registers > {max_registers}")
    return found


COLUMNS = (
    ("kernel", "kernel"),
    ("registers", "regs"),
    ("spill_store_bytes", "spill st"),
    ("spill_load_bytes", "spill ld"),
    ("stack_bytes", "stack"),
    ("local_bytes", "local"),
    ("shared_bytes", "smem"),
    ("param_bytes", "params"),
    ("ptx_version", "ptx"),
    ("vector_loads", "LDG.128"),
    ("sass_instructions", "SASS"),
    ("const_loads", "LDC"),
    ("compile_s", "compile s"),
)


def table(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row[key]
            cells.append(("yes" if value else "no") if isinstance(value, bool) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the rows as JSON to this path")
    parser.add_argument("--forms", default=",".join(FORMS), help="fused,two_pass")
    parser.add_argument("--groups", default="all", help="e.g. float32/float32,float32/bfloat16")
    parser.add_argument("--flags", default=",".join(FLAG_SETS), help=", ".join(FLAG_SETS))
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA handler")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    groups = GROUPS
    if args.groups != "all":
        groups = tuple(tuple(g.split("/")) for g in args.groups.split(","))  # type: ignore[misc]
        for g in groups:
            if g not in GROUPS:
                parser.error(f"--groups: {'/'.join(g)} is not one of the dtype groups")
    flag_sets = args.flags.split(",")
    for name in flag_sets:
        if name not in FLAG_SETS:
            parser.error(f"--flags: unknown flag set {name!r}")
    cases = triton_cases(args.forms.split(","), groups, flag_sets)
    start = time.perf_counter()
    rows, errors = report(cases, cuda=not args.no_cuda, jobs=args.jobs)
    seconds = time.perf_counter() - start
    from bench import environment

    env = environment.collect(argv)
    env["command"] = " ".join(["python -m bench.kernel_report", *(argv or sys.argv[1:])])
    result = {
        "target": ARCH,
        "environment": env,
        "triton": __import__("triton").__version__,
        "ptxas": tool_version(str(Path(cuobjdump_path()).with_name("ptxas"))),
        "nvcc": tool_version(shutil.which("nvcc")),
        "seconds": round(seconds, 1),
        "rows": rows,
        "errors": errors,
        "violations": {r["kernel"]: violations(r) for r in rows if violations(r)},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    for error in errors:
        print(error, file=sys.stderr)
    for name, found in result["violations"].items():
        print(f"over the limits: {name}: {'; '.join(found)}")
    print(f"{len(rows)} kernels for {ARCH} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
