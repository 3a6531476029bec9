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
    from modelopt_sparse.kernels.triton_attention import configs, launch

    launchers = {tuned: tuned.launcher for tuned in (configs._fwd, configs._dkdv, configs._dq)}
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
    assert launchers[configs._fwd].direct_launches > 0 and launchers[configs._dq].direct_launches > 0
    # Aligned inference calls ran from plans (each hit also checked against JITFunction.run).
    assert sum(plan.launches for plan in launch._FORWARD_PLANS.values()) >= 4
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


def _reference_codes(batch, q_len, width, first_query, kv_offset=0, padding=None):
    """Token codes written out slot by slot from the module docstring of hf_attention.masks."""
    codes = torch.zeros(batch, width, dtype=torch.int32)
    for b in range(batch):
        for j in range(width):
            row = j - first_query
            pad_j = kv_offset + j
            real = row < q_len and (padding is None or (pad_j < padding.shape[-1] and bool(padding[b, pad_j])))
            codes[b, j] = (row + 2 if row >= 0 else 1) if real else 0
    return codes


@pytest.mark.parametrize("offset_kind", ["int", "tensor"])
def test_token_codes_match_their_definition(offset_kind):
    """token_codes (a few fused kernels, cached constants) against the slot-by-slot definition:
    queries at the start, middle and end, static-cache tails, padding shorter, as long as and
    longer than the keys, kv_offset, bool and integer padding."""
    gen = torch.Generator().manual_seed(0)
    for batch, q_len, width, first, kv_offset, pad_len, pad_dtype in [
        (1, 1, 8, 7, 0, None, None), (3, 1, 8, 3, 0, None, None), (2, 4, 10, 0, 0, None, None),
        (2, 1, 12, 4, 0, 5, torch.bool), (3, 2, 9, 5, 0, 9, torch.int64), (2, 3, 8, 2, 2, 12, torch.bool),
        (2, 1, 16, 0, 0, 1, torch.int32), (4, 5, 5, 0, 0, 5, torch.bool), (1, 1, 6, 2, 3, 6, torch.bool),
    ]:
        padding = None
        if pad_len is not None:
            padding = (torch.rand(batch, pad_len, generator=gen) < 0.7).to(pad_dtype)
        first_query = torch.tensor(first) if offset_kind == "tensor" else first
        for _ in range(2):  # the second call reuses the cached constants
            got = hf_attention.token_codes(batch, q_len, width, first_query, kv_offset, padding)
            assert got.dtype == torch.int32 and got.is_contiguous()
            assert torch.equal(got, _reference_codes(batch, q_len, width, first, kv_offset, padding))


# Ops that make no kernel: views and metadata. aten._local_scalar_dense is the CPU form of a
# device check (reading the flag at once); on CUDA it is a copy to pinned memory instead,
# counted as a device check (lazy_checks.require) below.
_NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.expand", "aten.slice", "aten.select", "aten.alias",
              "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.reshape", "aten.as_strided", "aten.t",
              "aten._local_scalar_dense"}


def _decode_step_mask_costs(monkeypatch, cache_implementation, padded, batch=3, got_mask=None):
    """(kernels, device checks) of each call of the mask function with one query per row during
    a tiny generate(): the work transformers runs eagerly at every decode step, outside a
    compiled step (create_masks_for_generate) and, in eager decode, inside the model too."""
    checks = []
    require = lazy_checks.require
    monkeypatch.setattr(lazy_checks, "require", lambda *a, **k: (checks.append(1), require(*a, **k))[1])
    costs = []

    def counted(*args, **kwargs):
        before = len(checks)
        result = []
        names = _host_cost_tool().aten_ops(lambda: result.append(hf_attention.sparse_attention_mask(*args, **kwargs)))
        out = result[0]
        if kwargs["q_length"] == 1:
            costs.append(([n for n in names if n not in _NO_KERNEL], len(checks) - before))
            if got_mask is not None:  # whether transformers handed this call a 2-D attention mask
                got_mask.append(kwargs.get("attention_mask") is not None)
        return out

    model = mts.sparsify(tiny_model("llama", dtype=torch.float32), sparse_cfg(2, 4))  # (re-)registers the mask
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, hf_attention.ATTN_IMPLEMENTATION, counted)
    ids = token_ids(batch, 10)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    with torch.no_grad():
        for _ in range(2):  # the first run fills the caches of constant tensors: count the second
            costs.clear()
            if got_mask is not None:
                got_mask.clear()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           **extra)
    return costs


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decode_step_mask_costs_a_few_kernels_and_one_check(monkeypatch, padded):
    """A static cache's decode-step mask (its offset on the device) is built eagerly every step,
    where CUDA graphs cannot hide launches: it must stay a few kernels (SDPA's mask is 7) and
    one device check per call. It was 14-19 kernels and 1-2 checks (each a pinned copy and an
    event) before the token codes and the two placement checks were fused."""
    costs = _decode_step_mask_costs(monkeypatch, "static", padded)
    assert len(costs) == 4  # 2 decode steps x (create_masks_for_generate + the model's own mask call)
    for kernels, checks in costs:
        # sub (slot index), clamp + eq (placement check), clamp + index (codes), mul_ (padding)
        assert len(kernels) <= 6 and checks == 1, (kernels, checks)


