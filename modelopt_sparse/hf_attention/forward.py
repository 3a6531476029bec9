"""The attention-interface function, and its checks of what transformers passes.

The attention function runs prefill through the module's method on the padded rows in
place (each row's real tokens are one sequence of the varlen layout: no gather, and padded
query rows come out as zeros), and decode steps (one query per row, which the rule keeps
dense) through the fused decode kernel on the Triton backend (on CUDA, or interpreted on the
CPU) and PyTorch's SDPA otherwise. Off the Triton backend, a decode step of a module with a
window, a soft cap or learned sinks (which SDPA cannot take) runs through the module's
method like a prefill: the kernel keeps a single query dense.

Logit soft-capping (``softcap=``) and learned sinks (``s_aux=``, one extra logit per head)
are passed to the kernel as they come; they change nothing in the layout.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

import torch

from .. import lazy_checks
from ..kernels.api import interpreting
from ..kernels.semantics import selection_applies
from .layouts import _as_codes, _cached, _cross_layout, _layout
from .masks import _FIRST_QUERY_CODE, _outside_inference_mode, codes_from_key_codes, is_key_codes

# The name transformers selects both functions by (attn_implementation=...); the package
# registers them under it.
ATTN_IMPLEMENTATION = "modelopt_sparse"

# Set on a converted module for the duration of a cross-attention call (by the forward that
# conversion gives classes that serve as self- and cross-attention, BART's and Whisper's).
CROSS_CALL_ATTR = "_mts_cross_call"

# kwargs that transformers passes and that do not change the attention math.
# (MoE models forward their output_router_logits flag down to the attention call.)
_HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "layer_idx", "output_router_logits",
                              "output_hidden_states"})
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The module's own attention features, passed on to the kernel (see _features).
_FEATURE_KWARGS = ("sliding_window", "softcap", "s_aux")
# kwargs that _reject_unsupported refuses when set (harmless when None / False).
# indices / block_indices select keys for DeepSeek-style sparse attention (DSA).
_REFUSED_KWARGS = ("position_bias", "head_mask", "output_attentions", "indices", "block_indices")
_ACCEPTED_KWARGS = _HARMLESS_KWARGS | frozenset(_PACKING_KWARGS) | frozenset(_FEATURE_KWARGS)


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    Args:
        module: a module converted by :func:`modelopt_sparse.sparsify`.
        query: ``[B, Hq, S, D]``; key, value: ``[B, Hkv, Skv, D]`` (not repeated for GQA).
        attention_mask: what :func:`.masks.sparse_attention_mask` produced (or ``None``); a 2-D bool
            or 0/1 padding mask ``[B, L]`` (queries the last ``S`` of ``L <= Skv`` slots) works too.
        scaling: softmax scale (default ``1/sqrt(D)``).
        dropout: must be 0.
        **kwargs: ``cu_seq_lens_q/k`` and ``max_length_q/k`` for packed sequences;
            ``position_ids``; the module's ``sliding_window``, ``softcap`` and ``s_aux``
            (learned sinks), passed on to the kernel; unsupported features raise (see
            :func:`_reject_unsupported`).

    Returns:
        ``([B, S, Hq, D], None)``; padded query rows are zero.
    """
    state = getattr(module, "_mts_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} but was not "
            "converted: call modelopt_sparse.sparsify (or restore) on the model first"
        )
    # True / False inside a call of a class that also serves as cross-attention; None otherwise.
    # (The instance dict: a missing attribute through nn.Module.__getattr__ costs ~1 us a layer.)
    cross = vars(module).get(CROSS_CALL_ATTR)
    is_causal = _resolve_is_causal(module, kwargs.pop("is_causal", None), decoder_self=cross is False)
    _reject_unsupported(module, dropout, kwargs)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"modelopt_sparse: expected 4-D query/key/value [batch, heads, seq, head_dim], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    features = _features(module, kwargs, is_causal, query)
    if features.sliding_window is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        _check_contiguous_tokens(module, attention_mask, query, key)
    batch, _, q_len, _ = query.shape
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"modelopt_sparse: key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match "
            f"query {tuple(query.shape)}"
        )
    stats_sink = getattr(module, "_mts_stats", None)
    if stats_sink is not None and not isinstance(stats_sink, list):
        raise TypeError(f"{state.name}._mts_stats must be a list or None, got {type(stats_sink).__name__}")
    lazy_checks.raise_failed()
    if cross:
        return _cross_attention(module, state, query, key, value, attention_mask, scaling, is_causal, features,
                                stats_sink, kwargs), None
    if is_key_codes(attention_mask):  # a bidirectional call with fewer queries than keys, not cross-attention
        attention_mask = _self_codes(module, attention_mask, q_len, key.shape[2])
    packed = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    if (not selection_applies(1, q_len) and stats_sink is None and not packed
            and _is_padding_or_none(attention_mask)):
        # One query per row: the rule keeps every key (the decode guard), whatever the pattern.
        # The fused decode kernel on CUDA, or interpreted on the CPU when the Triton backend
        # was asked for there (tests/conftest.py: the GPU route, checked without a GPU).
        if (query.is_cuda or interpreting()) and state.method.select_backend(query.device) in ("triton", "auto"):
            return _triton_decode(query, key, value, attention_mask, scaling, features), None
        if features is _NO_FEATURES:
            return _dense_decode(module, query, key, value, attention_mask, scaling), None
        # Otherwise the module's method runs it, as a prefill of one query (kept dense).

    layout = _layout(query, key, attention_mask, kwargs, is_causal, features.sliding_window)
    kernel_kwargs = state.kernel_kwargs if state.config.enable else {**state.kernel_kwargs, "sparsity_n": 0}
    if (features.sliding_window is not None and q_len < layout.kv_len and selection_applies(kernel_kwargs["sparsity_n"], q_len)
            and not packed):
        _check_no_dropped_keys(module, attention_mask, kwargs.get("position_ids"), layout, kernel_kwargs)
    return _run_method(module, state, query, key, value, layout, scaling, kernel_kwargs, is_causal, features,
                       stats_sink), None


