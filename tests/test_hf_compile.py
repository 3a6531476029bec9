"""A sparsified model under ``torch.compile`` gives the eager model's logits, in one graph.

The attention and mask functions read no device value on the host, so
``torch.compile(model, fullgraph=True)`` traces a whole prefill (no mask, a padded mask,
packed ``cu_seq_lens``) with zero graph breaks, counted by ``torch._dynamo.explain``. On
CPU the reference backend (one custom op) and the interpreted Triton kernels run; on CUDA
(gpu-marked) the compiled kernels, CUDA graphs (``mode="reduce-overhead"``) and the
static-cache ``generate()`` fast path.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelopt_sparse as mts
from modelopt_sparse.kernels import interpreting

from .hf_tiny import logits, sparse_cfg, tiny_model, token_ids


def _check(device, backend, dtype, atol):
    torch._dynamo.reset()
    base = tiny_model("llama", dtype=dtype).to(device)
    model = mts.sparsify(copy.deepcopy(base), sparse_cfg(2, 4, sinks=1, window=4, backend=backend))
    ids = token_ids(2, 40).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    want = logits(model, ids, attention_mask=mask)
    compiled = torch.compile(model)
    got = logits(compiled, ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=atol, rtol=0)
    dense = logits(base, ids, attention_mask=mask)
    assert (got[mask.bool()] - dense[mask.bool()]).abs().max() > 10 * atol  # sparsity really applied


_PACKED = torch.tensor([0, 30, 80], dtype=torch.int32)
# (input shape, forward kwargs): what a user compiles for prefill.
_PREFILL_CASES = {
    "no_mask": ((2, 40), {}),
    "padded": ((2, 40), {"attention_mask": "left_padded"}),
    "packed": ((1, 80), {"cu_seq_lens_q": _PACKED, "cu_seq_lens_k": _PACKED, "max_length_q": 50, "max_length_k": 50,
                         "use_cache": False}),
}


def _prefill_inputs(case, device):
    shape, kwargs = _PREFILL_CASES[case]
    ids = token_ids(2, 40).reshape(shape).to(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if kwargs.get("attention_mask") == "left_padded":
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        kwargs["attention_mask"] = mask
    return ids, kwargs


def _check_fullgraph(device, backend, dtype, atol, case):
    torch._dynamo.reset()
    base = tiny_model("llama", dtype=dtype).to(device)
    model = mts.sparsify(copy.deepcopy(base), sparse_cfg(2, 4, sinks=1, window=4, backend=backend))
    ids, kwargs = _prefill_inputs(case, device)
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, **kwargs).logits)()
    assert explained.graph_break_count == 0, [str(r.reason)[:500] for r in explained.break_reasons]
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids, **kwargs).logits
    real = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], atol=atol, rtol=0)
    with torch.no_grad():
        dense = base(input_ids=ids, **{k: v for k, v in kwargs.items() if k == "attention_mask"}).logits
    if case != "packed":  # sparsity really applied
        assert (got[real] - dense[real]).abs().max() > 10 * atol


@pytest.mark.parametrize("case", list(_PREFILL_CASES))
def test_fullgraph_prefill_has_no_graph_break_on_cpu(case):
    _check_fullgraph("cpu", "torch", torch.float32, 1e-4, case)


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="CPU with TRITON_INTERPRET=1")
def test_fullgraph_prefill_interpreted_triton():
    _check_fullgraph("cpu", "triton", torch.float32, 1e-3, "padded")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(_PREFILL_CASES))
def test_fullgraph_prefill_has_no_graph_break_triton(case):
    _check_fullgraph("cuda", "triton", torch.float32, 1e-3, case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["no_mask", "padded"])
def test_cuda_graphs_give_the_eager_logits(case):
    """mode="reduce-overhead" captures the compiled forward in CUDA graphs: nothing on the
    attention path may read the device back or allocate outside the graph pool."""
    torch._dynamo.reset()
    # float32: in bf16 Inductor's fused norms round differently from eager, and with this
    # tiny model's peaked scores that flips N:M choices (a real but uninteresting change).
    model = mts.sparsify(tiny_model("llama", dtype=torch.float32).cuda(), sparse_cfg(2, 4, sinks=1, window=4))
    # With the default cache: without one and without a mask, transformers looks for packing
    # in position_ids and hands over a 4-D mask, whose path reads the device.
    ids, kwargs = _prefill_inputs(case, "cuda")
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits.float()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # record, then replay
            got = compiled(input_ids=ids, **kwargs).logits.float().clone()
    real = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], atol=1e-3, rtol=0)


def _greedy(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def _assert_static_compiled_generate_matches_eager(model, device):
    """Greedy tokens of a left-padded batch: eager generate() against a static cache with a
    compiled forward (transformers' documented fast path)."""
    ids = token_ids(2, 24).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = _greedy(model, ids, mask)
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, fullgraph=True)
    got = _greedy(model, ids, mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_static_cache_compiled_generate_matches_eager(device):
    """transformers' documented fast path: a static cache and a compiled forward. Prefill runs
    sparse, decode steps dense through SDPA; the tokens equal eager generate()'s."""
    torch._dynamo.reset()
    dtype = torch.float32
    model = mts.sparsify(tiny_model("llama", dtype=dtype).to(device), sparse_cfg(2, 4, sinks=1, window=4,
                                                                               backend="auto"))
    _assert_static_compiled_generate_matches_eager(model, device)


def test_compiled_sparsified_model_matches_eager_on_cpu():
    _check("cpu", "torch", torch.float32, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(), reason="CPU with TRITON_INTERPRET=1")
def test_compiled_sparsified_model_matches_eager_interpreted_triton():
    """The Triton kernels sit behind torch.library custom ops, so torch.compile treats them
    as one opaque call; on CPU the interpreter then runs them inside a compiled model."""
    _check("cpu", "triton", torch.float32, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_sparsified_model_matches_eager_triton():
    _check("cuda", "triton", torch.float32, atol=1e-3)


_INDUCTOR_SOURCE_CHECK = r"""
import builtins, dis, importlib.util, pathlib, sys
import triton
from torch._inductor.codegen.wrapper import (
    user_defined_triton_kernel_transitive_closure_source_code as kernel_source,
)
import pkgutil
from modelopt_sparse.kernels import triton_attention as ta
from modelopt_sparse.kernels.triton_attention import backward, forward

# Every JIT function of the package, each once (modules import their helpers by name).
modules = [importlib.import_module(f"{ta.__name__}.{m.name}") for m in pkgutil.iter_modules(ta.__path__)]
kernels = list({id(v): v for mod in modules for v in vars(mod).values() if isinstance(v, triton.JITFunction)}.values())
assert len(kernels) > 10, kernels
out = pathlib.Path(sys.argv[1])
for kernel in kernels:
    path = out / f"{kernel.fn.__name__}_inductor.py"
    path.write_text("import triton\nimport triton.language as tl\n" + kernel_source(kernel))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, fn in vars(module).items():
        if isinstance(fn, triton.JITFunction):
            for ins in dis.Bytecode(fn.fn):
                if ins.opname == "LOAD_GLOBAL":
                    assert ins.argval in vars(module) or hasattr(builtins, ins.argval), (name, ins.argval)

# Inductor launches with Python floats typed fp64 and ints typed i64 (a plain launch: fp32,
# i32). Compile the three attention kernels for sm_90 with those types: no GPU needed.
import inspect
from triton.backends.compiler import GPUTarget

launched = [(forward._attn_fwd, dict(WITH_STATS=False)), (backward._attn_bwd_dkdv, dict(TMA=False)),
            (backward._attn_bwd_dq, {})]
for kernel, extra in launched:
    consts = dict(GROUPS=1, HEAD_DIM=64, BLOCK_D=64, IS_CAUSAL=True, SPARSITY_N=2, SPARSITY_M=4,
                  TIE_INDEX=False, HAS_WINDOW=False, SOFTCAP=False, UPCAST=False, DOT_PRECISION="tf32",
                  BLOCK_M=64, BLOCK_N=64, **extra)
    names = list(inspect.signature(kernel.fn).parameters)
    def arg_type(name):
        if name in consts:
            return "constexpr"
        if name in ("Q_START", "Q_LEN", "K_START", "K_LEN"):
            return "*i32"
        if name in ("LSE", "STATS", "DELTA"):
            return "*fp32"
        if name.isupper():
            return "*bf16"
        return "fp64" if name.endswith("scale") else "i64"
    source = triton.compiler.ASTSource(
        fn=kernel, signature={name: arg_type(name) for name in names},
        constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
print("checked", len(kernels))
"""


def test_inductor_can_regenerate_and_launch_the_kernels(tmp_path):
    """Our kernels reach torch.compile only behind custom ops, but a user Triton kernel that
    Dynamo does trace is rebuilt by Inductor from its source plus the globals it reads
    (constexprs re-emitted with repr()) and launched with fp64 float scalars, and both
    broke the compiled GPU path once, before the custom ops: a global
    tl.constexpr(float("-inf")) came back as the undefined name ``inf``, and an fp64
    ``qk_scale`` turned the forward's running max into fp64. Rebuild every kernel that way
    and check each name it loads resolves, then compile the kernels for sm_90 with
    Inductor's argument types. A subprocess, because under TRITON_INTERPRET the kernels are
    not JITFunctions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _INDUCTOR_SOURCE_CHECK, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_mask", "padded"])
def test_fullgraph_prefill_of_a_sliding_window_model_on_cpu(case):
    """Compiled code cannot read the mask function's closures, so it recognizes
    transformers' sliding-window mask from the call's arguments: still one graph, and the
    eager model's logits (window included)."""
    torch._dynamo.reset()
    model = mts.sparsify(tiny_model("mistral", dtype=torch.float32, sliding_window=8),
                         sparse_cfg(2, 4, sinks=1, window=4, backend="torch"))
    ids, kwargs = _prefill_inputs(case, "cpu")
    explained = torch._dynamo.explain(lambda: model(input_ids=ids, **kwargs).logits)()
    assert explained.graph_break_count == 0, [str(r.reason)[:500] for r in explained.break_reasons]
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids, **kwargs).logits
    real = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_static_cache_compiled_generate_of_a_sliding_window_model(device):
    """The same fast path with a window shorter than the prompt: the static cache's sliding
    layers are rolling buffers, whose precomputed masks come back through the compiled mask
    call in the buffer's slot space; decode steps are dense within the window."""
    torch._dynamo.reset()
    model = mts.sparsify(tiny_model("mistral", dtype=torch.float32, sliding_window=8).to(device),
                         sparse_cfg(2, 4, sinks=1, window=4, backend="auto"))
    _assert_static_compiled_generate_matches_eager(model, device)


def _check_fullgraph_position_ids(device, backend, atol):
    """A prefill without a cache and without a mask: transformers then looks for packing in
    position_ids and hands over a 4-D mask, and the sequences come from position_ids. How many
    there are is data, so one graph needs Dynamo's capture_dynamic_output_shape_ops (docs/api.md);
    with it, no graph break and the eager logits, packed or not."""
    torch._dynamo.reset()
    model = mts.sparsify(tiny_model("llama", dtype=torch.float32).to(device),
                         sparse_cfg(2, 4, sinks=1, window=4, backend=backend))
    ids = token_ids(2, 40).to(device)
    packed = torch.cat([torch.arange(15), torch.arange(25)]).view(1, 40).expand(2, 40).to(device)
    for kwargs in ({"use_cache": False}, {"use_cache": False, "position_ids": packed}):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            explained = torch._dynamo.explain(lambda: model(input_ids=ids, **kwargs).logits)()
            assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
            torch._dynamo.reset()
            with torch.no_grad():
                want = model(input_ids=ids, **kwargs).logits
                got = torch.compile(model, fullgraph=True)(input_ids=ids, **kwargs).logits
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    # The packed call really is two sequences: the second one's logits do not depend on the first.
    with torch.no_grad():
        alone = model(input_ids=ids[:, 15:], use_cache=False).logits
    torch.testing.assert_close(want[:, 15:], alone, atol=atol, rtol=0)
    # A compiled training step (what a Trainer with torch_compile runs): the eager gradients.
    torch._dynamo.reset()
    model.train()
    grads = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            run(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=atol, rtol=1e-3)
    torch._dynamo.reset()


def test_fullgraph_prefill_without_cache_or_mask_on_cpu():
    _check_fullgraph_position_ids("cpu", "torch", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fullgraph_prefill_without_cache_or_mask_triton():
    _check_fullgraph_position_ids("cuda", "triton", 1e-3)


def _two_rows_one_packed(device):
    """Position ids of two rows of 40 tokens: row 0 one sequence, row 1 two (15 + 25)."""
    return torch.stack([torch.arange(40), torch.cat([torch.arange(15), torch.arange(25)])]).to(device)


def test_static_shapes_without_the_dynamo_switch_cost_no_host_read():
    """Without capture_dynamic_output_shape_ops a compiled prefill without a mask or a cache
    reads each row as one sequence (no op of data-dependent size: transformers hands over its
    packed-sequence mask whether or not position_ids pack anything): one graph, the eager
    logits for unpacked rows, and NaN for a row whose position_ids restart (packing only
    cu_seq_lens_q/k can express there), never a silent attention across its sequences."""
    from modelopt_sparse.hf_attention import layouts

    torch._dynamo.reset()
    model = mts.sparsify(tiny_model("llama", dtype=torch.float32), sparse_cfg(2, 4, sinks=1, window=4, backend="torch"))
    ids = token_ids(2, 40)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        mixed_eager = model(input_ids=ids, use_cache=False, position_ids=_two_rows_one_packed("cpu")).logits
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    for position_ids in (None, _two_rows_one_packed("cpu")):
        kwargs = {"use_cache": False} if position_ids is None else {"use_cache": False, "position_ids": position_ids}
        explained = torch._dynamo.explain(lambda: model(input_ids=ids, **kwargs).logits)()
        assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert not any("sequence_starts" in op for op in ops), ops
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(model, fullgraph=True)(input_ids=ids, **kwargs).logits
        torch._dynamo.reset()
        if position_ids is None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(got[0], mixed_eager[0], atol=1e-4, rtol=0)  # the unpacked row
            assert got[1].isnan().all() and not mixed_eager[1].isnan().any()
    # A CUDA-graph capture is the same case in eager code (emulated: the capture flag forced).
    original = layouts._capturing
    try:
        layouts._capturing = lambda device: True
        with torch.no_grad():
            captured = model(input_ids=ids, use_cache=False, position_ids=_two_rows_one_packed("cpu")).logits
    finally:
        layouts._capturing = original
    torch.testing.assert_close(captured[0], mixed_eager[0], atol=1e-4, rtol=0)
    assert captured[1].isnan().all()