def test_dynamic_cache_decode_step_mask_costs_a_few_kernels_and_no_check(monkeypatch):
    """A dynamic cache's offset is a Python int: its checks run on the host, and the codes of a
    padded batch take four kernels. Without padding: none where transformers hands the mask
    function no 2-D mask (5.24: the function returns None), the same four where it hands it an
    all-ones mask (5.17: telling that it is all ones would need a host read)."""
    costs = _decode_step_mask_costs(monkeypatch, None, padded=True)
    assert len(costs) == 2
    for kernels, checks in costs:
        assert len(kernels) <= 4 and checks == 0, (kernels, checks)  # arange, clamp, index, mul_
    got_mask = []
    costs = _decode_step_mask_costs(monkeypatch, None, padded=False, got_mask=got_mask)
    assert len(costs) == len(got_mask) == 2
    for (kernels, checks), masked in zip(costs, got_mask):
        assert checks == 0 and (len(kernels) <= 4 if masked else kernels == []), (kernels, checks, masked)


def test_code_table_is_built_without_host_writes():
    """The cached code table [1, 2, ..., n + 1, 0] is built by device ops only: a Python scalar
    written into a CUDA tensor (`table[-1] = 0`) is a host-to-device copy that synchronizes,
    which the GPU no-sync tests caught at the first decode step (session 13)."""
    from modelopt_sparse.hf_attention import masks

    masks._CODE_CONSTANTS.clear()
    built = []
    names = _host_cost_tool().aten_ops(lambda: built.append(masks._code_constant("table", 5, "cpu")))
    assert built[0].tolist() == [1, 2, 3, 4, 5, 6, 0]
    assert not {"aten.fill_", "aten.copy_", "aten.index_put_", "aten.lift_fresh"} & set(names), names


def test_compiled_table_lookup_is_the_table(monkeypatch):
    """Under torch.compile the code table is read as arithmetic (torch 2.13's Inductor fails on
    the gather with a sliding layer's symbolic offset): the same code at every index."""
    from modelopt_sparse.hf_attention import masks

    for q_len in (1, 3, 8):
        index = torch.arange(q_len + 2).expand(2, q_len + 2)
        eager = masks._table_lookup(index, q_len, "cpu")
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = masks._table_lookup(index, q_len, "cpu")
        monkeypatch.undo()
        assert compiled.dtype == eager.dtype and torch.equal(compiled, eager), (q_len, compiled, eager)


# --------------------------------------------------------------------------------------
# The eager autograd path with the forward kernel stubbed out (tools/host_cost_cpu.py):
# what Python and PyTorch do around the launch when autograd records the call.
# --------------------------------------------------------------------------------------
def _host_cost_tool():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "host_cost_cpu.py"
    if "host_cost_cpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("host_cost_cpu", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["host_cost_cpu"] = module
    return sys.modules["host_cost_cpu"]


def _needs_triton():
    from modelopt_sparse.kernels import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")


