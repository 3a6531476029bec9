"""The Hopper forward engine (``backend="hopper"``, the kernels/hopper_attention/ package).

A test that replaces a name replaces it in the module that looks it up: ``ha`` (the package)
for what kernels/api.py calls on it (``choose``, ``hopper_attention``), ``he`` (engine) for
``find_nvcc`` as ``unsupported_reason`` sees it, ``hb`` (build) for the compile path, ``ht``
(tools) for the timing table's ``forward``.

CPU tests (always run): the dispatch, the fallback line, the error messages, the cubin cache
keying and the compile command, and that the ctypes argument struct mirrors the CUDA one.

GPU tests (``gpu`` marker; they need an sm_90 GPU and nvcc, and skip otherwise), ordered by
feature so that a failure names what broke: dense non-causal, causal, GQA and varlen, chunked
prefill and decode, head dims and dtypes, the LSE against the Triton forward's, N:M on
separated inputs (exact scores, hence exact masks) for every M and both tie rules, sinks and
the dense window, sliding window, the mask probe against ``semantics.kept_mask`` bit for bit
on tied inputs, the backward through the Triton kernels, the alternative schedules, and
``backend="auto"`` with the engine enabled. Every launch is checked for a timed-out barrier
wait (MODELOPT_SPARSE_HOPPER_CHECK=1), and a test that runs past 120 s ends its process with a
traceback instead of hanging the run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelopt_sparse.kernels import attention, kept_mask
from modelopt_sparse.kernels import hopper_attention as ha
from modelopt_sparse.kernels import api
from modelopt_sparse.kernels.api import _hopper_engine
from modelopt_sparse.kernels.hopper_attention import ab_table as hab
from modelopt_sparse.kernels.hopper_attention import build as hb
from modelopt_sparse.kernels.hopper_attention import driver as hd
from modelopt_sparse.kernels.hopper_attention import engine as he
from modelopt_sparse.kernels.hopper_attention import tools as ht
from modelopt_sparse.kernels.hopper_attention import variant_sets as hs
from modelopt_sparse.kernels.hopper_attention import variants as hv
from modelopt_sparse.kernels.reference import SparseParams

from .helpers import rel_err, separated_inputs, tied_inputs, varlen

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _params(**kw) -> SparseParams:
    base = dict(is_causal=True, softmax_scale=0.125, sparsity_n=0, sparsity_m=4, num_sink_tokens=0,
                dense_window_size=0, tie_break="threshold")
    base.update(kw)
    return SparseParams(**base)


class _FakeCuda:
    """A stand-in for a CUDA tensor: only what ``unsupported_reason`` looks at."""

    is_cuda = True
    device = torch.device("cuda:0")

    def __init__(self, shape=(8, 4, 128), dtype=torch.bfloat16):
        self.shape, self.dtype = torch.Size(shape), dtype

    def dim(self):
        return len(self.shape)


# ======================================================================================
# CPU: dispatch, fallback, errors
# ======================================================================================
def test_forced_backend_on_cpu_raises_clear_error():
    q = torch.randn(6, 2, 64)
    lens = torch.tensor([6], dtype=torch.int32)
    with pytest.raises(ha.HopperUnavailable, match=r"backend='hopper' cannot run this call: it needs CUDA tensors"):
        attention(q, q, q, torch.zeros(1, dtype=torch.int32), lens, 6, backend="hopper")


def test_unknown_backend_lists_hopper():
    q = torch.randn(6, 2, 64)
    lens = torch.tensor([6], dtype=torch.int32)
    with pytest.raises(ValueError, match="hopper"):
        attention(q, q, q, torch.zeros(1, dtype=torch.int32), lens, 6, backend="cuda")


def test_auto_on_cpu_is_unchanged(monkeypatch):
    """auto never considers the engine for CPU tensors, even opted in: the same result as
    without the opt-in, and the engine's module is never asked."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, 2, 64, generator=g) for _ in range(3))
    st, ln = torch.zeros(1, dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=4)
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER", raising=False)
    plain = attention(q, k, v, st, ln, 20, backend="auto", **kw)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER", "1")
    assert _hopper_engine() is ha  # attention() asks the package, where the stub below goes
    monkeypatch.setattr(ha, "choose", lambda *a, **kw: pytest.fail("the engine was considered for CPU tensors"))
    assert torch.equal(attention(q, k, v, st, ln, 20, backend="auto", **kw), plain)


@pytest.mark.parametrize("shape,dtype,kw,match", [
    ((8, 4, 128), torch.float32, {}, "float16 and bfloat16, not torch.float32"),
    ((8, 4, 96), torch.bfloat16, {}, "head_dim 64 and 128, not 96"),
    ((8, 4, 128), torch.bfloat16, {"softcap": 30.0}, "softcap is not implemented"),
    ((8, 4, 128), torch.bfloat16, {"stats": True}, "return_stats=True runs on the Triton forward"),
])
def test_unsupported_reasons_name_the_feature(monkeypatch, shape, dtype, kw, match):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    t = _FakeCuda(shape, dtype)
    params = _params(softcap=kw.get("softcap", 0.0))
    reason = ha.unsupported_reason(t, t, t, params, stats={} if kw.get("stats") else None, check_toolchain=False)
    assert reason is not None and re.search(match, reason), reason


def test_learned_sinks_run_on_the_engine(monkeypatch):
    """Learned sinks (GPT-OSS) are no reason to leave the engine since session 24."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    t = _FakeCuda()
    assert ha.unsupported_reason(t, t, t, _params(), learned_sinks=object(), check_toolchain=False) is None


def test_unsupported_reason_architecture_and_toolchain(monkeypatch):
    t = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "needs an sm_90 GPU (H100/H200), this one is sm_80" in ha.unsupported_reason(t, t, t, _params())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(he, "find_nvcc", lambda: None)
    reason = ha.unsupported_reason(t, t, t, _params())
    assert "no CUDA compiler found" in reason and "modelopt-sparse[hopper]" in reason
    monkeypatch.setattr(he, "find_nvcc", lambda: "/bin/true")
    assert ha.unsupported_reason(t, t, t, _params()) is None


def test_toolchain_search_runs_once_per_environment(monkeypatch):
    """The nvcc search (a glob of site-packages/nvidia and a dozen stats: ~230 us of an engine
    call's host time on the H200 host) runs once, and again when an environment variable it
    reads changes; the answer follows."""
    searches = []
    monkeypatch.setattr(he, "find_nvcc", lambda: searches.append(1) or os.environ.get("MODELOPT_SPARSE_NVCC"))
    monkeypatch.setenv("MODELOPT_SPARSE_NVCC", "/opt/nvcc")
    assert [he._toolchain_reason() for _ in range(5)] == [None] * 5 and len(searches) == 1
    monkeypatch.delenv("MODELOPT_SPARSE_NVCC")
    assert "no CUDA compiler found" in he._toolchain_reason() and len(searches) == 2
    he._toolchain_reason()
    assert len(searches) == 2


def test_choose_forced_raises_auto_logs_once(monkeypatch, caplog):
    t = _FakeCuda(dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(he, "_logged", set())
    with pytest.raises(ha.HopperUnavailable, match="backend='hopper' cannot run this call: it supports float16"):
        ha.choose(t, t, t, _params(), forced=True)
    big = _FakeCuda(shape=(4096, 32, 128), dtype=torch.float32)  # past AUTO_MIN_WORK
    with caplog.at_level(logging.WARNING, logger="modelopt_sparse"):
        assert ha.choose(big, big, big, _params(), forced=False) == "triton"
        assert ha.choose(big, big, big, _params(), forced=False) == "triton"
    lines = [r.getMessage() for r in caplog.records if "Hopper engine is not used" in r.getMessage()]
    assert len(lines) == 1 and "float16 and bfloat16" in lines[0] and "using the Triton kernels" in lines[0]
    # Statistics: even a forced call is served by the Triton forward (documented), with the line.
    t16 = _FakeCuda()
    monkeypatch.setattr(he, "find_nvcc", lambda: "/bin/true")
    assert ha.choose(t16, t16, t16, _params(), forced=True, stats={}) == "triton"
    assert ha.choose(t16, t16, t16, _params(), forced=True) == "hopper"


def test_auto_keeps_small_calls_on_triton_silently(monkeypatch, caplog):
    """Below AUTO_MIN_WORK auto never asks the engine (not even why it could not run); at and
    above it, the engine; batched [B, S, H, D] counts B x S rows against S keys."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(he, "find_nvcc", lambda: "/bin/true")
    monkeypatch.setattr(he, "_logged", set())
    small, edge = _FakeCuda(shape=(4095, 32, 128)), _FakeCuda(shape=(4096, 32, 128))
    with caplog.at_level(logging.WARNING, logger="modelopt_sparse"):
        assert ha.choose(small, small, small, _params(), forced=False) == "triton"
        assert ha.choose(small, small, small, _params(), forced=True) == "hopper"
        assert ha.choose(edge, edge, edge, _params(), forced=False) == "hopper"
        batched = _FakeCuda(shape=(2, 2048, 32, 128))
        assert he._work(batched, batched) == 2 * 2048 * 2048 * 32
        assert ha.choose(batched, batched, batched, _params(), forced=False) == "triton"
    assert not caplog.records


def test_the_choice_is_the_same_under_compile(monkeypatch):
    """Under torch.compile the engine is chosen as in eager mode (it runs as a custom op there):
    the machine questions (capability, toolchain) are answered once at trace time, not refused."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(he, "find_nvcc", lambda: "/bin/true")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    edge = _FakeCuda(shape=(4096, 32, 128))
    assert ha.choose(edge, edge, edge, _params(), forced=False) == "hopper"
    monkeypatch.setattr(he, "find_nvcc", lambda: None)
    with pytest.raises(ha.HopperUnavailable, match="no CUDA compiler found"):
        ha.choose(edge, edge, edge, _params(), forced=True)
    # Dynamo keeps both answers as constants instead of tracing a file system lookup.
    assert he._capability._dynamo_marked_constant and he._toolchain_reason._dynamo_marked_constant


def _triton_forward_as_the_kernel(q, k, v, q_start, q_len, max_q, k_start, k_len, params, *, q_covered, with_lse,
                                  learned_sinks=None):
    """A CPU stand-in for the engine's launch with its contract, (out, log2-domain lse): the
    (interpreted) Triton forward, whose output and lse the Hopper kernel reproduces."""
    from modelopt_sparse.kernels.triton_attention import launch

    out, lse, _ = launch._forward_launch(q, k, v, q_start, q_len, k_start, k_len, max_q, int(k_len.max()), q_covered,
                                         False, params, True, learned_sinks=learned_sinks)
    return out, lse


@pytest.mark.skipif(torch.cuda.is_available() or not api.interpreting(), reason="CPU with TRITON_INTERPRET=1")
def test_compiled_call_runs_the_engine_op_in_one_graph_with_the_triton_backward(monkeypatch):
    """torch.compile(fullgraph=True) of a backend="hopper" call: one graph holding the engine's
    custom op (the launch stubbed by the Triton forward on the CPU), the eager output, and the
    gradients of the Triton backward through the op's autograd formula (aot_eager traces it)."""
    from modelopt_sparse.kernels.hopper_attention import ops as hops

    monkeypatch.setattr(ha, "choose", lambda *a, **kw: "hopper")
    launches = []

    def launch(*a, **kw):
        launches.append(a[0].shape)
        return _triton_forward_as_the_kernel(*a, **kw)

    monkeypatch.setattr(hops, "forward", launch)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, h, 32) for h in (4, 2, 2))
    start = torch.zeros(2, dtype=torch.int32)
    lens = torch.tensor([24, 17], dtype=torch.int32)

    sinks = torch.randn(4)
    kw = dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=1, dense_window_size=4)

    def call(q, k, v, sinks):
        return attention(q, k, v, start, lens, 24, backend="hopper", check_metadata=False, learned_sinks=sinks, **kw)

    want = attention(q, k, v, start, lens, 24, backend="triton", learned_sinks=sinks, **kw)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(q, k, v, sinks)
    assert explained.graph_break_count == 0 and len(explained.graphs) == 1
    assert "hopper_attention_forward" in explained.graphs[0].code
    torch._dynamo.reset()
    launches.clear()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    got = torch.compile(call, fullgraph=True, backend="aot_eager")(*leaves)
    assert launches, "the compiled graph did not call the engine's op"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    grad = torch.randn_like(got)
    got.backward(grad)
    eager = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    attention(*eager[:3], start, lens, 24, backend="triton", learned_sinks=eager[3], **kw).backward(grad)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available() or not api.interpreting(), reason="CPU with TRITON_INTERPRET=1")
def test_eager_autograd_with_learned_sinks_is_the_triton_backward(monkeypatch):
    """The eager autograd path (_HopperAttention, the launch stubbed by the Triton forward on the
    CPU) hands the learned sinks to the kernel and takes their gradient from the Triton backward:
    every gradient equals the Triton path's, the sinks' in their own dtype."""
    monkeypatch.setattr(ha, "choose", lambda *a, **kw: "hopper")
    monkeypatch.setattr(he, "forward", _triton_forward_as_the_kernel)
    torch.manual_seed(1)
    q, k, v = (torch.randn(30, h, 32) for h in (4, 2, 2))
    sinks = torch.randn(4, dtype=torch.float64)
    start, lens = torch.tensor([0, 12], dtype=torch.int32), torch.tensor([12, 18], dtype=torch.int32)
    kw = dict(sparsity_n=4, sparsity_m=8, sliding_window=9, num_sink_tokens=1)
    grads = []
    for backend in ("hopper", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = attention(*leaves[:3], start, lens, 18, backend=backend, learned_sinks=leaves[3], **kw)
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_engine_op_fake_matches_the_launch_contract(monkeypatch):
    """The op's fake (what compiled graphs plan with) gives the outputs the op's real
    implementation returns: shapes, dtypes and strides of ``out`` and ``lse`` as forward()
    allocates them (the launch itself stubbed out on the CPU), for a strided q, both dtypes, with
    and without learned sinks."""
    import contextlib
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    class _Loaded:  # a loaded module whose launch does nothing (no GPU here)
        block_m, block_n = 128, 128
        driver = types.SimpleNamespace(encode_tma=lambda *a: None, encode_tma_grouped=lambda *a: None)

        def launch(self, *a):
            pass

    monkeypatch.setattr(he, "_module", lambda *a, **kw: _Loaded())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: types.SimpleNamespace(cuda_stream=0))

    def run(dtype, sinks):
        q = torch.zeros(10, 8, 128, dtype=dtype)[:, :4]  # a head slice: not contiguous
        k = torch.zeros(12, 2, 128, dtype=dtype)
        meta = torch.zeros(1, dtype=torch.int32)
        return torch.ops.modelopt_sparse.hopper_attention_forward(
            q, k, k, meta, meta.clone(), meta, meta.clone(), 10, 12, False, False, True, 0.1, 2, 4, 0, 0,
            "threshold", 0, 0.0, torch.zeros(4) if sinks else None)

    for dtype in (torch.bfloat16, torch.float16):
        for sinks in (False, True):
            real = run(dtype, sinks)
            with FakeTensorMode(allow_non_fake_inputs=True):
                fake = run(dtype, sinks)
            for r, f in zip(real, fake):
                assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), (dtype, sinks)
            assert real[0].shape == (10, 4, 128) and real[0].dtype == dtype and real[1].dtype == torch.float32


def test_auto_keeps_short_sliding_windows_on_triton(monkeypatch, caplog):
    """A sliding window shorter than 1024 keys (dense) or 2048 (N:M) keeps auto on Triton, where
    the engine measured slower (session 24: 0.80-0.97x); longer windows, and windows that drop
    no key (at least the key rows), leave the choice to the work rule; forced calls still run."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(he, "find_nvcc", lambda: "/bin/true")
    monkeypatch.setattr(he, "_logged", set())
    t = _FakeCuda(shape=(16384, 32, 128))
    cases = [(0, None, "hopper"), (0, 512, "triton"), (0, 1024, "hopper"), (2, 1024, "triton"),
             (2, 2048, "hopper"), (8, 128, "triton"), (2, 16384, "hopper"), (2, 20000, "hopper")]
    with caplog.at_level(logging.WARNING, logger="modelopt_sparse"):
        for n, window, want in cases:
            params = _params(sparsity_n=n, sparsity_m=4 if n < 4 else 16, sliding_window=window or 0)
            assert ha.choose(t, t, t, params, forced=False) == want, (n, window)
            assert ha.choose(t, t, t, params, forced=True) == "hopper"
    assert not caplog.records  # a choice by size, not a fallback: no log line
    batched = _FakeCuda(shape=(4, 4096, 32, 128))  # key rows per sequence: 4096
    assert ha.choose(batched, batched, batched, _params(sparsity_n=2, sliding_window=4096), forced=False) == "hopper"
    assert ha.choose(batched, batched, batched, _params(sparsity_n=2, sliding_window=1024), forced=False) == "triton"


def test_auto_is_on_unless_opted_out(monkeypatch):
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER", raising=False)
    assert ha.auto_enabled()
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER", "0")
    assert not ha.auto_enabled()
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER", "yes")
    with pytest.raises(ValueError, match="MODELOPT_SPARSE_HOPPER must be 0 or 1"):
        ha.auto_enabled()


# ======================================================================================
# CPU: variants, cache keys, compile command, argument struct
# ======================================================================================
def test_variant_validation_and_canonical_form():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        hv.Variant(head_dim=96)
    with pytest.raises(ValueError, match="sparsity_m must be 2, 4, 8 or 16"):
        hv.Variant(sparsity_n=1, sparsity_m=3)
    # Dense kernels ignore M and the tie rule: one cubin for all of them.
    assert hv.Variant(sparsity_m=16, tie_index=True).canonical() == hv.Variant()
    assert hv.Variant(sparsity_n=2, sparsity_m=4, tie_index=True).canonical().tag == "d128_2of4i_o"
    d = hv.Variant(head_dim=64, sparsity_n=3, sparsity_m=16, fp16=True, pingpong=True, overlap=False).defines()
    assert d == ["-DNMH_HEAD_DIM=64", "-DNMH_SPARSITY_N=3", "-DNMH_SPARSITY_M=16", "-DNMH_TIE_INDEX=0",
                 "-DNMH_FP16=1", "-DNMH_PINGPONG=1", "-DNMH_OVERLAP=0", "-DNMH_PROBE=0"]


def test_variant_for_reads_schedule_switches(monkeypatch):
    p = _params(sparsity_n=4, sparsity_m=8, tie_break="index")
    v = hv.variant_for(p, torch.float16, 64)
    assert (v.head_dim, v.sparsity_n, v.sparsity_m, v.tie_index, v.fp16, v.pingpong, v.overlap) == \
        (64, 4, 8, True, True, True, False)  # the measured schedule (no overlap at M = 8)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_PINGPONG", "0")
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_OVERLAP", "1")
    v = hv.variant_for(p, torch.bfloat16, 128)
    assert not v.pingpong and v.overlap and v.lean  # each switch overrides one field
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_OVERLAP", "2")
    with pytest.raises(ValueError, match="MODELOPT_SPARSE_HOPPER_OVERLAP must be 0 or 1"):
        hv.variant_for(p, torch.bfloat16, 128)


def test_cache_key_depends_on_sources_variant_and_compiler():
    v = hv.Variant(sparsity_n=2, sparsity_m=4)
    base = hb.cache_key(v, "nvcc A", digest="src1")
    assert base == hb.cache_key(v, "nvcc A", digest="src1")  # stable
    assert base == hb.cache_key(hv.Variant(sparsity_n=2, sparsity_m=4, probe=False), "nvcc A", digest="src1")
    others = {
        hb.cache_key(v, "nvcc B", digest="src1"),
        hb.cache_key(v, "nvcc A", digest="src2"),
        hb.cache_key(hv.Variant(sparsity_n=2, sparsity_m=4, tie_index=True), "nvcc A", digest="src1"),
        hb.cache_key(hv.Variant(sparsity_n=2, sparsity_m=4, fp16=True), "nvcc A", digest="src1"),
        hb.cache_key(hv.Variant(sparsity_n=2, sparsity_m=4, probe=True), "nvcc A", digest="src1"),
        hb.cache_key(hv.Variant(head_dim=64, sparsity_n=2, sparsity_m=4), "nvcc A", digest="src1"),
    }
    assert base not in others and len(others) == 6
    # Dense variants that differ only in ignored fields share a key.
    assert hb.cache_key(hv.Variant(sparsity_m=8), "x", digest="s") == hb.cache_key(hv.Variant(), "x", digest="s")


def test_source_digest_covers_every_cuda_source(tmp_path, monkeypatch):
    for name in ("a.cu", "b.cuh"):
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(hb, "SOURCE_DIR", tmp_path)
    d0 = hb.source_digest()
    (tmp_path / "b.cuh").write_text("changed")
    assert hb.source_digest() != d0
    for f in tmp_path.iterdir():
        f.unlink()
    with pytest.raises(ha.HopperUnavailable, match="CUDA sources are missing"):
        hb.source_digest()


def test_compile_runs_nvcc_once_then_hits_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CACHE", str(tmp_path))
    monkeypatch.setattr(hb, "find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(hb, "nvcc_version", lambda nvcc: "fake 13.0")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"CUBIN")
        return subprocess.CompletedProcess(cmd, 0, "", "ptxas info    : Used 168 registers\n"
                                           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")

    monkeypatch.setattr(hb.subprocess, "run", fake_run)
    v = hv.Variant(head_dim=64, sparsity_n=4, sparsity_m=8, tie_index=True)
    path = hb.compile_variant(v)
    assert path.read_bytes() == b"CUBIN" and path.parent == tmp_path and "d64_4of8i_o" in path.name
    assert hb.compile_variant(v) == path and len(calls) == 1  # cached: nvcc not run again
    cmd = calls[0]
    assert cmd[0] == "/opt/fake/nvcc" and "-arch=sm_90a" in cmd and "-cubin" in cmd
    assert "--use_fast_math" not in cmd  # the kept test needs subnormals (drop_below)
    assert "-DNMH_SPARSITY_N=4" in cmd and "-DNMH_TIE_INDEX=1" in cmd and cmd[-1].endswith("nm_attention_fwd.cu")
    summary = hb.ptxas_summary(path.with_suffix(".log").read_text())
    assert summary == {"registers": 168, "stack": 0, "spill_stores": 0, "spill_loads": 0, "serialized_wgmma": False}
    # Another compiler version is another cubin.
    monkeypatch.setattr(hb, "nvcc_version", lambda nvcc: "fake 13.1")
    assert hb.compile_variant(v) != path and len(calls) == 2


def test_compile_keys_the_cubin_by_the_sources_it_compiled(tmp_path, monkeypatch):
    """nvcc compiles a snapshot of the sources, keyed by the snapshot's hash: a source edited
    while a compile runs (a background precompile during development) never lands under another
    source's key, and the edited source gets its own cubin."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "nm_attention_fwd.cu").write_text("// v1\n")
    (src / "ptx.cuh").write_text("// p1\n")
    monkeypatch.setattr(hb, "SOURCE_DIR", src)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hb, "find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(hb, "nvcc_version", lambda nvcc: "fake 13.0")
    v1 = hb.source_digest()

    def fake_run(cmd, **kw):
        (src / "nm_attention_fwd.cu").write_text("// v2\n")  # edited after the key, before nvcc reads
        compiled = Path(cmd[-1]).read_text() + (Path(cmd[-1]).parent / "ptx.cuh").read_text()
        Path(cmd[cmd.index("-o") + 1]).write_text(compiled)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hb.subprocess, "run", fake_run)
    v = hv.Variant()
    path = hb.compile_variant(v)
    assert path.read_text() == "// v1\n// p1\n" and path == hb.cubin_path(v, digest=v1)
    assert hb.source_digest() != v1 and hb.compile_variant(v) != path  # v2: a cubin of its own


