"""Sliding-window attention and logit soft-capping (issue 16).

* The rule itself (``semantics.kept_mask`` and the reference) against transformers'
  sliding-window mask function and Gemma 2's eager attention, with their exact conventions.
* The Triton kernels (interpreter on CPU) against the float64 reference, forward and
  gradients, on shapes that exercise tile skipping below the window (sequences of several
  tiles, windows that are no multiple of a tile), GQA/MQA, varlen, chunked prefill, decode
  and the padded-batch layout.
* The mask probe: the kernels' mask and their choice of visited / interior tiles, tile by tile.
* Teeth: on the very inputs of the equality tests, window ``w`` and ``w + 1`` (and caps a
  little apart) give clearly different references, so an off-by-one in a kernel fails them.
"""

import itertools
import math

import pytest
import torch

from modelopt_sparse.kernels import attention, interpreting, kept_mask
from modelopt_sparse.kernels.reference import SparseParams

from .helpers import rel_err, separated_inputs, varlen

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_only = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"
)
TOL32 = 2e-5


def _run(backend, dtype, inputs, lens_q, lens_k, do, *, batched=False, grad=True, **kw):
    xs = [t.detach().to(DEVICE, dtype).requires_grad_(grad) for t in inputs]
    if batched:  # one sequence per batch row, right-padded to the longest
        sq = torch.zeros(len(lens_q), dtype=torch.int32, device=DEVICE)
        lq = torch.tensor(lens_q, dtype=torch.int32, device=DEVICE)
        out = attention(*xs, sq, lq, max(lens_q), backend=backend, **kw)
    else:
        sq, lq, mq, _ = varlen(lens_q, DEVICE)
        sk, lk, mk, _ = varlen(lens_k, DEVICE)
        out = attention(*xs, sq, lq, mq, b_start_loc_k=sk, b_seq_len_k=lk, max_input_len_k=mk,
                        backend=backend, **kw)
    grads = torch.autograd.grad(out, xs, do.to(DEVICE, dtype)) if grad else ()
    return (out, *grads)


def _check(inputs, lens_q, lens_k, *, teeth=None, batched=False, grad=True, seed=0, **kw):
    """Triton (fp32) against the float64 reference; ``teeth``: a variant of kw whose
    reference must differ clearly from kw's (so the equality above would catch it)."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    got = _run("triton", torch.float32, inputs, lens_q, lens_k, do, batched=batched, grad=grad, **kw)
    want = _run("torch", torch.float64, inputs, lens_q, lens_k, do, batched=batched, grad=grad, **kw)
    # A gradient can vanish exactly (window 1: one key per query, so dq = dk = 0 in float64
    # but rounding noise in fp32): errors of gradients are measured against the problem's
    # gradient scale when they are below 1 % of it.
    scale = max((b.double().norm().item() for b in want[1:]), default=0.0)
    errs = [rel_err(got[0], want[0])] + [rel_err(a, b, floor=max(1e-2 * scale, 1e-30))
                                         for a, b in zip(got[1:], want[1:])]
    assert max(errs) < TOL32, errs
    if teeth is not None:
        other = _run("torch", torch.float64, inputs, lens_q, lens_k, do, batched=batched, grad=grad,
                     **{**kw, **teeth})
        # Every compared tensor moves by far more than the tolerance.
        assert min(rel_err(a, b) for a, b in zip(other, want)) > 100 * TOL32


# --------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------
def _hf_mask(fn, q_abs, kv_len):
    """A transformers mask function evaluated on all (query, key) pairs, as its vmapped
    mask builders do: index tensors broadcast."""
    zero = torch.tensor(0)
    return fn(zero, zero, q_abs[:, None], torch.arange(kv_len)[None, :]).expand(len(q_abs), kv_len)


@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("q_len,kv_len", [(20, 20), (7, 30)])
def test_window_mask_is_transformers_sliding_window_causal(window, q_len, kv_len):
    """transformers/masking_utils.py ``sliding_window_causal_mask_function``: key allowed
    iff ``q - window < k <= q`` (absolute positions), i.e. ``0 <= q - k < window``."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(window)
    q_abs = torch.arange(q_len) + (kv_len - q_len)  # queries are the last q_len positions
    want = _hf_mask(fn, q_abs, kv_len)
    got = kept_mask(torch.zeros(q_len, kv_len), q_len, kv_len, is_causal=True, sparsity_n=0, sparsity_m=4,
                    num_sink_tokens=0, dense_window_size=0, tie_break="threshold", sliding_window=window)
    assert torch.equal(got, want)