def test_lse_templates_never_hold_fake_tensors():
    """The lse's broadcast template is remembered per shape and device; under a fake mode (the
    traced forward that torch.compile runs with fake tensors, where Dynamo's is_compiling() is
    False) the lse must come from new_empty and leave nothing behind: a fake template made
    every later compile fail with "Mixing fake modes" (the H200 run of 148267f)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from modelopt_sparse.kernels.triton_attention import launch

    shape = (37, 3, 16)  # a shape no other test uses
    launch._LSE_TEMPLATES.clear()
    with FakeTensorMode():
        lse = launch._empty_lse(torch.empty(shape, dtype=torch.bfloat16))
    assert isinstance(lse, FakeTensor) and lse.shape == shape[:-1] and lse.dtype == torch.float32
    assert launch._LSE_TEMPLATES == {}
    q = torch.empty(shape, dtype=torch.bfloat16)
    lse = launch._empty_lse(q)
    assert type(lse) is torch.Tensor and lse.shape == shape[:-1] and lse.is_contiguous()
    assert lse.dtype == torch.float32 and len(launch._LSE_TEMPLATES) == 1
    assert launch._empty_lse(q).data_ptr() != lse.data_ptr()  # a new tensor each call
    with FakeTensorMode():
        assert isinstance(launch._empty_lse(torch.empty(shape, dtype=torch.bfloat16)), FakeTensor)


def test_autograd_call_allocates_out_and_lse_only_and_runs_from_the_launch_plan(monkeypatch):
    """One mts.attention call that autograd records (the host case: 16 tokens, 4 heads, D=64)
    dispatches out, lse and the detach that saving out costs, and launches from the same
    kind of plan as an inference call. It was 3 allocations (an empty row-statistics tensor
    too) through a 22-argument Function.apply with three outputs, a SparseParams rebuilt
    from scalars on every call: 2.8x SDPA's host time on the H200 (issue 14)."""
    _needs_triton()
    from modelopt_sparse.kernels import api
    from modelopt_sparse.kernels.triton_attention import ops

    tool = _host_cost_tool()
    seen = []
    launch = ops._forward_launch
    monkeypatch.setattr(ops, "_forward_launch", lambda *a, **kw: (seen.append(a[11]), launch(*a, **kw))[1])
    with tool.stub_forward_kernel() as stub:
        # Recorded: out, lse, and the detach that saving out for the backward costs.
        for grad, expected in ((False, ["aten.empty_like"]),
                               (True, ["aten.empty_like", "aten.empty_like", "aten.detach"])):
            call, (q, k, v) = tool.host_case(grad)
            with torch.set_grad_enabled(grad):
                call()
                call()  # the first launch goes the ordinary way and records the plan
                before = (stub.launches, stub.plan_launches())
                assert tool.aten_ops(call) == expected
                out = call()
            assert (stub.launches, stub.plan_launches()) == (before[0], before[1] + 2)
            assert out.requires_grad == grad
        # The node's tensor inputs: q, k and v (the metadata tensors travel in one tuple
        # argument with the scalars; the old node had 7 of its 22 arguments as tensor inputs).
        assert len(out.grad_fn.next_functions) == 3
    # The eager Function launched with the caller's params object, not a rebuilt one.
    params = api._PARAMS[(True, 0.125, 0, 4, 0, 64, "threshold", 0, 0.0)]
    assert len(seen) == 8 and all(p is params for p in seen)  # 4 calls under no_grad, 4 recorded


def test_autograd_node_saves_what_the_backward_reads(monkeypatch):
    """The backward gets q, k, v, out, the lse and the metadata as saved tensors, and the
    caller's scalars and params; it materialises no zero gradients for outputs that have
    none (the lse and statistics outputs of the old node cost two zero fills per backward)."""
    _needs_triton()
    from modelopt_sparse.kernels import api
    from modelopt_sparse.kernels.triton_attention import ops

    tool = _host_cost_tool()
    got = []

    def backward_launch(grad_out, q, k, v, out, lse, *rest):
        got.append((grad_out, q, k, v, out, lse, *rest))
        return torch.ones_like(q), torch.ones_like(k) * 2, torch.ones_like(v) * 3, q.new_empty(0)

    monkeypatch.setattr(ops, "_backward_launch", backward_launch)
    with tool.stub_forward_kernel():
        call, (q, k, v) = tool.host_case(True)
        out = call()
        node = out.grad_fn
        saved = node.saved_tensors
        assert len(saved) == 10 and saved[-1] is None
        assert all(a is b for a, b in zip(saved[:3], (q, k, v)))
        assert saved[3].shape == out.shape and saved[3].data_ptr() == out.data_ptr()
        lse = saved[4]
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
        assert [t.tolist() for t in saved[5:9]] == [[0], [16], [0], [16]]
        loss = out.float().sum()
        ops_run = tool.aten_ops(loss.backward)
    assert not {"aten.zeros", "aten.new_zeros", "aten.fill_", "aten.zero_"} & set(ops_run), ops_run
    (grad_out, gq, gk, gv, gout, glse, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, params,
     sinks) = got[0]
    assert (gq, gk, gv) == (q, k, v) and gout.data_ptr() == out.data_ptr() and glse.data_ptr() == lse.data_ptr()
    assert (max_q, max_k, q_covered, k_covered, sinks) == (16, 16, True, True, None)
    assert params is api._PARAMS[(True, 0.125, 0, 4, 0, 64, "threshold", 0, 0.0)]
    assert grad_out.shape == out.shape
    assert [t.grad.float().unique().tolist() for t in (q, k, v)] == [[1.0], [2.0], [3.0]]