def test_compile_from_another_source_folder(tmp_path, monkeypatch):
    """compile_variant(source_dir=...) (`ab --against`) compiles that folder's sources, keyed by
    their hash: another cubin than the package's sources give, the same one for equal sources, and
    a clear error for a folder without the kernel."""
    src, old = tmp_path / "src", tmp_path / "old"
    for folder, text in ((src, "// new\n"), (old, "// old\n")):
        folder.mkdir()
        (folder / "nm_attention_fwd.cu").write_text(text)
    monkeypatch.setattr(hb, "SOURCE_DIR", src)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hb, "find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(hb, "nvcc_version", lambda nvcc: "fake 13.0")

    def fake_run(cmd, **kw):
        Path(cmd[cmd.index("-o") + 1]).write_text(Path(cmd[-1]).read_text())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hb.subprocess, "run", fake_run)
    v = hv.Variant()
    ours, theirs = hb.compile_variant(v), hb.compile_variant(v, source_dir=old)
    assert ours.read_text() == "// new\n" and theirs.read_text() == "// old\n" and ours != theirs
    (old / "nm_attention_fwd.cu").write_text("// new\n")
    assert hb.compile_variant(v, source_dir=old) == ours
    with pytest.raises(hb.HopperUnavailable, match="no nm_attention_fwd.cu"):
        hb.compile_variant(v, source_dir=tmp_path)


def test_precompile_fails_when_the_sources_change_under_it(tmp_path, monkeypatch, capsys):
    """`precompile` exits 1 and says so when the CUDA sources changed while it compiled (its
    cubins would then belong to two versions of them), 0 otherwise."""
    import argparse

    src = tmp_path / "src"
    src.mkdir()
    (src / "nm_attention_fwd.cu").write_text("// v1\n")
    monkeypatch.setattr(hb, "SOURCE_DIR", src)
    monkeypatch.setattr(ht, "standard_variants", lambda probe=True, schedule=None: [hv.Variant()])
    args = argparse.Namespace(schedule_from_env=False, no_probe=True, test_schedules=False, jobs=1, no_report=True)
    monkeypatch.setattr(ht, "compile_variant", lambda v: tmp_path / "x.cubin")
    assert ht._precompile(args) == 0
    assert "changed" not in capsys.readouterr().out

    def edit_while_compiling(v):
        (src / "nm_attention_fwd.cu").write_text("// v2\n")
        return tmp_path / "x.cubin"

    monkeypatch.setattr(ht, "compile_variant", edit_while_compiling)
    assert ht._precompile(args) == 1
    assert "the CUDA sources changed during this precompile" in capsys.readouterr().out


def test_compile_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CACHE", str(tmp_path))
    monkeypatch.setattr(hb, "find_nvcc", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(hb, "nvcc_version", lambda nvcc: "fake")
    monkeypatch.setattr(hb.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "nm_attention_fwd.cu(1): error: boom"))
    with pytest.raises(ha.HopperUnavailable, match=r"nvcc failed for d128_dense_o:\n.*error: boom"):
        hb.compile_variant(hv.Variant())
    assert not list(tmp_path.glob("*.cubin"))  # no partial cubin left behind
    monkeypatch.setattr(hb, "find_nvcc", lambda: None)
    with pytest.raises(ha.HopperUnavailable, match="no CUDA compiler found"):
        hb.compile_variant(hv.Variant())


def test_param_struct_mirrors_the_cuda_source():
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    body = re.search(r"struct FwdParams \{(.*?)\};", src, re.S).group(1)
    names = re.findall(r"^\s*[\w:*\s]+?\*?\s*(\w+(?:,\s*\w+)*);", body, re.M)
    c_fields = [n.strip() for group in names for n in group.split(",")]
    assert c_fields == [f[0] for f in hd._FwdParams._fields_]
    size = int(re.search(r"static_assert\(sizeof\(FwdParams\) == (\d+)", src).group(1))
    assert size == hd.PARAMS_SIZE == ctypes.sizeof(hd._FwdParams)


@pytest.mark.parametrize("sinks, dense, sliding", [(2**40, 2**40 + 5, 2**33), (2**31 - 1, 2**31 - 1, 2**31 - 1),
                                                   (40, 37, 37), (3, 16, 5)])
def test_window_fields_clamp_to_the_key_rows_without_changing_the_result(sinks, dense, sliding):
    """Sink counts and windows reach the kernel clamped to the packed key rows (a sliding window
    that long is off): int32 fields, never wrapped by ctypes (2**40 would read as 0: a dense
    window turned off), and no value near 2**31 for the kernel's tile bounds to overflow on. The
    clamped values give the same result as the given ones: the reference, bit for bit, on
    ragged sequences with more queries than keys in one of them."""
    lens_q, lens_k = [9, 20], [30, 12]
    q, k, v = tied_inputs(lens_q, lens_k, 2, 1, 16, torch.float64, seed=5)  # ties in every group
    key_rows = k.shape[0]  # 42
    given = _params(sparsity_n=2, sparsity_m=4, num_sink_tokens=sinks, dense_window_size=dense,
                    sliding_window=sliding)
    fields = he.window_fields(given, key_rows)
    p = hd._FwdParams()
    p.num_sink, p.dense_window, p.sliding_window = fields
    assert (p.num_sink, p.dense_window, p.sliding_window) == fields  # int32: nothing wrapped
    assert fields == (min(sinks, key_rows), min(dense, key_rows), sliding if sliding < key_rows else 0)
    sq, lq, mq, _ = varlen(lens_q, "cpu")
    sk, lk, mk, _ = varlen(lens_k, "cpu")

    def run(n_sink, d_window, s_window):
        return attention(q, k, v, sq, lq, mq, b_start_loc_k=sk, b_seq_len_k=lk, max_input_len_k=mk, sparsity_n=2,
                         sparsity_m=4, num_sink_tokens=n_sink,
                         dense_window_size=d_window, sliding_window=s_window or None, backend="torch")

    assert torch.equal(run(sinks, dense, sliding), run(*fields))


def test_standard_variants_cover_the_patterns():
    tags = {v.tag for v in hs.standard_variants()}
    # The tests' kernels run the measured schedule: ping-pong, late rescale, TMA (at M = 16
    # through the grouped maps), lean, and overlap except at M = 8; with overlap the wait for
    # P.V(j-1) inside the softmax (session 16; M = 16 since session 17); at M = 16 P's row sums by
    # the tensor core (session 18, as dense D = 128) and the pairwise selection network; at M = 8
    # no ping-pong, the tensor-core row sums and the split loop (session 20).
    for m, flags in ((2, "pormzw"), (4, "pormzw"), (8, "rmzlu"), (16, "pormzgwuqj")):
        for tie in "ti":
            assert any(re.fullmatch(rf"d128_\dof{m}{tie}_{flags}", t) for t in tags), (m, tie)
    # Since session 23 dense and M = 16 at D = 128 also test the next tile's K and V early (j).
    assert {"d128_dense_pormzwuj", "d128_dense_hpormzwuj", "d64_dense_pormz3lj", "d64_dense_hpormz3lj"} <= tags
    # The schedule tests' kernels, as the measured switches complete them (with j where measured).
    for tag in ("d128_dense_pormzw", "d128_dense_pormz", "d64_dense_pormz3", "d128_dense_hpormzw", "d128_dense_owu",
                "d128_dense_o", "d128_dense_p"):
        assert tag in tags or tag + "j" in tags, tag
    assert len(tags) == len(hs.standard_variants())  # no duplicates


# The variants added after the first H200 run (compile-checked only, not yet run on a GPU).
SWITCHES = ("PINGPONG", "OVERLAP", "LATE_RESCALE", "TMA", "LEAN")


def _set_schedule(monkeypatch, sched):
    for name, on in zip(SWITCHES, sched):
        monkeypatch.setenv(f"MODELOPT_SPARSE_HOPPER_{name}", str(int(on)))


def test_new_switches_tags_defines_and_env(monkeypatch):
    # Off, the new switches add no define: the default cubins compile exactly the verified source path.
    assert hv.Variant().defines() == ["-DNMH_HEAD_DIM=128", "-DNMH_SPARSITY_N=0", "-DNMH_SPARSITY_M=4",
                                      "-DNMH_TIE_INDEX=0", "-DNMH_FP16=0", "-DNMH_PINGPONG=0", "-DNMH_OVERLAP=1",
                                      "-DNMH_PROBE=0"]
    # Stage 3: 2:4 only, never in a probe build; with or without TMA, with or without overlap.
    sp = hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, overlap=False).canonical()
    assert sp.sparse_pv and not sp.overlap and not sp.tma and sp.tag == "d128_2of4t_s"
    spo = hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, consumers=3, pingpong=True, tma=True).canonical()
    assert spo.overlap and spo.consumers == 2 and spo.tag == "d128_2of4t_poms" and hv._parse_tag(spo.tag) == spo
    assert sp.defines()[-1] == "-DNMH_SPARSE_PV=1"
    spt = hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, tma=True, pingpong=True, late_rescale=True,
                     lean=True, overlap=False).canonical()
    assert spt.tma and not spt.overlap and spt.tag == "d128_2of4t_prmzs" and hv._parse_tag(spt.tag) == spt
    assert {"-DNMH_TMA=1", "-DNMH_SPARSE_PV=1"} <= set(spt.defines())
    assert not hv.Variant(sparsity_n=4, sparsity_m=8, sparse_pv=True).canonical().sparse_pv
    assert not hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, probe=True).canonical().sparse_pv
    v = hv.Variant(sparsity_n=4, sparsity_m=8, pingpong=True, overlap=False, late_rescale=True, tma=True, lean=True)
    assert v.tag == "d128_4of8t_prmz"
    assert v.defines()[-3:] == ["-DNMH_LATE_RESCALE=1", "-DNMH_TMA=1", "-DNMH_LEAN=1"]
    # TMA's element stride is at most 8: M = 16 keeps cp.async (one cubin, no TMA define).
    v16 = hv.Variant(sparsity_n=8, sparsity_m=16, tma=True).canonical()
    assert not v16.tma and "-DNMH_TMA=1" not in v16.defines()
    assert hv.Variant(tma=True).canonical().tma
    # Three consumer warpgroups: D = 64 only, always with TMA, so never with M = 16.
    assert hv.Variant(head_dim=64, consumers=3).canonical() == hv.Variant(head_dim=64, consumers=3, tma=True)
    assert hv.Variant(head_dim=64, consumers=3).canonical().defines()[-2:] == ["-DNMH_TMA=1", "-DNMH_CONSUMERS=3"]
    assert hv.Variant(consumers=3).canonical().consumers == 2
    assert hv.Variant(head_dim=64, sparsity_n=8, sparsity_m=16, consumers=3).canonical().consumers == 2
    for name in SWITCHES:
        monkeypatch.delenv(f"MODELOPT_SPARSE_HOPPER_{name}", raising=False)
    measured = dict(pingpong=True, overlap=True, late_rescale=True, tma=True, lean=True)
    assert hv.schedule_from_env() == measured == hv.measured_schedule(128, 2, 4) == hv.measured_schedule(64, 2, 4)
    assert hv.measured_schedule(64, 0, 4) == measured  # session 14: overlap and late rescale at three warpgroups too
    assert hv.variant_for(_params(), torch.bfloat16, 64).tag == "d64_dense_pormz3lj"  # three consumer warpgroups, split loop (session 17), early K/V test (23)
    assert hv.variant_for(_params(sparsity_n=2, sparsity_m=4), torch.bfloat16, 64).consumers == 2
    assert hv.measured_schedule(64, 4, 8) == dict(measured, overlap=False)
    assert hv.measured_schedule(64, 8, 16) == measured  # session 21: M = 16 at D = 64 overlaps
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16), torch.bfloat16, 64).tag == "d64_8of16t_pormzgwq"
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16, tie_break="index"), torch.bfloat16,
                          64).tag == "d64_8of16i_pormzgwqv"
    # Session 20: M = 8 at D = 128 without ping-pong (and with the tensor-core row sums).
    assert hv.schedule_from_env(128, 4, 8) == dict(measured, pingpong=False, overlap=False)
    assert hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 128).tag == "d128_4of8t_rmzlu"
    assert hv.measured_schedule(128, 8, 16) == measured  # session 14: 8:16 at D = 128 overlaps
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_TMA3D", raising=False)
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16), torch.bfloat16, 128).tag == "d128_8of16t_pormzgwuqj"
    _set_schedule(monkeypatch, (True, False, True, True, True))
    got = hv.variant_for(_params(sparsity_n=2, sparsity_m=4), torch.bfloat16, 128)
    assert (got.pingpong, got.overlap, got.late_rescale, got.tma, got.lean) == (True, False, True, True, True)
    assert hv.schedule_env(hv.schedule_from_env()) == (
        "MODELOPT_SPARSE_HOPPER_PINGPONG=1 MODELOPT_SPARSE_HOPPER_OVERLAP=0 MODELOPT_SPARSE_HOPPER_LATE_RESCALE=1 "
        "MODELOPT_SPARSE_HOPPER_TMA=1 MODELOPT_SPARSE_HOPPER_LEAN=1")
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA", "on")
    with pytest.raises(ValueError, match="MODELOPT_SPARSE_HOPPER_TMA must be 0 or 1"):
        hv.variant_for(_params(), torch.bfloat16, 128)


def test_tags_parse_back_for_every_standard_variant():
    for v in hs.standard_variants():
        assert hv._parse_tag(v.tag) == v, v.tag
    with pytest.raises(ValueError, match="not a variant tag"):
        hv._parse_tag("d128_dense")


def test_schedule_test_set_covers_every_test_kernel():
    """The device script precompiles the test set of the schedule the timing favours: it must
    hold every (head dim, pattern, tie, dtype, probe) kernel the default set holds."""
    sched = dict(pingpong=True, overlap=False, late_rescale=False, tma=False, lean=False)
    got = hs.standard_variants(schedule=sched)
    # test_gpu_11's own ping-pong/overlap pairs aside, everything runs the schedule.
    own = {(p, o) for p, o in ((True, True), (True, False), (False, False))}
    assert all((v.pingpong, v.overlap) == (True, False) for v in got
               if not (v.sparsity_n in (0, 4) and v.head_dim == 128 and not v.fp16 and not v.probe))
    assert {(v.pingpong, v.overlap) for v in got if v.sparsity_n == 4 and v.head_dim == 128 and not v.tie_index
            and not v.fp16 and not v.probe} == own
    strip = {(v.head_dim, v.sparsity_n, v.sparsity_m, v.tie_index, v.fp16, v.probe) for v in got}
    assert strip == {(v.head_dim, v.sparsity_n, v.sparsity_m, v.tie_index, v.fp16, v.probe)
                     for v in hs._test_set(True)}
    carried = set(hs.standard_variants())
    assert {v.canonical() for v in hs.NEW_VARIANT_TESTS + hs.bench_variants()} <= carried


def test_tma_params_struct_mirrors_the_cuda_source():
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    body = re.search(r"struct TmaParams \{(.*?)\};", src, re.S).group(1)
    assert re.findall(r"TmaMap (\w+(?:, \w+)*);", body) == ["q, k, v"]
    assert "struct alignas(64) TmaMap" in src and "uint64_t opaque[16]" in src
    assert [f[0] for f in hd._TmaParams._fields_] == ["q", "k", "v"] and ctypes.sizeof(hd._TmaParams) == 384


def test_tma3d_grouped_maps_variant_struct_and_env(monkeypatch):
    """The grouped 4-D maps (tma3d): M = 16 with TMA only, its own define and tag flag, the
    48-byte-longer TmaParams (kv_rows after the maps, 64-byte aligned), off by default."""
    v = hv.Variant(sparsity_n=8, sparsity_m=16, pingpong=True, overlap=False, late_rescale=True, tma=True, lean=True,
                   tma3d=True).canonical()
    assert v.tma and v.tma3d and v.tag == "d128_8of16t_prmzg"
    assert v.defines()[-4:] == ["-DNMH_LATE_RESCALE=1", "-DNMH_TMA=1", "-DNMH_LEAN=1", "-DNMH_TMA3D=1"]
    assert hv._parse_tag(v.tag) == v
    # Dropped wherever the element-strided map (or cp.async) is the kernel: one cubin each.
    for other in (hv.Variant(sparsity_n=8, sparsity_m=16, tma3d=True), hv.Variant(tma=True, tma3d=True),
                  hv.Variant(sparsity_n=4, sparsity_m=8, tma=True, tma3d=True)):
        assert other.canonical() == dataclasses.replace(other, tma3d=False).canonical()
    assert not hv.Variant(sparsity_n=8, sparsity_m=16, tma3d=True).canonical().tma
    assert hv.Variant(head_dim=64, sparsity_n=8, sparsity_m=16, tma=True, tma3d=True, consumers=3).canonical().consumers == 2
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert re.search(r"#if NMH_TMA_BOUNDED\s+int64_t kv_rows;", src)
    assert "#define NMH_TMA_BOUNDED (NMH_TMA3D || (NMH_SPARSE_PV && NMH_TMA))" in src
    assert ctypes.sizeof(hd._TmaParams3D) == 448 and hd._TmaParams3D.kv_rows.offset == 384
    # On by default for M = 16 (the measured schedule since session 11), for no other pattern;
    # the switch set to 0 brings back the cp.async producer there.
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_TMA3D", raising=False)
    for name in SWITCHES:
        monkeypatch.delenv(f"MODELOPT_SPARSE_HOPPER_{name}", raising=False)
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16), torch.bfloat16, 128).tag == "d128_8of16t_pormzgwuqj"
    assert hv.variant_for(_params(sparsity_n=3, sparsity_m=16, tie_break="index"), torch.bfloat16, 64).tma3d
    assert hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 128).tag == "d128_4of8t_rmzlu"
    assert not hv.variant_for(_params(), torch.bfloat16, 128).tma3d
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA3D", "0")
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16), torch.bfloat16, 128).tag == "d128_8of16t_porzwuqj"
    assert {v.tag for v in hs._test_set(probe=False) if v.sparsity_m == 16} >= {"d128_8of16t_pormzgwuqj", "d64_3of16i_pormzgwqv"}
    # Carried: the GPU tests' and the timing table's grouped-map kernels are precompiled.
    carried = set(hs.standard_variants())
    assert {"d128_8of16t_pormzg", "d128_8of16t_prmzg", "d128_8of16t_pmzg", "d128_3of16i_omg", "d128_8of16t_omgx",
            "d128_3of16i_omgx", "d64_8of16t_hprmzg"} <= {c.tag for c in carried}


