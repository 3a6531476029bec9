"""A long randomized run of the Triton kernel (interpreter or GPU) against the float64
reference: forward and all three gradients. CI's property test draws 12 examples; this
draws as many as you ask, from a wider space (exact ties, softmax scales, head dims that
are not powers of two, every pattern, sinks, windows, chunked prefill, decode):

    N=300 TRITON_INTERPRET=1 python -m pytest -q -x -p no:cacheprovider tools/fuzz_kernel.py

On CPU about 1.6 s an example. A failure prints the shrunk example and a seed to replay.
"""

import os

import torch

# Before any kernel module is imported: without a GPU the kernels run in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers import separated_inputs, tied_inputs  # noqa: E402
from tests.test_kernel_triton import TOL, _compare  # noqa: E402


@settings(max_examples=int(os.environ.get("N", 100)), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lens=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    extra_keys=st.integers(0, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]),
    d=st.sampled_from([16, 20, 40, 64, 72]),
    pattern=st.sampled_from([(0, 2), (1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8),
                             (1, 16), (4, 16), (8, 16), (15, 16)]),
    sink=st.integers(0, 9),
    window=st.integers(0, 40),
    causal=st.booleans(),
    tie_break=st.sampled_from(["threshold", "index"]),
    tied=st.booleans(),
    scale=st.sampled_from([None, 0.05, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_kernel_matches_reference(lens, extra_keys, heads, d, pattern, sink, window, causal, tie_break,
                                  tied, scale, dtype):
    lens_k = [n + extra_keys for n in lens]
    hq, hkv = heads
    n, m = pattern
    seed = sum(lens) + d
    inputs = (tied_inputs(lens, lens_k, hq, hkv, d, torch.float64, seed=seed) if tied
              else separated_inputs(lens, lens_k, hq, hkv, d, m, torch.float64, seed=seed))
    errs, _ = _compare(lens, lens_k, hq, hkv, d, dtype, inputs, is_causal=causal, sparsity_n=n,
                       sparsity_m=m, num_sink_tokens=sink, dense_window_size=window,
                       tie_break=tie_break, softmax_scale=scale)
    assert max(errs) < TOL[dtype], errs