def _run_method(module, state, query, key, value, layout, scaling, kernel_kwargs, is_causal, features, stats_sink):
    """The module's method on the rows ``layout`` places: ``[B, S, Hq, D]``, padded query rows 0."""
    batch, q_len = query.shape[0], query.shape[2]
    if layout.kv_len != key.shape[2]:  # a static cache's empty tail
        key, value = key[:, :, : layout.kv_len], value[:, :, : layout.kv_len]
    q_rows, k_rows, v_rows = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, S, H, D]
    if layout.batched:
        # One sequence per batch row: the kernel reads the rows in place (no copy) and
        # returns [B, S, H, D], the layout transformers wants.
        q, k, v = q_rows, k_rows, v_rows
    elif layout.take_q is None:
        # [B, S, H, D] -> [B * S, H, D]: a view for batch 1, one copy otherwise.
        q = q_rows.reshape(batch * q_len, query.shape[1], query.shape[3])
        k = k_rows.reshape(batch * layout.kv_len, key.shape[1], key.shape[3])
        v = v_rows.reshape(batch * layout.kv_len, value.shape[1], value.shape[3])
    else:
        q, k, v = q_rows[layout.take_q], k_rows[layout.take_k], v_rows[layout.take_k]
    # is_causal is passed only when False, and each feature only when on, so methods
    # written before they were supported (an attention() override without the keyword)
    # keep working for modules without them; conversion refuses a module whose method
    # cannot take what the module uses.
    result = state.method.attention(
        module, q, k, v, layout.batch,
        softmax_scale=scaling, kernel_kwargs=kernel_kwargs, return_stats=stats_sink is not None,
        **({} if is_causal else {"is_causal": False}),
        **({} if features is _NO_FEATURES else features.method_kwargs()),
    )
    if stats_sink is not None:
        out, stats = result
        stats_sink.append(stats)
    else:
        out = result
    if layout.batched:
        if layout.nan_rows is not None:
            out = torch.where(layout.nan_rows[:, None, None, None], float("nan"), out)
        return out
    # Query rows outside every sequence (padding) come back as zeros.
    if layout.put_q is not None:
        out = out[layout.put_q]
    return out.view(batch, q_len, out.shape[1], out.shape[2])


