"""The decode kernel (``kernels.triton_decode``) against a float64 PyTorch reference.

Interpreted on CPU, compiled on GPU: dtypes, GQA/MQA groups, head dims, in-place cache
layouts (a static cache's full buffer, ``view().transpose()``), key masks (left and right
padding, holes, a row with no key), query masks, the split path and the single pass, and
every validation error. Unattended key slots and invalid query rows hold NaN wherever the
kernel must not read them, so a stray read shows. GPU-only tests check that the call never
synchronises, replays in a CUDA graph, compiles with ``fullgraph=True`` (zero graph breaks,
no copy of the cache), and that the direct launcher gives the bits of a plain launch.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modelopt_sparse.kernels import interpreting
from modelopt_sparse.kernels import triton_decode as td
from modelopt_sparse.kernels.triton_decode import decode_attention, split_plan

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="needs a GPU or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol = rtol


def reference(q, k, v, key_valid=None, query_valid=None, softmax_scale=None):
    """[B, 1, Hq, D] float64: softmax over the attended keys, zeros for rows without any."""
    groups = q.shape[1] // k.shape[1]
    width = k.shape[2] if key_valid is None else key_valid.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    keys = k[:, :, :width].double().repeat_interleave(groups, 1)
    values = v[:, :, :width].double().repeat_interleave(groups, 1)
    attended = torch.ones(q.shape[0], width, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        attended = key_valid != 0
    if query_valid is not None:
        attended = attended & query_valid[:, None]
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attended[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # all -inf rows: NaN -> 0
    # 0 * NaN is NaN: clear unattended values, which the tests may fill with NaN.
    values = values.masked_fill(~attended[:, None, :, None], 0.0)
    return (probs @ values).transpose(1, 2)


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _check(out, q, k, v, key_valid=None, query_valid=None, softmax_scale=None):
    b, hq, _, d = q.shape
    assert out.shape == (b, 1, hq, d) and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    want = reference(q, k, v, key_valid, query_valid, softmax_scale)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def _poison_unattended(k, v, key_valid):
    """NaN in every slot the mask excludes (holes and slots >= W): the kernel must not read them."""
    width = key_valid.shape[1]
    k[:, :, width:] = float("nan")
    v[:, :, width:] = float("nan")
    holes = (key_valid == 0)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    k[:, :, :width][holes] = float("nan")
    v[:, :, :width][holes] = float("nan")


@pytest.fixture
def force_splits(monkeypatch):
    """Split every launch with more than 32 keys, into pieces of one key tile; the test
    fails if no launch was split after all."""
    monkeypatch.setattr(td, "SINGLE_PASS_MAX_KEYS", 32)
    monkeypatch.setattr(td, "MIN_KEYS_PER_SPLIT", 32)
    launches = _Launches(monkeypatch)
    yield
    assert any(split and grid[2] > 1 for _, grid, split in launches.calls), "no launch was split"


class _Launches:
    """Launchers that record each launch and forward it to the real ones."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = td._eager_launchers

        def recorder(i):
            def launch(grid, key, args, kwargs):
                self.calls.append((i, grid, kwargs.get("SPLIT")))
                real[i](grid, key, args, kwargs)
            return launch

        monkeypatch.setattr(td, "_eager_launchers", (recorder(0), recorder(1)))
        monkeypatch.setattr(td, "_PLANS", {})  # every launch goes through the recorders


