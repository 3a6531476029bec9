"""What each implementation of the kernel benchmark runs: inputs and the call to time.

Ours is ``modelopt_sparse.kernels.attention`` on one varlen-packed sequence; the peers are
PyTorch SDPA pinned to one backend, compiled FlexAttention and FlashAttention-4 (its CuTe DSL
kernel, ``flash_attn.cute``, when installed). Each ``prepare_*`` returns a
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


# Compute capability majors FlashAttention-4 (flash-attn-4 4.0.0b36, flash_attn/cute/interface.py)
# accepts: _flash_attn_fwd asserts ``arch // 10 in [8, 9, 10, 11, 12]`` and _flash_attn_bwd
# ``arch // 10 in [9, 10, 11, 12]``. Its tuned kernels are sm_90 (Hopper) and sm_100 (Blackwell);
# sm_8x and sm_12x run a simpler forward.
FA4_FWD_MAJORS = (8, 9, 10, 11, 12)
FA4_BWD_MAJORS = (9, 10, 11, 12)
FA4_NOT_INSTALLED = "FlashAttention-4 is not installed (pip install flash-attn-4)"


def fa4_device_reason(device, mode: str) -> str | None:
    """Why FlashAttention-4 cannot run ``mode`` on ``device`` (None when it can): it is CUDA-only
    and checks the compute capability. Checked before the import, so that a GPU it does not
    support is not told to install it."""
    if device.type != "cuda":
        return f"FlashAttention-4 needs CUDA (device is {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FA4_FWD_MAJORS:
        return (f"FlashAttention-4 does not support compute capability {major}.{minor} (sm_{major}{minor}); "
                "it runs on 8.x-12.x, tuned for sm_90 and sm_100")
    if mode == "fwdbwd" and major not in FA4_BWD_MAJORS:
        return (f"FlashAttention-4's backward does not support compute capability {major}.{minor} "
                f"(sm_{major}{minor}); it needs 9.x-12.x")
    return None


def import_fa4() -> Callable:
    """``flash_attn.cute.flash_attn_func``, or :class:`Unsupported` saying why not: not installed,
    or installed but broken (a missing dependency, a CUDA library that does not load)."""
    try:
        from flash_attn.cute import flash_attn_func
    except ModuleNotFoundError as exc:
        if exc.name in ("flash_attn", "flash_attn.cute"):  # (flash_attn alone is FlashAttention-2)
            raise Unsupported(FA4_NOT_INSTALLED) from None
        raise Unsupported(f"FlashAttention-4 cannot be imported: {short(exc)}") from None
    except Exception as exc:  # a broken install must not stop the run
        raise Unsupported(f"FlashAttention-4 cannot be imported: {short(exc)}") from None
    return flash_attn_func


def prepare_fa4(case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    reason = fa4_device_reason(device, case.mode)
    if reason:
        raise Unsupported(reason)
    flash_attn_func = import_fa4()
    train = case.mode == "fwdbwd"
    s, d = case.seq_len, case.head_dim
    # FA4's layout is (batch, seqlen, heads, head_dim); GQA is K/V with fewer heads.
    q = randn((1, s, case.heads, d), device, dtype, train)
    k = randn((1, s, case.kv_heads, d), device, dtype, train)
    v = randn((1, s, case.kv_heads, d), device, dtype, train)
    window = cfg.sliding_window
    # FA4 (as FlashAttention-2) lets query i see the keys j with i - left <= j <= i + right
    # (equal lengths; flash_attn/cute/mask.py masks j < i - window_size_left and
    # j > i + window_size_right). Our rule drops a key when i - j >= window, i.e. keeps
    # i - j <= window - 1: left = window - 1, and right = 0 is causal (which
    # _resolve_causal_local_window sets for causal=True anyway). No window: (None, None).
    window_size = (window - 1, 0) if window else (None, None)
    # Keywords only: flash_attn_func's 4th and 5th positional parameters are qv and
    # gather_kv_indices in 4.0.0b36.
    kwargs = dict(causal=case.causal, window_size=window_size)

    def forward():
        out = flash_attn_func(q, k, v, **kwargs)
        # 4.0.0b36 returns (out, lse), lse None unless return_lse; older builds returned out alone.
        return out[0] if isinstance(out, (tuple, list)) else out

    def context():
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    prep = with_backward(forward, (q, k, v), train, context=context)
    # One call before timing: it compiles the CuTe DSL kernels (forward, and backward when
    # training), and a kernel FA4 has not for this GPU or shape (its backward, a head dim)
    # becomes an n/a row with FA4's own short reason.
    try:
        with context(), (contextlib.nullcontext() if train else torch.no_grad()):
            prep.fn()
    except Exception as exc:
        raise Unsupported(f"FlashAttention-4 {'forward+backward' if train else 'forward'} failed here: "
                          f"{short(exc)}") from None
    for t in prep.grads:
        t.grad = None
    return prep


def prepare(impl: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    if impl in OUR_VARIANTS:
        return prepare_ours(impl, case, cfg, device, dtype)
    if impl == "flex":
        return prepare_flex(case, cfg, device, dtype)
    if impl == "fa4":
        return prepare_fa4(case, cfg, device, dtype)
    return prepare_sdpa(impl, case, cfg, device, dtype)