def cross_attention_sparse_message(where: str, name: str) -> str:
    """Why an N:M pattern on a cross-attention layer is refused, and what to do instead."""
    pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)  # every layer's: model.decoder.layers.*.encoder_attn
    return (
        f"{where}: N:M sparsity on cross-attention (queries from one sequence, keys from another) is not "
        "supported by modelopt_sparse: the rule's key groups, sink tokens and dense window are defined on the "
        "query's own sequence. Keep cross-attention dense, e.g. add "
        f'"{pattern}": {{"enable": False}} to sparse_cfg; it then runs dense through the same kernel'
    )


def _cross_attention(module, state, query, key, value, attention_mask, scaling, is_causal, features, stats_sink,
                     kwargs) -> torch.Tensor:
    """A cross-attention call: every query sees every real key of its batch row (the keys'
    padding from the mask), dense, through the module's method."""
    where = _where(module)
    if state.config.enable and state.kernel_kwargs["sparsity_n"]:
        raise NotImplementedError("modelopt_sparse: " + cross_attention_sparse_message(where, state.name))
    if is_causal:
        raise NotImplementedError(f"modelopt_sparse: {where}: causal cross-attention is not supported")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise NotImplementedError(
            f"modelopt_sparse: {where}: packed sequences (cu_seq_lens_q/k) in cross-attention are not supported"
        )
    layout = _outside_inference_mode(_cross_layout, query, key, attention_mask, where)
    kernel_kwargs = {**state.kernel_kwargs, "sparsity_n": 0}
    return _run_method(module, state, query, key, value, layout, scaling, kernel_kwargs, False, features, stats_sink)


def _self_codes(module, key_codes, q_len, kv_len) -> torch.Tensor:
    """The token codes that the mask function's key codes stand for in a call that is not
    cross-attention (a bidirectional chunk after a cache); more queries than keys cannot be one."""
    if q_len > kv_len:
        raise NotImplementedError(
            f"modelopt_sparse: {_where(module)}: a bidirectional mask of {q_len} queries and {kv_len} keys: "
            "cross-attention, which this module's forward did not announce (modelopt_sparse tells cross-attention "
            "calls by a key_value_states, encoder_hidden_states or cross_attention_states argument)"
        )
    return _outside_inference_mode(
        _cached, (key_codes,), ("self-codes", q_len, kv_len), lambda: codes_from_key_codes(key_codes, q_len))


def _is_padding_or_none(mask) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)


def _dense_decode(module, query, key, value, attention_mask, scaling) -> torch.Tensor:
    """One query per row: the rule keeps every key, so this is dense attention, and the
    fastest exact dense path for it is PyTorch's SDPA, called as transformers' own SDPA
    integration calls it (GQA, backends, contiguity). Padded query rows are zero."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as sdpa

    if attention_mask is None:
        if key.shape[2] < 1:
            raise ValueError("modelopt_sparse: 1 query but no keys")
        return sdpa(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=False)[0]
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    keys_real, query_real, width = _outside_inference_mode(
        lambda: _cached((attention_mask,), ("decode", batch, q_len, kv_len, query.device),
                        lambda: _decode_masks(_as_codes(attention_mask, batch, q_len, kv_len, query.device))))
    out = sdpa(module, query, key[:, :, :width], value[:, :, :width], keys_real,
               dropout=0.0, scaling=scaling, is_causal=False)[0]
    return torch.where(query_real, out, 0)


def _triton_decode(query, key, value, attention_mask, scaling, features) -> torch.Tensor:
    """Decode on the GPU: one fused kernel reads the cache in place, with the token codes as
    its key mask (a nonzero code is a real token) and zeros for padded query rows."""
    from ..kernels.triton_decode import decode_attention

    extra = {} if features is _NO_FEATURES else features.method_kwargs()
    if attention_mask is None:
        return decode_attention(query, key, value, softmax_scale=scaling, **extra)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    codes, query_real = _outside_inference_mode(
        lambda: _cached((attention_mask,), ("decode-codes", batch, q_len, kv_len, query.device),
                        lambda: _decode_codes(_as_codes(attention_mask, batch, q_len, kv_len, query.device))))
    return decode_attention(query, key, value, codes, query_real, softmax_scale=scaling, **extra)


def _decode_codes(codes):
    """The codes as the key mask, and whether each row's query is a real token."""
    return codes, (codes >= _FIRST_QUERY_CODE).any(1)