# --------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (4, 1)], ids=["mha", "g3", "g4", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_matches_reference(dtype, heads, head_dim):
    hq, hkv = heads
    q = _randn(2, hq, 1, head_dim, dtype=dtype, seed=0)
    k = _randn(2, hkv, 100, head_dim, dtype=dtype, seed=1)
    v = _randn(2, hkv, 100, head_dim, dtype=dtype, seed=2)
    _check(decode_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("heads,head_dim", [((72, 1), 64), ((80, 2), 256)], ids=["g72_d64", "g40_d256"])
def test_wide_groups_span_several_head_tiles(heads, head_dim):
    """More query heads per kv head than one tile holds: several programs share a kv head."""
    hq, hkv = heads
    g_tiles = td._config(torch.float32, head_dim, hq // hkv, False, False, -1)[1]
    assert g_tiles == 2
    q = _randn(2, hq, 1, head_dim, dtype=torch.float32, seed=0)
    k = _randn(2, hkv, 40, head_dim, dtype=torch.float32, seed=1)
    v = _randn(2, hkv, 40, head_dim, dtype=torch.float32, seed=2)
    _check(decode_attention(q, k, v), q, k, v)


def test_explicit_softmax_scale_and_large_scores():
    q = _randn(2, 4, 1, 64, dtype=torch.float32, seed=0) * 8
    k = _randn(2, 2, 70, 64, dtype=torch.float32, seed=1) * 8
    v = _randn(2, 2, 70, 64, dtype=torch.float32, seed=2)
    _check(decode_attention(q, k, v, softmax_scale=0.3), q, k, v, softmax_scale=0.3)
    # The scale really is used: the default one gives another result.
    assert not torch.allclose(decode_attention(q, k, v, softmax_scale=0.3), decode_attention(q, k, v))


@pytest.mark.parametrize("splits", [False, True], ids=["single", "split"])
def test_static_cache_buffer_read_in_place(splits, request):
    """The whole [B, Hkv, Lmax, D] buffer, only the first W slots attended; the rest is NaN."""
    if splits:
        request.getfixturevalue("force_splits")
    k = _randn(2, 2, 160, 64, dtype=torch.float16, seed=1)
    v = _randn(2, 2, 160, 64, dtype=torch.float16, seed=2)
    q = _randn(2, 6, 1, 64, dtype=torch.float16, seed=0)
    key_valid = torch.ones(2, 130, dtype=torch.int32, device=DEVICE)
    key_valid[1, :7] = 0  # left padding
    _poison_unattended(k, v, key_valid)
    _check(decode_attention(q, k, v, key_valid), q, k, v, key_valid)


def test_transposed_views_and_strided_query():
    """k/v as ``[B, L, Hkv, D]`` storage viewed ``transpose(1, 2)``; q sliced from a fused
    projection ``[B, 1, (Hq + 2 Hkv) D]``, so its batch stride is not Hq * D."""
    fused = _randn(3, 1, 12 * 80, dtype=torch.bfloat16, seed=0)
    q = fused[..., : 8 * 80].view(3, 1, 8, 80).transpose(1, 2)
    k = _randn(3, 90, 2, 80, dtype=torch.bfloat16, seed=1).transpose(1, 2)
    v = _randn(3 * 90 * 2 * 80, dtype=torch.bfloat16, seed=2).view(3, 90, 2, 80).transpose(1, 2)
    assert q.stride()[:2] == (12 * 80, 80) and not (k.is_contiguous() or v.is_contiguous())
    _check(decode_attention(q, k, v), q, k, v)


def _key_masks():
    left = torch.ones(3, 100, dtype=torch.int32)
    left[0, :40] = 0
    left[2, :99] = 0  # a single key, the last one
    right = torch.ones(3, 100, dtype=torch.int32)
    right[1, 65:] = 0
    holes = torch.ones(3, 100, dtype=torch.int32)
    holes[0, ::3] = 0
    holes[1, 10:80] = 0
    holes[2] = 0  # no key at all: zeros, not NaN
    return {"left": left, "right": right, "holes": holes, "holes_bool": holes.bool()}


@pytest.mark.parametrize("splits", [False, True], ids=["single", "split"])
@pytest.mark.parametrize("kind", ["left", "right", "holes", "holes_bool"])
def test_key_masks(kind, splits, request):
    if splits:
        request.getfixturevalue("force_splits")
    key_valid = _key_masks()[kind].to(DEVICE)
    q = _randn(3, 4, 1, 64, dtype=torch.float32, seed=0)
    k = _randn(3, 2, 110, 64, dtype=torch.float32, seed=1)
    v = _randn(3, 2, 110, 64, dtype=torch.float32, seed=2)
    _poison_unattended(k, v, key_valid)
    out = decode_attention(q, k, v, key_valid)
    _check(out, q, k, v, key_valid)
    if kind.startswith("holes"):
        assert (out[2] == 0).all()
        assert (out[:2].abs() > 0).any(-1).all()  # the other rows are real outputs


@pytest.mark.parametrize("splits", [False, True], ids=["single", "split"])
def test_query_valid_rows_are_zero(splits, request):
    if splits:
        request.getfixturevalue("force_splits")
    q = _randn(3, 4, 1, 64, dtype=torch.float16, seed=0)
    k = _randn(3, 1, 100, 64, dtype=torch.float16, seed=1)
    v = _randn(3, 1, 100, 64, dtype=torch.float16, seed=2)
    query_valid = torch.tensor([True, False, True], device=DEVICE)
    q[1] = float("nan")  # an invalid row's query is never used
    key_valid = torch.ones(3, 100, dtype=torch.int32, device=DEVICE)
    key_valid[2] = 0
    for kv in (None, key_valid):
        out = decode_attention(q, k, v, kv, query_valid)
        _check(out, q, k, v, kv, query_valid)
        assert (out[1] == 0).all()
        assert (out[0].abs() > 0).any(-1).all()


def test_split_path_equals_single_pass(monkeypatch):
    """The same inputs through one pass and through 4 splits (one of them holding only
    masked keys) agree to fp32 rounding, and the split path really launched two kernels."""
    q = _randn(2, 8, 1, 128, dtype=torch.float32, seed=0)
    k = _randn(2, 2, 250, 128, dtype=torch.float32, seed=1)
    v = _randn(2, 2, 250, 128, dtype=torch.float32, seed=2)
    key_valid = torch.ones(2, 250, dtype=torch.bool, device=DEVICE)
    key_valid[0, 64:128] = False  # the whole second split of row 0
    single = decode_attention(q, k, v, key_valid)
    launches = _Launches(monkeypatch)
    monkeypatch.setattr(td, "SINGLE_PASS_MAX_KEYS", 64)
    monkeypatch.setattr(td, "MIN_KEYS_PER_SPLIT", 64)
    split = decode_attention(q, k, v, key_valid)
    assert [(i, grid[2], s) for i, grid, s in launches.calls] == [(0, 4, True), (1, 1, None)]
    torch.testing.assert_close(split, single, atol=1e-5, rtol=1e-5)
    _check(split, q, k, v, key_valid)


def test_empty_batch_and_no_keys():
    q = _randn(0, 4, 1, 64, dtype=torch.float16, seed=0)
    k = _randn(0, 2, 10, 64, dtype=torch.float16, seed=1)
    assert decode_attention(q, k, k).shape == (0, 1, 4, 64)
    q = _randn(2, 4, 1, 64, dtype=torch.float16, seed=0)
    k = _randn(2, 2, 0, 64, dtype=torch.float16, seed=1)
    out = decode_attention(q, k, k)
    assert out.shape == (2, 1, 4, 64) and (out == 0).all()
    k = _randn(2, 2, 10, 64, dtype=torch.float16, seed=1)
    out = decode_attention(q, k, k, torch.ones(2, 0, dtype=torch.int32, device=DEVICE))
    assert (out == 0).all()


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------
def test_split_plan_rule():
    assert split_plan(4, td.SINGLE_PASS_MAX_KEYS, 64, 132) == (1, td.SINGLE_PASS_MAX_KEYS)
    assert split_plan(4096, 100_000, 64, 132) == (1, 100_000)  # enough programs already
    assert split_plan(1, 1_000_000, 64, 132)[0] == td.MAX_SPLITS
    splits, per = split_plan(1, 2000, 64, 132)
    assert splits == 8 and per == 256  # at least MIN_KEYS_PER_SPLIT keys each
    for programs in (1, 3, 8, 40, 100):
        for n_keys in (1025, 1500, 4097, 33_333, 131_072):
            splits, per = split_plan(programs, n_keys, 64, 132)
            assert per % 64 == 0 or splits == 1
            assert (splits - 1) * per < n_keys <= splits * per  # no empty split, all keys covered
            assert splits == 1 or splits * programs <= td.SPLIT_TARGET_WAVES * 132 + programs


def test_split_plan_rule_in_compiled_graphs():
    """Launches of a compiled graph split short caches too while the (row, kv head) programs
    fill less than one wave (issue 14: batch 1 with 3 kv heads ran 3 programs on 132 SMs);
    eager launches keep their rule, and so do compiled ones once the programs fill a wave."""
    block_n, sms = 64, 132
    # SmolLM2-135M decode (3 kv heads, group 3: one head tile) over a 640-slot static cache.
    assert split_plan(3, 640, block_n, sms) == (1, 640)  # eager: unchanged
    assert split_plan(3, 640, block_n, sms, graph=True) == (5, 128)  # 15 programs of 2 tiles
    assert split_plan(24, 640, block_n, sms, graph=True) == (5, 128)  # batch 8: 120 programs
    assert split_plan(3, 2048, block_n, sms, graph=True) == (16, 128)  # eager: (8, 256)
    assert split_plan(3, 2048, block_n, sms) == (8, 256)
    assert split_plan(3, td.GRAPH_SINGLE_PASS_MAX_KEYS, block_n, sms, graph=True) == (
        1, td.GRAPH_SINGLE_PASS_MAX_KEYS)
    assert split_plan(3, td.GRAPH_SINGLE_PASS_MAX_KEYS + 1, block_n, sms, graph=True)[0] == 3
    for programs, n_keys in ((sms, 640), (4096, 3000), (200, 5000)):  # a full wave: the eager rule
        assert split_plan(programs, n_keys, block_n, sms, graph=True) == split_plan(programs, n_keys, block_n, sms)
    for programs in (1, 3, 8, 24, 40, 100, 131):
        for n_keys in (257, 300, 640, 1000, 1025, 4097, 33_333):
            for bn in (32, 64):
                splits, per = split_plan(programs, n_keys, bn, sms, graph=True)
                assert splits > 1 and per % bn == 0
                assert (splits - 1) * per < n_keys <= splits * per  # no empty split, all keys covered
                assert per > td.GRAPH_MIN_KEYS_PER_SPLIT // 2  # at most cdiv(n_keys, that) splits
                assert splits * programs <= td.SPLIT_TARGET_WAVES * sms + programs
                assert splits <= td.MAX_SPLITS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in of the compiled op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_decode_splits_a_short_static_cache(monkeypatch, dtype, batch):
    """torch.compile(fullgraph=True) of a SmolLM2-135M decode step (9 query / 3 kv heads,
    D = 64) over a 640-slot static cache, filled up to a different slot per row (holes and
    the empty tail poisoned with NaN): the compiled op splits the keys 5 ways and merges,
    and matches the reference and the eager single pass."""
    cache, filled = 640, [521 + 15 * b for b in range(batch)]
    q = _randn(batch, 9, 1, 64, dtype=dtype, seed=0)
    k = _randn(batch, 3, cache, 64, dtype=dtype, seed=1)
    v = _randn(batch, 3, cache, 64, dtype=dtype, seed=2)
    codes = torch.zeros(batch, cache, dtype=torch.int32, device=DEVICE)  # token codes, as the adapter's
    for b, n in enumerate(filled):
        codes[b, :n - 1] = 1
        codes[b, n - 1] = 2  # the step's own token
    if batch > 1:
        codes[1, :7] = 0  # left padding
    query_valid = (codes >= 2).any(1)
    if batch > 1:
        query_valid[-1] = False  # a padded query row: zeros
    _poison_unattended(k, v, codes)
    eager = decode_attention(q, k, v, codes, query_valid)  # eager rule: one pass
    launches = _Launches(monkeypatch)

    def step(q, k, v, codes, query_valid):
        return decode_attention(q, k, v, codes, query_valid)

    torch._dynamo.reset()
    try:
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, codes, query_valid)
    finally:
        torch._dynamo.reset()
    assert [(i, grid[2], s) for i, grid, s in launches.calls] == [(0, 5, True), (1, 1, None)]
    assert launches.calls[1][1][0] == batch * 9  # the merge: one program per (row, query head)
    _check(got, q, k, v, codes, query_valid)
    torch.testing.assert_close(got, eager, atol=TOL[dtype], rtol=TOL[dtype])
    if batch > 1:
        assert (got[-1] == 0).all()


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_keys", [300, 5000])
def test_one_allocation_per_launch(monkeypatch, n_keys):
    """Single pass: one aten op (the output) and one launch; split: one scratch more."""
    launched = []
    monkeypatch.setattr(td, "_eager_launchers", (lambda *a: launched.append(0), lambda *a: launched.append(1)))
    monkeypatch.setattr(td, "_PLANS", {})  # no plan of an earlier test takes the call
    q = _randn(1, 8, 1, 64, dtype=torch.float16, seed=0)
    k = _randn(1, 2, n_keys, 64, dtype=torch.float16, seed=1)
    key_valid = torch.ones(1, n_keys, dtype=torch.int32, device=DEVICE)
    query_valid = torch.ones(1, dtype=torch.bool, device=DEVICE)
    with _AtenOps() as mode:
        decode_attention(q, k, k, key_valid, query_valid)
    if n_keys <= td.SINGLE_PASS_MAX_KEYS:
        assert mode.ops == ["aten.new_empty.default"] and launched == [0]
    else:
        assert mode.ops == ["aten.new_empty.default", "aten.empty.memory_format"] and launched == [0, 1]


def test_compile_fullgraph_without_graph_breaks():
    """Dynamo traces the checks and the op: one graph, no break (on CPU the interpreted
    kernel runs as an opaque op; on GPU see test_compile_inductor_gpu)."""
    q = _randn(2, 4, 1, 64, dtype=torch.float32, seed=0)
    k = _randn(2, 2, 70, 64, dtype=torch.float32, seed=1)
    key_valid = torch.ones(2, 60, dtype=torch.int32, device=DEVICE)
    key_valid[0, :5] = 0
    query_valid = torch.tensor([True, False], device=DEVICE)

    def step(q, k, v, key_valid, query_valid):
        return decode_attention(q, k, v, key_valid, query_valid) * 2

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(q, k, k, key_valid, query_valid)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(q, k, k, key_valid, query_valid)
    torch.testing.assert_close(got, 2 * decode_attention(q, k, k, key_valid, query_valid))
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def _good():
    q = torch.zeros(2, 4, 1, 32, device=DEVICE)
    k = torch.zeros(2, 2, 10, 32, device=DEVICE)
    return q, k, k.clone()


def _bad_cases():
    q, k, v = _good()
    mask = torch.ones(2, 10, dtype=torch.int32, device=DEVICE)
    meta = torch.zeros(2, 2, 10, 32, device="meta")
    cases = {
        "q_not_tensor": ((q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        "k_3d": ((q, k[0], v), {}, ValueError, "k must be 4-D"),
        "dtype_mix": ((q, k.half(), v), {}, TypeError, "share one dtype"),
        "float64": ((q.double(), k.double(), v.double()), {}, TypeError, "unsupported dtype torch.float64"),
        "devices": ((q, meta, v), {}, ValueError, "one device"),
        "two_queries": ((q.expand(2, 4, 2, 32), k, v), {}, ValueError, "one query per row"),
        "kv_shapes": ((q, k, v[:, :, :9]), {}, ValueError, "k and v must have one shape"),
        "batch": ((q[:1], k, v), {}, ValueError, "k/v batch 2 differs from q batch 1"),
        "head_dim_mismatch": ((q[..., :16], k, v), {}, ValueError, "head dims differ: 16 and 32"),
        "head_dim_small": ((q[..., :8], k[..., :8], v[..., :8]), {}, ValueError, r"head_dim must be in \[16, 256\]"),
        "head_dim_large": ((torch.zeros(2, 4, 1, 264, device=DEVICE), torch.zeros(2, 2, 10, 264, device=DEVICE),
                            torch.zeros(2, 2, 10, 264, device=DEVICE)), {}, ValueError, "head_dim must be in"),
        "groups": ((q[:, :3], k, v), {}, ValueError, r"query heads \(3\) must be a positive multiple"),
        "no_kv_heads": ((q, k[:, :0], v[:, :0]), {}, ValueError, r"key/value heads \(0\)"),
        "q_stride": ((torch.zeros(2, 4, 1, 64, device=DEVICE)[..., ::2], k, v), {}, ValueError,
                     "q must have unit stride in its last dim"),
        "v_stride": ((q, k, torch.zeros(2, 2, 10, 64, device=DEVICE)[..., ::2]), {}, ValueError,
                     "v must have unit stride"),
        "mask_type": ((q, k, v, mask.tolist()), {}, TypeError, "key_valid must be a tensor or None"),
        "mask_dtype": ((q, k, v, mask.float()), {}, TypeError, "key_valid must be bool, int32 or int64"),
        "mask_1d": ((q, k, v, mask[0]), {}, ValueError, r"key_valid must be \[B=2, W\]"),
        "mask_batch": ((q, k, v, mask[:1]), {}, ValueError, r"key_valid must be \[B=2, W\], got shape \(1, 10\)"),
        "mask_wide": ((q, k, v, torch.ones(2, 11, dtype=torch.int32, device=DEVICE)), {}, ValueError,
                      "key_valid covers 11 key slots but k/v hold 10"),
        "mask_device": ((q, k, v, torch.ones(2, 10, dtype=torch.int32, device="meta")), {}, ValueError,
                        "key_valid is on meta"),
        "qmask_type": ((q, k, v, None, [True, True]), {}, TypeError, "query_valid must be a tensor or None"),
        "qmask_dtype": ((q, k, v, None, torch.ones(2, dtype=torch.int32, device=DEVICE)), {}, TypeError,
                        "query_valid must be bool"),
        "qmask_shape": ((q, k, v, None, torch.ones(2, 1, dtype=torch.bool, device=DEVICE)), {}, ValueError,
                        r"query_valid must be \[B=2\]"),
        "qmask_device": ((q, k, v, None, torch.ones(2, dtype=torch.bool, device="meta")), {}, ValueError,
                         "query_valid is on meta"),
        "scale_str": ((q, k, v), {"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a float, got str"),
        "scale_bool": ((q, k, v), {"softmax_scale": True}, TypeError, "softmax_scale must be a float, got bool"),
        "scale_zero": ((q, k, v), {"softmax_scale": 0.0}, ValueError, "positive and finite, got 0.0"),
        "scale_negative": ((q, k, v), {"softmax_scale": -1}, ValueError, "positive and finite, got -1"),
        "scale_inf": ((q, k, v), {"softmax_scale": float("inf")}, ValueError, "positive and finite, got inf"),
        "scale_nan": ((q, k, v), {"softmax_scale": float("nan")}, ValueError, "positive and finite, got nan"),
    }
    return cases


_BAD = _bad_cases()


@pytest.mark.parametrize("case", list(_BAD))
def test_validation_errors_before_launch(monkeypatch, case):
    args, kwargs, error, message = _BAD[case]

    def never(*a):
        raise AssertionError("launched a kernel for bad input")

    monkeypatch.setattr(td, "_eager_launchers", (never, never))
    monkeypatch.setattr(td, "_PLANS", {})
    with pytest.raises(error, match=message):
        decode_attention(*args, **kwargs)


def test_good_inputs_pass_validation():
    """The baseline the error cases perturb is itself valid (so each error has one cause)."""
    q, k, v = _good()
    mask = torch.ones(2, 10, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, mask, torch.ones(2, dtype=torch.bool, device=DEVICE), softmax_scale=2)
    assert out.shape == (2, 1, 4, 32) and (out == 0).all()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(td, "_UPCAST", False)
    q = torch.zeros(2, 4, 1, 32)
    k = torch.zeros(2, 2, 10, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        decode_attention(q, k, k)


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------
def _gpu_cases():
    """(name, q, k, v, key_valid, query_valid): single pass and split, every optional input."""
    b, hq, hkv, d, lmax = 3, 8, 2, 128, 6000
    q = _randn(b, hq, 1, d, dtype=torch.bfloat16, seed=0)
    k = _randn(b, hkv, lmax, d, dtype=torch.bfloat16, seed=1)
    v = _randn(b, hkv, lmax, d, dtype=torch.bfloat16, seed=2)
    query_valid = torch.tensor([True, False, True], device=DEVICE)
    cases = []
    for width in (700, 5000):  # one pass, split
        key_valid = torch.ones(b, width, dtype=torch.int32, device=DEVICE)
        key_valid[0, : width // 3] = 0
        cases.append((f"plain{width}", q, k[:, :, :width], v[:, :, :width], None, None))
        cases.append((f"masked{width}", q, k, v, key_valid, query_valid))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 8, 64, 3000), (1, 32, 8, 128, 20000), (4, 128, 1, 128, 1500),
                                   (2, 4, 2, 256, 5000), (3, 12, 4, 80, 777)],
                         ids=["mha", "gqa_long", "mqa_wide", "d256", "d80"])
def test_long_caches_gpu(dtype, shape):
    """Real cache lengths: split and single-pass, wide groups (head tiles), D = 256."""
    b, hq, hkv, d, n = shape
    q = _randn(b, hq, 1, d, dtype=dtype, seed=0)
    k = _randn(b, hkv, n, d, dtype=dtype, seed=1)
    v = _randn(b, hkv, n, d, dtype=dtype, seed=2)
    key_valid = torch.rand(b, n, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.2
    _check(decode_attention(q, k, v), q, k, v)
    _check(decode_attention(q, k, v, key_valid), q, k, v, key_valid)


@pytest.mark.gpu
def test_never_synchronises_gpu():
    cases = _gpu_cases()
    for _, *args in cases:  # compile and fill the launch caches first
        decode_attention(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [decode_attention(*args) for _, *args in cases]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for out, (_, *args) in zip(outs, cases):
        _check(out, *args)


@pytest.mark.gpu
def test_cuda_graph_replay_gpu():
    """Captured once, replayed on new cache contents, masks and a longer valid width."""
    for name, q, k, v, key_valid, query_valid in _gpu_cases():
        inputs = [t.clone() if t is not None else None for t in (q, k, v, key_valid, query_valid)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decode_attention(*inputs)  # warm up off the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_attention(*inputs)
        for t, seed in zip(inputs[:3], (10, 11, 12)):
            t.copy_(_randn(*t.shape, dtype=t.dtype, seed=seed))
        if inputs[3] is not None:
            inputs[3].fill_(1)
            inputs[3][1, 5:] = 0
            inputs[4].copy_(torch.tensor([False, True, True]))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, *inputs)


@pytest.mark.gpu
def test_compile_inductor_gpu():
    """Inductor sees the user-defined Triton kernels: no graph break, the eager result."""
    for name, q, k, v, key_valid, query_valid in _gpu_cases():

        def step(q, k, v, key_valid, query_valid):
            return decode_attention(q, k, v, key_valid, query_valid) + 1

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(q, k, v, key_valid, query_valid)
        assert explanation.graph_break_count == 0, name
        got = torch.compile(step, fullgraph=True)(q, k, v, key_valid, query_valid)
        want = decode_attention(q, k, v, key_valid, query_valid) + 1
        torch.testing.assert_close(got, want)
        _check(got - 1, q, k, v, key_valid, query_valid)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compile_dynamic_cache_length_gpu():
    """A growing (dynamic) cache: one compiled function, several lengths, marked dynamic."""
    q = _randn(2, 8, 1, 64, dtype=torch.float16, seed=0)
    k = _randn(2, 2, 900, 64, dtype=torch.float16, seed=1)
    v = _randn(2, 2, 900, 64, dtype=torch.float16, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: decode_attention(q, k, v), fullgraph=True, dynamic=True)
    for length in (700, 701, 833):
        _check(compiled(q, k[:, :, :length], v[:, :, :length]), q, k[:, :, :length], v[:, :, :length])
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_kernels_do_not_copy_the_cache_gpu():
    """Inductor's functional kernel wrapper clones every tensor it thinks the kernel writes;
    only the output or scratch may be among them, never q, k, v or the masks."""
    from torch._functorch.aot_autograd import aot_function

    cases = _gpu_cases()
    _, q, k, v, _, _ = cases[0]
    # The compiled op splits the 700-key cases of these 6 programs too (split_plan's graph
    # rule): a cache within GRAPH_SINGLE_PASS_MAX_KEYS covers its single pass.
    cases.append(("plain200", q, k[:, :, :200], v[:, :, :200], None, None))
    for name, q, k, v, key_valid, query_valid in cases:
        cloned = []

        def record(graph_module, example_inputs):
            for node in graph_module.graph.nodes:
                if "triton_kernel_wrapper" in str(node.target):
                    cloned.append(sorted(node.kwargs["tensors_to_clone"]))
            return graph_module

        if key_valid is None:
            aot_function(lambda q, k, v: td._decode_op(q, k, v, None, None, 0.1), fw_compiler=record)(q, k, v)
        else:
            aot_function(lambda *a: td._decode_op(*a, 0.1), fw_compiler=record)(q, k, v, key_valid, query_valid)
        want = [["OUT"]] if "200" in name else [["OUT"], ["OUT"]]  # split: partials, then merge
        assert cloned == want, (name, cloned)


@pytest.mark.gpu
def test_direct_launches_equal_plain_launches_gpu(monkeypatch):
    """The direct launcher (verified against JITFunction.run on every hit) gives the bits
    of an ordinary ``kernel[grid](...)`` launch, single pass and split."""
    launchers = td._eager_launchers
    if not all(hasattr(launcher, "direct_launches") for launcher in launchers):
        pytest.skip("MODELOPT_SPARSE_DIRECT_LAUNCH=0")
    for launcher in launchers:
        monkeypatch.setattr(launcher, "_verify", True)
    monkeypatch.setattr(td, "_PLANS_ON", False)  # launch plans have their own test
    cases = _gpu_cases()
    before = [launcher.direct_launches for launcher in launchers]
    direct = [[decode_attention(*args) for _ in range(3)][-1] for _, *args in cases]
    assert all(launcher.direct_launches > n for launcher, n in zip(launchers, before))
    monkeypatch.setattr(td, "_eager_launchers", (td._plain(td._decode_kernel), td._plain(td._merge_splits_kernel)))
    for out, (name, *args) in zip(direct, cases):
        assert torch.equal(out, decode_attention(*args)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launch_plans_equal_ordinary_launches(monkeypatch):
    """Repeated calls of one signature run from a launch plan (pointers as integers, no
    revalidation); with verification on, every plan hit is checked against the ordinary
    path, and the results equal a plain kernel[grid] launch bit for bit."""
    monkeypatch.setattr(td._eager_launchers[0], "_verify", True)
    monkeypatch.setattr(td, "_PLANS", {})
    q = _randn(3, 8, 1, 64, dtype=torch.bfloat16, seed=0)
    k = _randn(3, 2, 700, 64, dtype=torch.bfloat16, seed=1)
    v = _randn(3, 2, 700, 64, dtype=torch.bfloat16, seed=2)
    key_valid = torch.ones(3, 650, dtype=torch.int32, device="cuda")
    key_valid[1, :40] = 0
    query_valid = torch.tensor([True, True, False], device="cuda")
    outs = [decode_attention(q, k, v, key_valid, query_valid) for _ in range(4)]
    assert len(td._PLANS) == 1 and next(iter(td._PLANS.values())).launches == 3
    launcher = td._eager_launchers
    monkeypatch.setattr(td, "_eager_launchers", (td._plain(td._decode_kernel), td._plain(td._merge_splits_kernel)))
    monkeypatch.setattr(td, "_PLANS", {})
    plain = decode_attention(q, k, v, key_valid, query_valid)
    for out in outs:
        assert torch.equal(out, plain)
    # Another signature (no masks) gets its own plan.
    monkeypatch.setattr(td, "_eager_launchers", launcher)
    for _ in range(2):
        decode_attention(q, k, v)
    assert len(td._PLANS) == 1  # the earlier dict was replaced above; this one holds the new plan
