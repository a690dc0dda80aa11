"""The intrinsic paths this CPU would not pick: AVX/F16C and SSE2.

PARM_SIMD_MAX caps the run-time dispatch (float16 loads, streaming stores) at
import, so each capped build runs in a fresh interpreter.
"""

import os
import subprocess
import sys

import pytest

import coding_ext

CHECK = r"""
import sys
import numpy as np
import coding_ext, coding_ext.debug
from coding_ext import reference

want_nt, want_f16 = sys.argv[1], sys.argv[2]
for ce in (coding_ext._kernels, coding_ext._kernels_debug):
    assert (ce.SIMD_NT, ce.SIMD_F16) == (want_nt, want_f16), (ce.SIMD_NT, ce.SIMD_F16)
for ce in (coding_ext, coding_ext.debug):
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, -1)
    zeros = np.zeros_like(halves)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(ce.sum_encode([halves, zeros]),
                                      reference.sum_encode([halves, zeros]))
    rng = np.random.default_rng(0)
    n = coding_ext._kernels.NT_MIN_BYTES // 4 + 13
    for off in (0, 3):
        xs = [rng.standard_normal(n + off).astype(np.float32)[off:].reshape(1, n)
              for _ in range(3)]
        np.testing.assert_array_equal(ce.sum_encode(xs), reference.sum_encode(xs))
        np.testing.assert_array_equal(ce.subtract_decode(xs[0], xs[1:]),
                                      reference.subtract_decode(xs[0], xs[1:]))
    imgs = [rng.standard_normal((1, 2, 6, 40)).astype(np.float16) for _ in range(4)]
    np.testing.assert_array_equal(ce.concat_encode(imgs), reference.concat_encode(imgs))
print("ok")
"""


@pytest.mark.skipif(coding_ext._kernels.SIMD_NT != "avx512f",
                    reason="needs an AVX-512 CPU to have paths to cap")
@pytest.mark.parametrize("cap, nt, f16", [("avx", "avx", "f16c"), ("sse2", "sse2", "plain")])
def test_capped_dispatch_matches_reference(cap, nt, f16):
    env = dict(os.environ, PARM_SIMD_MAX=cap)
    result = subprocess.run([sys.executable, "-c", CHECK, nt, f16], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