def test_split_loop_variant_flag_env_and_carried(monkeypatch):
    """The split tile loop (edge-tile and interior-tile loops): its own define and tag flag, on by
    default only for the three-warpgroup kernel (session 17's A/B) and otherwise when
    MODELOPT_SPARSE_HOPPER_SPLIT_LOOP=1, timed beside the one-loop kernels (both are
    precompiled), and the source classifies every tile of both loops with tile_is_edge."""
    v = hv.Variant(head_dim=64, consumers=3, pingpong=True, overlap=True, late_rescale=True, tma=True, lean=True,
                   split_loop=True).canonical()
    assert v.tag == "d64_dense_pormz3l" and v.defines()[-1] == "-DNMH_SPLIT_LOOP=1"
    assert hv._parse_tag(v.tag) == v
    assert "-DNMH_SPLIT_LOOP=1" not in dataclasses.replace(v, split_loop=False).defines()
    for name in SWITCHES + ("SPLIT_LOOP",):
        monkeypatch.delenv(f"MODELOPT_SPARSE_HOPPER_{name}", raising=False)
    assert not hv.variant_for(_params(), torch.bfloat16, 128).split_loop
    assert not hv.variant_for(_params(sparsity_n=2, sparsity_m=4), torch.bfloat16, 64).split_loop
    # M = 8 at D = 128 (session 20, without ping-pong): split; M = 8 at D = 64, 2:4 and 8:16: one loop.
    assert hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 128).split_loop
    assert hv.variant_for(_params(sparsity_n=2, sparsity_m=8, tie_break="index"), torch.bfloat16, 128).split_loop
    assert not hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 64).split_loop
    assert not any(hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, 128).split_loop
                   for n, m in ((2, 4), (8, 16)))
    assert hv.variant_for(_params(), torch.bfloat16, 64).tag == "d64_dense_pormz3lj"
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_D64_WG3", "0")  # two warpgroups: one loop, as measured
    assert not hv.variant_for(_params(), torch.bfloat16, 64).split_loop
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_D64_WG3")
    assert "d64_dense_pormz3lj" in {v.tag for v in hs._test_set(probe=False)}  # the GPU tests' kernel is carried
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_SPLIT_LOOP", "0")
    assert hv.variant_for(_params(), torch.bfloat16, 64).tag == "d64_dense_pormz3j"
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_SPLIT_LOOP", "1")
    assert hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 128).tag == "d128_4of8t_rmzlu"
    carried = {c.tag for c in hs.standard_variants()}
    assert {"d128_dense_pormz", "d128_dense_pormzl", "d128_8of16t_pormzg", "d128_8of16t_pormzgl", "d128_8of16t_prmzg",
            "d128_8of16t_prmzgl", "d64_dense_pmz3", "d64_dense_pmz3l", "d64_dense_pormz3", "d64_dense_pormz3l"} <= carried
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    loops = src[src.index("if constexpr (SPLIT_LOOP) {"):src.index("// ---- last P.V")]
    assert loops.count("tile_is_edge(tile_n0(i), x, p)") == 2
    assert "step(i, EdgeTile{})" in loops and "step(i, InteriorTile{})" in loops



def test_mid_wait_variant_flag_env_and_source(monkeypatch):
    """The wait for P.V(j-1) inside the softmax (MID_WAIT): its own define and tag flag, off
    unless MODELOPT_SPARSE_HOPPER_MID_WAIT=1, dropped where no P.V runs during the softmax (no
    overlap) and on the sparse P.V path; in the source the conversion into the operand happens
    only after the wait, and the K-stage arrive that pins the wait depends on an exponential."""
    v = hv.Variant(head_dim=64, consumers=3, pingpong=True, overlap=True, late_rescale=True, tma=True, lean=True,
                   mid_wait=True).canonical()
    assert v.tag == "d64_dense_pormz3w" and v.defines()[-1] == "-DNMH_MID_WAIT=1"
    assert hv._parse_tag(v.tag) == v
    assert "-DNMH_MID_WAIT=1" not in dataclasses.replace(v, mid_wait=False).defines()
    assert not dataclasses.replace(v, overlap=False).canonical().mid_wait
    assert not hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, mid_wait=True).canonical().mid_wait
    for name in SWITCHES + ("MID_WAIT", "D64_WG3", "TMA3D", "MMA_ROWSUM"):
        monkeypatch.delenv(f"MODELOPT_SPARSE_HOPPER_{name}", raising=False)
    # The measured default (session 16, M = 16 since session 17): dense D = 128 and N:M; not
    # dense D = 64 (three warpgroups), and M = 8 has no overlap.
    tags = {(d, n, m): hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d).tag
            for d in (64, 128) for n, m in ((0, 4), (1, 2), (2, 4), (4, 8), (8, 16))}
    assert tags[128, 0, 4] == "d128_dense_pormzwuj" and tags[64, 0, 4] == "d64_dense_pormz3lj"
    assert tags[128, 2, 4] == "d128_2of4t_pormzw" and tags[64, 2, 4] == "d64_2of4t_pormzwj"
    assert tags[128, 1, 2] == "d128_1of2t_pormzw" and tags[128, 4, 8] == "d128_4of8t_rmzlu"
    assert tags[128, 8, 16] == "d128_8of16t_pormzgwuqj"
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MID_WAIT", "0")
    assert hv.variant_for(_params(), torch.bfloat16, 128).tag == "d128_dense_pormzuj"
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MID_WAIT", "1")
    assert hv.variant_for(_params(), torch.bfloat16, 64).tag == "d64_dense_pormz3lwj"
    assert hv.variant_for(_params(sparsity_n=4, sparsity_m=8), torch.bfloat16, 128).tag == "d128_4of8t_rmzlu"  # no overlap
    assert hab.variant_env(v)["MODELOPT_SPARSE_HOPPER_MID_WAIT"] == "1"
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    body = src[src.index("if constexpr (MID_WAIT) {\n      if (i == MID_WAIT_AFTER - 1)"):]
    body = body[:body.index("if constexpr (LEAN) return")]
    assert body.index("mid(s[i]);") < body.index("convert_p_slice(s, pr, kk)")
    hook = src[src.index("auto pv_done = [&](float last_p) {"):]
    hook = hook[:hook.index("};")]
    assert hook.index("!(last_p < 0.f)) mbar_arrive(bar(BAR_EMPTY_K + s))") < hook.index("wg_wait<0>();")
    assert hook.index("wg_wait<0>();") < hook.index("reg_fence(pr[kk])")


def test_producer_polls_unless_suspending_is_asked(monkeypatch):
    """The producer's waits for free stages poll in a tight loop by default (session 16: the
    suspending form measured 0.986-1.009x); MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS=1 (tag flag
    n) builds the waits that suspend between polls (try_wait with a time hint), for A/B runs; the
    consumers' waits never suspend."""
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS", raising=False)
    v = hv.variant_for(_params(), torch.bfloat16, 128)
    assert not v.producer_suspends and "-DNMH_PRODUCER_SUSPENDS=1" not in v.defines()
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS", "1")
    sleeps = hv.variant_for(_params(), torch.bfloat16, 128)
    assert _flags_added(v.tag, sleeps.tag) == {"n"} and "-DNMH_PRODUCER_SUSPENDS=1" in sleeps.defines()
    assert hv._parse_tag(sleeps.tag) == sleeps
    assert hab.variant_env(sleeps)["MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS"] == "1"
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "constexpr bool SUSPEND_PRODUCER = NMH_PRODUCER_SUSPENDS != 0;" in src
    waits = re.findall(r"mbar_wait(<\w+>)?\(bar\(BAR_(\w+?)[ )]", src)
    assert {w for w in waits if w[1].startswith("EMPTY")} == {("<SUSPEND_PRODUCER>", "EMPTY_K"),
                                                            ("<SUSPEND_PRODUCER>", "EMPTY_V")}
    assert all(tmpl == "" for tmpl, name in waits if not name.startswith("EMPTY"))
    ptx = (hb.SOURCE_DIR / "ptx.cuh").read_text()
    assert 'if constexpr (SUSPEND) NMH_TRY_WAIT_ASM(", 200000");' in ptx

def test_mma_rowsum_variant_flag_env_and_source(monkeypatch):
    """P's row sums by the tensor core (MODELOPT_SPARSE_HOPPER_MMA_ROWSUM=1, tag flag u): a
    variant of its own (define, tag, parse, A/B switch), never with the sparse P.V; in the source
    the softmax's FADD into l is compiled out under it, V's stages make room for the ones atom
    and P.V runs as m64n(D+8)k16."""
    # The measured default (session 18): on for dense D = 128 and M = 16, off elsewhere.
    for d, n, m in ((128, 0, 4), (128, 2, 4), (128, 4, 8), (128, 8, 16), (64, 0, 4), (64, 8, 16)):
        monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", raising=False)
        default = hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d)
        assert default.mma_rowsum == (d == 128 and (n == 0 or m in (8, 16))) == hv.measured_mma_rowsum(d, n, m)
        monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", "0")
        v = hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d)
        assert not v.mma_rowsum and "-DNMH_MMA_ROWSUM=1" not in v.defines()
        monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", "1")
        on = hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d)
        assert on == dataclasses.replace(v, mma_rowsum=True).canonical() and "u" in on.tag.split("_")[-1]
        assert "-DNMH_MMA_ROWSUM=1" in on.defines()
        assert hv._parse_tag(on.tag) == on
        assert hab.variant_env(on)["MODELOPT_SPARSE_HOPPER_MMA_ROWSUM"] == "1"
    sp = hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, mma_rowsum=True).canonical()
    assert sp.sparse_pv and not sp.mma_rowsum
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "if constexpr (!MMA_ROWSUM) l[(i >> 1) & 1] += s[i];" in src
    assert "constexpr int V_STAGE_BYTES = TILE_BYTES + (MMA_ROWSUM ? ATOM_BYTES : 0);" in src
    assert "V_OFF + s * TILE_BYTES" not in src  # every V address steps by V_STAGE_BYTES
    wg = (hb.SOURCE_DIR / "wgmma.cuh").read_text()
    for n in (72, 136):
        for t in ("bf16", "f16"):
            assert f"wgmma_pv_rs_n{n}_{t}(float (&d)[{n // 2}]" in wg
            assert f"m64n{n}k16.f32.{t}.{t}" in wg
    assert {v.canonical() for v in hs.MMA_ROWSUM_TESTS} <= set(hs.standard_variants())  # carried: test_gpu_28's


def test_bn64_variant_flag_env_and_source(monkeypatch):
    """64-key tiles (MODELOPT_SPARSE_HOPPER_BN64=1, tag flag k): D = 128 only, dense or M <= 8,
    always three consumer warpgroups and the TMA producer, never the grouped maps or the sparse
    P.V; the source sizes every per-thread score array by BN, and the cubin tells the host its
    tile's keys (nmh_config[4], the K / V maps' box rows)."""
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_BN64", raising=False)
    assert not hv.variant_for(_params(sparsity_n=2, sparsity_m=4), torch.bfloat16, 128).bn64
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_BN64", "1")
    for n, m in ((0, 4), (1, 2), (2, 4), (4, 8)):
        v = hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, 128)
        assert v.bn64 and v.consumers == 3 and v.tma and not v.tma3d
        assert "-DNMH_BN64=1" in v.defines() and "-DNMH_CONSUMERS=3" in v.defines()
        assert {"3", "k", "m"} <= set(v.tag.split("_")[-1])
        assert hv._parse_tag(v.tag) == v
        assert hab.variant_env(v)["MODELOPT_SPARSE_HOPPER_BN64"] == "1"
    for d, n, m in ((64, 0, 4), (128, 8, 16), (128, 3, 16)):
        v = hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d)
        assert not v.bn64 and "-DNMH_BN64=1" not in v.defines()
    assert not hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, bn64=True).canonical().bn64
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "constexpr int BN = BN64 ? 64 : 128;" in src
    assert "extern \"C\" __constant__ int nmh_config[5] = {SMEM_BYTES, THREADS, BM, (int)sizeof(FwdParams), BN};" in src
    assert not re.search(r"\[64\]|\[8\]\[4\]|j < 16\b|i < 64\b|kk < 8\b", src.split("using namespace nmh;")[1]
                         .replace("float (&s)[64], uint64_t dq", ""))
    assert {v.canonical() for v in hs.BN64_TESTS} <= set(hs.standard_variants())


def _flags_added(off_tag: str, on_tag: str) -> set:
    """The flag letters ``on_tag`` has beyond ``off_tag`` (same head dim and pattern, and every
    flag of ``off_tag`` kept; a tag's flags are in a fixed order, not appended)."""
    off_head, _, off_flags = off_tag.rpartition("_")
    on_head, _, on_flags = on_tag.rpartition("_")
    assert off_head == on_head and set(off_flags.strip("-")) <= set(on_flags), (off_tag, on_tag)
    return set(on_flags) - set(off_flags)


def _assert_switch_flag(monkeypatch, field, name, letter, params, head_dim=128):
    """MODELOPT_SPARSE_HOPPER_<name> set to 0 and 1 for ``params``: the variant's ``field`` follows
    it, the tag gains ``letter``, the define appears, the tag parses back and the A/B table's
    switches reproduce it."""
    env, define = f"MODELOPT_SPARSE_HOPPER_{name}", f"-DNMH_{name}=1"
    monkeypatch.setenv(env, "0")
    off = hv.variant_for(params, torch.bfloat16, head_dim)
    assert not getattr(off, field) and define not in off.defines()
    monkeypatch.setenv(env, "1")
    on = hv.variant_for(params, torch.bfloat16, head_dim)
    assert getattr(on, field) and _flags_added(off.tag, on.tag) == {letter} and define in on.defines()
    assert hv._parse_tag(on.tag) == on and hab.variant_env(on)[env] == "1"


