"""The shared backend suite on the "pallas" backend.

On a GPU or TPU every case of the suite runs on the compiled kernels. On a CPU
the kernels run in interpret mode, where each case costs several seconds of
compilation (the interpreted kernel is a large XLA program); there the option
cases are cut to a set that still switches every option on at least once and
every mask form, and the remaining tests of the suite (eager, determinism,
zero and empty leaves, containers, ``lars.Lars`` and schedules) all run.
The kernels' own tests, option by option, are in test_pallas.py and
test_pallas_fused.py. On a CPU the step runs the Mosaic TPU kernels, the fused
one-pass kernel for every leaf here (they all fit its VMEM ring), and every
test here is marked slow.
"""

import backend_cases
import jax
import pytest
from backend_base import BackendTests
from backend_cases import CASES_BY_NAME, INTERPRETED_CASES

from lars.kernels import pallas

INTERPRET = pallas.default_kernel(jax.default_backend())[1]
pytestmark = [pytest.mark.slow] if INTERPRET else []

# Every option and mask form of CASES, in 6 cases (all 18 off the CPU).
CPU_CASES = INTERPRETED_CASES
CASES = backend_cases.CASES if not INTERPRET else [CASES_BY_NAME[n] for n in CPU_CASES]
LOW_PRECISION = ["defaults", "both_masks", "everything"] if not INTERPRET else ["everything"]


class TestPallasBackend(BackendTests):
    backend = "pallas"
    # The leaf count, not the size, sets the interpret-mode cost; the largest
    # leaf still spans several blocks of the kernels' default sizes.
    big = 20_000
    mid = 4097
    same_bits_across_programs = not INTERPRET

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_transform_matches_oracle(self, case):
        super().test_transform_matches_oracle(case)

    @pytest.mark.parametrize("dtype_case", ["bf16_grads", "bf16_params"])
    @pytest.mark.parametrize("name", LOW_PRECISION)
    def test_low_precision_matches_oracle(self, name, dtype_case):
        super().test_low_precision_matches_oracle(name, dtype_case)