def _decode_masks(codes):
    """SDPA's boolean key mask [B, 1, 1, L], the real-query selector [B, 1, 1, 1], and L."""
    return (codes > 0)[:, None, None, :], (codes >= _FIRST_QUERY_CODE).any(1)[:, None, None, None], codes.shape[-1]


def _resolve_is_causal(module, is_causal, decoder_self=False) -> bool:
    """transformers' SDPA integration's rule: the ``is_causal`` kwarg when given (not None),
    else the module's ``is_causal`` attribute, else causal.

    One exception, ``decoder_self``: a self-attention call of a class that also serves as
    cross-attention (BART's family), on a module built with ``is_decoder=True``, is a decoder's
    self-attention, and runs causal even where the module says ``is_causal=False``. PegasusX and
    NLLB-MoE build their decoders' self-attention so; their eager attention (the only one
    transformers runs them with) is causal all the same, through the mask it builds."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
        if decoder_self and is_non_causal_decoder_module(module):
            is_causal = True
    if not isinstance(is_causal, bool):
        if isinstance(is_causal, torch.Tensor) and is_causal.numel() == 1 and not torch.compiler.is_compiling():
            is_causal = bool(is_causal)
        else:
            raise TypeError(
                f"modelopt_sparse: {_where(module)}: is_causal must be a bool, got {type(is_causal).__name__}"
            )
    return is_causal


def is_non_causal_decoder_module(module) -> bool:
    """A decoder's module that says ``is_causal=False`` (``is_decoder=True``): in a class that
    also serves as cross-attention, its self-attention calls run causal (:func:`_resolve_is_causal`)."""
    return getattr(module, "is_causal", True) is False and getattr(module, "is_decoder", False) is True


def _where(module) -> str:
    """``module.path (OriginalClass)`` for error messages."""
    state = getattr(module, "_mts_state", None)
    if state is None:
        return type(module).__name__
    return f"{state.name} ({state.original_class})"


class _Features(NamedTuple):
    """The module's own attention features, as the kernel takes them (``None``: off)."""

    sliding_window: int | None = None
    softcap: float | None = None
    learned_sinks: torch.Tensor | None = None

    def method_kwargs(self) -> dict:
        """The keywords of :meth:`SparseAttentionMethod.attention` (and of the fused decode
        kernel, which names them alike) for the features that are on."""
        return {name: value for name, value in zip(self._fields, self) if value is not None}


_NO_FEATURES = _Features()


def _features(module, kwargs, is_causal, query) -> _Features:
    """``sliding_window``, ``softcap`` and ``s_aux`` from the call, checked, naming the module.

    transformers' eager and SDPA paths apply the window through the mask and ignore the
    argument; its FlashAttention path applies the argument. Both say the same thing for
    every model that passes it (conversion refuses those that do not).
    """
    window, cap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    if window is None and cap is None and sinks is None:
        return _NO_FEATURES
    where = f"modelopt_sparse: {_where(module)}:"
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"{where} sliding_window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"{where} sliding_window={window}: a window must hold at least the query itself (>= 1)")
        if not is_causal:
            raise NotImplementedError(
                f"{where} sliding_window={window} on bidirectional attention (is_causal=False) is not supported: "
                "the kernel implements causal sliding windows only"
            )
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, (int, float)):
            raise TypeError(f"{where} softcap must be a float or None, got {type(cap).__name__}")
        cap = float(cap)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.shape != (query.shape[1],):
            got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
            raise ValueError(
                f"{where} s_aux (learned sinks) must be a tensor of one logit per query head, shape "
                f"({query.shape[1]},), got {got}"
            )
    return _Features(window, cap, sinks)