def test_pairwise_network_sorts_and_is_the_generated_header(monkeypatch):
    """Parberry's pairwise network (networks.cuh, MODELOPT_SPARSE_HOPPER_PAIRWISE, tag flag q):
    a sorting network by the 0-1 principle (every 0/1 input of 16 wires), 88 FMNMX at 8:16's
    ranks against Batcher's 92, the header exactly the generator's output, and a variant of its
    own at M = 16 only, on by default there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_networks", hb.SOURCE_DIR / "gen_networks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    net = gen.pairwise_network(16)
    assert len(net) == 63 and gen.check(16, net)
    assert not gen.check(16, net[:-1])  # the check can fail: the network less one comparator
    assert gen.pruned_minmax(net, {0, 7}) == 88
    out = subprocess.run([sys.executable, str(hb.SOURCE_DIR / "gen_networks.py")], capture_output=True, text=True,
                         check=True).stdout
    assert out == (hb.SOURCE_DIR / "networks.cuh").read_text()
    # On by default at M = 16 (session 18 A/B: 8:16 1.016x, 3:16 index 1.038x).
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_PAIRWISE", raising=False)
    assert hv.variant_for(_params(sparsity_n=8, sparsity_m=16), torch.bfloat16, 128).pairwise
    assert hv.variant_for(_params(sparsity_n=3, sparsity_m=16), torch.bfloat16, 64).pairwise
    _assert_switch_flag(monkeypatch, "pairwise", "PAIRWISE", "q", _params(sparsity_n=8, sparsity_m=16))
    for n, m in ((0, 4), (2, 4), (4, 8)):
        assert not hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, 128).pairwise
    assert {v.canonical() for v in hs.PAIRWISE_TESTS} <= set(hs.standard_variants())


def _half_select_floor(top, tn, tn1):
    """numpy mirror of nm_attention_fwd.cu's half_select_group on arrays of f16 ranks: (decided,
    floor). Each step is one IEEE f32 operation, as on the GPU (the fma exactly in float64, then
    rounded once)."""
    import numpy as np

    top32, tn32, tn132 = (np.asarray(x, np.float16).astype(np.float32) for x in (top, tn, tn1))
    decided = (tn132 < tn32) & (tn132 != -np.inf) & (top32 != np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        theta = np.float32(0.5) * (tn32 + tn132)
    odd = (np.asarray(tn, np.float16).view(np.uint16) & 1).astype(bool)
    odd_step = np.where(odd, np.uint32(0x33C00000), np.uint32(0)).astype(np.uint32).view(np.float32)
    assert np.array([0x33C00000], np.uint32).view(np.float32)[0] == np.float32(1.5 * 2.0 ** -24)
    with np.errstate(invalid="ignore"):
        floor = (np.abs(theta).astype(np.float64) * odd_step + theta).astype(np.float32)
    return decided, floor


def test_half_select_floor_decides_exactly_on_every_adjacent_f16_pair():
    """NMH_HALF_SELECT's threshold: whenever the f16 copies of the N-th and (N+1)-th largest
    differ, the f32 floor built from them lies above every f32 that rounds to the (N+1)-th's copy
    and at or below every f32 that rounds to the N-th's, so `score >= floor` keeps exactly the N
    largest. Checked against numpy's f32 -> f16 rounding (to nearest, ties to even) on every pair
    of adjacent finite f16 values (where the floor is a rounding boundary and ties-to-even
    decides) and on random pairs, with f32 next-door values of the floor rounded both ways; the
    cases the kernel hands to the f32 network are the undecidable ones."""
    import numpy as np

    every = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.unique(every[np.isfinite(every)].astype(np.float32))  # ascending; -0 and +0 merge
    tn1, tn = finite[:-1], finite[1:]  # adjacent pairs
    rng = np.random.default_rng(0)
    a, b = rng.choice(finite, 200_000), rng.choice(finite, 200_000)
    a = np.concatenate([a, -finite[finite > 0]])  # (-x, x): theta = 0
    b = np.concatenate([b, finite[finite > 0]])
    tn1, tn = np.concatenate([tn1, np.minimum(a, b)]), np.concatenate([tn, np.maximum(a, b)])
    keep = tn1 < tn
    tn1, tn = tn1[keep], tn[keep]
    # tn's f16 bit pattern as the network leaves it: either zero when tn is zero (both are even).
    decided, floor = _half_select_floor(np.full_like(tn, 1.0), tn.astype(np.float16), tn1.astype(np.float16))
    assert decided.all()
    below = np.nextafter(floor, np.float32(-np.inf))
    # floor rounds above tn1 (so every score that rounds to tn1 or less is < floor) ...
    assert (floor.astype(np.float16).astype(np.float32) > tn1).all()
    # ... and the next f32 down rounds below tn (so every score that rounds to tn is >= floor).
    assert (below.astype(np.float16).astype(np.float32) < tn).all()
    # Undecidable: equal copies (collisions, f32 ties), a -inf (N+1)-th, a +inf maximum.
    one, inf = np.float16(1.0), np.float16(np.inf)
    undecided = [(one, one, one), (inf, one, -inf), (inf, one, np.float16(0.5)), (one, -inf, -inf)]
    for top, t, t1 in undecided:
        assert not _half_select_floor(top, t, t1)[0][()]
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    body = src[src.index("bool half_select_group("):]
    body = body[:body.index("\n}\n")]
    assert "!(tn1 < tn) || tn1 == -INFINITY || top == INFINITY" in body and "0.5f * (tn + tn1)" in body
    assert "fmaf(fabsf(theta), odd_step, theta)" in body and "0x33C00000u" in src and "* 0x33C0u" in src


def test_half_select_variant_flag_env_and_sets(monkeypatch):
    """MODELOPT_SPARSE_HOPPER_HALF_SELECT (tag flag v): M = 16 only, on by default where it
    measured faster (the index rule at D = 64) and off elsewhere, its own define, parsed back from its
    tag, switched by the A/B table, and its test kernels (both settings) carried."""
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_HALF_SELECT", raising=False)
    for n in (8, 3):
        assert hv.variant_for(_params(sparsity_n=n, sparsity_m=16, tie_break="index"), torch.bfloat16, 64).half_select
    for d, n, tie in ((128, 8, "index"), (64, 8, "threshold"), (128, 8, "threshold"), (128, 3, "index")):
        assert not hv.variant_for(_params(sparsity_n=n, sparsity_m=16, tie_break=tie), torch.bfloat16, d).half_select
    _assert_switch_flag(monkeypatch, "half_select", "HALF_SELECT", "v", _params(sparsity_n=8, sparsity_m=16))
    for n, m in ((0, 4), (2, 4), (4, 8)):
        assert not hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, 128).half_select
    assert hv.variant_for(_params(sparsity_n=3, sparsity_m=16, tie_break="index"), torch.float16, 64).half_select
    assert {v.canonical() for v in hs.HALF_SELECT_TESTS} <= set(hs.standard_variants())
    assert {True, False} == {v.half_select for v in hs.HALF_SELECT_TESTS}


def _f32(bits: int) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<I", bits))[0]


def test_drop_below2_constants_and_kept_set():
    """The two-instruction kept test of the lean variants: its PTX constants are -2^64 and
    -2^127, and (emulating one fma rounding in float64, exact for these operands) it keeps
    exactly the scores >= the floor, on random, tied and adjacent fp32 values."""
    src = (hb.SOURCE_DIR / "ptx.cuh").read_text()
    body = src[src.index("drop_below2"):]
    assert "0fDF800000" in body and "0fFF000000" in body
    assert _f32(0xDF800000) == -2.0 ** 64 and _f32(0xFF000000) == -2.0 ** 127
    g = torch.Generator().manual_seed(0)
    score = (torch.randn(4096, generator=g) * 8).float()
    floor = torch.where(torch.rand(4096, generator=g) < 0.3, score, (torch.randn(4096, generator=g) * 8).float())
    floor = torch.where(torch.rand(4096, generator=g) < 0.2, torch.nextafter(score, torch.tensor(1e9)), floor)
    floor = torch.where(torch.rand(4096, generator=g) < 0.2, torch.nextafter(score, torch.tensor(-1e9)), floor)
    exact = score.double() * -(2.0 ** 64) + (floor * 2.0 ** 64).double()  # exact in float64 for these
    t = exact.float().clamp(0.0, 1.0)  # one rounding to fp32, then .sat
    arg = torch.zeros_like(score)
    out = t.double() * -(2.0 ** 127) + arg.double()
    kept = out > -(2.0 ** 41)
    assert torch.equal(kept, score >= floor)
    assert (t[score < floor] >= 2.0 ** -85).all()


def test_sass_loop_counter_on_a_synthetic_listing():
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;",
        ".L_x_2:",
        "        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R6 ;",
        "        /*0030*/               @!P0 BRA `(.L_x_2) ;",
        "        /*0040*/                   MUFU.EX2 R3, R3 ;",
        "        /*0050*/                   FMNMX R4, R4, R5, !PT ;",
        "        /*0060*/               @P1 BRA `(.L_x_1) ;",
        "        /*0070*/                   EXIT ;",
    ])
    counts = ht.count_main_loop(sass)
    assert counts["total"] == 4 and counts["HGMMA"] == 1 and counts["MUFU"] == 1 and counts["FMNMX"] == 1
    assert counts["SYNCS"] == 0  # the barrier-retry loop is not part of the tile's work
    assert counts["stall"] == 0  # no encodings in the listing
    assert counts["dispatch"] == 5  # HGMMA, MUFU and the branch one cycle each, the half-rate FMNMX two
    # nvdisasm -hex: each instruction line ends with its lower word, the next line holds the upper
    # one, whose bits 41-44 are the stall count; the body's sum leaves out the retry loop too.
    stall_of = {"MOV": 1, "HGMMA": 12, "SYNCS": 5, "@!P0": 9, "MUFU": 2, "FMNMX": 3, "@P1": 6, "EXIT": 4}
    hexed = []
    for line in sass.splitlines():
        if line.startswith(".L_x"):
            hexed.append(line)
            continue
        op = line.split("*/")[1].split()[0].split(".")[0]
        hexed.append(line + "   /* 0x0000000000007a02 */")
        hexed.append(" " * 100 + f"/* 0x{(stall_of[op] << 41) | (0x7f << 46):016x} */")
    counts = ht.count_main_loop("\n".join(hexed))
    assert counts["total"] == 4 and counts["SYNCS"] == 0
    assert counts["stall"] == 12 + 2 + 3 + 6


def test_sparse_pv_layout_and_compression_rules():
    """Stage 3's index algebra, as the kernel writes it (the expressions are checked to be in
    the source): every key of the 2:4 group permutation meets the V row its sparse-operand slot
    multiplies, and the kept-pair selects give the right values and a valid metadata nibble for
    all six 2-of-4 patterns."""
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "return (c / 32) * 32 + 8 * ((c % 16) / 4) + 4 * ((c % 32) / 16) + c % 4;" in src
    assert "const uint32_t i0 = k0 ? 0u : (k1 ? 1u : 2u), i1 = k3 ? 3u : (k2 ? 2u : 1u);" in src
    assert "w[jr][e] |= (i0 | (i1 << 2)) << (4 * t + 16 * r);" in src
    assert "cp[jr][2 * e + r] = pack2<FP16>(p0, p1);" in src  # staged; to_operand copies cp -> pr
    assert "for (int q = 0; q < 4; ++q) pr[jr][q] = cp[jr][q];" in src and "meta[jr] = cm[jr];" in src

    def v_row_key(c):
        return (c // 32) * 32 + 8 * ((c % 16) // 4) + 4 * ((c % 32) // 16) + c % 4

    def col_key(j, t, e, m=4):  # accumulator column -> key (K group permutation, M = 4, R = 4)
        return m * (8 * (j % 4) + 2 * t + e) + j // 4

    assert sorted(v_row_key(c) for c in range(128)) == list(range(128))
    for t in range(4):
        for jr in range(4):
            for e in range(2):
                for mm in range(4):
                    key = col_key(jr + 4 * mm, t, e)  # member mm of group (jr, e) in thread t
                    k_logical = 16 * e + 4 * t + mm  # chunk t (e = 0) or 4 + t (e = 1), element mm
                    assert v_row_key(32 * jr + k_logical) == key
    import itertools

    for kept in itertools.combinations(range(4), 2):
        k = [i in kept for i in range(4)]
        i0 = 0 if k[0] else (1 if k[1] else 2)
        i1 = 3 if k[3] else (2 if k[2] else 1)
        assert (i0, i1) == kept  # first kept in the low half, idx0 < idx1 (a valid nibble)
    # The split path's fixed nibbles: members {0, 1} and {2, 3}.
    assert (0 | 1 << 2) == 0x4 and (2 | 3 << 2) == 0xE
    assert "0xEEEEEEEEu" in src and "0x44444444u" in src


# --------------------------------------------------------------------------------------
# Stage 3 (NMH_SPARSE_PV): a register-level emulation of the sparse P.V of one consumer
# warpgroup against the PTX ISA's wgmma.mma_async.sp, on the CPU.
#
# What the ISA says (PTX ISA 8.x/9.x), and where each fact is used below:
#   * 9.7.15.6.2.1 "Matrix Fragments for sparse wgmma.mma_async.m64nNk32" (Figure 175) and
#     CuTe's ALayout_64x32 (mma_traits_sm90_gmma.hpp: thread (4,8,4):(256,1,16), value
#     (4,2,2):(64,8,1024)): thread (warp w, lane 4g+t) register q holds the two kept values
#     (first in the low half) of the 4-wide chunk t + 4 (q // 2) of row 16w + g + 8 (q % 2).
#   * Figure 176 (metadata, .f16/.bf16, sparsity selector 0) and CuTe's ELayout_64x32
#     (thread (2,2,8,4):(1024,0,1,16), value (16,2):(64,8)): lane 4g + h (h = 0, 1) supplies
#     chunks 4h..4h+3 of rows g (bits 0-15) and g+8 (bits 16-31), chunk 4h+c in bits 4c..4c+3;
#     lanes 4g+2 and 4g+3 are not read. A nibble is idx0 | idx1 << 2, idx0 < idx1 the positions
#     of the two values in the chunk ("Sparse matrix storage"). All of this is what the stage-1
#     microbenchmark verified bit for bit on the H200 (docs/hopper_wgmma_microbench.md).
#   * B is the dense 32 x N slice: logical k = smem row of the slice (descriptor + 4096 B).
#   * 9.7.15.7.3 (wgmma.wait_group): "Accessing the accumulator register or the input register
#     containing the fragments of matrix A of a wgmma.mma_async instruction without first
#     performing a wgmma.wait_group instruction that waits on a wgmma-group including that
#     wgmma.mma_async instruction is undefined behavior": an issued MMA may read its register
#     operands (A and, like them, the metadata) at any time until the wait that covers it. The
#     emulation evaluates every MMA twice, with its operands as they were at issue and as they
#     are at the wait, and also reports a write to an operand register of an MMA in flight.
# --------------------------------------------------------------------------------------
_SP_THREADS = [(w, lane) for w in range(4) for lane in range(32)]


def _sp_row_key(c):  # K smem row -> key offset (2:4 group permutation, G = 32)
    return (c % 32) * 4 + c // 32


def _sp_v_row_key(c):  # V smem row -> key offset (NMH_SPARSE_PV's second order)
    return (c // 32) * 32 + 8 * ((c % 16) // 4) + 4 * ((c % 32) // 16) + c % 4


def _sp_member_index(gi, m, r):  # the kernel's member_index (M = 4, R_PERM = 4)
    return 4 * ((gi >> 1) + 4 * m) + 2 * r + (gi & 1)


def _sp_fragment(mat, w, lane):
    """The f32 accumulator fragment of S = Q.K^T (64 x 128, columns = K smem rows) that thread
    (w, lane) holds: d[4j + 2r + e] = S[16w + g + 8r][8j + 2t + e]; here indexed by key."""
    g, t = lane // 4, lane % 4
    return [mat[16 * w + g + 8 * ((i >> 1) & 1)][_sp_row_key(8 * (i >> 2) + 2 * t + (i & 1))] for i in range(64)]


def _sp_kernel_compress(s, t):
    """softmax_tile's compressed branch, transcribed (P = the kept score itself: the emulation
    checks where values go, not the exponentials): pr[8][4] (pairs, low half first) and the
    unreduced metadata words w[jr][e]."""
    pr = [[None] * 4 for _ in range(8)]
    w = [[0, 0] for _ in range(4)]
    for r in range(2):
        for gi in range(8):
            jr, e = gi >> 1, gi & 1
            s0, s1, s2, s3 = (s[_sp_member_index(gi, m, r)] for m in range(4))
            t2 = sorted((s0, s1, s2, s3), reverse=True)[1]  # thr[r][g] = v[N_SEL - 1]
            k0, k1, k2, k3 = s0 >= t2, s1 >= t2, s2 >= t2, s3 >= t2
            v0 = s0 if k0 else (s1 if k1 else s2)
            v1 = s3 if k3 else (s2 if k2 else s1)
            i0 = 0 if k0 else (1 if k1 else 2)
            i1 = 3 if k3 else (2 if k2 else 1)
            pr[jr][2 * e + r] = (v0, v1)
            w[jr][e] |= (i0 | (i1 << 2)) << (4 * t + 16 * r)
    return pr, w


def _sp_kernel_split(p):
    """convert_p_split, transcribed: members {0, 1} -> pr[jr], {2, 3} -> pr[4 + jr]."""
    pr = [[None] * 4 for _ in range(8)]
    for jr in range(4):
        for h in range(2):
            for e in range(2):
                for r in range(2):
                    gi = 2 * jr + e
                    pr[4 * h + jr][2 * e + r] = (p[_sp_member_index(gi, 2 * h, r)], p[_sp_member_index(gi, 2 * h + 1, r)])
    return pr


def _sp_isa_mma(a_regs, meta_regs, b):
    """wgmma.mma_async.sp m64nNk32, sparsity selector 0, as the ISA states it: the dense 64 x 32
    A from the per-thread registers and metadata, times the 32 x N slice b."""
    a = torch.zeros(64, 32, dtype=torch.float64)
    for w, lane in _SP_THREADS:
        g, t = lane // 4, lane % 4
        for q in range(4):
            row, chunk = 16 * w + g + 8 * (q % 2), t + 4 * (q // 2)
            word = meta_regs[(w, 4 * g + chunk // 4)]
            nib = (word >> (16 * (q % 2) + 4 * (chunk % 4))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1, f"invalid metadata nibble {nib:#x} (warp {w}, row {row}, chunk {chunk})"
            lo, hi = a_regs[(w, lane)][q]
            a[row, 4 * chunk + i0] = lo
            a[row, 4 * chunk + i1] = hi
    return a @ b


def _sp_pv_form(src: str) -> int:
    """Which form of pv_gemm_sparse the source has (an unknown form fails: model it below)."""
    if "a[jr][q] = pass ? pr[4 + jr][q] : pr[jr][q];" in src and "mt[jr] = pass ? 0xEEEEEEEEu : meta[jr];" in src:
        return 1
    if ("wgmma_pvsp_rs_n128_bf16(o, pr[jr], dsl[jr], 1, meta[jr]);" in src
            and "for (int pass = 1; pass < passes; ++pass) {" in src
            and "wgmma_pvsp_rs_n128_bf16(o, pr[4 + jr], dsl[jr], 1, meta_hi);" in src
            and "const uint32_t meta_hi = 0xEEEEEEEEu;" in src):
        return 2
    raise AssertionError("pv_gemm_sparse has a form the emulation does not model")


def _sp_pv_program(form: int, passes: int):
    """pv_gemm_sparse as register-level events. Registers "pr<k>.<q>" and "meta<jr>" are written
    by the softmax / to_operand before the P.V; anything else is the P.V's own. A rolled loop
    (#pragma unroll 1) has one set of registers for its body, so its locals are the same
    registers in every pass (form 1's SASS shows it: both passes' HGMMA.SP read R152..R167 and
    R201..R204, rewritten by SELs between the passes with no wait)."""
    ev = []
    if form == 1:  # the first GPU run: each pass selects its operand into loop-local a[4][4], mt[4]
        for pas in range(passes):
            for jr in range(4):
                for q in range(4):
                    ev.append(("write", f"a{jr}.{q}", f"pr{4 * bool(pas) + jr}.{q}"))
                ev.append(("write", f"mt{jr}", 0xEEEEEEEE if pas else f"meta{jr}"))
            ev.append(("fence",))
            ev += [("mma", [f"a{jr}.{q}" for q in range(4)], f"mt{jr}", jr) for jr in range(4)]
            ev.append(("commit",))
    else:  # pass 0 reads pr[jr] / meta, the second pass pr[4 + jr] / meta_hi, all written first
        ev.append(("write", "meta_hi", 0xEEEEEEEE))
        ev.append(("fence",))
        ev += [("mma", [f"pr{jr}.{q}" for q in range(4)], f"meta{jr}", jr) for jr in range(4)]
        ev.append(("commit",))
        for _ in range(1, passes):
            ev.append(("fence",))
            ev += [("mma", [f"pr{4 + jr}.{q}" for q in range(4)], "meta_hi", jr) for jr in range(4)]
            ev.append(("commit",))
    ev.append(("wait",))
    return ev


def _sp_run(events, regs, v_smem, n):
    """Execute the events on per-thread register files ``regs[(w, lane)][name]``; returns the
    output under both operand-read times and the list of writes to in-flight operands."""
    out = {"issue": torch.zeros(64, n, dtype=torch.float64), "wait": torch.zeros(64, n, dtype=torch.float64)}
    issued, committed, hazards = [], [], []
    for e in events:
        if e[0] == "write":
            _, dst, val = e
            for op in issued + committed:
                if dst in op[0] or dst == op[1]:
                    hazards.append(f"{dst} written while an MMA reading it is in flight")
                    break
            for th in _SP_THREADS:
                regs[th][dst] = regs[th][val] if isinstance(val, str) else val
        elif e[0] == "mma":
            _, a_names, m_name, jr = e
            snap = ({th: [regs[th][x] for x in a_names] for th in _SP_THREADS},
                    {th: regs[th][m_name] for th in _SP_THREADS})
            issued.append((a_names, m_name, jr, snap))
        elif e[0] == "commit":
            committed += issued
            issued = []
        elif e[0] == "wait":
            for a_names, m_name, jr, (a_snap, m_snap) in committed:
                b = v_smem[32 * jr:32 * jr + 32]
                at_issue = _sp_isa_mma(a_snap, m_snap, b)
                a_now = {th: [regs[th][x] for x in a_names] for th in _SP_THREADS}
                m_now = {th: regs[th][m_name] for th in _SP_THREADS}
                out["issue"] += at_issue
                out["wait"] += at_issue if (a_now, m_now) == (a_snap, m_snap) else _sp_isa_mma(a_now, m_now, b)
            committed = []
    return out, hazards


def _sp_emulate_tile(scores, keep, v, form, compressed, v_row_key=_sp_v_row_key):
    """One 64 x 128 tile through the kernel's sparse P.V; returns (the emulated outputs, the
    hazards, the reference P_masked @ V)."""
    n = v.shape[1]
    p_masked = torch.where(keep, scores, torch.zeros_like(scores))
    v_smem = torch.stack([v[v_row_key(c)] for c in range(128)])
    regs = {th: {} for th in _SP_THREADS}
    words = {}
    for w, lane in _SP_THREADS:
        t = lane % 4
        if compressed:
            pr, words[(w, lane)] = _sp_kernel_compress(_sp_fragment(scores.tolist(), w, lane), t)
        else:
            pr = _sp_kernel_split(_sp_fragment(p_masked.tolist(), w, lane))
        for k in range(8):
            for q in range(4):
                regs[(w, lane)][f"pr{k}.{q}"] = pr[k][q]
    for w, lane in _SP_THREADS:
        for jr in range(4):
            if compressed:  # OR over the quad (two xor shuffles), then lane parity picks the half
                red = [0, 0]
                for e in range(2):
                    for u in range(4):
                        red[e] |= words[(w, (lane & ~3) | u)][jr][e]
                regs[(w, lane)][f"meta{jr}"] = red[1] if lane & 1 else red[0]
            else:  # to_operand: the first pass's fixed metadata
                regs[(w, lane)][f"meta{jr}"] = 0x44444444
    out, hazards = _sp_run(_sp_pv_program(form, 1 if compressed else 2), regs, v_smem, n)
    return out, hazards, p_masked @ v


def _sp_top2(scores, tie_index):
    """The 2:4 kept set in key space (groups 4q..4q+3): docs/semantics.md."""
    grp = scores.view(64, 32, 4)
    t2 = grp.sort(dim=-1, descending=True).values[..., 1:2]
    if not tie_index:
        return (grp >= t2).view(64, 128)
    idx = torch.arange(4).view(1, 1, 4)
    better = (grp.unsqueeze(-1) > grp.unsqueeze(-2)) | ((grp.unsqueeze(-1) == grp.unsqueeze(-2)) & (idx.unsqueeze(-1) < idx.unsqueeze(-2)))
    rank = better.sum(dim=-2)  # r_ij = #{j' better than j}
    return (rank < 2).view(64, 128)


def test_sparse_pv_register_emulation_against_isa():
    """NMH_SPARSE_PV on the CPU, register by register: the compressed operand (softmax_tile's
    selects, the nibbles, the quad OR-reduction, the lane-parity half), the split operand
    (convert_p_split, 0x44444444 / 0xEEEEEEEE), the second V row order and pv_gemm_sparse's
    issue sequence, run through the ISA's sparse MMA; the result must be P_masked @ V whether
    an MMA reads its registers at issue or at the wait, with no write to a register of an MMA
    in flight."""
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    # The transcriptions above are the kernel's lines.
    for line in ("const bool k0 = s0 >= t2, k1 = s1 >= t2, k2 = s2 >= t2, k3 = s3 >= t2;",
                 "const float v0 = k0 ? s0 : (k1 ? s1 : s2), v1 = k3 ? s3 : (k2 ? s2 : s1);",
                 "const uint32_t i0 = k0 ? 0u : (k1 ? 1u : 2u), i1 = k3 ? 3u : (k2 ? 2u : 1u);",
                 "cp[jr][2 * e + r] = pack2<FP16>(p0, p1);",
                 "w[jr][e] |= (i0 | (i1 << 2)) << (4 * t + 16 * r);",
                 "w[jr][e] |= __shfl_xor_sync(0xffffffffu, w[jr][e], 1);",
                 "w[jr][e] |= __shfl_xor_sync(0xffffffffu, w[jr][e], 2);",
                 "cm[jr] = (t & 1) ? w[jr][1] : w[jr][0];",
                 "pack2<FP16>(s[member_index(2 * jr + e, 2 * h, r)], s[member_index(2 * jr + e, 2 * h + 1, r)]);",
                 "pr[4 * h + jr][2 * e + r] =",
                 "for (int jr = 0; jr < 4; ++jr) meta[jr] = 0x44444444u;",
                 "return (c / 32) * 32 + 8 * ((c % 16) / 4) + 4 * ((c % 32) / 16) + c % 4;",
                 "dsl[jr] = desc_v(stage) + ((uint32_t)(jr * 4096) >> 4);",
                 "return 4 * ((g >> 1) + R_PERM * m) + 2 * r + (g & 1);"):
        assert line in src, line
    gen = torch.Generator().manual_seed(7)
    v = torch.randint(-8, 9, (128, 8), generator=gen).double()
    # Distinct scores (no ties: the compressed path), and small integers with ties at the 2nd /
    # 3rd largest (the split path: threshold keeps 3 or 4, index resolves by key order).
    distinct = (torch.randperm(64 * 128, generator=gen).view(64, 128) + 1).double()
    tied = torch.randint(1, 4, (64, 128), generator=gen).double()
    cases = [("compressed", distinct, _sp_top2(distinct, False), True),
             ("split, threshold ties", tied, _sp_top2(tied, False), False),
             ("split, index ties", tied, _sp_top2(tied, True), False),
             ("split, dense region (all kept)", tied, torch.ones(64, 128, dtype=torch.bool), False)]
    form = _sp_pv_form(src)
    for name, scores, keep, compressed in cases:
        out, hazards, ref = _sp_emulate_tile(scores, keep, v, form, compressed)
        assert not hazards, f"{name}: {hazards[0]} (PTX ISA 9.7.15.7.3: undefined behaviour)"
        for when, o in out.items():
            err = ((o - ref).norm() / ref.norm()).item()
            assert err == 0, f"{name}: operands read at {when}: relative L2 of O - P_masked V = {err:.3f}"
    # The emulation sees what went wrong on the H200: the first form's second pass rewrote the
    # operand registers of the first pass's MMAs in flight (right if read at issue, not at the
    # wait); and it sees a wrong layout: V in the K order or in key order.
    out, hazards, ref = _sp_emulate_tile(tied, cases[1][2], v, 1, False)
    assert hazards and (out["issue"] - ref).abs().max().item() == 0 and (out["wait"] - ref).abs().max().item() > 0
    for wrong in (_sp_row_key, lambda c: c):
        out, _, ref = _sp_emulate_tile(distinct, cases[0][2], v, form, True, v_row_key=wrong)
        assert (out["issue"] - ref).abs().max().item() > 0


def _sp_operand_registers(scores, keep, compressed):
    """Per thread: the operand registers one tile's to_operand leaves (pr<k>.<q>, meta<jr>),
    from softmax_tile's compressed branch (staged, then copied) or from convert_p_split."""
    p_masked = torch.where(keep, scores, torch.zeros_like(scores))
    words, regs = {}, {th: {} for th in _SP_THREADS}
    for w, lane in _SP_THREADS:
        if compressed:
            pr, words[(w, lane)] = _sp_kernel_compress(_sp_fragment(scores.tolist(), w, lane), lane % 4)
        else:
            pr = _sp_kernel_split(_sp_fragment(p_masked.tolist(), w, lane))
        regs[(w, lane)].update({f"pr{k}.{q}": pr[k][q] for k in range(8) for q in range(4)})
    for w, lane in _SP_THREADS:
        for jr in range(4):
            red = [0x44444444, 0x44444444]
            if compressed:
                red = [0, 0]
                for e in range(2):
                    for u in range(4):
                        red[e] |= words[(w, (lane & ~3) | u)][jr][e]
            regs[(w, lane)][f"meta{jr}"] = red[1] if lane & 1 else red[0]
    return regs, p_masked


