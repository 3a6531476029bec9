"""What each implementation of the kernel benchmark runs: inputs and the call to time.

Ours is ``modelopt_sparse.kernels.attention`` on one varlen-packed sequence; the peers are
PyTorch SDPA pinned to one backend and compiled FlexAttention. Each ``prepare_*`` returns a
:class:`Prepared` (the callable, the leaves whose gradients are reset between calls, and a
context to run it in) or raises :class:`~.errors.Unsupported`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cases import OUR_VARIANTS, BenchConfig, Case
from .errors import Unsupported, short


@dataclass
class Prepared:
    fn: Callable[[], object]
    grads: list = field(default_factory=list)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str | None = None


def randn(shape, device, dtype, requires_grad: bool) -> torch.Tensor:
    # Random, never zeros: zeros make tensor cores (and the N:M selection) unrealistically fast.
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def with_backward(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], train: bool,
                  **kw) -> Prepared:
    if not train:
        return Prepared(fn=forward, **kw)
    # Every output here has the shape of q (leaves[0]).
    grad_out = torch.randn_like(leaves[0], requires_grad=False)

    def fwd_bwd():
        forward().backward(grad_out)

    return Prepared(fn=fwd_bwd, grads=list(leaves), **kw)


def prepare_ours(variant: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    from modelopt_sparse.kernels import attention

    train = case.mode == "fwdbwd"
    s, d = case.seq_len, case.head_dim
    q = randn((s, case.heads, d), device, dtype, train)
    k = randn((s, case.kv_heads, d), device, dtype, train)
    v = randn((s, case.kv_heads, d), device, dtype, train)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    seq_len = torch.full((1,), s, dtype=torch.int32, device=device)
    kwargs = dict(
        OUR_VARIANTS[variant],
        num_sink_tokens=cfg.num_sink_tokens,
        dense_window_size=cfg.dense_window_size,
        sliding_window=cfg.sliding_window or None,
        backend=cfg.backend,
    )

    def forward():
        return attention(q, k, v, start, seq_len, s, is_causal=case.causal, **kwargs)

    return with_backward(forward, (q, k, v), train)


def _peer_inputs(case: Case, device, dtype, train: bool):
    s, d = case.seq_len, case.head_dim
    return (
        randn((1, case.heads, s, d), device, dtype, train),
        randn((1, case.kv_heads, s, d), device, dtype, train),
        randn((1, case.kv_heads, s, d), device, dtype, train),
    )


def prepare_sdpa(name: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[name]
    if cfg.sliding_window:
        raise Unsupported(f"{name} has no sliding window (the window would need a dense mask)")
    if name != "sdpa-math" and device.type != "cuda":
        raise Unsupported(f"{name} needs CUDA (device is {device})")
    train = case.mode == "fwdbwd"
    q, k, v = _peer_inputs(case, device, dtype, train)
    gqa = case.kv_heads != case.heads
    note = None

    def context():
        return sdpa_kernel(backend)

    def run(k_, v_, **extra):
        return F.scaled_dot_product_attention(q, k_, v_, is_causal=case.causal, **extra)

    if gqa:
        try:
            with context(), torch.no_grad():
                run(k, v, enable_gqa=True)
        except Exception as exc:  # this backend has no native GQA: give it full-size K/V
            groups = case.heads // case.kv_heads
            k = k.detach().repeat_interleave(groups, dim=1).requires_grad_(train)
            v = v.detach().repeat_interleave(groups, dim=1).requires_grad_(train)
            note = f"K/V expanded to {case.heads} heads; native GQA failed: {short(exc)}"
            gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    leaves = (q, k, v)
    return with_backward(lambda: run(leaves[1], leaves[2], **extra), leaves, train,
                         context=context, note=note)


def prepare_flex(case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    if device.type != "cuda":
        raise Unsupported("FlexAttention is benchmarked on CUDA only")
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per configuration: otherwise the second shape turns on dynamic shapes
    # and later ones can hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True, mode=cfg.flex_compile_mode)
    train = case.mode == "fwdbwd"
    q, k, v = _peer_inputs(case, device, dtype, train)
    block_mask = None
    if case.causal:
        window = cfg.sliding_window

        def causal_mask(b, h, q_idx, kv_idx):
            allowed = q_idx >= kv_idx
            if window:  # our rule: a key is disallowed when q_idx - kv_idx >= window
                allowed = allowed & (q_idx - kv_idx < window)
            return allowed

        block_mask = create_block_mask(
            causal_mask, B=None, H=None, Q_LEN=case.seq_len, KV_LEN=case.seq_len, device=device
        )
    extra = {"enable_gqa": True} if case.kv_heads != case.heads else {}

    def forward():
        return compiled(q, k, v, block_mask=block_mask, **extra)

    return with_backward(forward, (q, k, v), train)


def prepare(impl: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    if impl in OUR_VARIANTS:
        return prepare_ours(impl, case, cfg, device, dtype)
    if impl == "flex":
        return prepare_flex(case, cfg, device, dtype)
    return prepare_sdpa(impl, case, cfg, device, dtype)