def test_autograd_path_keeps_its_errors_and_checks():
    """What the 22-argument Function.apply did besides launching: under a functorch transform
    it raises torch's message, and metadata written in place after the forward fails the
    backward's version check."""
    _needs_triton()
    tool = _host_cost_tool()
    with tool.stub_forward_kernel():
        call, (q, k, v) = tool.host_case(True)
        with pytest.raises(RuntimeError, match="must override the setup_context staticmethod"):
            torch.func.grad(lambda x: mts.attention(x, k, v, *call.metadata, 16, backend="triton").float().sum())(
                q.detach())
        lens = call.metadata[1].clone()
        out = mts.attention(q, k, v, call.metadata[0], lens, 16, backend="triton", check_metadata=False)
        lens.add_(0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.float().sum().backward()


def test_params_reach_the_eager_function_as_plain_fields():
    """The custom ops pass params as bool/float/int/str scalars; the eager Function takes the
    params object itself when its fields are of those exact types, else a plain copy."""
    import enum

    from modelopt_sparse.kernels.reference import SparseParams
    from modelopt_sparse.kernels.triton_attention.ops import _plain_params

    class N(enum.IntEnum):
        TWO = 2

    plain = SparseParams(True, 0.125, 2, 4, 0, 64, "threshold")
    assert _plain_params(plain) is plain and _plain_params(plain) is plain
    odd = SparseParams(True, 0.125, N.TWO, 4, 0, 64, "threshold")
    got = _plain_params(odd)
    assert got == plain and got is not odd and type(got.sparsity_n) is int
    assert _plain_params(odd) is got


def test_env_value_reads_what_os_environ_holds(monkeypatch):
    """The cheap environment read agrees with os.environ: after a set, a delete, an empty
    value, and when os.environ is replaced by another mapping altogether."""
    import os

    from modelopt_sparse.kernels.switches import env_flag, env_value

    name = "MODELOPT_SPARSE_TEST_ENV_VALUE"
    monkeypatch.delenv(name, raising=False)
    assert env_value(name) == "" and env_value(name, "x") == "x" and env_flag(name, True) is True
    monkeypatch.setenv(name, "0")
    assert env_value(name) == "0" and env_flag(name, True) is False
    monkeypatch.setenv(name, " 1 ")
    assert env_flag(name, False) is True
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=name):
        env_flag(name, False)
    monkeypatch.delenv(name)
    assert env_value(name, "d") == "d"
    monkeypatch.setattr(os, "environ", {name: "1"})
    assert env_value(name) == "1" and env_flag(name, False) is True