def _check_contiguous_tokens(module, attention_mask, query, key) -> None:
    """With a sliding window, refuse a padding mask whose real tokens leave holes in a row.

    The kernel measures a query's distance to a key among the row's real tokens;
    transformers measures it in key slots. The two agree exactly when every row's real
    tokens are contiguous: left or right padding, and the caches of sliding layers (they
    keep the last ``W - 1`` keys). Checked once per mask (memoized), on the device.
    """
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    where = _where(module)

    def check():
        real = _as_codes(attention_mask, batch, q_len, kv_len, query.device) > 0
        slots = torch.arange(real.shape[-1], device=real.device)
        first = torch.where(real, slots, real.shape[-1]).amin(-1)
        last = torch.where(real, slots, -1).amax(-1)
        count = real.sum(-1)
        lazy_checks.require(
            (count == 0) | (last - first + 1 == count),
            lambda: f"modelopt_sparse: {where}: a sliding window with padding between the real tokens of a row "
                    "(a 2-D attention_mask with holes) is not supported: transformers counts the window in "
                    "key slots, the kernel in real tokens",
            NotImplementedError,
        )
        return True

    _outside_inference_mode(_cached, (attention_mask,), ("contiguous", batch, q_len, kv_len, query.device), check)


def _check_no_dropped_keys(module, attention_mask, position_ids, layout, kernel_kwargs) -> None:
    """Refuse a sparse chunk of queries after a cache that dropped the row's oldest keys
    (transformers' caches of sliding layers keep the last ``W - 1``), when that changes the
    rule: N:M groups and sink tokens count from the row's first key (docs/semantics.md),
    which is then the first cached key, not the sequence's first token. Dropping a multiple
    of M keys with no sink tokens changes nothing. Plain ``generate()`` never gets here
    (its prefill starts from an empty cache, its decode steps are dense); chunked prefill
    and assisted decoding past the window do. The dropped count is the last query's
    position (``position_ids``) minus the row's real keys before it; a device check.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:  # (multimodal rotary ids: 3-D)
        return
    where = _where(module)
    pos = position_ids.to(device=layout.batch.b_seq_len_k.device).expand(layout.batch.b_seq_len_k.shape[0], -1)
    dropped = pos.amax(-1) - (layout.batch.b_seq_len_k.long() - 1)
    m, sinks = kernel_kwargs["sparsity_m"], kernel_kwargs["num_sink_tokens"]
    lazy_checks.require(
        (dropped <= 0) | ((dropped % m == 0) & (sinks == 0)),
        lambda: f"modelopt_sparse: {where}: a chunk of queries after a sliding-window cache that dropped the "
                f"oldest keys: N:M groups{' and sink tokens' if sinks else ''} would count from the first cached "
                "key instead of the sequence's first token; run it with a cache that keeps every key "
                "(transformers.DynamicCache() without a config)",
        NotImplementedError,
    )


def _reject_unsupported(module, dropout, kwargs) -> None:
    """Raise, naming the module and the argument, for every transformers feature the kernel
    does not implement."""
    if not dropout:
        # The common call (every layer of every forward) passes only kwargs it accepts.
        for name, value in kwargs.items():
            if value is not None and name not in _ACCEPTED_KWARGS:
                break
        else:
            return
    where = f"modelopt_sparse: {_where(module)}:"
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            f"{where} position_bias (an additive attention bias, as T5's relative positions) is not supported"
        )
    for name in ("indices", "block_indices"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{where} {name} (keys chosen per query by a sparse-attention indexer) is not supported"
            )
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError(f"{where} head_mask is not supported")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"{where} output_attentions=True is not supported (the fused kernel never forms the "
            "attention matrix); use attn_implementation='eager' to inspect attention weights"
        )
    if dropout:
        raise NotImplementedError(
            f"{where} dropout={dropout} (attention dropout in training) is not supported; "
            "set config.attention_dropout=0.0"
        )
    unknown = sorted(
        name for name, val in kwargs.items()
        if val is not None and name not in _ACCEPTED_KWARGS and name not in _REFUSED_KWARGS
    )
    if unknown:
        warnings.warn(
            f"modelopt_sparse: ignoring attention kwargs {unknown} that it does not know", RuntimeWarning, stacklevel=3
        )
