"""The HuggingFace side: an attention function and a mask function for transformers.

Both are registered under :data:`ATTN_IMPLEMENTATION` in transformers' global
``AttentionInterface`` and ``AttentionMaskInterface``. The mask function matters: without
one, transformers hands custom attention functions ``attention_mask=None`` even for padded
batches.

Nothing here reads a device value on the host for unpadded batches, left- or right-padded
2-D masks, packed ``cu_seq_lens`` or decode steps: every layout is computed on the device
with static shapes, so the path costs no synchronisation in eager mode and traces into one
graph under ``torch.compile(fullgraph=True)``. Checks of device values (a padding mask
with holes, inconsistent ``cu_seq_lens``) are device flags: on the CPU they raise at once;
on CUDA they are read back without blocking and raise at the next call after the GPU has
computed them (:mod:`modelopt_sparse.lazy_checks`).

What the mask function returns (and so what the attention function receives):

* ``None``: no padding, and the keys end at the last query (the common case).
* a 2-D int32 tensor ``[B, L]`` of *token codes*, one per key slot ``j < L``: ``0`` for no
  real token (padding, or an empty slot of a static cache), ``1`` for a real token that is
  not one of this call's queries, ``2 + r`` for the real token of query row ``r``. It stays
  a plain 2-D tensor because transformers feeds a precomputed mask back into the mask
  function (static-cache ``generate``); turned into bool there it means "real token",
  which is still right.
* a 4-D bool tensor ``[B, 1, S, Skv]``, only when transformers composed a mask that is not
  plain causal (packed sequences found from ``position_ids``, custom overlays). The
  attention function accepts it only if it is exactly the block-causal mask (within the
  module's sliding window, if it has one) of the sequences it derives itself, and raises
  otherwise (this check reads the mask).

Sliding-window layers: transformers builds their mask with
``sliding_window_causal_mask_function(W)``. The mask function recognizes that function and
returns what it returns for a causal mask (the padding, as token codes, or ``None``): the
window itself reaches the kernel from the ``sliding_window=W`` argument that the module
passes to the attention function, so no ``[S, Skv]`` mask is ever built. Both come from
the same config value in every model that passes the argument; conversion refuses modules
whose window lives in the mask alone (:mod:`modelopt_sparse.conversion`). The kernel counts
window distances between the real tokens of a row; transformers counts key slots. They
agree when a row's real tokens are contiguous (left or right padding, caches that keep the
last ``W - 1`` keys), which the attention function checks when a window is on.

Logit soft-capping (``softcap=``) and learned sinks (``s_aux=``, one extra logit per head)
are passed to the kernel as they come; they change nothing in the layout.

The attention function runs prefill through the module's method on the padded rows in
place (each row's real tokens are one sequence of the varlen layout: no gather, and padded
query rows come out as zeros), and decode steps (one query per row, which the rule keeps
dense) through the fused decode kernel on the Triton backend (on CUDA, or interpreted on the
CPU) and PyTorch's SDPA otherwise. Off the Triton backend, a decode step of a module with a
window, a soft cap or learned sinks (which SDPA cannot take) runs through the module's
method like a prefill: the kernel keeps a single query dense.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch

from . import lazy_checks
from .kernels.api import interpreting
from .kernels.semantics import aligned_query_position, allowed_keys, selection_applies
from .methods import PackedBatch

__all__ = ["ATTN_IMPLEMENTATION", "register_with_transformers", "sparse_attention_forward", "sparse_attention_mask"]

ATTN_IMPLEMENTATION = "modelopt_sparse"

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
# Token codes (see the module docstring).
_CODES_DTYPE = torch.int32
_FIRST_QUERY_CODE = 2


def register_with_transformers() -> None:
    """Register the attention and mask functions (idempotent; transformers is imported lazily)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparse_attention_mask)


