"""gpu_check's ``sanitize`` step (bench/gpu_check_sanitize.py), with a stand-in sanitizer.

The summaries of compute-sanitizer are read (memcheck's and racecheck's), each
tool that finished is a check that fails on a finding, a tool that did not
finish is reported with its reason and is not a check, the command filters
the project's kernels under XLA's per-buffer allocator, and the report lists
the tools.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import gpu_check_phases, gpu_check_report
from bench import gpu_check_sanitize as sanitizer

MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at lars_native::(anonymous namespace)::SumsKernel(...)+0x120
=========     by thread (3,0,0) in block (7,0,0)
========= ERROR SUMMARY: 1 error
"""


def _stand_in(tmp_path: Path, body: str) -> Path:
    """An executable Python script in ``tmp_path``: a compute-sanitizer stand-in."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!" + sys.executable + "\nimport json, os, sys\n" + body)
    fake.chmod(0o755)
    return fake


def test_the_summaries_are_read():
    assert sanitizer.parse_errors(MEMCHECK) == 1
    assert sanitizer.parse_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    racecheck = "========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, 1 warnings)\n"
    assert sanitizer.parse_errors(racecheck) == 2
    assert sanitizer.parse_errors("Error: Device not supported\n") is None
    first = sanitizer.findings("a line of the target's own\n" + MEMCHECK)
    assert first[0] == "Invalid __global__ read of size 4 bytes" and len(first) == 3


def test_each_tool_that_finished_is_a_check(tmp_path: Path, monkeypatch):
    # A stand-in: memcheck finds an error, synccheck and racecheck none,
    # initcheck cannot run. It records its arguments and environment.
    log = tmp_path / "calls.jsonl"
    fake = _stand_in(
        tmp_path,
        f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv, "
        "'alloc': os.environ.get('XLA_PYTHON_CLIENT_ALLOCATOR')}) + '\\n')\n"
        "tool = sys.argv[sys.argv.index('--tool') + 1]\n"
        f"if tool == 'memcheck':\n    print({MEMCHECK!r}); sys.exit(86)\n"
        "if tool == 'racecheck':\n"
        "    print('========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)')\n"
        "    sys.exit(0)\n"
        "if tool == 'initcheck':\n    print('Error: Device not supported'); sys.exit(1)\n"
        "print('========= ERROR SUMMARY: 0 errors')\n",
    )
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: str(fake))
    partial = gpu_check_phases.Partial()
    result = sanitizer.sanitize(False, str(tmp_path / "r.json"), 120, partial)
    checks = {c["case"]: c for c in partial.result["checks"]}
    assert set(checks) == {"memcheck", "synccheck", "racecheck"}
    memcheck = checks["memcheck"]
    assert not memcheck["ok"] and "Invalid __global__ read" in memcheck["detail"]
    assert checks["synccheck"]["ok"] and checks["racecheck"]["ok"]
    tools = result["tools"]
    assert (
        tools["initcheck"]["status"] == "error"
        and "Device not supported" in (tools["initcheck"]["reason"])
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["argv"][c["argv"].index("--tool") + 1] for c in calls] == list(sanitizer.TOOLS)
    for c in calls:
        assert c["alloc"] == "platform"
        argv = c["argv"]
        assert argv[argv.index("--kernel-name") + 1] == "kns=lars"
        assert argv[argv.index("-m") + 1 :][:2] == ["bench.gpu_check_phases", "sanitize-target"]
    step = {"status": "fail", **partial.result, **result}
    md = gpu_check_report.markdown({"environment": {}, "seconds": 1.0, "steps": {"sanitize": step}})
    assert "## compute-sanitizer" in md and "| memcheck | found | 1 |" in md
    assert "| racecheck | ok | 0 |" in md and "Device not supported" in md


def test_no_sanitizer_or_no_tool_finishing_is_a_skip(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: None)
    got = sanitizer.sanitize(False, str(tmp_path / "r.json"), 60, gpu_check_phases.Partial())
    assert got == {"status": "skipped", "reason": "compute-sanitizer not found"}
    fake = _stand_in(tmp_path, "print('Error: Device not supported'); sys.exit(1)\n")
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: str(fake))
    got = sanitizer.sanitize(False, str(tmp_path / "r.json"), 60, gpu_check_phases.Partial())
    assert got["status"] == "skipped" and "memcheck: rc 1" in got["reason"]


def test_a_refused_kernel_filter_is_dropped(tmp_path: Path, monkeypatch):
    log = tmp_path / "calls.txt"
    fake = _stand_in(
        tmp_path,
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if '--kernel-name' in sys.argv:\n"
        "    print(\"Unrecognized option '--kernel-name'\"); sys.exit(1)\n"
        "print('========= ERROR SUMMARY: 0 errors')\n",
    )
    monkeypatch.setattr(sanitizer, "find_sanitizer", lambda: str(fake))
    partial = gpu_check_phases.Partial()
    result = sanitizer.sanitize(False, str(tmp_path / "r.json"), 120, partial)
    assert [c["ok"] for c in partial.result["checks"]] == [True] * len(sanitizer.TOOLS)
    assert "every kernel checked" in result["tools"]["memcheck"]["note"]
    calls = log.read_text().splitlines()
    assert len(calls) == len(sanitizer.TOOLS) + 1
    assert "--kernel-name" in calls[0] and not any("--kernel-name" in c for c in calls[1:])