def test_sparse_pv_overlap_stages_the_next_operand():
    """With overlap, tile B's softmax runs while P.V(A) is in flight: the compressed branch must
    write staging registers (cp, cm), and to_operand moves them into the operand registers (pr,
    meta) only after the wait. Emulated over two tiles: A's P.V issued, B's softmax writes, the
    wait, B's to_operand, B's P.V; no write may hit an operand of an MMA in flight and the sum
    must be P_A V + P_B V whenever the MMAs read their registers."""
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    staged = "cp[jr][2 * e + r] = pack2<FP16>(p0, p1);" in src
    assert staged and "for (int q = 0; q < 4; ++q) pr[jr][q] = cp[jr][q];" in src and "meta[jr] = cm[jr];" in src
    # The overlap loop: softmax(i) between wait<1> and wait<0> (pv_done), to_operand after it.
    # (The sparse path never waits inside the softmax: MID_WAIT excludes it.)
    assert '"NMH_MID_WAIT: the overlapped schedule, dense P.V"' in src
    loop = src[src.index("if constexpr (OVERLAP) {\n        wg_wait<1>();"):]
    assert loop.index("wg_wait<0>();") < loop.index("softmax(i, kind, nothing_in_flight);\n          pretest(i);\n"
                                                    "          stamp(i, 5);\n          pv_done(0.f);")
    assert loop.index("pv_done(0.f);") < loop.index("if constexpr (!MID_WAIT) to_operand();")
    gen = torch.Generator().manual_seed(12)
    v = torch.randint(-8, 9, (128, 8), generator=gen).double()
    v_smem = torch.stack([v[_sp_v_row_key(c)] for c in range(128)])
    form = _sp_pv_form(src)
    a_scores = (torch.randperm(64 * 128, generator=gen).view(64, 128) + 1).double()
    b_scores = (torch.randperm(64 * 128, generator=gen).view(64, 128) + 1).double()
    tied = torch.randint(1, 4, (64, 128), generator=gen).double()
    for (sa, ka, ca), (sb, kb, cb) in (((a_scores, _sp_top2(a_scores, False), True), (b_scores, _sp_top2(b_scores, False), True)),
                                       ((tied, _sp_top2(tied, True), False), (b_scores, _sp_top2(b_scores, False), True)),
                                       ((a_scores, _sp_top2(a_scores, False), True), (tied, _sp_top2(tied, False), False))):
        regs_a, pa = _sp_operand_registers(sa, ka, ca)
        regs_b, pb = _sp_operand_registers(sb, kb, cb)
        regs = {th: dict(regs_a[th]) for th in _SP_THREADS}
        for th in _SP_THREADS:  # B's softmax result, where the compressed branch writes it
            regs[th].update({f"b.{name}": val for name, val in regs_b[th].items()})
        prog_a = [e for e in _sp_pv_program(form, 1 if ca else 2) if e[0] != "wait"]
        # B's softmax during P.V(A): staged -> cp/cm (no operand); the split path writes nothing
        # yet (convert_p_split is in to_operand). Then the wait, to_operand, P.V(B).
        dest = (lambda name: "c" + name) if staged else (lambda name: name)
        during = [("write", dest(n), f"b.{n}") for n in regs_b[_SP_THREADS[0]] if cb]
        after = [("write", n, dest(n) if cb else f"b.{n}") for n in regs_b[_SP_THREADS[0]]]
        events = prog_a + during + [("wait",)] + after + _sp_pv_program(form, 1 if cb else 2)
        out, hazards = _sp_run(events, regs, v_smem, v.shape[1])
        assert not hazards, hazards[0]
        ref = pa @ v + pb @ v
        for when, o in out.items():
            assert (o - ref).abs().max().item() == 0, f"operands read at {when}"
    # The unstaged form (the softmax writing pr/meta directly) is what the check catches.
    regs_a, _ = _sp_operand_registers(a_scores, _sp_top2(a_scores, False), True)
    regs_b, _ = _sp_operand_registers(b_scores, _sp_top2(b_scores, False), True)
    regs = {th: {**regs_a[th], **{f"b.{n}": x for n, x in regs_b[th].items()}} for th in _SP_THREADS}
    events = [e for e in _sp_pv_program(form, 1) if e[0] != "wait"] + \
        [("write", n, f"b.{n}") for n in regs_b[_SP_THREADS[0]]] + [("wait",)]
    _, hazards = _sp_run(events, regs, v_smem, v.shape[1])
    assert hazards


@pytest.mark.slow
def test_real_nvcc_compiles_a_variant(tmp_path, monkeypatch):
    """Compile one variant with the real toolchain (no GPU needed): no spills, no serialized wgmma."""
    if hb.find_nvcc() is None:
        pytest.skip("no nvcc")
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CACHE", str(tmp_path))
    path = hb.compile_variant(hv.Variant(sparsity_n=2, sparsity_m=4))
    s = hb.ptxas_summary(path.with_suffix(".log").read_text())
    assert s["spill_stores"] == 0 and not s["serialized_wgmma"], s
    # The host finds these by their plain names (cuModuleGetFunction / cuModuleGetGlobal): a
    # C++-mangled name (a symbol inside a namespace) would fail every launch on the GPU.
    image = path.read_bytes()
    for name in (hb.KERNEL, "nmh_config", "nmh_timeout"):
        assert b"\0" + name.encode() + b"\0" in image, f"symbol {name} is missing or mangled"


# ======================================================================================
# GPU (sm_90 + nvcc)
# ======================================================================================
def _hopper_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return "needs an sm_90 GPU"
    if hb.find_nvcc() is None:
        return "needs nvcc"
    return None


def gpu_test(fn):
    """A GPU test: the ``gpu`` marker (CI deselects it) and a skip without sm_90 + nvcc."""
    return pytest.mark.skipif(_hopper_ready() is not None, reason=str(_hopper_ready()))(pytest.mark.gpu(fn))