# --------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------
def sparse_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = None,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers mask-interface function; see the module docstring for what it returns."""
    return _outside_inference_mode(_sparse_attention_mask, batch_size, q_length, kv_length, q_offset, kv_offset,
                                   mask_function, attention_mask, **kwargs)


def _outside_inference_mode(build, *args, **kwargs):
    """``build(*args, **kwargs)``, with inference mode switched off if it is on.

    Tensors made under ``torch.inference_mode()`` have no version counter, so the memo of
    the layout could not tell whether they were rewritten, and would re-derive it in every
    layer. Masks and layouts built outside inference mode keep their counters.
    """
    # Dynamo cannot trace is_inference_mode_enabled (a graph break per layer), and compiled
    # code keeps no memo anyway.
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return build(*args, **kwargs)
    with torch.inference_mode(False):
        return build(*args, **kwargs)


def _sparse_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                           **kwargs):
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    lazy_checks.raise_failed()
    # Causal and bidirectional masks differ only in which keys a query may see, and that
    # comes from the module's is_causal (see _resolve_is_causal), as SDPA takes it when no
    # mask is materialized: the token codes (which slots hold real tokens) serve both. A
    # sliding-window mask adds only the window, which the module passes as sliding_window.
    if (mask_function is not None and mask_function not in (causal_mask_function, bidirectional_mask_function)
            and not _is_plain_sliding_window(mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset,
                                             kwargs)):
        # Not plain causal: materialize it, and let the attention function check that it is
        # a pattern it reproduces exactly (packing) or refuse it.
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length,
            q_offset=0 if q_offset is None else q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs,
        )
    if q_offset is None:
        cache_position = kwargs.get("cache_position")
        q_offset = cache_position[0] if cache_position is not None else 0
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else None)
    kv_offset = int(kv_offset)
    padding_offset = kv_offset  # where slot 0 of the keys sits in the padding mask
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"modelopt_sparse: expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"modelopt_sparse: the 2-D attention_mask has {attention_mask.shape[0]} rows for a batch of {batch_size}"
            )
        if kv_offset > 0 and attention_mask.shape[-1] == kv_length:
            # Static-cache generate builds this step's masks in advance and feeds them back
            # (as bool) through the model's own mask call. For a sliding layer whose rolling
            # buffer has wrapped, that mask is ours, in the buffer's slot space: it spans the
            # kv_length slots exactly, where a padding mask over positions would have to
            # cover kv_offset + kv_length of them.
            padding_offset = 0
    if isinstance(q_offset, torch.Tensor):
        # A static cache keeps its length on the device: so does everything derived from it.
        # This runs eagerly at every step of generate() (transformers builds the masks outside
        # the compiled step), so it is kept to a few kernels and one device check.
        first_query = q_offset.to(device=device, dtype=torch.int64).reshape(())
        if kv_offset:
            first_query = first_query - kv_offset
        slot_index = _slot_index(kv_length, first_query, device)
        _require_placed(first_query, slot_index, q_length, kv_length, kv_offset, padding_offset, attention_mask)
        return token_codes(batch_size, q_length, kv_length, first_query, padding_offset, attention_mask, device,
                           slot_index=slot_index)
    first_query = int(q_offset) - kv_offset
    q_end = first_query + q_length  # key slots up to and including the last query
    if not q_length <= q_end <= kv_length:
        raise ValueError(
            f"modelopt_sparse: cannot place {q_length} queries at offset {int(q_offset)} among {kv_length} "
            f"keys (kv_offset {kv_offset})"
        )
    if attention_mask is None and q_end == kv_length:
        return None
    if attention_mask is not None and attention_mask.shape[-1] < padding_offset + q_end:
        raise ValueError(
            f"modelopt_sparse: the 2-D attention_mask covers {attention_mask.shape[-1]} positions but the "
            f"queries reach position {kv_offset + q_end}"
        )
    return token_codes(batch_size, q_length, kv_length, first_query, padding_offset, attention_mask, device)


_WINDOW_MASK_CODES: list = []  # filled on first use (transformers is imported lazily)


def _sliding_window_codes():
    """The code objects of transformers' ``and_masks`` closure and of its sliding-window overlay."""
    if not _WINDOW_MASK_CODES:
        from transformers.masking_utils import sliding_window_causal_mask_function, sliding_window_overlay

        _WINDOW_MASK_CODES.extend((sliding_window_causal_mask_function(1).__code__, sliding_window_overlay(1).__code__))
    return _WINDOW_MASK_CODES[0], _WINDOW_MASK_CODES[1]


def _is_plain_sliding_window(mask_function, attention_mask, q_length, kv_length, q_offset, kv_offset, kwargs) -> bool:
    """Whether transformers asks for its plain sliding-window causal mask (padding aside).

    ``create_sliding_window_causal_mask`` passes ``local_size=W``. In eager code the mask
    function's closures say exactly whether it is ``sliding_window_causal_mask_function(W)``
    (:func:`sliding_window_of`). Dynamo cannot read the closures of a function made inside
    the traced code (reading them breaks the later call), so compiled code decides from the
    arguments: the same ``and_masks`` code with ``local_size`` equal to the config's
    ``sliding_window``, no custom overlay (``use_vmap``), and not a call that could be
    packing (transformers composes packed sequences only without a padding mask or a
    cache, and then forbids the causal skip); that last case is materialized and checked
    instead.
    """
    local_size = kwargs.get("local_size")
    if local_size is None:
        return False
    if not torch.compiler.is_compiling():
        return sliding_window_of(mask_function) == local_size
    and_code, _ = _sliding_window_codes()
    config = kwargs.get("config")
    maybe_packed = (attention_mask is None and q_length == kv_length and kv_offset == 0
                    and not isinstance(q_offset, torch.Tensor) and not q_offset
                    and not kwargs.get("allow_is_causal_skip", True))
    return (getattr(mask_function, "__code__", None) is and_code and not kwargs.get("use_vmap")
            and local_size == getattr(config, "sliding_window", None) and not maybe_packed)