@pytest.mark.parametrize("tie_break", ["threshold", "index"])
@pytest.mark.parametrize("n,m,window,sinks,dense", [(2, 4, 7, 3, 2), (1, 4, 6, 0, 0), (3, 8, 13, 5, 4)])
def test_window_edge_groups_count_outside_keys_as_minus_inf(tie_break, n, m, window, sinks, dense):
    """A group straddling the window edge selects exactly as if its members outside the
    window were -inf scores (as causally masked members are), and sinks outside the window
    are not kept: the window restricts the allowed set, sinks and the dense window only
    protect allowed keys."""
    g = torch.Generator().manual_seed(n * 7 + window)
    q_len = kv_len = 45
    q_pos = torch.arange(q_len)
    inside = (q_pos[:, None] - torch.arange(kv_len)[None, :]) < window
    for qk in (torch.randint(-2, 3, (q_len, kv_len), generator=g).double(),
               torch.randn(q_len, kv_len, generator=g, dtype=torch.float64)):
        common = dict(is_causal=True, sparsity_n=n, sparsity_m=m, num_sink_tokens=sinks,
                      dense_window_size=dense, tie_break=tie_break)
        got = kept_mask(qk, q_len, kv_len, sliding_window=window, **common)
        want = kept_mask(qk.masked_fill(~inside, float("-inf")), q_len, kv_len, **common) & inside
        assert torch.equal(got, want)
        assert not (got & ~inside).any()