@pytest.fixture(autouse=True)
def _watchdog(request, monkeypatch):
    """GPU tests: check every launch for a timed-out barrier wait, and end the process with a
    traceback if a test hangs (a deadlock the in-kernel timeout cannot catch)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CHECK", "1")
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _run(lens_q, lens_k, hq, hkv, d, dtype, inputs, backend, grad=False, **kw):
    sq, lq, mq, _ = varlen(lens_q, "cuda")
    sk, lk, mk, _ = varlen(lens_k, "cuda")
    cast = torch.float64 if backend == "torch" else dtype
    xs = [t.to("cuda", dtype).to(cast).detach().requires_grad_(grad) for t in inputs]
    out = attention(*xs, sq, lq, mq, b_start_loc_k=sk, b_seq_len_k=lk, max_input_len_k=mk, backend=backend, **kw)
    return out, xs


def _check_against_reference(lens_q, lens_k, hq, hkv, d, dtype, inputs, tol=None, **kw):
    out, _ = _run(lens_q, lens_k, hq, hkv, d, dtype, inputs, "hopper", **kw)
    ref, _ = _run(lens_q, lens_k, hq, hkv, d, dtype, inputs, "torch", **kw)
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel_err(out, ref)
    assert err < (tol or TOL[dtype]), f"relative L2 error {err:.3g}"
    return out, ref


def _random(lens_q, lens_k, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lens), h, d, generator=g) for lens, h in ((lens_q, hq), (lens_k, hkv), (lens_k, hkv))]


@gpu_test
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_1_dense_single_sequence(causal):
    lens = [256]
    _check_against_reference(lens, lens, 2, 2, 128, torch.bfloat16, _random(lens, lens, 2, 2, 128), is_causal=causal,
                             sparsity_n=0)


@gpu_test
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_2_dense_varlen_gqa(d, dtype, causal):
    # Lengths around tile edges: 1 row, a partial tile, exactly one tile, one past it, several.
    lens = [1, 100, 128, 129, 300]
    _check_against_reference(lens, lens, 4, 2, d, dtype, _random(lens, lens, 4, 2, d, seed=d), is_causal=causal)


@gpu_test
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gpu_3_chunked_prefill_decode_and_mqa(causal):
    lens_q, lens_k = [3, 130, 1, 1, 200], [40, 400, 17, 1, 200]  # chunked, chunked, decode, decode, plain
    _check_against_reference(lens_q, lens_k, 4, 1, 128, torch.bfloat16, _random(lens_q, lens_k, 4, 1, 128, seed=3),
                             is_causal=causal, sparsity_n=2, sparsity_m=4, dense_window_size=8)


@gpu_test
def test_gpu_4_more_queries_than_keys_and_empty_rows():
    # Causal with q_len > kv_len: the first q_len - kv_len rows see no key (output 0).
    lens_q, lens_k = [150], [20]
    out, ref = _check_against_reference(lens_q, lens_k, 2, 2, 64, torch.bfloat16, _random(lens_q, lens_k, 2, 2, 64))
    assert out[:130].abs().max().item() == 0.0


# |log2(sum of 16-bit P / sum of f32 P)| <= -log2(1 - 2**-9) for bf16 P (each P >= 0 rounds by at
# most 2**-9 relative): how far the lse of a kernel whose tensor core sums P (MMA_ROWSUM) may
# lie from the f32 sum's.
LSE_TOL_16BIT_SUM = 2.83e-3


@gpu_test
@pytest.mark.parametrize("rowsum", [0, 1], ids=["fadd_sum", "mma_sum"])
def test_gpu_5_lse_matches_triton_forward(monkeypatch, rowsum):
    """The saved lse (log2 units, the Triton backward's input) equals the Triton forward's: to
    1e-4 where the softmax sums P in f32, within the 16-bit rounding bound of P where the tensor
    core sums it (MODELOPT_SPARSE_HOPPER_MMA_ROWSUM=1, the default for dense D = 128)."""
    from modelopt_sparse.kernels.triton_attention import _forward_launch

    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", str(rowsum))
    lens = [77, 300]
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _random(lens, lens, 4, 2, 128, seed=5))
    sq, lq, mq, _ = varlen(lens, "cuda")
    tol = LSE_TOL_16BIT_SUM if rowsum else 1e-4
    for params in (_params(), _params(sparsity_n=4, sparsity_m=8, dense_window_size=16, num_sink_tokens=2),
                   _params(sparsity_n=8, sparsity_m=16, dense_window_size=16, num_sink_tokens=2)):
        out_h, lse_h = ha.forward_with_lse(q, k, v, sq, lq, mq, sq, lq, params, covered=True)
        out_t, lse_t, _ = _forward_launch(q, k, v, sq, lq, sq, lq, mq, mq, True, False, params)
        assert rel_err(out_h, out_t) < 1e-2
        assert torch.allclose(lse_h, lse_t, rtol=0 if rowsum else 1e-4, atol=tol), (lse_h - lse_t).abs().max()


PATTERNS = [(1, 2), (2, 4), (3, 4), (4, 8), (8, 16), (3, 16)]


@gpu_test
@pytest.mark.parametrize("tie", ["threshold", "index"])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_gpu_6_nm_separated_inputs(n, m, tie):
    """Exact dyadic scores with no ties: every backend computes the same scores, hence the
    same mask; sinks, the dense window, causal and varlen together."""
    lens = [1, 90, 257]
    inputs = separated_inputs(lens, lens, 4, 2, 128, m, torch.float64, seed=n * 31 + m)
    _check_against_reference(lens, lens, 4, 2, 128, torch.bfloat16, inputs, sparsity_n=n, sparsity_m=m,
                             tie_break=tie, num_sink_tokens=3, dense_window_size=20)


@gpu_test
@pytest.mark.parametrize("n,m", [(2, 4), (8, 16)])
def test_gpu_7_nm_noncausal_d64_fp16(n, m):
    lens_q, lens_k = [50, 200], [300, 200]
    inputs = separated_inputs(lens_q, lens_k, 2, 1, 64, m, torch.float64, seed=7)
    _check_against_reference(lens_q, lens_k, 2, 1, 64, torch.float16, inputs, is_causal=False, sparsity_n=n,
                             sparsity_m=m, num_sink_tokens=1, dense_window_size=5)


@gpu_test
@pytest.mark.parametrize("n", [0, 2])
def test_gpu_8_sliding_window(n):
    lens = [40, 600]
    _check_against_reference(lens, lens, 2, 2, 128, torch.bfloat16, _random(lens, lens, 2, 2, 128, seed=8),
                             sparsity_n=n, sparsity_m=4, sliding_window=200, dense_window_size=16, num_sink_tokens=4)


PROBE_CASES = [
    dict(sparsity_n=0),
    dict(sparsity_n=1, sparsity_m=2),
    dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=5, dense_window_size=33),
    dict(sparsity_n=2, sparsity_m=4, tie_break="index", num_sink_tokens=5, dense_window_size=33),
    dict(sparsity_n=4, sparsity_m=8, dense_window_size=7),
    dict(sparsity_n=4, sparsity_m=8, tie_break="index"),
    dict(sparsity_n=8, sparsity_m=16, num_sink_tokens=130),
    dict(sparsity_n=8, sparsity_m=16, tie_break="index", dense_window_size=140),
    dict(sparsity_n=3, sparsity_m=16, tie_break="index", sliding_window=150, num_sink_tokens=2),
    dict(sparsity_n=5, sparsity_m=16, is_causal=False, dense_window_size=3),
    # Windows wider than any sequence, up to the int32 limit: the edge tiles' per-row key bounds
    # must not overflow (key_window / dense_region in nm_attention_fwd.cu).
    dict(sparsity_n=2, sparsity_m=4, sliding_window=2**31 - 1, dense_window_size=2**31 - 1),
    dict(sparsity_n=4, sparsity_m=8, sliding_window=2**31 - 1, num_sink_tokens=1),
]


@gpu_test
@pytest.mark.parametrize("case", PROBE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_9_mask_probe_equals_semantics(case):
    """The kernel's kept mask equals semantics.kept_mask of its own raw scores, bit for bit, on
    inputs full of exact ties (integer scores), for chunked prefill, plain prefill and decode."""
    lens_q, lens_k = [130, 1, 261], [300, 40, 261]
    hq, hkv, d = 2, 1, 128
    inputs = tied_inputs(lens_q, lens_k, hq, hkv, d, torch.float64, seed=9)
    _assert_probe_equals_semantics(inputs, lens_q, lens_k, hq, case)


def _assert_probe_equals_semantics(inputs, lens_q, lens_k, hq, case, exact_scores=True):
    """The mask probe of the kernel ``case`` selects, on bf16 ``inputs``: its raw scores are
    q.k (exactly, for inputs whose products sum exactly in any order; else to f32 rounding) and
    its kept flags are semantics.kept_mask of them, bit for bit."""
    q, k, v = (t.to("cuda", torch.bfloat16) for t in inputs)
    sq, lq, mq, _ = varlen(lens_q, "cuda")
    sk, lk, mk, _ = varlen(lens_k, "cuda")
    params = _params(**{"is_causal": True, **case})
    scores, kept = ha.kept_mask_probe(q, k, v, sq, lq, mq, sk, lk, params, keys=mk)
    for b, (ql, kl) in enumerate(zip(lens_q, lens_k)):
        rows = slice(int(sq[b]), int(sq[b]) + ql)
        s = scores[:, rows, :kl]
        keys = k[int(sk[b]):int(sk[b]) + kl].float().repeat_interleave(hq // k.shape[1], dim=1)
        exact = torch.einsum("qhd,khd->hqk", q[rows].float(), keys)
        seen = ~torch.isnan(s)
        if exact_scores:
            assert torch.equal(s[seen], exact[seen]), f"sequence {b}: the kernel's scores are not q.k"
        else:
            assert rel_err(s[seen], exact[seen]) < 1e-5, f"sequence {b}: the kernel's scores are not q.k"
        ref = kept_mask(torch.where(seen, s, torch.zeros_like(s)), ql, kl, is_causal=params.is_causal,
                        sparsity_n=params.sparsity_n, sparsity_m=params.sparsity_m,
                        num_sink_tokens=params.num_sink_tokens, dense_window_size=params.dense_window_size,
                        tie_break=params.tie_break, sliding_window=params.sliding_window or None)
        got = kept[:, rows, :kl]
        bad = (got != ref).nonzero()
        assert bad.numel() == 0, f"sequence {b}: {bad.shape[0]} entries differ, first (head, row, key): {bad[:5].tolist()}"


@gpu_test
def test_gpu_10_backward_through_triton():
    lens = [70, 190]
    inputs = _random(lens, lens, 4, 2, 128, seed=10)
    g = torch.Generator().manual_seed(11)
    do = torch.randn(sum(lens), 4, 128, generator=g).to("cuda", torch.bfloat16)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=16)
    grads = {}
    for backend in ("hopper", "triton"):
        out, xs = _run(lens, lens, 4, 2, 128, torch.bfloat16, inputs, backend, grad=True, **kw)
        grads[backend] = torch.autograd.grad(out, xs, do)
    for a, b in zip(grads["hopper"], grads["triton"]):
        assert rel_err(a, b) < 2e-2


@gpu_test
@pytest.mark.parametrize("pingpong,overlap", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("n,m", [(0, 4), (4, 8)])
def test_gpu_11_schedules_agree(monkeypatch, pingpong, overlap, n, m):
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_PINGPONG", str(int(pingpong)))
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_OVERLAP", str(int(overlap)))
    lens = [33, 700]  # many tiles, so that the turn-taking runs for a while
    inputs = separated_inputs(lens, lens, 2, 2, 128, m, torch.float64, seed=11)
    _check_against_reference(lens, lens, 2, 2, 128, torch.bfloat16, inputs, sparsity_n=n, sparsity_m=m,
                             dense_window_size=8)


@gpu_test
def test_gpu_12_errors_and_auto(monkeypatch, caplog):
    lens = [64]
    sq, lq, mq, _ = varlen(lens, "cuda")
    x32 = torch.randn(64, 2, 128, device="cuda")
    with pytest.raises(ha.HopperUnavailable, match="float16 and bfloat16"):
        attention(x32, x32, x32, sq, lq, mq, backend="hopper")
    x96 = torch.randn(64, 2, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ha.HopperUnavailable, match="head_dim 64 and 128, not 96"):
        attention(x96, x96, x96, sq, lq, mq, backend="hopper")
    # auto (on by default): a call this small stays on Triton; with the size rule lowered, the
    # engine for a supported call, Triton (one log line) otherwise.
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER", raising=False)
    monkeypatch.setattr(he, "_logged", set())
    calls = []
    real = ha.hopper_attention
    monkeypatch.setattr(ha, "hopper_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16)
    attention(x, x, x, sq, lq, mq, backend="auto")
    assert calls == []
    monkeypatch.setattr(he, "AUTO_MIN_WORK", 0)
    # attention()'s hot path remembers that this call stayed on Triton by its shapes, which
    # holds while the threshold is the constant it is outside this test.
    api._PREPARED.clear()
    attention(x, x, x, sq, lq, mq, backend="auto")
    assert calls == [1]
    with caplog.at_level(logging.WARNING, logger="modelopt_sparse"):
        attention(x96, x96, x96, sq, lq, mq, backend="auto")
        attention(x96, x96, x96, sq, lq, mq, backend="auto")
    assert sum("Hopper engine is not used" in r.getMessage() for r in caplog.records) == 1
    assert calls == [1]


@gpu_test
def test_gpu_13_padded_batch_and_strided_views():
    """[B, S, H, D] input (packed by attention()) and K/V as views into a fused buffer."""
    b, s, hq, hkv, d = 2, 150, 4, 2, 128
    g = torch.Generator().manual_seed(13)
    fused = torch.randn(b, s, hq + 2 * hkv, d, generator=g).to("cuda", torch.bfloat16)
    q, k, v = fused[:, :, :hq], fused[:, :, hq:hq + hkv], fused[:, :, hq + hkv:]
    lens = torch.tensor([150, 97], dtype=torch.int32, device="cuda")
    starts = torch.tensor([0, 53], dtype=torch.int32, device="cuda")  # left padding in row 1
    kw = dict(sparsity_n=4, sparsity_m=8, dense_window_size=8)
    out = attention(q, k, v, starts, lens, s, backend="hopper", **kw)
    ref = attention(q.double(), k.double(), v.double(), starts, lens, s, backend="torch", **kw)
    assert rel_err(out[0], ref[0]) < 2e-2 and rel_err(out[1, 53:], ref[1, 53:]) < 2e-2



NEW_SCHEDULES = [tuple(t) for t in hs.NEW_VARIANT_SCHEDULES]


def _sched_id(t):
    return ht._sched_label(hs._sched(t)).replace(" ", "-")


@gpu_test
@pytest.mark.parametrize("n,m", hs.NEW_VARIANT_PATTERNS)
@pytest.mark.parametrize("sched", NEW_SCHEDULES, ids=_sched_id)
def test_gpu_14_new_variants_against_reference(monkeypatch, sched, n, m):
    """The variants added after the first H200 run (late rescale, TMA producer, lean softmax,
    their combinations with ping-pong and overlap): varlen, GQA, causal, sinks and the dense
    window, many tiles, lengths around tile edges."""
    _set_schedule(monkeypatch, sched)
    lens = [1, 100, 128, 129, 700]
    inputs = separated_inputs(lens, lens, 4, 2, 128, m, torch.float64, seed=14 + n)
    _check_against_reference(lens, lens, 4, 2, 128, torch.bfloat16, inputs, sparsity_n=n, sparsity_m=m,
                             num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0)


@gpu_test
@pytest.mark.parametrize("sched,wg3", [(t, False) for t in NEW_SCHEDULES] +
                         [(tuple(t), True) for t in hs.BENCH_SCHEDULES_WG3],
                         ids=lambda x: _sched_id(x) if isinstance(x, tuple) else ("3wg" if x else "2wg"))
def test_gpu_15_new_variants_d64_chunked_noncausal(monkeypatch, sched, wg3):
    """D = 64 under the new variants, with two and with three consumer warpgroups (192 rows per
    CTA: lengths around 192 and its multiples, chunked prefill, decode rows)."""
    _set_schedule(monkeypatch, sched)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_D64_WG3", str(int(wg3)))
    lens_q, lens_k = [3, 130, 1, 192, 193, 400], [40, 400, 17, 192, 193, 400]
    _check_against_reference(lens_q, lens_k, 4, 1, 64, torch.float16, _random(lens_q, lens_k, 4, 1, 64, seed=15),
                             is_causal=False)
    _check_against_reference(lens_q, lens_k, 4, 1, 64, torch.bfloat16, _random(lens_q, lens_k, 4, 1, 64, seed=16))


@gpu_test
@pytest.mark.parametrize("case", [PROBE_CASES[0], PROBE_CASES[1], PROBE_CASES[3], PROBE_CASES[4]],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_16_tma_mask_probe(monkeypatch, case):
    """The TMA producer's element-strided boxes put every key where the group permutation says:
    the kept mask equals semantics.kept_mask bit for bit (as test_gpu_9, TMA on)."""
    _set_schedule(monkeypatch, (False, True, False, True, False))  # the default schedule, TMA on (carried)
    test_gpu_9_mask_probe_equals_semantics(case)


@gpu_test
@pytest.mark.parametrize("sched", [(True, False, False, True, False), (True, True, True, True, True)],
                         ids=_sched_id)
def test_gpu_17_tma_strided_views_padded_batch(monkeypatch, sched):
    """TMA maps over views into a fused QKV buffer (row stride != heads * head_dim) and a padded batch."""
    _set_schedule(monkeypatch, sched)
    test_gpu_13_padded_batch_and_strided_views()


@gpu_test
@pytest.mark.parametrize("n,m", [(0, 4), (4, 8)])
@pytest.mark.parametrize("sched", [(True, False, False, False, True), (True, True, True, True, True),
                                   (False, True, False, False, True)], ids=_sched_id)
def test_gpu_18_lean_rescale_with_growing_max(monkeypatch, sched, n, m):
    """Lean softmax: keys get larger toward the sequence start, so the running max grows on
    tile after tile (descending key order), by more and by less than the 2^8 slack, and rows
    whose max moves only a little keep P up to 2^8."""
    _set_schedule(monkeypatch, sched)
    lens = [600, 333]
    q, k, v = _random(lens, lens, 2, 2, 128, seed=18)
    pos = torch.cat([torch.arange(n_, dtype=torch.float64) for n_ in lens])
    k = k * (1.0 + 3.0 * (1.0 - pos / 600.0))[:, None, None]  # up to 4x larger scores at the start
    q = q * 0.5
    _check_against_reference(lens, lens, 2, 2, 128, torch.bfloat16, [q, k, v], sparsity_n=n, sparsity_m=m,
                             dense_window_size=8 if n else 0)


@gpu_test
@pytest.mark.parametrize("n,m", [(0, 4), (2, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize("sched", [tuple(t) for t in hs.TEST_SCHEDULES_WG3], ids=_sched_id)
def test_gpu_19_three_consumer_warpgroups_d64(monkeypatch, sched, n, m):
    """D = 64 with three consumer warpgroups: the ring of three ping-pong turns, the 192-row Q
    tile (a 192-row TMA box), N:M selection, sinks and the dense window, GQA; 8:16 (no TMA for
    M = 16) falls back to two warpgroups."""
    _set_schedule(monkeypatch, sched)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_D64_WG3", "1")
    lens = [1, 191, 192, 385, 900]
    inputs = separated_inputs(lens, lens, 4, 2, 64, m, torch.float64, seed=19 + n)
    _check_against_reference(lens, lens, 4, 2, 64, torch.float16, inputs, sparsity_n=n, sparsity_m=m,
                             num_sink_tokens=2 if n else 0, dense_window_size=9 if n else 0)
    _check_against_reference(lens, lens, 4, 2, 64, torch.float16, inputs, is_causal=False, sparsity_n=n,
                             sparsity_m=m)


@gpu_test
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tie", ["threshold", "index"])
@pytest.mark.parametrize("sched", [tuple(t) for t in hs.BENCH_SCHEDULES_SPARSE_PV], ids=_sched_id)
def test_gpu_20_sparse_pv_against_reference(monkeypatch, sched, tie, d):
    """Stage 3, 2:4 P.V through wgmma.sp: interior tiles without ties take the compressed
    operand (separated inputs never tie), tiles with sinks, the dense window, the diagonal or a
    sequence end take the split dense path; both on the second V row order, GQA, varlen."""
    _set_schedule(monkeypatch, sched)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_SPARSE_PV", "1")
    lens = [1, 90, 128, 257, 700]
    inputs = separated_inputs(lens, lens, 4, 2, d, 4, torch.float64, seed=20)
    _check_against_reference(lens, lens, 4, 2, d, torch.bfloat16, inputs, sparsity_n=2, sparsity_m=4,
                             tie_break=tie, num_sink_tokens=3, dense_window_size=20)
    # Non-causal, no dense region: nearly every tile compressed; fp16.
    _check_against_reference(lens, lens, 4, 2, d, torch.float16, inputs, is_causal=False, sparsity_n=2,
                             sparsity_m=4, tie_break=tie)
    # Random (real-valued) scores, MQA.
    _check_against_reference(lens, lens, 4, 1, d, torch.bfloat16, _random(lens, lens, 4, 1, d, seed=21),
                             sparsity_n=2, sparsity_m=4, tie_break=tie, dense_window_size=8)
    # With TMA, tiles within 131 rows of the tensor's end go by cp.async: a tensor of 120 rows
    # (every tile), and one of 260 (its last tile; the two before it by TMA).
    for short in ([120], [260]):
        _check_against_reference(short, short, 2, 1, d, torch.bfloat16, _random(short, short, 2, 1, d, seed=22),
                                 is_causal=False, sparsity_n=2, sparsity_m=4, tie_break=tie)


@gpu_test
@pytest.mark.parametrize("tie", ["threshold", "index"])
def test_gpu_21_sparse_pv_with_ties(monkeypatch, tie):
    """Exact ties (integer scores): groups whose 2nd and 3rd largest are equal make their
    warpgroup's tile take the split path (threshold keeps more than two, index resolves by
    key order); the output equals the reference on the same exact scores."""
    _set_schedule(monkeypatch, (True, False, False, False, False))
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_SPARSE_PV", "1")
    lens_q, lens_k = [130, 1, 261, 600], [300, 40, 261, 600]
    inputs = tied_inputs(lens_q, lens_k, 2, 1, 128, torch.float64, seed=21)
    _check_against_reference(lens_q, lens_k, 2, 1, 128, torch.bfloat16, inputs, sparsity_n=2, sparsity_m=4,
                             tie_break=tie)


TMA3D_CASES = [(8, 16, "threshold"), (3, 16, "index")]


@gpu_test
@pytest.mark.parametrize("n,m,tie", TMA3D_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("sched", [tuple(t) for t in hs.TMA3D_TEST_SCHEDULES], ids=_sched_id)
def test_gpu_22_tma3d_grouped_maps_m16(monkeypatch, sched, n, m, tie):
    """M = 16 through the grouped 4-D TMA maps (MODELOPT_SPARSE_HOPPER_TMA3D=1): tiles inside
    the maps' bound (one box per atom column) and the tiles near the tensor's end that the
    producer warps load with cp.async: the last sequence's last tiles, a short last sequence
    (tail tiles of the sequence before it), a tensor too short for any box, GQA, D = 64 and 128."""
    _set_schedule(monkeypatch, sched)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA3D", "1")
    kw = dict(sparsity_n=n, sparsity_m=m, tie_break=tie, num_sink_tokens=3, dense_window_size=20)
    lens = [1, 100, 128, 129, 700]
    _check_against_reference(lens, lens, 4, 2, 128, torch.bfloat16,
                             separated_inputs(lens, lens, 4, 2, 128, m, torch.float64, seed=22 + n), **kw)
    for lens_q, lens_k in (([700, 20], [700, 20]), ([5], [5]), ([3, 130, 1], [40, 400, 17])):
        _check_against_reference(lens_q, lens_k, 4, 1, 64, torch.float16, _random(lens_q, lens_k, 4, 1, 64, seed=23),
                                 **kw)
        _check_against_reference(lens_q, lens_k, 2, 2, 128, torch.bfloat16,
                                 _random(lens_q, lens_k, 2, 2, 128, seed=24), **kw)


@gpu_test
@pytest.mark.parametrize("case", [PROBE_CASES[6], PROBE_CASES[8]],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_23_tma3d_mask_probe(monkeypatch, case):
    """The grouped 4-D maps put every key where the group permutation says (M = 16): the kept
    mask equals semantics.kept_mask bit for bit (as test_gpu_16)."""
    _set_schedule(monkeypatch, (False, True, False, True, False))
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA3D", "1")
    test_gpu_9_mask_probe_equals_semantics(case)


@gpu_test
@pytest.mark.parametrize("n,m,d,wg3,overlap", [(0, 4, 128, False, True), (2, 4, 128, False, True),
                                               (4, 8, 128, False, False), (8, 16, 128, False, False),
                                               (0, 4, 64, True, False), (0, 4, 64, True, True), (2, 4, 64, False, True)],
                         ids=lambda x: str(x))
def test_gpu_24_split_loop_equals_one_loop(monkeypatch, n, m, d, wg3, overlap):
    """The split tile loop (MODELOPT_SPARSE_HOPPER_SPLIT_LOOP=1) runs the same arithmetic on every
    tile as the one loop: outputs equal bit for bit, with edge tiles leading (causal diagonal,
    sequence ends, dense window), trailing (sinks, the sliding window's far end) and alone
    (decode rows, chunked prefill), and close to the reference."""
    _set_schedule(monkeypatch, (True, overlap, not wg3, True, True))
    _assert_switch_changes_no_bit(monkeypatch, "SPLIT_LOOP", n, m, d, wg3, seed=24)


def _assert_switch_changes_no_bit(monkeypatch, switch, n, m, d, wg3, seed):
    """Outputs with MODELOPT_SPARSE_HOPPER_<switch> off and on equal bit for bit (under the
    schedule the caller set), with edge tiles leading (causal diagonal, sequence ends, dense
    window), trailing (sinks, the sliding window's far end) and alone (decode rows, chunked
    prefill), causal, sliding-window and non-causal; and are close to the reference."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_D64_WG3", str(int(wg3)))
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA3D", str(int(m == 16)))
    lens_q, lens_k = [1, 300, 5, 700], [1, 300, 900, 700]
    inputs = _random(lens_q, lens_k, 4, 2, d, seed=seed + n + d)
    for kw in (dict(), dict(sliding_window=300), dict(is_causal=False)):
        kw.update(sparsity_n=n, sparsity_m=m, num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0)
        outs = []
        for on in (0, 1):
            monkeypatch.setenv(f"MODELOPT_SPARSE_HOPPER_{switch}", str(on))
            outs.append(_run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "hopper", **kw)[0])
        assert torch.equal(outs[0], outs[1]), kw
        ref, _ = _run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "torch", **kw)
        assert rel_err(outs[1], ref) < TOL[torch.bfloat16], kw



@gpu_test
@pytest.mark.parametrize("n,m,d,wg3", [(0, 4, 128, False), (2, 4, 128, False), (8, 16, 128, False),
                                       (0, 4, 64, True), (2, 4, 64, False)], ids=lambda x: str(x))
def test_gpu_26_mid_wait_equals_end_wait(monkeypatch, n, m, d, wg3):
    """The wait for P.V(j-1) inside the softmax (MODELOPT_SPARSE_HOPPER_MID_WAIT=1) changes when
    P(j) is converted, not what: outputs equal the end-of-softmax wait's bit for bit, on
    edge tiles (causal diagonal, sequence ends, dense window, sinks, decode rows, chunked
    prefill) and interior ones, and are close to the reference."""
    _set_schedule(monkeypatch, (True, True, True, True, True))
    _assert_switch_changes_no_bit(monkeypatch, "MID_WAIT", n, m, d, wg3, seed=26)


@gpu_test
@pytest.mark.parametrize("n,m,d", [(0, 4, 128), (4, 8, 128), (8, 16, 128), (0, 4, 64)], ids=lambda x: str(x))
def test_gpu_27_suspending_producer_equals_polling(monkeypatch, n, m, d):
    """The producer that suspends between polls for a free stage (PRODUCER_SUSPENDS=1) loads the
    same tiles as the polling one: outputs equal bit for bit (the measured schedule of each
    pattern; sequence ends and short sequences exercise the cp.async edge loads too)."""
    lens_q, lens_k = [1, 300, 5, 700], [1, 300, 900, 700]
    inputs = _random(lens_q, lens_k, 4, 2, d, seed=27 + n + d)
    kw = dict(sparsity_n=n, sparsity_m=m, num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0)
    outs = []
    for sleeps in (0, 1):
        monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_PRODUCER_SUSPENDS", str(sleeps))
        outs.append(_run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "hopper", **kw)[0])
    assert torch.equal(outs[0], outs[1])
    ref, _ = _run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "torch", **kw)
    assert rel_err(outs[0], ref) < TOL[torch.bfloat16]