def sliding_window_of(mask_function) -> int | None:
    """``W`` if ``mask_function`` is transformers' plain ``sliding_window_causal_mask_function(W)``
    (``and_masks(sliding_window_overlay(W), causal_mask_function)``), else ``None``.

    Read from the closures, matched by code object: a composed mask (packing, image
    overlays) is a different function. Eager code only (see :func:`_is_plain_sliding_window`).
    """
    from transformers.masking_utils import causal_mask_function

    and_code, overlay_code = _sliding_window_codes()
    if getattr(mask_function, "__code__", None) is not and_code:
        return None
    parts = _closure_value(mask_function, "mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is causal_mask_function
            and getattr(parts[0], "__code__", None) is overlay_code):
        return None
    window = _closure_value(parts[0], "sliding_window")
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def _closure_value(function, name):
    return function.__closure__[function.__code__.co_freevars.index(name)].cell_contents


def _require_placed(first_query, slot_index, q_length, kv_length, kv_offset, padding_offset, attention_mask):
    """One device check that the queries, first at key slot ``first_query`` (a 0-d device
    tensor), fit among the ``kv_length`` keys and within the 2-D ``attention_mask`` (if any).

    Both bounds are host ints, so one clamp says whether ``0 <= first_query <= last_start``.
    Which of the two errors it is is decided when the message is built, from the first
    query slot as it was at this call (``slot_index[0] = 1 - first_query``; ``first_query``
    itself may be the cache's live counter, which later steps advance in place).
    """
    if torch.compiler.is_compiling():
        return  # compiled code cannot read a check back (lazy_checks): skip the ops too
    last_start = kv_length - q_length
    mask_width = None if attention_mask is None else attention_mask.shape[-1]
    if mask_width is not None:
        last_start = min(last_start, mask_width - padding_offset - q_length)
    if last_start < 0:
        ok = torch.zeros_like(first_query, dtype=torch.bool)  # no slot fits: fails whatever the value
    else:
        ok = first_query.clamp(0, last_start) == first_query

    def message():
        first = 1 - int(slot_index[0]) if slot_index.numel() else int(first_query)
        if first < 0 or first + q_length > kv_length or mask_width is None:
            return (f"modelopt_sparse: cannot place {q_length} queries at offset {first + kv_offset} among "
                    f"{kv_length} keys (kv_offset {kv_offset})")
        return (f"modelopt_sparse: the 2-D attention_mask covers {mask_width} positions but the queries reach "
                f"position {first + kv_offset + q_length}")

    lazy_checks.require(ok, message)


# Small constant tensors of the token-code computation, per shape and device (never written).
_CODE_CONSTANTS: dict = {}


def _code_constant(kind, n, device) -> torch.Tensor:
    """``arange(1, n + 1)`` (kind "slots") or the code table ``[1, 2, ..., n + 1, 0]`` (kind
    "table", int32), cached per ``(kind, n, device)`` outside compiled code."""
    def build():
        if kind == "slots":
            return torch.arange(1, n + 1, device=device, dtype=torch.int64)
        # Index i <= n holds code i + 1 (1: before the queries; 2 + r at index r + 1: query row r).
        table = torch.arange(_FIRST_QUERY_CODE - 1, n + _FIRST_QUERY_CODE + 1, device=device, dtype=_CODES_DTYPE)
        table[-1] = 0  # index n + 1: after the last query
        return table

    device = torch.device("cpu" if device is None else device)
    if torch.compiler.is_compiling() or (device.type != "cpu" and device.index is None):
        return build()  # ("cuda" without an index follows the current device: not a cache key)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build()  # not cached: a tensor made during a capture lives in that graph's pool
    key = (kind, n, device)
    value = _CODE_CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):  # usable (read-only) in and out of inference mode
            value = build()
        if len(_CODE_CONSTANTS) >= 64:
            _CODE_CONSTANTS.pop(next(iter(_CODE_CONSTANTS)))
        _CODE_CONSTANTS[key] = value
    return value