def test_softcap_matches_gemma2_eager_attention():
    """Gemma 2's eager attention (transformers/models/gemma2/modeling_gemma2.py,
    ``eager_attention_forward``): scores scaled, then ``cap * tanh(s / cap)``, then the
    sliding-window mask, softmax; with GQA. The reference (dense) matches it, gradients too."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    g = torch.Generator().manual_seed(3)
    s, hq, hkv, d, window, cap, scale = 24, 4, 2, 16, 9, 2.0, 0.3
    q, k, v = (torch.randn(1, h, s, d, generator=g, dtype=torch.float64).requires_grad_() for h in (hq, hkv, hkv))
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim = hq // hkv, d
    module.eval()
    fn = sliding_window_causal_mask_function(window)
    allowed = _hf_mask(fn, torch.arange(s), s)
    mask = torch.zeros(s, s, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    want, _ = eager_attention_forward(module, q, k, v, mask[None, None], scaling=scale, softcap=cap)
    lens = torch.tensor([s], dtype=torch.int32)
    got = attention(*(t[0].transpose(0, 1) for t in (q, k, v)), torch.zeros(1, dtype=torch.int32), lens, s,
                    softmax_scale=scale, sparsity_n=0, sliding_window=window, softcap=cap, backend="torch")
    # Gemma 2's eager softmax runs in float32.
    assert rel_err(got, want[0]) < 1e-6
    do = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad(want, (q, k, v), do)
    g_got = torch.autograd.grad(got, (q, k, v), do[0])
    assert max(rel_err(a, b) for a, b in zip(g_got, g_want)) < 1e-6


def test_softcap_reference_gradient_is_autograd_of_the_formula():
    """The reference's hand-written backward (mask held fixed, through the tanh) against
    autograd of the same function written out, sparse, in float64."""
    g = torch.Generator().manual_seed(5)
    s, h, d, cap, scale, window = 33, 2, 16, 1.5, 0.4, 11
    q, k, v = (torch.randn(s, h, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    kw = dict(is_causal=True, sparsity_n=2, sparsity_m=4, num_sink_tokens=1, dense_window_size=3,
              tie_break="threshold", sliding_window=window)
    qk = torch.einsum("ihd,jhd->hij", q, k)
    keep = kept_mask(qk.detach(), s, s, **kw)
    z = (cap * torch.tanh(qk * scale / cap)).masked_fill(~keep, float("-inf"))
    want = torch.einsum("hij,jhd->ihd", torch.softmax(z, -1), v)
    lens = torch.tensor([s], dtype=torch.int32)
    got = attention(q, k, v, torch.zeros(1, dtype=torch.int32), lens, s, softmax_scale=scale,
                    sparsity_n=2, sparsity_m=4, num_sink_tokens=1, dense_window_size=3,
                    sliding_window=window, softcap=cap, backend="torch")
    assert rel_err(got, want) < 1e-12
    do = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kw,error,match", [
    (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=-3), ValueError, "sliding_window must be >= 1"),
    (dict(sliding_window=True), TypeError, "sliding_window must be an int"),
    (dict(sliding_window=4.0), TypeError, "sliding_window must be an int"),
    (dict(sliding_window=4, is_causal=False), ValueError, "sliding_window needs is_causal=True"),
    (dict(softcap=0.0), ValueError, "softcap must be positive"),
    (dict(softcap=-1.0), ValueError, "softcap must be positive"),
    (dict(softcap=math.inf), ValueError, "softcap must be positive"),
    (dict(softcap=math.nan), ValueError, "softcap must be positive"),
    (dict(softcap="30"), TypeError, "softcap must be a float"),
    (dict(softcap=True), TypeError, "softcap must be a float"),
])
def test_bad_window_or_softcap_is_refused(kw, error, match):
    q = torch.zeros(4, 1, 16)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(error, match=match):
        attention(q, q, q, torch.zeros(1, dtype=torch.int32), lens, 4, backend="torch", **kw)


def test_defaults_leave_the_params_unchanged():
    """Off is the default: the params compare equal to ones built without the new fields
    (so launch keys, plans and compiled kernels of existing configurations are unchanged)."""
    assert SparseParams(True, 0.5, 2, 4, 0, 64, "threshold") == SparseParams(True, 0.5, 2, 4, 0, 64, "threshold",
                                                                             0, 0.0)


# --------------------------------------------------------------------------------------
# The kernels' mask and tile choice
# --------------------------------------------------------------------------------------
def _probe(qk, q_len, kv_len, params, block_m, block_n, by_keys):
    from modelopt_sparse.kernels.triton_attention import kernel_kept_mask

    return kernel_kept_mask(qk.to(DEVICE), q_len, kv_len, params, block_m=block_m, block_n=block_n,
                            by_keys=by_keys, return_interior=True, return_visited=True)


@triton_only
@pytest.mark.parametrize("n,m,tie_break,sinks,dense", [(2, 4, "threshold", 3, 4), (3, 8, "index", 0, 0),
                                                       (0, 4, "threshold", 0, 0)])
def test_kernel_window_mask_and_tiles(n, m, tie_break, sinks, dense):
    """For every tile shape and both tile classifications: the kernels' mask equals
    ``kept_mask`` bit for bit (a tile skipped wrongly would lose kept entries); every
    interior tile really lies inside every row's window; and tiles wholly older than the
    window are skipped (fewer tiles visited than with the causal mask alone)."""
    g = torch.Generator().manual_seed(n + m)
    skipped = 0
    # The windows put tile bounds exactly at the window's edge for 16x32 tiles: 18 (first
    # visited key tile, last visited query block), 47 (first interior key tile, last
    # interior query block), 30 (both, with queries after a cached prefix); 1 (self only).
    for (q_len, kv_len), window in [((150, 150), 18), ((150, 150), 47), ((60, 200), 30), ((37, 37), 1)]:
        qk = torch.randint(-2, 3, (q_len, kv_len), generator=g).float()
        params = SparseParams(True, 1.0, n, m, sinks, dense, tie_break, window)
        causal_only = SparseParams(True, 1.0, n, m, sinks, dense, tie_break)
        want = kept_mask(qk.double(), q_len, kv_len, is_causal=True, sparsity_n=n, sparsity_m=m,
                         num_sink_tokens=sinks, dense_window_size=dense, tie_break=tie_break, sliding_window=window)
        q_pos = torch.arange(q_len) + (kv_len - q_len)
        for (block_m, block_n), by_keys in itertools.product([(16, 32), (32, 64)], [False, True]):
            got, interior, visited = _probe(qk, q_len, kv_len, params, block_m, block_n, by_keys)
            assert torch.equal(got.cpu(), want), (q_len, kv_len, window, block_m, block_n, by_keys)
            for bi, bj in interior.cpu().nonzero().tolist():
                rows = q_pos[bi * block_m:min((bi + 1) * block_m, q_len)]
                keys = torch.arange(bj * block_n, (bj + 1) * block_n)
                assert (rows[:, None] - keys[None, :] < window).all(), (q_len, kv_len, window, bi, bj)
            _, _, visited_causal = _probe(qk, q_len, kv_len, causal_only, block_m, block_n, by_keys)
            assert not (visited & ~visited_causal).any()
            skipped += int(visited_causal.sum() - visited.sum())
    assert skipped > 0


# --------------------------------------------------------------------------------------
# Kernels against the reference, forward and gradients
# --------------------------------------------------------------------------------------
@triton_only
@pytest.mark.parametrize("n,m,tie_break,window", [(2, 4, "threshold", 34), (0, 4, "threshold", 127),
                                                  (3, 8, "index", 1)])
def test_window_varlen_gqa(n, m, tie_break, window):
    """Several key tiles per sequence (the interpreter runs 32x64 tiles), windows that are
    no multiple of a tile but put a tile bound at the window's edge (34: the first visited
    key tile and the last visited query block; 127: the first interior key tile and the last
    interior query block, as a tile can only be interior when W >= BLOCK_M + BLOCK_N - 1),
    sinks and a dense window inside a sliding window, GQA."""
    lens = [150, 70, 9]
    inputs = separated_inputs(lens, lens, 4, 2, 16, m, torch.float64, seed=window)
    _check(inputs, lens, lens, sparsity_n=n, sparsity_m=m, tie_break=tie_break, num_sink_tokens=3,
           dense_window_size=5, sliding_window=window, teeth=dict(sliding_window=window + 1))


@triton_only
def test_window_chunked_prefill_and_decode_mqa():
    """Queries after a cached prefix and a single-token decode step, where the window cuts
    the prefix: the window counts from each query's aligned position."""
    lens_q, lens_k = [40, 1, 20], [170, 90, 20]
    inputs = separated_inputs(lens_q, lens_k, 3, 1, 32, 4, torch.float64, seed=11)
    _check(inputs, lens_q, lens_k, sparsity_n=2, sparsity_m=4, dense_window_size=4, sliding_window=50,
           teeth=dict(sliding_window=49))