# --------------------------------------------------------------------------------------
# The hot path of attention(): a call like one validated before skips the checks.
# --------------------------------------------------------------------------------------
def _counting_checks(monkeypatch):
    """Counts calls of the argument checks that a hot-path hit skips."""
    from modelopt_sparse.kernels import api

    counts = {"tensors": 0, "metadata": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(api, "_check_tensors", counted("tensors", api._check_tensors))
    monkeypatch.setattr(api, "_check_metadata", counted("metadata", api._check_metadata))
    return counts


def test_hot_path_skips_the_checks_and_gives_the_same_output(monkeypatch):
    """The second identical call skips the checks and returns the first call's output bit
    for bit (interpreted kernel, packed GQA, 2:4); new metadata tensors, or the same ones
    written in place, are checked again."""
    _needs_triton()
    from modelopt_sparse.kernels import api

    api._PREPARED.clear()
    counts = _counting_checks(monkeypatch)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(24, 4, 16, generator=g)
    k, v = (torch.randn(24, 2, 16, generator=g) for _ in range(2))
    starts, lens = torch.tensor([0, 10], dtype=torch.int32), torch.tensor([10, 14], dtype=torch.int32)
    kw = dict(sparsity_n=2, sparsity_m=4, dense_window_size=2, backend="triton")
    first = mts.attention(q, k, v, starts, lens, 14, **kw)
    assert counts == {"tensors": 1, "metadata": 1}
    second = mts.attention(q, k, v, starts, lens, 14, **kw)
    assert counts == {"tensors": 1, "metadata": 1}
    assert torch.equal(first, second)
    mts.attention(q, k, v, starts.clone(), lens, 14, **kw)  # another tensor object: checked
    assert counts == {"tensors": 2, "metadata": 2}
    lens.add_(0)  # a write bumps the version: checked again
    mts.attention(q, k, v, starts, lens, 14, **kw)
    assert counts == {"tensors": 3, "metadata": 3}
    mts.attention(q, k, v, starts, lens, 14, **kw)
    assert counts == {"tensors": 3, "metadata": 3}
    reference = mts.attention(q, k, v, starts, lens, 14, **{**kw, "backend": "torch"})  # never remembered
    mts.attention(q, k, v, starts, lens, 14, **{**kw, "backend": "torch"})
    assert counts == {"tensors": 5, "metadata": 5}
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, error, match", [
    ({"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ({"sparsity_n": 2.0}, TypeError, "sparsity_n"),
    ({"softmax_scale": True}, TypeError, "softmax_scale must be a float"),
    ({"check_metadata": 1}, TypeError, "check_metadata must be a bool"),
    ({"max_input_len": 9}, ValueError, "exceeds max_input_len=9"),
    ({"return_stats": 1}, TypeError, "return_stats must be a bool"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_hot_path_keeps_every_error(change, error, match):
    """After a call has taken the hot path, a call that differs in one argument's value or
    type (True vs 1, 2 vs 2.0 hash alike) raises the same error as on a fresh start."""
    _needs_triton()
    q, k, v = (torch.randn(16, 2, 16) for _ in range(3))
    starts, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    kw = dict(max_input_len=16, is_causal=True, sparsity_n=2, sparsity_m=4, softmax_scale=0.25,
              check_metadata=True, return_stats=False, backend="triton")
    for _ in range(2):
        mts.attention(q, k, v, starts, lens, **kw)
    with pytest.raises(error, match=match):
        mts.attention(q, k, v, starts, lens, **{**kw, **change})


def test_hot_path_rechecks_metadata_written_in_place_and_tensors_that_differ():
    """Lengths made invalid in place, and k of another dtype or device than q, raise after
    a hot-path hit as they do before one."""
    _needs_triton()
    q, k, v = (torch.randn(16, 2, 16) for _ in range(3))
    starts, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    for _ in range(2):
        mts.attention(q, k, v, starts, lens, 16, backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        mts.attention(q, k.double(), v, starts, lens, 16, backend="triton")
    with pytest.raises(ValueError, match="one device"):
        mts.attention(q, k.to("meta"), v, starts, lens, 16, backend="triton")
    lens.fill_(17)  # the very call remembered above, but its lengths now run past the rows
    with pytest.raises(ValueError, match="exceed the 16 packed rows"):
        mts.attention(q, k, v, starts, lens, 16, backend="triton")


def test_hot_path_stays_off_under_autocast_and_for_the_reference():
    """Autocast casts the inputs first (so the checks run), and the reference backend is
    never remembered (it reads host-side sequence bounds)."""
    from modelopt_sparse.kernels import api

    api._PREPARED.clear()
    q, k, v = (torch.randn(16, 2, 16) for _ in range(3))
    starts, lens = torch.tensor([0], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    mts.attention(q, k, v, starts, lens, 16, backend="torch")
    assert not api._PREPARED._entries
    if api.interpreting():
        mts.attention(q, k, v, starts, lens, 16, backend="triton")
        assert len(api._PREPARED._entries) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mts.attention(q, k, v, starts, lens, 16, backend="triton")
        assert out.dtype == torch.bfloat16 and len(api._PREPARED._entries) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hot_path_never_keeps_a_large_auto_call_off_the_hopper_engine(monkeypatch):
    """A call large enough for the Hopper engine that MODELOPT_SPARSE_HOPPER=0 sent to Triton
    is not remembered: without the switch the next identical call goes to the engine."""
    from modelopt_sparse.kernels import api

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    q, k, v = (torch.randn(2048, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    starts = torch.zeros(1, dtype=torch.int32, device="cuda")
    lens = torch.full((1,), 2048, dtype=torch.int32, device="cuda")
    from modelopt_sparse.kernels.reference import SparseParams

    if api._hopper_engine().unsupported_reason(q, k, v, SparseParams(True, 0.1, 0, 4, 0, 64, "threshold")):
        pytest.skip("the Hopper engine cannot run here")
    engine_calls = []
    real = api._hopper_engine().hopper_attention
    monkeypatch.setattr(api._hopper_engine(), "hopper_attention",
                        lambda *a, **kw: (engine_calls.append(1), real(*a, **kw))[1])
    monkeypatch.setenv("MODELOPT_SPARSE_HOPPER", "0")
    off = mts.attention(q, k, v, starts, lens, 2048)
    assert engine_calls == []
    monkeypatch.delenv("MODELOPT_SPARSE_HOPPER")
    on = mts.attention(q, k, v, starts, lens, 2048)
    assert engine_calls == [1]
    torch.testing.assert_close(on, off, rtol=2e-2, atol=2e-2)