def _slot_index(width, first_query, device) -> torch.Tensor:
    """``[width]`` int64: ``j + 1 - first_query`` for key slot ``j``, i.e. the query row the slot
    holds, plus one (``<= 0`` before the first query, ``> q_len`` after the last). One kernel."""
    if isinstance(first_query, torch.Tensor):
        return _code_constant("slots", width, device) - first_query
    return torch.arange(1 - first_query, width + 1 - first_query, device=device, dtype=torch.int64)


def token_codes(batch, q_len, width, first_query, kv_offset=0, padding=None, device=None, *,
                slot_index=None) -> torch.Tensor:
    """``[batch, width]`` int32 token codes (module docstring) of ``q_len`` queries whose first
    sits at key slot ``first_query`` (an int, or a 0-d device tensor), with ``padding[b,
    kv_offset + j]`` saying whether slot ``j`` holds a real token (``None``: every slot up to
    the last query does). Device ops only: three kernels, plus one for the padding.

    ``slot_index`` (:func:`_slot_index` of ``width`` and ``first_query``) may be passed in
    when the caller already has it.
    """
    if padding is not None:
        device = padding.device if device is None else device
        if padding.dtype.is_floating_point:
            raise TypeError("modelopt_sparse: a 2-D attention_mask must be bool or integer 0/1, not floating point")
    if slot_index is None:
        slot_index = _slot_index(width, first_query, device)
    # slot_index clamped to [0, q_len + 1] indexes the table [1, 2, ..., q_len + 1, 0]: 1 for a
    # token before the queries, 2 + r for query row r, 0 after the last query. The index is
    # expanded to the batch, so the gather writes the [batch, width] result directly.
    index = slot_index.clamp(0, q_len + 1).expand(batch, width)
    codes = _code_constant("table", q_len, device)[index]
    if padding is not None:
        # Slots the mask does not reach (a static cache longer than the mask) lie after the
        # last query (checked by the callers): their code is 0 already.
        pad = padding[:, kv_offset : kv_offset + width]
        if pad.device != codes.device or pad.dtype != torch.bool:
            pad = pad.to(device=codes.device, dtype=torch.bool)
        codes[:, : pad.shape[-1]].mul_(pad)
    return codes


# --------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------
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
        attention_mask: what :func:`sparse_attention_mask` produced (or ``None``); a 2-D bool
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
    is_causal = _resolve_is_causal(module, kwargs.pop("is_causal", None))
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

    kernel_kwargs = state.kernel_kwargs if state.config.enable else {**state.kernel_kwargs, "sparsity_n": 0}
    if (features.sliding_window is not None and q_len < layout.kv_len and selection_applies(kernel_kwargs["sparsity_n"], q_len)
            and not packed):
        _check_no_dropped_keys(module, attention_mask, kwargs.get("position_ids"), layout, kernel_kwargs)
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
        return out, None
    # Query rows outside every sequence (padding) come back as zeros.
    if layout.put_q is not None:
        out = out[layout.put_q]
    return out.view(batch, q_len, out.shape[1], out.shape[2]), None


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
    from .kernels.triton_decode import decode_attention

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