@triton_only
@pytest.mark.parametrize("grad", [True, False])
def test_window_and_softcap_padded_batch(grad):
    """The padded-batch layout [B, S, H, D] (the inference forward reads it in place, a
    differentiable call packs it), with a window and a cap together."""
    lens = [130, 57]
    s = max(lens)
    inputs = [t.view(2, s, *t.shape[1:]) for t in separated_inputs([s, s], [s, s], 2, 2, 16, 4, torch.float64,
                                                                   seed=2)]
    _check(inputs, lens, lens, batched=True, grad=grad, sparsity_n=2, sparsity_m=4, dense_window_size=0,
           sliding_window=45, softcap=0.8, teeth=dict(sliding_window=46))


@triton_only
@pytest.mark.parametrize("n,m", [(2, 4), (0, 4)])
def test_softcap_varlen_gqa(n, m):
    """A cap small against the scores (they reach several times it), so that tanh is far
    from linear and its gradient factor matters; causal and sparse."""
    lens = [100, 33]
    inputs = separated_inputs(lens, lens, 4, 2, 16, m, torch.float64, seed=n)
    _check(inputs, lens, lens, sparsity_n=n, sparsity_m=m, dense_window_size=3, softcap=0.5, softmax_scale=1.0,
           teeth=dict(softcap=0.6))


@triton_only
def test_softcap_noncausal_stats():
    """Non-causal with a cap, and the statistics (counts exact, dropped mass through the cap)."""
    lens = [90, 40]
    inputs = separated_inputs(lens, lens, 2, 1, 16, 4, torch.float64, seed=9)
    sq, lq, mq, _ = varlen(lens, DEVICE)
    stats = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        q, k, v = (t.to(DEVICE, dtype) for t in inputs)
        out, stats[backend] = attention(q, k, v, sq, lq, mq, is_causal=False, sparsity_n=2, sparsity_m=4,
                                        dense_window_size=0, softcap=0.6, sliding_window=None, backend=backend,
                                        return_stats=True)
    (a, b) = stats["triton"], stats["torch"]
    for key in ("allowed", "kept", "rows"):
        assert torch.equal(a[key].cpu(), b[key].cpu()), key
    assert torch.allclose(a["dropped_mass"].cpu(), b["dropped_mass"].cpu(), rtol=1e-5, atol=1e-6)
    _check(inputs, lens, lens, is_causal=False, sparsity_n=2, sparsity_m=4, dense_window_size=0, softcap=0.6)
