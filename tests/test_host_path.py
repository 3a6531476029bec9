"""The host path: no device-to-host synchronisation, cheap launches, lazy device checks.

On CUDA the attention and mask functions run under ``torch.cuda.set_sync_debug_mode
("error")``, which raises on any synchronising call, for every input kind the adapter
promises to handle without one. The direct launcher is checked against
``JITFunction.run`` and against ordinary launches bit for bit. CPU tests cover the parts
that need no GPU: the argument signature and the immediate form of the device checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, StaticCache
from transformers.masking_utils import AttentionMaskInterface

import modelopt_sparse as mts
from modelopt_sparse import hf_attention, lazy_checks
from modelopt_sparse.kernels.triton_launch import _arg_signature

from .hf_tiny import CACHE_KW, sparse_cfg, tiny_model, token_ids

def test_argument_signature_splits_on_what_triton_specializes():
    base = torch.empty(64)
    assert _arg_signature((base,)) != _arg_signature((base[1:],))  # 16-byte alignment
    assert _arg_signature((base,)) != _arg_signature((base.half(),))  # dtype
    assert len({_arg_signature((x,)) for x in (1, 2, 16, 32, 2**31, -(2**31) - 1)}) == 5  # 1, %16, 32/64-bit
    assert _arg_signature((True,)) != _arg_signature((1,))
    assert _arg_signature((3, 0.5)) == _arg_signature((5, 0.25))


def test_device_checks_raise_at_once_on_cpu():
    with pytest.raises(ValueError, match="bad thing"):
        lazy_checks.require(torch.tensor([True, False]), lambda: "bad thing")
    lazy_checks.require(torch.tensor([True, True]), lambda: "never")
    assert lazy_checks.pending() == 0


def _strict(fn):
    """``fn`` with every synchronising CUDA call turned into an error."""

    def wrapped(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return wrapped


@pytest.fixture
def strict_sparse_model():
    model = mts.sparsify(tiny_model("llama", dtype=torch.bfloat16).cuda(), sparse_cfg(2, 4, sinks=1, window=4))
    AttentionInterface.register(hf_attention.ATTN_IMPLEMENTATION, _strict(hf_attention.sparse_attention_forward))
    AttentionMaskInterface.register(hf_attention.ATTN_IMPLEMENTATION, _strict(hf_attention.sparse_attention_mask))
    yield model
    hf_attention.register_with_transformers()


def _padded(ids, side):
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :5] = 0
    elif side == "right":
        mask[1, -5:] = 0
    return mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["unpadded", "left", "right", "packed", "inference_mode"])
def test_prefill_never_synchronises(strict_sparse_model, case):
    model = strict_sparse_model
    ids = token_ids(2, 40).cuda()
    kwargs = {"use_cache": False}
    if case in ("left", "right"):
        kwargs["attention_mask"] = _padded(ids, case)
    if case == "packed":
        ids = ids.reshape(1, 80)
        cu = torch.tensor([0, 30, 80], dtype=torch.int32, device="cuda")
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=50, max_length_k=50,
                      position_ids=torch.cat([torch.arange(30), torch.arange(50)])[None].cuda())
    context = torch.inference_mode() if case == "inference_mode" else torch.no_grad()
    for _ in range(2):  # the first call compiles and tunes, which may synchronise
        with context:
            model(input_ids=ids, **kwargs)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_never_synchronises(strict_sparse_model, cache_kind):
    model = strict_sparse_model
    ids = token_ids(2, 24).cuda()
    mask = _padded(ids, "left")
    cache = StaticCache(config=model.config, max_cache_len=40) if cache_kind == "static" else None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **({CACHE_KW: cache} if cache else {}))
        cache = out.past_key_values
        for step in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{CACHE_KW: cache})
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_cu_seq_lens_raise_at_the_next_call():
    model = mts.sparsify(tiny_model("llama", dtype=torch.bfloat16).cuda(), sparse_cfg(2, 4))
    ids = token_ids(1, 80).cuda()
    bad = torch.tensor([0, 50, 30, 80], dtype=torch.int32, device="cuda")
    # Raised by a later layer of the same forward, or once the GPU has caught up.
    with torch.no_grad(), pytest.raises(ValueError, match=r"cu_seq_lens_q=\[0, 50, 30, 80\] must rise .*earlier call"):
        model(input_ids=ids, cu_seq_lens_q=bad, cu_seq_lens_k=bad, use_cache=False)
        lazy_checks.wait_and_raise()
    assert lazy_checks.pending() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct_launches_equal_ordinary_launches_bit_for_bit(monkeypatch):
    """Unaligned and aligned inputs, forward and backward: the direct launcher picks the
    kernel JITFunction.run picks (checked on every hit) and gives the same bits."""
    from modelopt_sparse.kernels import triton_attention as ta

    launchers = {tuned: tuned.launcher for tuned in (ta._fwd, ta._dkdv, ta._dq)}
    for launcher in launchers.values():
        monkeypatch.setattr(launcher, "_verify", True)
    base = tiny_model("llama", dtype=torch.bfloat16).cuda()
    model = mts.sparsify(copy.deepcopy(base), sparse_cfg(2, 4, sinks=1, window=4))
    results = {}
    for direct in ("1", "0"):
        for tuned, launcher in launchers.items():  # what MODELOPT_SPARSE_DIRECT_LAUNCH=0 does at import
            monkeypatch.setattr(tuned, "launcher", launcher if direct == "1" else None)
        got = []
        for offset in (0, 1):  # q/k/v views 2 bytes past an aligned base on the second pass
            g = torch.Generator(device="cuda").manual_seed(offset)
            buf = torch.randn(300 * 4 * 16 + 8, generator=g, device="cuda", dtype=torch.bfloat16)
            q = buf[offset:offset + 300 * 4 * 16].view(300, 4, 16).requires_grad_()
            k = torch.randn(300, 2, 16, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(300, 2, 16, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            lens = torch.tensor([200, 100], dtype=torch.int32, device="cuda")
            starts = torch.tensor([0, 200], dtype=torch.int32, device="cuda")
            for _ in range(2):
                out = mts.attention(q, k, v, starts, lens, 200, sparsity_n=2, sparsity_m=4)
                out.float().square().sum().backward()
            got.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
            with torch.no_grad():
                got.append([model(input_ids=token_ids(2, 40).cuda()).logits])
                # Inference calls run from launch plans after their first launches: packed
                # rows, and a padded batch read in place from [B, H, S, D] tensors.
                q4 = buf[offset:offset + 2 * 4 * 150 * 16].view(2, 4, 150, 16).transpose(1, 2)
                k4, v4 = (torch.randn(2, 2, 160, 16, generator=g, device="cuda", dtype=torch.bfloat16)
                          .transpose(1, 2) for _ in range(2))
                starts4 = torch.tensor([0, 30], dtype=torch.int32, device="cuda")
                lens4 = torch.tensor([150, 120], dtype=torch.int32, device="cuda")
                lens4_k = torch.tensor([160, 125], dtype=torch.int32, device="cuda")
                for _ in range(4):
                    packed = mts.attention(q.detach(), k.detach(), v.detach(), starts, lens, 200, sparsity_n=2,
                                           sparsity_m=4, check_metadata=False, rows_covered=True)
                    batched = mts.attention(q4, k4, v4, starts4, lens4, 150, True, None, starts4, lens4_k, 160,
                                            sparsity_n=2, sparsity_m=4)
                got.append([packed, batched])
        results[direct] = got
    assert launchers[ta._fwd].direct_launches > 0 and launchers[ta._dq].direct_launches > 0
    # Aligned inference calls ran from plans (each hit also checked against JITFunction.run).
    assert sum(plan.launches for plan in ta._FORWARD_PLANS.values()) >= 4
    for a, b in zip(results["1"], results["0"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_metadata_gives_the_checked_result(backend):
    """check_metadata=False reads nothing back; rows outside every sequence come out 0
    unless rows_covered vouches that there are none (then they are not written at all)."""
    from modelopt_sparse.kernels import interpreting

    if backend == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(40, 4, 16, generator=g).to(device) for _ in range(3))
    starts = torch.tensor([0, 24], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 16], dtype=torch.int32, device=device)  # rows 20..23 are in no sequence
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=2, backend=backend)
    checked = mts.attention(q, k, v, starts, lens, 20, **kw)
    unchecked = mts.attention(q, k, v, starts, lens, 20, check_metadata=False, **kw)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
    assert unchecked[20:24].abs().max() == 0
    full = torch.tensor([0, 20], dtype=torch.int32, device=device), torch.tensor([20, 20], dtype=torch.int32,
                                                                                  device=device)
    covered = mts.attention(q, k, v, *full, 20, check_metadata=False, rows_covered=True, **kw)
    torch.testing.assert_close(covered, mts.attention(q, k, v, *full, 20, **kw), rtol=0, atol=0)
    with pytest.raises(TypeError, match="rows_covered must be a bool"):
        mts.attention(q, k, v, *full, 20, check_metadata=False, rows_covered=1, **kw)
    with pytest.raises(ValueError, match="rows_covered=True needs check_metadata=False"):
        mts.attention(q, k, v, *full, 20, rows_covered=True, **kw)
    with pytest.raises(TypeError, match="check_metadata must be a bool"):
        mts.attention(q, k, v, *full, 20, check_metadata="no", **kw)


def test_dynamo_never_traces_into_pending_device_checks(monkeypatch):
    """raise_failed() under torch.compile returns before looking at the pending checks. When
    Dynamo traced `not _pending`, it guarded on the list and registered the pending checks'
    torch.cuda.Event objects as graph inputs; compiled static-cache generate then crashed in
    Dynamo's user-object registry on the H200. Here: changing the pending list between calls
    must not recompile, and Dynamo registers no user object."""
    import torch._dynamo.graph_bytecode_inputs as registry

    from modelopt_sparse import lazy_checks

    class Check:  # stands in for a pending (event, flag, message, error) entry
        pass

    monkeypatch.setattr(lazy_checks, "_pending", [(Check(), None, None, None)])
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def step(x):
        lazy_checks.raise_failed()
        return x + 1

    torch._dynamo.reset()
    step(torch.ones(3))
    assert not registry.index_to_bytecode_constructor
    lazy_checks._pending.append((Check(), None, None, None))
    step(torch.ones(3))
    lazy_checks._pending.clear()
    step(torch.ones(3))
    assert len(compiles) == 1
    torch._dynamo.reset()