def _resolve_is_causal(module, is_causal) -> bool:
    """transformers' SDPA integration's rule: the ``is_causal`` kwarg when given (not None),
    else the module's ``is_causal`` attribute, else causal."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not isinstance(is_causal, bool):
        if isinstance(is_causal, torch.Tensor) and is_causal.numel() == 1 and not torch.compiler.is_compiling():
            is_causal = bool(is_causal)
        else:
            raise TypeError(
                f"modelopt_sparse: {_where(module)}: is_causal must be a bool, got {type(is_causal).__name__}"
            )
    return is_causal


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


class _Layout:
    """Where the real tokens are: the packed metadata, how many key slots it reads, and for
    padded batches the gathers that pack query and key rows and the one that unpacks the
    output (``None``: rows are used in place)."""

    __slots__ = ("batch", "kv_len", "take_q", "take_k", "put_q", "batched", "nan_rows")

    def __init__(self, batch: PackedBatch, kv_len: int, take_q=None, take_k=None, put_q=None, batched=False,
                 nan_rows=None):
        self.batch, self.kv_len = batch, kv_len
        self.take_q, self.take_k, self.put_q = take_q, take_k, put_q
        # batched: the metadata places sequence b in batch row b of [B, S, H, D] tensors.
        self.batched = batched
        # [B] bool or None: batch rows whose output is made NaN (packing that static shapes
        # cannot express, see _position_ids_layout; batched layouts only).
        self.nan_rows = nan_rows


def _layout(query, key, attention_mask, kwargs, causal=True, window=None) -> _Layout:
    if attention_mask is None and kwargs.get("cu_seq_lens_q") is None and kwargs.get("cu_seq_lens_k") is None:
        hit = _DENSE_LAYOUTS.get((query.shape[0], query.shape[2], key.shape[2], query.device))
        if hit is not None and not torch.compiler.is_compiling():
            return hit
    return _outside_inference_mode(_derived_layout, query, key, attention_mask, kwargs, causal, window)


def _derived_layout(query, key, attention_mask, kwargs, causal=True, window=None) -> _Layout:
    batch, q_len, kv_len, device = query.shape[0], query.shape[2], key.shape[2], query.device
    shape_key = (batch, q_len, kv_len, device)
    # A 4-D mask is verified against the causal or the bidirectional mask of the sequences
    # (within the window, if any), so the verdict is memoized per kind.
    mask_key = (*shape_key, causal, window)
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            raise ValueError(
                "modelopt_sparse: pass either cu_seq_lens_q/k (packed sequences) or a padding "
                "attention_mask, not both"
            )

        def packed():
            layout = _packed_layout(query, key, kwargs)
            # transformers also builds a 4-D mask from position_ids: it must agree (a device
            # check, so no sync; compiled code cannot read it and follows cu_seq_lens).
            if attention_mask is not None:
                _verify_dense_mask(attention_mask, layout, q_len, kv_len, "cu_seq_lens_q/k", causal, window)
            return layout

        # The mask check is part of the memo: a verified mask stays verified while neither
        # it nor the sequence tensors change.
        anchors = (cu_q, cu_k) if attention_mask is None else (cu_q, cu_k, attention_mask)
        return _cached(anchors, (*mask_key, kwargs.get("max_length_q"), kwargs.get("max_length_k")), packed)
    if attention_mask is None:
        if q_len > kv_len:
            raise ValueError(f"modelopt_sparse: {q_len} queries but only {kv_len} keys")
        return _dense_layout(*shape_key)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"modelopt_sparse: unsupported attention_mask of type {type(attention_mask).__name__}; "
            "let transformers build it with attn_implementation='modelopt_sparse'"
        )
    if attention_mask.dim() == 2:
        return _cached((attention_mask,), shape_key,
                       lambda: _codes_layout(_as_codes(attention_mask, *shape_key), q_len))
    if attention_mask.dim() == 4:
        position_ids = kwargs.get("position_ids")

        def block_causal():
            layout, source = _position_ids_layout(position_ids, batch, q_len, kv_len, device)
            _verify_dense_mask(attention_mask, layout, q_len, kv_len, source, causal, window)
            return layout

        anchors = (attention_mask,) if position_ids is None else (attention_mask, position_ids)
        return _cached(anchors, mask_key, block_causal)
    raise ValueError(f"modelopt_sparse: attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")


# Every layer of one forward receives the same mask (or packing) tensors. Deriving the
# layout once and reusing it saves the per-layer device work and launches, and hands the
# kernel the very same metadata tensors.
_LAYOUT_ATTR = "_mts_layout"


def _cached(anchors, key, build):
    """``build()`` memoized on ``anchors[0]``, valid while the anchors are the same tensor
    objects at the same version (in-place writes bump it). Inference tensors keep no
    version, and compiled code keeps no Python state: no memo there."""
    if torch.compiler.is_compiling() or any(a is None or a.is_inference() for a in anchors):
        return build()
    versions = tuple(a._version for a in anchors)
    hit = getattr(anchors[0], _LAYOUT_ATTR, None)
    if hit is not None:
        for hit_key, hit_others, hit_versions, value in hit:
            if hit_key == key and hit_versions == versions and all(a is b for a, b in zip(hit_others, anchors[1:])):
                return value
    value = build()
    # The memo holds the other anchors themselves, so their ids cannot be reused while it
    # lives. A decode-mask entry and a layout entry can share one mask: keep a few.
    entries = [e for e in (hit or ()) if e[2] == versions][-3:]
    setattr(anchors[0], _LAYOUT_ATTR, (*entries, (key, anchors[1:], versions, value)))
    return value


def _dense_layout(batch, q_len, kv_len, device) -> _Layout:
    """Unpadded rows, queries at the end of their keys."""
    if torch.compiler.is_compiling():
        return _build_dense_layout(batch, q_len, kv_len, device)
    key = (batch, q_len, kv_len, device)
    layout = _DENSE_LAYOUTS.get(key)
    if layout is None and _capturing(device):
        return _build_dense_layout(*key)  # not cached: a tensor made in a capture lives in its pool
    if layout is None:
        layout = _build_dense_layout(batch, q_len, kv_len, device)
        if len(_DENSE_LAYOUTS) >= 64:
            _DENSE_LAYOUTS.pop(next(iter(_DENSE_LAYOUTS)))
        _DENSE_LAYOUTS[key] = layout
    return layout


def _build_dense_layout(batch, q_len, kv_len, device) -> _Layout:
    starts = torch.zeros(batch, dtype=torch.int32, device=device)
    meta = PackedBatch(starts, torch.full((batch,), q_len, dtype=torch.int32, device=device), q_len,
                       starts, torch.full((batch,), kv_len, dtype=torch.int32, device=device), kv_len,
                       trusted=True, rows_covered=True)
    return _Layout(meta, kv_len, batched=True)


# Cached by shape because its tensors are never written after creation (built outside
# inference mode, see _outside_inference_mode, so the kernel API's memo can hold them).
_DENSE_LAYOUTS: dict = {}


def _as_codes(mask, batch, q_len, kv_len, device) -> torch.Tensor:
    """Token codes from what reached the attention function: the mask function's codes
    (int32), or a plain 2-D padding mask whose last ``q_len`` slots are the queries."""
    if mask.dtype == _CODES_DTYPE:
        if mask.shape[0] != batch or mask.shape[-1] > kv_len:
            raise ValueError(
                f"modelopt_sparse: token codes of shape {tuple(mask.shape)} do not fit batch {batch} and {kv_len} keys"
            )
        return mask.to(device)
    width = mask.shape[-1]
    if mask.shape[0] != batch or not q_len <= width <= kv_len:
        raise ValueError(
            f"modelopt_sparse: 2-D attention_mask of shape {tuple(mask.shape)} does not fit batch {batch}, "
            f"{q_len} queries and {kv_len} keys"
        )
    return token_codes(batch, q_len, width, width - q_len, 0, mask, device)


def _codes_layout(codes, q_len) -> _Layout:
    """Every batch row's real tokens as one sequence of the varlen layout.

    The rows are compacted by gathers with static shapes: a stable sort moves each row's
    real tokens (and, among the query rows, its real queries) to the front, in order. Any
    padding pattern works, holes included, with no host read. Batch rows of more than one
    token were copied into the packed layout before anyway, so this costs no extra pass
    there; ``put_q`` is the inverse permutation that brings the output rows back.
    """
    batch, width = codes.shape
    device = codes.device
    real = codes > 0
    # Query row r of batch row b is real iff some slot of row b holds code 2 + r.
    query_row = torch.where(codes >= _FIRST_QUERY_CODE, codes - _FIRST_QUERY_CODE, q_len).to(torch.int64)
    q_real = torch.zeros(batch, q_len + 1, dtype=torch.bool, device=device).scatter_(1, query_row, True)[:, :q_len]
    k_order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    q_order = torch.sort((~q_real).to(torch.int8), dim=1, stable=True).indices
    rows = torch.arange(batch, device=device)
    take_q = (rows[:, None].expand(batch, q_len).flatten(), q_order.flatten())
    take_k = (rows[:, None].expand(batch, width).flatten(), k_order.flatten())
    packed_q = (rows[:, None] * q_len + q_order).flatten()
    put_q = torch.empty_like(packed_q).scatter_(0, packed_q, torch.arange(batch * q_len, device=device))
    rows32 = rows.to(torch.int32)
    meta = PackedBatch(rows32 * q_len, q_real.sum(1, dtype=torch.int32), q_len,
                       rows32 * width, real.sum(1, dtype=torch.int32), width, trusted=True)
    return _Layout(meta, width, take_q, take_k, put_q)


def _packed_layout(query, key, kwargs) -> _Layout:
    """Packed sequences from transformers' flash-attention kwargs, without host reads: the
    values are checked on the device, the bounds are ``max_length_q/k`` or the row counts."""
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError("modelopt_sparse: packed sequences need both cu_seq_lens_q and cu_seq_lens_k")
    if batch != 1:
        raise ValueError(f"modelopt_sparse: packed sequences (cu_seq_lens_q/k) need batch size 1, got {batch}")
    cu = []
    for name, t, total in (("cu_seq_lens_q", cu_q, q_len), ("cu_seq_lens_k", cu_k, kv_len)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() < 2 or t.dtype.is_floating_point:
            raise ValueError(f"modelopt_sparse: {name} must be a 1-D integer tensor [num_seqs + 1]")
        t = t.to(device=query.device, dtype=torch.int32)
        lazy_checks.require(
            (t[0] == 0) & (t[-1] == total) & (t.diff() >= 0).all(),
            functools.partial(lambda n, v, tot: f"modelopt_sparse: {n}={v.tolist()} must rise from 0 to the {tot} "
                                                "packed tokens", name, t, total),
        )
        cu.append(t)
    if cu[0].numel() != cu[1].numel():
        raise ValueError("modelopt_sparse: cu_seq_lens_q and cu_seq_lens_k describe different numbers of sequences")
    lens_q, lens_k = cu[0].diff(), cu[1].diff()
    lazy_checks.require((lens_q <= lens_k).all(),
                        lambda: "modelopt_sparse: a packed sequence has more queries than keys")
    bounds = []
    for name, given, lens, total in (("max_length_q", kwargs.get("max_length_q"), lens_q, q_len),
                                     ("max_length_k", kwargs.get("max_length_k"), lens_k, kv_len)):
        if given is None or isinstance(given, torch.Tensor):
            bounds.append(total)  # a bound that needs no host read; only the grid grows
            continue
        given = int(given)
        lazy_checks.require(
            lens.max() <= given,
            functools.partial(lambda n, g, ls: f"modelopt_sparse: {n}={g} is below the longest sequence "
                                               f"({int(ls.max())})", name, given, lens),
        )
        bounds.append(min(given, total))
    meta = PackedBatch(cu[0][:-1], lens_q, bounds[0], cu[1][:-1], lens_k, bounds[1], trusted=True)
    return _Layout(meta, kv_len)


def _position_ids_layout(position_ids, batch, q_len, kv_len, device):
    """Sequences per batch row: split where position_ids do not step by one (packing).

    How many sequences there are is data. Where shapes must be static (a CUDA-graph capture,
    or compiled code without Dynamo's ``capture_dynamic_output_shape_ops``), each batch row is
    one sequence, and a row whose position_ids restart (packing, which only ``cu_seq_lens_q/k``
    can express there) comes out as NaN instead of attending across its sequences: transformers
    hands over this mask whenever it cannot read position_ids itself, packed or not, so the
    common unpacked row must not cost a host read in every layer (docs/api.md).
    """
    if position_ids is None or q_len != kv_len:
        return _dense_layout(batch, q_len, kv_len, device), "a causal mask"
    pos = position_ids.to(device).expand(batch, -1)
    if pos.shape[-1] != q_len:
        raise ValueError(f"modelopt_sparse: position_ids of shape {tuple(position_ids.shape)} for {q_len} tokens")
    if _static_shapes_only(device):
        packed_rows = (pos[:, 1:] - pos[:, :-1] != 1).any(dim=1)
        rows = _dense_layout(batch, q_len, kv_len, device)
        return (_Layout(rows.batch, kv_len, batched=True, nan_rows=packed_rows),
                "one sequence per row (position_ids under static shapes)")
    if torch.compiler.is_compiling():
        # How many sequences there are is data: one op of data-dependent length (Dynamo cannot
        # trace nonzero without a global flag), and the longest sequence bounded by the row
        # (no host read; the grid's programs past a sequence's end return at once).
        flat_starts = sequence_starts(pos.contiguous())
        longest = q_len
    else:
        flat_starts = _sequence_starts(pos)
        longest = None
    bounds = torch.cat([flat_starts, torch.full((1,), batch * q_len, dtype=flat_starts.dtype, device=device)])
    lens = bounds.diff().to(torch.int32)
    if longest is None:
        longest = int(lens.max())
    starts = flat_starts.to(torch.int32)
    # Valid by construction, and the sequences tile every row: nothing to read back.
    meta = PackedBatch(starts, lens, longest, starts, lens, longest, trusted=True, rows_covered=True)
    return _Layout(meta, kv_len), "packed sequences found in position_ids"


def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


@torch.compiler.assume_constant_result
def _dynamic_output_shapes_allowed() -> bool:
    """Dynamo's switch for ops whose output shape is data (read once, at trace time)."""
    return bool(torch._dynamo.config.capture_dynamic_output_shape_ops)


def _static_shapes_only(device) -> bool:
    """No op of data-dependent output size may run: a capture, or a graph without the switch."""
    if torch.compiler.is_compiling():
        return not _dynamic_output_shapes_allowed()
    return _capturing(device)


def _sequence_starts(pos: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) offsets, int64, of the tokens of ``pos`` ``[B, L]`` that start a
    sequence: the first of each row and every token whose position is not its
    predecessor's plus one (packing, as transformers finds it)."""
    starts_here = torch.ones_like(pos, dtype=torch.bool)
    starts_here[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return starts_here.flatten().nonzero().flatten()


@torch.library.custom_op("modelopt_sparse::sequence_starts", mutates_args=())
def sequence_starts(pos: torch.Tensor) -> torch.Tensor:
    """:func:`_sequence_starts` as one op for compiled graphs (its length is data)."""
    return _sequence_starts(pos)


@sequence_starts.register_fake
def _(pos):
    # At least one sequence per row, at most one per token.
    count = torch.library.get_ctx().new_dynamic_size(min=pos.shape[0], max=pos.numel())
    return pos.new_empty(count, dtype=torch.int64)


def _verify_dense_mask(mask, layout: _Layout, q_len, kv_len, source, causal=True, window=None) -> None:
    """Refuse a 4-D mask unless it is exactly block-causal (block-diagonal when not
    ``causal``; within ``window`` if given) over the derived sequences."""
    batch = mask.shape[0]
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"modelopt_sparse: 4-D attention_mask of shape {tuple(mask.shape)} for {q_len}x{kv_len} scores")
    if torch.compiler.is_compiling() or _capturing(mask.device):
        return  # the value checks are device checks, which compiled or captured code cannot read back
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        lazy_checks.require(keep | (mask <= torch.finfo(mask.dtype).min / 2),
                            lambda: "modelopt_sparse: additive attention biases in attention_mask are not supported",
                            NotImplementedError)
    expected = _block_causal(layout, batch, q_len, kv_len, mask.device, causal, window)
    if keep.shape[1] != 1:
        expected = expected.expand_as(keep)
    lazy_checks.require(
        keep.expand_as(expected) == expected,
        lambda: f"modelopt_sparse: transformers built an attention mask that is not the "
                f"{'causal' if causal else 'bidirectional'} mask of {source}"
                f"{'' if window is None else f' within a sliding window of {window}'}: "
                "mixed causal/bidirectional masks, windows other than the module's sliding_window "
                "or custom mask overlays are not supported",
        NotImplementedError,
    )


def _block_causal(layout: _Layout, batch, q_len, kv_len, device, causal=True, window=None) -> torch.Tensor:
    """[B, 1, S, Skv] bool: query sees key iff same sequence and (not ``causal`` or key
    position <= query position) and (no ``window`` or query position - key position < window)."""
    meta = layout.batch
    starts_q, starts_k = meta.b_start_loc, meta.b_start_loc_k
    if layout.batched:  # row-local starts: move them to the packed rows of the whole batch
        rows = torch.arange(batch, dtype=starts_q.dtype, device=starts_q.device)
        starts_q, starts_k = starts_q + rows * q_len, starts_k + rows * kv_len
    seq_q, pos_q = _sequence_positions(starts_q, meta.b_seq_len, batch * q_len, device)
    seq_k, pos_k = _sequence_positions(starts_k, meta.b_seq_len_k, batch * kv_len, device)
    seq = seq_q.clamp(min=0)
    lens_q, lens_k = meta.b_seq_len.to(device).long()[seq], meta.b_seq_len_k.to(device).long()[seq]
    pos_q = torch.where(seq_q >= 0, aligned_query_position(pos_q, lens_q, lens_k), pos_q)
    seq_k = torch.where(seq_k >= 0, seq_k, -2)  # rows outside every sequence see nothing
    seq_q, pos_q = seq_q.view(batch, q_len), pos_q.view(batch, q_len)
    seq_k, pos_k = seq_k.view(batch, kv_len), pos_k.view(batch, kv_len)
    same = seq_q[:, :, None] == seq_k[:, None, :]
    return (same & allowed_keys(pos_q[:, :, None], pos_k[:, None, :], causal, window))[:, None]


def _sequence_positions(starts, lens, total, device):
    """Per packed row: its sequence's index (-1 outside every sequence) and its position in
    it, without a host round trip or a loop over sequences (they never overlap, checked)."""
    starts, lens = starts.to(device).long(), lens.to(device).long()
    ids = torch.arange(1, starts.shape[0] + 1, device=device)
    step = torch.zeros(total + 1, dtype=torch.long, device=device)
    step.index_add_(0, starts, ids)
    step.index_add_(0, starts + lens, -ids)
    seq = step.cumsum(0)[:total] - 1
    rows = torch.arange(total, device=device)
    return seq, rows - torch.where(seq >= 0, starts[seq.clamp(min=0)], rows)