@gpu_test
@pytest.mark.parametrize("n,m,d,wg3", [(0, 4, 128, False), (2, 4, 128, False), (4, 8, 128, False),
                                       (8, 16, 128, False), (0, 4, 64, True), (2, 4, 64, False)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_28_mma_rowsum(monkeypatch, n, m, d, wg3, dtype):
    """P's row sums by the tensor core (MODELOPT_SPARSE_HOPPER_MMA_ROWSUM=1) sum P as the MMA
    reads it (16-bit) instead of in f32: the output stays within the dtype's tolerance of the
    reference, and the lse (the Triton backward's input) within the 16-bit rounding bound of
    P (LSE_TOL_16BIT_SUM, log2 units) of the f32 sum's, on edge and interior tiles, causal,
    sliding-window and non-causal; the causal rows that see no key (the last sequence has 30
    more queries than keys) output exactly 0 with lse -inf; the backward through the Triton
    kernels on its output matches the reference's gradients."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_D64_WG3", str(int(wg3)))
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_TMA3D", str(int(m == 16)))
    lens_q, lens_k = [1, 300, 5, 700, 40], [1, 300, 900, 700, 10]
    no_key = slice(sum(lens_q[:-1]), sum(lens_q[:-1]) + 30)
    inputs = _random(lens_q, lens_k, 4, 2, d, seed=28 + n + d)
    sq, lq, mq, _ = varlen(lens_q, "cuda")
    sk, lk, mk, _ = varlen(lens_k, "cuda")
    q, k, v = (t.to("cuda", dtype) for t in inputs)
    for kw in (dict(), dict(sliding_window=300), dict(is_causal=False)):
        kw.update(sparsity_n=n, sparsity_m=m, num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0)
        p = SparseParams(kw.get("is_causal", True), d ** -0.5, n, m, kw["num_sink_tokens"],
                         kw["dense_window_size"], "threshold", kw.get("sliding_window") or 0)
        runs = []
        for on in (0, 1):
            monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", str(on))
            runs.append(he.forward(q, k, v, sq, lq, mq, sk, lk, p, q_covered=True, with_lse=True))
        (out0, lse0), (out1, lse1) = runs
        ref, _ = _run(lens_q, lens_k, 4, 2, d, dtype, inputs, "torch", **kw)
        assert torch.isfinite(out1).all(), kw
        assert rel_err(out1, ref) < TOL[dtype], kw
        assert torch.equal(torch.isinf(lse0), torch.isinf(lse1)), kw
        if kw.get("is_causal", True):
            assert out1[no_key].abs().max().item() == 0.0 and bool((lse1[no_key] == float("-inf")).all()), kw
        finite = torch.isfinite(lse0)
        assert (lse1[finite] - lse0[finite]).abs().max().item() < LSE_TOL_16BIT_SUM, kw
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_MMA_ROWSUM", "1")
    g = torch.Generator().manual_seed(29)
    do = torch.randn(sum(lens_q), 4, d, generator=g).to("cuda", dtype)
    kw = dict(sparsity_n=n, sparsity_m=m, num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0)
    grads = {}
    for backend in ("hopper", "torch"):
        out, xs = _run(lens_q, lens_k, 4, 2, d, dtype, inputs, backend, grad=True, **kw)
        grads[backend] = torch.autograd.grad(out, xs, do.to(out.dtype))
    for a, b in zip(grads["hopper"], grads["torch"]):
        assert rel_err(a, b) < 3e-2


@gpu_test
@pytest.mark.parametrize("case", [c for c in PROBE_CASES if c.get("sparsity_m", 4) <= 8],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_29_bn64_mask_probe(monkeypatch, case):
    """64-key tiles with three consumer warpgroups (MODELOPT_SPARSE_HOPPER_BN64=1): the kept mask
    equals semantics.kept_mask bit for bit (as test_gpu_9: ties, chunked prefill, decode, the
    group permutation in 64-key TMA boxes)."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_BN64", "1")
    test_gpu_9_mask_probe_equals_semantics(case)


@gpu_test
@pytest.mark.parametrize("n,m,tie", [(0, 4, "threshold"), (1, 2, "threshold"), (2, 4, "threshold"),
                                     (2, 4, "index"), (3, 4, "index"), (4, 8, "threshold"), (4, 8, "index")],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_30_bn64_against_reference(monkeypatch, n, m, tie, dtype):
    """64-key tiles with three consumer warpgroups: sequences ending inside, at and after 64-key
    tiles and 192-row CTAs, GQA, causal with sinks and the dense window, a sliding window, non-
    causal, decode rows; the backward through the Triton kernels on its output and lse."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_BN64", "1")
    lens_q, lens_k = [1, 63, 64, 65, 191, 192, 385, 5, 900], [1, 63, 64, 65, 191, 192, 385, 700, 900]
    inputs = _random(lens_q, lens_k, 4, 2, 128, seed=30 + n + m)
    for kw in (dict(num_sink_tokens=3 if n else 0, dense_window_size=20 if n else 0),
               dict(sliding_window=150, dense_window_size=8 if n else 0), dict(is_causal=False)):
        _check_against_reference(lens_q, lens_k, 4, 2, 128, dtype, inputs, sparsity_n=n, sparsity_m=m,
                                 tie_break=tie, **kw)
    g = torch.Generator().manual_seed(31)
    do = torch.randn(sum(lens_q), 4, 128, generator=g).to("cuda", dtype)
    grads = {}
    for backend in ("hopper", "torch"):
        out, xs = _run(lens_q, lens_k, 4, 2, 128, dtype, inputs, backend, grad=True, sparsity_n=n, sparsity_m=m,
                       tie_break=tie, dense_window_size=16)
        grads[backend] = torch.autograd.grad(out, xs, do.to(out.dtype))
    for a, b in zip(grads["hopper"], grads["torch"]):
        assert rel_err(a, b) < 3e-2


@gpu_test
@pytest.mark.parametrize("n,tie", [(8, "threshold"), (3, "index")], ids=lambda x: str(x))
@pytest.mark.parametrize("d", [128, 64])
def test_gpu_31_pairwise_network_equals_batcher(monkeypatch, n, tie, d):
    """M = 16 with Parberry's pairwise network (MODELOPT_SPARSE_HOPPER_PAIRWISE=1): the same
    thresholds, so the same outputs bit for bit as Batcher's network, on tied inputs (integer
    scores) and random ones, edge and interior tiles, causal, sliding-window and non-causal."""
    lens_q, lens_k = [1, 300, 5, 700], [1, 300, 900, 700]
    for inputs in (_random(lens_q, lens_k, 4, 2, d, seed=31 + n),
                   tied_inputs(lens_q, lens_k, 4, 2, d, torch.float64, seed=31)):
        for kw in (dict(num_sink_tokens=3, dense_window_size=20), dict(sliding_window=300), dict(is_causal=False)):
            outs = []
            for on in (0, 1):
                monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_PAIRWISE", str(on))
                outs.append(_run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "hopper", sparsity_n=n,
                                 sparsity_m=16, tie_break=tie, **kw)[0])
            assert torch.equal(outs[0], outs[1]), kw
            ref, _ = _run(lens_q, lens_k, 4, 2, d, torch.bfloat16, inputs, "torch", sparsity_n=n, sparsity_m=16,
                          tie_break=tie, **kw)
            assert rel_err(outs[1], ref) < TOL[torch.bfloat16], kw


def f16_regime_inputs(lens_q, lens_k, d, seed=0):
    """Four query heads over two K/V heads whose scores exercise every way an f16 copy of a score
    can fail to decide a group (NMH_HALF_SELECT): head 0 as drawn (f16 rounds groups apart almost
    always), head 1 scores of a few 10^4 (past f16's largest, 65504: +inf and -inf copies),
    head 2 scores of ~10^-6 (f16 subnormals and zeros: collisions), head 3 scores 1024 + O(1)
    (f16's spacing there is 1: most groups collide, some do not)."""
    q, k, v = _random(lens_q, lens_k, 4, 2, d, seed=seed)
    q[:, 1] *= 2.0 ** 12
    q[:, 2] *= 2.0 ** -24
    k[:, 1, 0] = 16.0
    q[:, 3] *= 2.0 ** -3
    q[:, 3, 0] = 64.0
    return [q, k, v]


HALF_SELECT_PROBE_CASES = [c for c in PROBE_CASES if c.get("sparsity_m") == 16]


@gpu_test
@pytest.mark.parametrize("case", HALF_SELECT_PROBE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_34_half_select_mask_probe(monkeypatch, case):
    """M = 16 with the selection network on f16 copies (MODELOPT_SPARSE_HOPPER_HALF_SELECT=1):
    the kept mask equals semantics.kept_mask bit for bit on exact ties (integer scores, test_gpu_9's
    inputs) and on scores that overflow, underflow and collide in f16 (f16_regime_inputs), where
    the f32 network must take over group by group."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_HALF_SELECT", "1")
    test_gpu_9_mask_probe_equals_semantics(case)
    lens_q, lens_k = [130, 1, 261], [300, 40, 261]
    _assert_probe_equals_semantics(f16_regime_inputs(lens_q, lens_k, 128, seed=34), lens_q, lens_k, 4, case,
                                   exact_scores=False)


@gpu_test
@pytest.mark.parametrize("n,tie", hs.HALF_SELECT_PATTERNS, ids=lambda x: str(x))
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_35_half_select_against_reference(monkeypatch, n, tie, d, dtype):
    """M = 16 with the f16 selection network: the float64 reference's output on random, tied and
    f16-regime inputs, causal with sinks and a dense window, sliding-window and non-causal, and
    within rounding of the f32 network's output (same kept set; only the row max, which the f16
    network gives to f16 precision, moves the exponents)."""
    lens_q, lens_k = [1, 300, 5, 700], [1, 300, 900, 700]
    tie_break = "index" if tie else "threshold"
    for inputs in (_random(lens_q, lens_k, 4, 2, d, seed=35 + n), tied_inputs(lens_q, lens_k, 4, 2, d, torch.float64,
                                                                               seed=35),
                   f16_regime_inputs(lens_q, lens_k, d, seed=35)):
        for kw in (dict(num_sink_tokens=3, dense_window_size=20), dict(sliding_window=300), dict(is_causal=False)):
            outs = []
            for on in (0, 1):
                monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_HALF_SELECT", str(on))
                outs.append(_run(lens_q, lens_k, 4, 2, d, dtype, inputs, "hopper", sparsity_n=n, sparsity_m=16,
                                 tie_break=tie_break, **kw)[0])
            assert torch.isfinite(outs[1]).all(), kw
            ref, _ = _run(lens_q, lens_k, 4, 2, d, dtype, inputs, "torch", sparsity_n=n, sparsity_m=16,
                          tie_break=tie_break, **kw)
            assert rel_err(outs[1], ref) < TOL[dtype], kw
            assert rel_err(outs[1], outs[0]) < TOL[dtype] / 2, kw


ROW_PIPE_PROBE_CASES = [c for c in PROBE_CASES if c.get("sparsity_n") and c.get("tie_break") != "index"]


@gpu_test
@pytest.mark.parametrize("case", ROW_PIPE_PROBE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_36_row_pipe_mask_probe(monkeypatch, case):
    """Row-by-row selection and exponentials (MODELOPT_SPARSE_HOPPER_ROW_PIPE=1): the kept mask
    equals semantics.kept_mask bit for bit on exact ties (test_gpu_9's inputs)."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_ROW_PIPE", "1")
    test_gpu_9_mask_probe_equals_semantics(case)


@gpu_test
@pytest.mark.parametrize("n,m", hs.ROW_PIPE_PATTERNS, ids=lambda x: str(x))
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_36_row_pipe_equals_all_rows_at_once(monkeypatch, n, m, d, dtype):
    """Row by row, the same instructions in another order: bit for bit the output of the
    measured kernel, on random and tied inputs, causal with sinks and a dense window,
    sliding-window and non-causal."""
    lens_q, lens_k = [1, 300, 5, 700], [1, 300, 900, 700]
    for inputs in (_random(lens_q, lens_k, 4, 2, d, seed=36 + n), tied_inputs(lens_q, lens_k, 4, 2, d, torch.float64,
                                                                               seed=36)):
        for kw in (dict(num_sink_tokens=3, dense_window_size=20), dict(sliding_window=300), dict(is_causal=False)):
            outs = []
            for on in (0, 1):
                monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_ROW_PIPE", str(on))
                outs.append(_run(lens_q, lens_k, 4, 2, d, dtype, inputs, "hopper", sparsity_n=n, sparsity_m=m, **kw)[0])
            assert torch.equal(outs[0], outs[1]), kw
            ref, _ = _run(lens_q, lens_k, 4, 2, d, dtype, inputs, "torch", sparsity_n=n, sparsity_m=m, **kw)
            assert rel_err(outs[1], ref) < TOL[dtype], kw


@gpu_test
@pytest.mark.parametrize("case", [c for c in HALF_SELECT_PROBE_CASES if c.get("tie_break") != "index"],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_37_half_select_row_by_row_mask_probe(monkeypatch, case):
    """The f16 network row by row (each row's f32 fallback a branch of its own): the kept mask
    equals semantics.kept_mask bit for bit on exact ties and on f16_regime_inputs."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_ROW_PIPE", "1")
    test_gpu_34_half_select_mask_probe(monkeypatch, case)


@gpu_test
@pytest.mark.parametrize("n", [8, 5])
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_37_half_select_row_by_row_against_reference(monkeypatch, n, d, dtype):
    """The f16 network row by row: the reference's output and within rounding of the f32
    network's, on random, tied and f16-regime inputs (as test_gpu_35)."""
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_ROW_PIPE", "1")
    test_gpu_35_half_select_against_reference(monkeypatch, n, False, d, dtype)


@gpu_test
@pytest.mark.parametrize("n,m,tie", hs.KV_PRETEST_PATTERNS, ids=lambda x: str(x))
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_38_kv_pretest_equals_the_measured_kernel(monkeypatch, n, m, tie, d, dtype):
    """Skipping the step's waits when the early test saw K and V arrive changes no value: bit
    for bit the measured kernel's output and lse, on random and tied inputs, causal with sinks and
    a dense window (many short and one long sequence: tiles of every kind), sliding-window and
    non-causal."""
    lens_q, lens_k = [1, 300, 5, 700, 2100], [1, 300, 900, 700, 2100]
    tie_break = "index" if tie else "threshold"
    sq, lq, mq, _ = varlen(lens_q, "cuda")
    sk, lk, _, _ = varlen(lens_k, "cuda")
    for inputs in (_random(lens_q, lens_k, 4, 2, d, seed=38 + n), tied_inputs(lens_q, lens_k, 4, 2, d, torch.float64,
                                                                               seed=38)):
        q, k, v = (x.to("cuda", dtype) for x in inputs)
        for kw in (dict(num_sink_tokens=3, dense_window_size=20), dict(sliding_window=300), dict(is_causal=False)):
            params = _params(**{"sparsity_n": n, "sparsity_m": m, "tie_break": tie_break, **kw})
            outs = []
            for on in (0, 1):
                monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_KV_PRETEST", str(on))
                assert hv.variant_for(params, dtype, d).kv_pretest == bool(on)
                outs.append(ha.forward_with_lse(q, k, v, sq, lq, mq, sk, lk, params))
            assert torch.equal(outs[0][0], outs[1][0]), kw
            assert torch.equal(outs[0][1], outs[1][1]), kw
            # and both are the reference's (the same parameters, in float64)
            ref, _ = _run(lens_q, lens_k, 4, 2, d, dtype, inputs, "torch", is_causal=params.is_causal,
                          softmax_scale=params.softmax_scale, sparsity_n=n, sparsity_m=m, tie_break=tie_break,
                          num_sink_tokens=params.num_sink_tokens, dense_window_size=params.dense_window_size,
                          sliding_window=params.sliding_window or None)
            rows = torch.cat([torch.arange(int(a), int(a) + ln) for a, ln in zip(sq, lens_q)]).cuda()
            assert torch.isfinite(outs[1][0]).all() and rel_err(outs[1][0][rows], ref[rows]) < TOL[dtype], kw


def test_learned_sinks_variant_flag_and_sets():
    """Learned sinks (tag flag a): chosen by the call, not the environment; its own define, parsed
    back from its tag, carried precompiled for test_gpu_40, and the same kernel otherwise."""
    for d, n, m in ((128, 0, 4), (64, 2, 4), (128, 8, 16)):
        params = _params(sparsity_n=n, sparsity_m=m)
        plain = hv.variant_for(params, torch.bfloat16, d)
        with_sinks = hv.variant_for(params, torch.bfloat16, d, learned_sinks=True)
        assert not plain.learned_sinks and with_sinks == dataclasses.replace(plain, learned_sinks=True)
        assert _flags_added(plain.tag, with_sinks.tag) == {"a"}
        assert "-DNMH_LEARNED_SINKS=1" in with_sinks.defines() and "-DNMH_LEARNED_SINKS=1" not in plain.defines()
        assert hv._parse_tag(with_sinks.tag) == with_sinks
        assert with_sinks in hs.standard_variants()
    assert hv.variant_for(_params(), torch.bfloat16, 128, learned_sinks=True, probe=True).learned_sinks


def test_kv_pretest_variant_flag_env_and_sets(monkeypatch):
    """MODELOPT_SPARSE_HOPPER_KV_PRETEST (tag flag j): its own define, parsed back from its tag,
    switched by the A/B table, its test kernels carried."""
    _assert_switch_flag(monkeypatch, "kv_pretest", "KV_PRETEST", "j", _params(sparsity_n=2, sparsity_m=4))
    _assert_switch_flag(monkeypatch, "kv_pretest", "KV_PRETEST", "j", _params(), head_dim=64)
    # The measured default (session 23): dense, M = 16 at D = 128, M = 4 and 8 at D = 64.
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER_KV_PRETEST")
    on = {(d, n, m): hv.variant_for(_params(sparsity_n=n, sparsity_m=m), torch.bfloat16, d).kv_pretest
          for d in (128, 64) for n, m in ((0, 4), (1, 2), (2, 4), (4, 8), (8, 16))}
    assert [k for k, v in on.items() if v] == [(128, 0, 4), (128, 8, 16), (64, 0, 4), (64, 2, 4), (64, 4, 8)]
    assert {v.canonical() for v in hs.KV_PRETEST_TESTS} <= set(hs.standard_variants())
    assert any(v.kv_pretest for v in hs.KV_PRETEST_TESTS)


def test_phase_clocks_variant_flag_and_summary(monkeypatch):
    """MODELOPT_SPARSE_HOPPER_PHASE_CLOCKS (tag flag c, the `phases` command's clock-stamp
    build): its own define, parsed back, switched by the A/B table, never a probe build; and the
    summary's arithmetic on synthetic stamps: per-phase means over fully recorded steps only, the
    loop gap and period between consecutive recorded steps, differences across the counter's
    wrap."""
    from modelopt_sparse.kernels.hopper_attention import phases

    _assert_switch_flag(monkeypatch, "phase_clocks", "PHASE_CLOCKS", "c", _params(sparsity_n=2, sparsity_m=4))
    assert not hv.Variant(probe=True, phase_clocks=True).canonical().phase_clocks
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "constexpr int CLOCK_TILES = 128, CLOCK_STAMPS = 8;" in src
    assert (he.PHASE_CLOCK_TILES, he.PHASE_CLOCK_STAMPS) == (128, 8)
    gaps = torch.tensor([5, 7, 11, 13, 17, 19], dtype=torch.int64)  # data .. tail
    stamps = torch.zeros(2, 4, 8, dtype=torch.int64)
    start = 2**32 - 40  # the first warpgroup's counter wraps inside its steps
    for wg in range(2):
        t0 = start if wg == 0 else 1001
        for i in range(3):  # steps 0-2 recorded, 23 cycles from one step's end to the next start
            stamps[wg, i, :7] = (t0 + torch.cat([torch.zeros(1, dtype=torch.int64), gaps.cumsum(0)])) % 2**32
            t0 += int(gaps.sum()) + 23
    stamps[1, 2, 5] = 0  # a step with a stamp missing does not count
    out = phases.summarize(stamps)
    assert out["steps"] == 5
    assert [out[k] for k in phases.PHASES] == [float(g) for g in gaps]
    assert out["loop"] == 23.0 and out["period"] == float(gaps.sum() + 23)
    with pytest.raises(ValueError, match="no tile step"):
        phases.summarize(torch.zeros(1, 2, 8, dtype=torch.int64))


def test_row_pipe_variant_flag_env_and_sets(monkeypatch):
    """MODELOPT_SPARSE_HOPPER_ROW_PIPE (tag flag e): N:M with the threshold rule only (not with
    the index rule or the sparse P.V), its own define, parsed back from its tag, switched by the
    A/B table, its test kernels carried (with the f16 network at M = 16 too)."""
    _assert_switch_flag(monkeypatch, "row_pipe", "ROW_PIPE", "e", _params(sparsity_n=2, sparsity_m=4))
    assert not hv.variant_for(_params(), torch.bfloat16, 128).row_pipe
    assert not hv.variant_for(_params(sparsity_n=2, sparsity_m=4, tie_break="index"), torch.bfloat16, 128).row_pipe
    assert not hv.Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, row_pipe=True).canonical().row_pipe
    assert hv.Variant(sparsity_n=8, sparsity_m=16, half_select=True, row_pipe=True).canonical().row_pipe
    assert {v.canonical() for v in hs.ROW_PIPE_TESTS} <= set(hs.standard_variants())


def test_timing_table_reference_is_the_last_rows_of_the_whole_call():
    """The timing table checks an engine row by its last rows against the float32 reference of
    those rows as a chunk against every key: the same values as the whole call's last rows."""
    from modelopt_sparse.kernels.api import attention as api_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(300, 2, 64, generator=g) for _ in range(3))
    zero, lens = torch.zeros(1, dtype=torch.int32), torch.tensor([300], dtype=torch.int32)
    for causal in (True, False):
        for n, m in ((0, 4), (2, 4), (8, 16)):
            p = SparseParams(causal, 0.125, n, m, 0, 16 if n else 0, "threshold")
            tail = ht._exact_tail(api_attention, q, k, v, p)
            whole = api_attention(q, k, v, zero, lens, 300, is_causal=causal, sparsity_n=n, sparsity_m=m,
                                  dense_window_size=p.dense_window_size, softmax_scale=0.125, backend="torch")
            assert tail.shape == (256, 2, 64) and torch.equal(tail, whole[-256:])


def test_timing_table_runs_its_plan_on_the_cpu(monkeypatch, capsys):
    """The device script's timing table, on the CPU with the engine's forward stubbed by the
    reference (two of its bugs cost GPU calls: a schedule-switch unpacking and a positional
    argument of the reference call). Every engine row must time and check out correct; a
    stub that is wrong must be flagged WRONG; the table must name the fastest schedule."""
    import argparse

    from modelopt_sparse.kernels.api import attention as api_attention

    seen = []

    mid_waits = []

    def fake_forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, *, q_covered, with_lse, probe=None):
        seen.append(hv.schedule_from_env(q.shape[-1], params.sparsity_n, params.sparsity_m))
        mid_waits.append(os.environ.get("MODELOPT_SPARSE_HOPPER_MID_WAIT") == "1")
        out = api_attention(q, k, v, q_start, q_len, max_q, b_start_loc_k=k_start, b_seq_len_k=k_len,
                            max_input_len_k=max_q, is_causal=params.is_causal, softmax_scale=params.softmax_scale,
                            sparsity_n=params.sparsity_n, sparsity_m=params.sparsity_m,
                            dense_window_size=params.dense_window_size, tie_break=params.tie_break, backend="torch")
        if os.environ.get("MODELOPT_SPARSE_HOPPER_SPARSE_PV") == "1":
            out = out.flip(0)  # a wrong kernel
        return out, None

    monkeypatch.setattr(ht, "forward", fake_forward)
    args = argparse.Namespace(seq_len=64, heads=2, iters=1, budget=600.0, device="cpu")
    assert ht._bench(args) == 0
    text = capsys.readouterr().out
    table = text[text.index("forward, S=64"):]
    engine_rows = [line for line in table.splitlines() if " hopper " in line]
    assert len(engine_rows) > 40 and len(seen) >= len(engine_rows)
    for line in engine_rows:
        assert "ERROR" not in line and "vs fp32" in line, line
        assert ("WRONG" in line) == ("sparse-pv" in line), line
    assert "FASTEST " in table and "BEST_SCHEDULE MODELOPT_SPARSE_HOPPER_PINGPONG=" in table
    assert len({tuple(sorted(s.items())) for s in seen}) > 5  # the schedules really change
    # MID_WAIT rows: each overlapped measured kernel without and with it, back to back; the
    # other rows run without it.
    assert sum("mid-wait" in line for line in engine_rows) == len(hs.MID_WAIT_TESTS) // 2
    calls_per_row, rest = divmod(len(seen), len(engine_rows))
    assert rest == 0 and sum(mid_waits) == calls_per_row * len(hs.MID_WAIT_TESTS) // 2


def test_ab_table_rotates_repeats_and_checks_each_kernel_on_the_cpu(monkeypatch, capsys):
    """The A/B command (ab_table.py) on the CPU with the engine's forward stubbed by the
    reference: each tag runs under the switches that select exactly its kernel, the repeats
    rotate the order, the speed-up is the median of per-repeat ratios against the first tag,
    a wrong kernel is flagged (and fails the command), and tags the switches cannot select are
    refused before any launch."""
    import argparse

    from modelopt_sparse.kernels.api import attention as api_attention
    from modelopt_sparse.kernels.hopper_attention import ab_table

    seen = []

    def fake_forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, *, q_covered, with_lse, probe=None,
                     source_dir=None):
        variant = hv.variant_for(params, q.dtype, q.shape[-1])
        seen.append(variant.tag if source_dir is None else f"{variant.tag}@{source_dir}")
        out = api_attention(q.float(), k.float(), v.float(), q_start, q_len, max_q, is_causal=params.is_causal,
                            softmax_scale=params.softmax_scale, sparsity_n=params.sparsity_n,
                            sparsity_m=params.sparsity_m, dense_window_size=params.dense_window_size,
                            tie_break=params.tie_break, backend="torch").to(q.dtype)
        return (out.flip(0) if variant.overlap and variant.head_dim == 128 else out), None  # one wrong kernel

    monkeypatch.setattr(ht, "forward", fake_forward)
    before = {name: value for name, value in os.environ.items() if name.startswith("MODELOPT_SPARSE_HOPPER")}
    tags = ["d64_dense_pormz3", "d64_dense_prmz3", "d128_4of8t_prmz", "d128_4of8t_pormz"]
    rows = ab_table.run_ab(tags, seq_len=64, heads=2, iters=1, repeats=3, device="cpu")
    assert [r["tag"] for r in rows] == tags
    # The check call of each, then per repeat one untimed and one timed call (event_ms on the
    # CPU), in rotating order.
    timed = seen[len(tags):]
    assert timed[::2] == [tags[i] for r in range(3) for i in ab_table._rotated(len(tags), r)]
    assert [r["ok"] for r in rows] == [True, True, True, False]
    assert all(len(r["ms"]) == 3 and r["median_ms"] > 0 for r in rows)
    assert rows[0]["speedup_vs_first"] == 1.0
    assert rows[1]["speedup_range"][0] <= rows[1]["speedup_vs_first"] <= rows[1]["speedup_range"][1]
    args = argparse.Namespace(tags=tags[:2], seq_len=64, heads=2, iters=1, repeats=2, noncausal=False, device="cpu")
    assert ab_table.main(args) == 0
    assert "d64_dense_prmz3" in capsys.readouterr().out
    assert ab_table.main(argparse.Namespace(**dict(vars(args), tags=tags[2:]))) == 1  # a WRONG row
    with pytest.raises(ValueError, match="mask-probe"):
        ab_table.parse_variants(["d128_dense_px"])
    with pytest.raises(ValueError, match="same kernel"):  # three warpgroups always take TMA
        ab_table.parse_variants(["d64_dense_pr3", "d64_dense_prm3"])
    with pytest.raises(ValueError, match="not a variant tag"):
        ab_table.parse_variants(["dense"])
    # --against DIR: each tag also built from DIR's sources, in the same rotation, as TAG@DIR.
    old_sources = str(hb.SOURCE_DIR)
    seen.clear()
    rows = ab_table.run_ab(tags[:2], seq_len=64, heads=2, iters=1, repeats=2, device="cpu", against=old_sources)
    expected = [tags[0], f"{tags[0]}@{old_sources}", tags[1], f"{tags[1]}@{old_sources}"]
    assert [r["tag"] for r in rows] == expected and all(r["ok"] for r in rows)
    assert seen[4:][::2] == [expected[i] for r in range(2) for i in ab_table._rotated(4, r)]
    with pytest.raises(ValueError, match="no nm_attention_fwd.cu"):
        ab_table.run_ab(tags[:1], seq_len=64, heads=2, iters=1, repeats=1, device="cpu", against=str(Path(old_sources).parent))
    with pytest.raises(ValueError, match="at least 1"):
        ab_table.run_ab(tags[:2], seq_len=64, heads=2, iters=1, repeats=0, device="cpu")
    assert set(ab_table.variant_env(hv._parse_tag(tags[0]))) == set(ab_table.SWITCH_NAMES)
    switches = {name: value for name, value in os.environ.items() if name.startswith("MODELOPT_SPARSE_HOPPER")}
    assert switches == before  # every switch put back


@gpu_test
@pytest.mark.parametrize("n", [0, 2], ids=["dense", "2of4"])
def test_gpu_24_auto_runs_the_engine_inside_a_sparsified_model(monkeypatch, n):
    """``sparsify`` with its default ``backend="auto"``: a transformers model's long prefill runs
    every layer through the engine (sm_90, at least AUTO_MIN_WORK per call), its logits match
    the same model forced onto Triton, and a short call in the same model stays on Triton."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import modelopt_sparse as mts

    from .hf_tiny import sparse_cfg

    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER", raising=False)
    calls = []
    real = ha.hopper_attention
    monkeypatch.setattr(ha, "hopper_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    tokens = 6144
    # The size rule at this model's scale (4 heads): the mechanism is under test, not the value.
    monkeypatch.setattr(he, "AUTO_MIN_WORK", tokens * tokens * config.num_attention_heads)
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).cuda()
    auto = mts.sparsify(copy.deepcopy(base), sparse_cfg(n, 4, 0, 64))
    forced = mts.sparsify(copy.deepcopy(base), sparse_cfg(n, 4, 0, 64, backend="triton"))
    with torch.no_grad():
        got = auto(input_ids=ids, use_cache=False).logits.float()
        assert len(calls) == config.num_hidden_layers
        want = forced(input_ids=ids, use_cache=False).logits.float()
        assert len(calls) == config.num_hidden_layers
        auto(input_ids=ids[:, :512], use_cache=False)
    assert len(calls) == config.num_hidden_layers  # 512 tokens: below the size rule
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 2e-2


def test_sparse_pv_tma_map_writes_the_v_row_order():
    """Stage 3's V map with the TMA producer, emulated element by element as the ISA defines a
    tiled box load (innermost dimension first into shared memory; a coordinate outside its
    extent reads zero): the four 5-D boxes of a tile write smem row r with the tile's key
    v_row_key(r), for every start row; a tile the kernel sends to TMA reads no row past the
    tensor's end and no zero-filled element; the kernel's bound test is exactly that."""
    src = (hb.SOURCE_DIR / "nm_attention_fwd.cu").read_text()
    assert "return (c / 32) * 32 + 8 * ((c % 16) / 4) + 4 * ((c % 32) / 16) + c % 4;" in src
    assert "const bool by_tma = TMA3D ? g0 + G_PERM <= bound : row0 + 96 + 3 < bound;" in src
    assert "kv_head, row0 + 32 * q32, 0, 0, bar(BAR_FULL_V + s));" in src
    assert "(int)tm.kv_rows - 31;" in src
    heads, head_dim = 3, 128
    row_bytes, head_bytes = heads * head_dim * 2, head_dim * 2
    for rows in (1, 31, 32, 130, 131, 132, 300, 1000):
        dims, strides, box = hd.sparse_pv_v_map(rows, heads, head_dim, row_bytes, head_bytes)
        assert box == (64, 1, 4, 4, 2) and dims[:2] == (head_dim, heads) and dims[3:] == (4, 2)
        assert all(st % 16 == 0 for st in strides) and strides[0] == head_bytes
        steps = [st // row_bytes for st in strides[1:]]  # rows per unit of d, c, b
        assert steps == [1, 8, 4]
        bound = rows - 31  # the kernel's, from kv_rows
        assert dims[2] == max(bound, 1)
        for row0 in range(0, rows + 1):
            smem = {}
            zero_filled = False
            for q32 in range(4):
                start = row0 + 32 * q32  # the box's d coordinate; c and b start at 0
                for b in range(box[4]):
                    for c in range(box[3]):
                        for d in range(box[2]):
                            r = 32 * q32 + d + box[2] * c + box[2] * box[3] * b  # innermost first
                            coords_ok = start + d < dims[2]
                            zero_filled |= not coords_ok
                            smem[r] = start + d * steps[0] + c * steps[1] + b * steps[2] if coords_ok else None
            by_tma = row0 + 96 + 3 < bound
            assert sorted(smem) == list(range(128))
            if by_tma:
                assert not zero_filled
                assert all(smem[r] == row0 + _sp_v_row_key(r) for r in range(128))
                assert max(smem.values()) < rows
            else:  # exactly the tiles whose last box would leave the map
                assert zero_filled or bound <= 0


def test_find_nvcc_search_order(monkeypatch, tmp_path):
    """$MODELOPT_SPARSE_NVCC, then $CUDA_HOME / $CUDA_PATH, PATH, the system toolkit, and last
    the nvidia-cuda-nvcc wheel (the ``[hopper]`` extra: site-packages/nvidia/cu13/bin/nvcc)."""
    import types

    def tool(*parts):
        path = tmp_path.joinpath(*parts, "nvcc")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return str(path)

    wheel = tool("site", "nvidia", "cu13", "bin")
    home, on_path, system = tool("home", "bin"), tool("path"), tool("system", "bin")
    for name in ("MODELOPT_SPARSE_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(hb, "SYSTEM_NVCC", tmp_path / "none" / "nvcc")
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[str(tmp_path / "site" / "nvidia")]))
    assert hb.find_nvcc() == wheel
    monkeypatch.setattr(hb, "SYSTEM_NVCC", Path(system))
    assert hb.find_nvcc() == system
    monkeypatch.setenv("PATH", str(Path(on_path).parent))
    assert hb.find_nvcc() == on_path
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "home"))
    assert hb.find_nvcc() == home
    monkeypatch.setenv("MODELOPT_SPARSE_NVCC", wheel)
    assert hb.find_nvcc() == wheel
    monkeypatch.setenv("MODELOPT_SPARSE_NVCC", str(tmp_path / "missing"))
    assert hb.find_nvcc() is None  # an explicit choice that does not exist is not overridden
    monkeypatch.delenv("MODELOPT_SPARSE_NVCC")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(hb, "SYSTEM_NVCC", tmp_path / "none" / "nvcc")
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[]))
    assert hb.find_nvcc() is None


def test_tensor_map_encodings(monkeypatch):
    """The three map encoders through one cuTensorMapEncodeTiled call (a recording stand-in of
    the driver): the geometry each passes, innermost dimension first, strides in bytes."""
    calls = []

    class FakeLib:
        def cuTensorMapEncodeTiled(self, _map, dtype, rank, _ptr, dims, strides, box, estrides, *enums):
            r = rank.value
            calls.append((dtype.value, r, list(dims)[:r], list(strides)[:r - 1], list(box)[:r], list(estrides)[:r],
                          [e.value for e in enums]))
            return 0

    driver = hd._Driver.__new__(hd._Driver)
    driver.lib = FakeLib()
    t = torch.empty(300, 3, 128, dtype=torch.bfloat16)  # packed [rows, heads, head_dim]
    out = (ctypes.c_uint64 * 16)()
    driver.encode_tma(out, t, 4, 128)
    assert driver.encode_tma_grouped(out, t, 16) == 300 // 16 - 1
    assert driver.encode_tma_sparse_pv(out, t) == 300 - 31
    row, head = 3 * 128 * 2, 128 * 2
    enums = [hd._TMA_INTERLEAVE_NONE, hd._TMA_SWIZZLE_128B, hd._TMA_L2_256B, hd._TMA_OOB_ZERO]
    assert calls == [
        (hd._TMA_UINT16, 3, [128, 3, 300], [head, row], [64, 1, 128], [1, 1, 4], enums),
        (hd._TMA_UINT16, 4, [128, 3, 17, 31], [head, 16 * row, row], [64, 1, 8, 16], [1, 1, 1, 1], enums),
        (hd._TMA_UINT16, 5, [128, 3, 269, 4, 2], [head, row, 8 * row, 4 * row], [64, 1, 4, 4, 2], [1] * 5, enums),
    ]


@gpu_test
def test_gpu_39_compiled_graphs_run_the_engine(monkeypatch):
    """torch.compile (Inductor, fullgraph) runs the engine's custom op: one graph, the eager
    engine's output bit for bit, the Triton backward's gradients through the op's autograd
    formula, and CUDA graphs (mode="reduce-overhead") replaying it on new inputs; backend="auto"
    chooses the engine at trace time as it does in eager mode."""
    from modelopt_sparse.kernels.hopper_attention import ops as hops

    torch._dynamo.reset()
    b, s, hq, hkv, d = 2, 640, 8, 2, 128
    g = torch.Generator().manual_seed(39)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to("cuda", torch.bfloat16) for h in (hq, hkv, hkv))
    starts = torch.tensor([0, 100], dtype=torch.int32, device="cuda")
    lens = torch.tensor([640, 540], dtype=torch.int32, device="cuda")
    kw = dict(sparsity_n=2, sparsity_m=4, num_sink_tokens=2, dense_window_size=16, check_metadata=False)
    launches = []
    real = hops.forward
    monkeypatch.setattr(hops, "forward", lambda *a, **k2: launches.append(1) or real(*a, **k2))

    def call(q, k, v, backend="hopper"):
        return attention(q, k, v, starts, lens, s, backend=backend, **kw)

    eager = attention(q, k, v, starts, lens, s, backend="hopper", **kw)
    explained = torch._dynamo.explain(call)(q, k, v)
    assert explained.graph_break_count == 0 and "hopper_attention_forward" in explained.graphs[0].code
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager) and launches
    # auto: the size rule lowered, the engine is chosen while tracing
    monkeypatch.setattr(he, "AUTO_MIN_WORK", 0)
    launches.clear()
    assert torch.equal(torch.compile(lambda q, k, v: call(q, k, v, "auto"), fullgraph=True)(q, k, v), eager)
    assert launches
    # gradients: the Triton backward on the engine's output and lse, eager and compiled alike
    grad = torch.randn(eager.shape, generator=g).to("cuda", torch.bfloat16)
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    attention(*leaves[0], starts, lens, s, backend="hopper", **kw).backward(grad)
    torch._dynamo.reset()
    torch.compile(call, fullgraph=True)(*leaves[1]).backward(grad)
    for a, c in zip(*leaves):
        assert torch.equal(a.grad, c.grad)
    # CUDA graphs: the launch is recorded once and replayed on the next inputs (no host read:
    # the barrier-timeout check, a synchronization, stays off here)
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER_CHECK", "0")
    torch._dynamo.reset()
    graphed = torch.compile(call, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = [t * (1 + step / 8) for t in (q, k, v)]
        want = attention(*x, starts, lens, s, backend="hopper", **kw)
        assert torch.equal(graphed(*x), want), step


@gpu_test
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n,m", [(0, 4), (2, 4), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_40_learned_sinks(n, m, d, dtype):
    """Learned sinks (GPT-OSS's per-head logit in every row's denominator) on the engine: the
    output against the float64 reference, on ragged GQA sequences with a sliding window, one
    sequence with more queries than keys (rows with no allowed key: output 0), sinks from very
    negative to dominant; the lse against the Triton forward's with the same sinks; the
    gradients (q, k, v and the sinks, the last in their dtype) against the Triton path's."""
    from modelopt_sparse.kernels.triton_attention import _forward_launch

    lens_q, lens_k = [300, 40, 7], [300, 20, 700]
    sq, lq, mq, _ = varlen(lens_q, "cuda")
    sk, lk, mk, _ = varlen(lens_k, "cuda")
    inputs = _random(lens_q, lens_k, 8, 2, d, seed=40 + m)
    sinks = torch.tensor([-30.0, -2.0, 0.0, 1.5, 4.0, 8.0, 12.0, 0.5], device="cuda")
    kw = dict(sparsity_n=n, sparsity_m=m, num_sink_tokens=2, dense_window_size=16, sliding_window=120)
    out, _ = _run(lens_q, lens_k, 8, 2, d, dtype, inputs, "hopper", learned_sinks=sinks, **kw)
    ref, _ = _run(lens_q, lens_k, 8, 2, d, dtype, inputs, "torch", learned_sinks=sinks.double(), **kw)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[dtype]
    plain, _ = _run(lens_q, lens_k, 8, 2, d, dtype, inputs, "hopper", **kw)
    assert rel_err(plain, out) > 10 * TOL[dtype]  # the sinks really took part
    q, k, v = (t.to("cuda", dtype) for t in inputs)
    params = _params(sparsity_n=n, sparsity_m=m, num_sink_tokens=2, dense_window_size=16, sliding_window=120)
    out_h, lse_h = ha.forward_with_lse(q, k, v, sq, lq, mq, sk, lk, params, covered=True, learned_sinks=sinks)
    out_t, lse_t, _ = _forward_launch(q, k, v, sq, lq, sk, lk, mq, mk, True, False, params, learned_sinks=sinks)
    assert rel_err(out_h, out_t) < 1e-2
    assert torch.allclose(lse_h, lse_t, rtol=0, atol=LSE_TOL_16BIT_SUM), (lse_h - lse_t).abs().max()
    g = torch.Generator().manual_seed(41)
    do = torch.randn(sum(lens_q), 8, d, generator=g).to("cuda", dtype)
    grads = {}
    for backend in ("hopper", "triton"):
        s16 = sinks.to(dtype).requires_grad_()
        o, xs = _run(lens_q, lens_k, 8, 2, d, dtype, inputs, backend, grad=True, learned_sinks=s16, **kw)
        grads[backend] = torch.autograd.grad(o, [*xs, s16], do)
    for a, b in zip(grads["hopper"], grads["triton"]):
        assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < 2e-2
