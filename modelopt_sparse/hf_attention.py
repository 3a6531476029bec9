"""The HuggingFace side: an attention function and a mask function for transformers.

Both are registered under :data:`ATTN_IMPLEMENTATION` in transformers' global
``AttentionInterface`` and ``AttentionMaskInterface``. The mask function matters: without
one, transformers hands custom attention functions ``attention_mask=None`` even for padded
batches.

What the mask function returns (and so what the attention function receives):

* ``None``: no padding, and the keys end at the last query (the common case).
* a 2-D bool tensor ``[B, L]``: ``True`` where key position ``j < L`` holds a real token.
  ``L`` is the key position just past the last query, so keys at ``>= L`` (empty slots of
  a static cache) are dropped; the queries are the last ``S`` of those ``L`` positions.
* a 4-D bool tensor ``[B, 1, S, Skv]``, only when transformers composed a mask that is not
  plain causal (packed sequences found from ``position_ids``, sliding windows, custom
  overlays). The attention function accepts it only if it is exactly the block-causal mask
  of the sequences it derives itself, and raises otherwise.

The attention function packs the valid tokens into the varlen layout of
:func:`modelopt_sparse.attention`, lets the module's method run the kernel, and scatters
the result back, with zeros in padded query rows.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .kernels.semantics import aligned_query_position
from .methods import PackedBatch

__all__ = ["ATTN_IMPLEMENTATION", "register_with_transformers", "sparse_attention_forward", "sparse_attention_mask"]

ATTN_IMPLEMENTATION = "modelopt_sparse"

# kwargs that transformers passes and that do not change the attention math.
_HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "layer_idx"})
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# kwargs that _reject_unsupported inspects (harmless when None / False).
_CHECKED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias", "head_mask", "output_attentions", "is_causal")


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

    Tensors made under ``torch.inference_mode()`` have no version counter, so the memos of
    the layout (here) and of the metadata check (the kernel API) could not tell whether
    they were rewritten, and would re-derive and re-check them in every layer (a device
    sync each). Masks and layouts built outside inference mode keep their counters.
    """
    # Dynamo cannot trace is_inference_mode_enabled (a graph break per layer): compiled
    # code keeps the previous behaviour.
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return build(*args, **kwargs)
    with torch.inference_mode(False):
        return build(*args, **kwargs)


def _sparse_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                           **kwargs):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if mask_function is not None and mask_function is not causal_mask_function:
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
        q_offset = int(cache_position[0]) if cache_position is not None else 0
    # A static cache gives a tensor that is later updated in place: read it now.
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    q_end = q_offset + q_length - kv_offset  # key slots up to and including the last query
    if not q_length <= q_end <= kv_length:
        raise ValueError(
            f"modelopt_sparse: cannot place {q_length} queries at offset {q_offset} among {kv_length} "
            f"keys (kv_offset {kv_offset})"
        )
    device = kwargs.get("device", None)
    if attention_mask is None:
        if q_end == kv_length:
            return None
        return torch.ones(batch_size, q_end, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"modelopt_sparse: expected a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] < kv_offset + q_end:
        raise ValueError(
            f"modelopt_sparse: the 2-D attention_mask covers {attention_mask.shape[-1]} positions but the "
            f"queries reach position {kv_offset + q_end}"
        )
    valid = attention_mask[:, kv_offset : kv_offset + q_end].to(torch.bool)
    if q_end == kv_length and bool(valid.all()):
        return None
    # A bool inference-mode mask comes back as a view of itself: copy it (a few bytes per
    # token), so that the memo never keys on a tensor without a version counter.
    return valid.clone() if valid.is_inference() else valid


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
        attention_mask: what :func:`sparse_attention_mask` produced (or ``None``).
        scaling: softmax scale (default ``1/sqrt(D)``).
        dropout: must be 0.
        **kwargs: ``cu_seq_lens_q/k`` and ``max_length_q/k`` for packed sequences;
            ``position_ids``; unsupported features raise (see :func:`_reject_unsupported`).

    Returns:
        ``([B, S, Hq, D], None)``; padded query rows are zero.
    """
    state = getattr(module, "_mts_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} but was not "
            "converted: call modelopt_sparse.sparsify (or restore) on the model first"
        )
    _reject_unsupported(module, dropout, kwargs)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"modelopt_sparse: expected 4-D query/key/value [batch, heads, seq, head_dim], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, _, q_len, _ = query.shape
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"modelopt_sparse: key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match "
            f"query {tuple(query.shape)}"
        )

    layout = _layout(query, key, attention_mask, kwargs)
    key, value = key[:, :, : layout.kv_len], value[:, :, : layout.kv_len]
    q_rows = query.transpose(1, 2)  # [B, S, Hq, D]
    k_rows, v_rows = key.transpose(1, 2), value.transpose(1, 2)
    if layout.q_valid is None:
        q = q_rows.reshape(batch * q_len, *q_rows.shape[2:])
        k = k_rows.reshape(batch * layout.kv_len, *k_rows.shape[2:])
        v = v_rows.reshape(batch * layout.kv_len, *v_rows.shape[2:])
    else:
        q, k, v = q_rows[layout.q_valid], k_rows[layout.kv_valid], v_rows[layout.kv_valid]

    kernel_kwargs = dict(state.kernel_kwargs)
    if not state.config.enable:
        kernel_kwargs["sparsity_n"] = 0
    stats_sink = getattr(module, "_mts_stats", None)
    if stats_sink is not None and not isinstance(stats_sink, list):
        raise TypeError(f"{state.name}._mts_stats must be a list or None, got {type(stats_sink).__name__}")
    result = state.method.attention(
        module, q, k, v, layout.batch,
        softmax_scale=scaling, kernel_kwargs=kernel_kwargs, return_stats=stats_sink is not None,
    )
    if stats_sink is not None:
        out, stats = result
        stats_sink.append(stats)
    else:
        out = result

    if layout.q_valid is None:
        return out.reshape(batch, q_len, *out.shape[1:]), None
    full = out.new_zeros(batch, q_len, *out.shape[1:])
    full[layout.q_valid] = out
    return full, None


def _reject_unsupported(module, dropout, kwargs) -> None:
    """Raise, naming the argument, for every transformers feature the kernel does not implement."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"modelopt_sparse: sliding_window={kwargs['sliding_window']} (sliding-window attention) is not "
            "supported; use a config with sliding_window=None / use_sliding_window=False"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"modelopt_sparse: softcap={kwargs['softcap']} (logit soft-capping) is not supported")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("modelopt_sparse: s_aux (learned attention sinks) is not supported")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("modelopt_sparse: position_bias (additive attention bias) is not supported")
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("modelopt_sparse: head_mask is not supported")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "modelopt_sparse: output_attentions=True is not supported (the fused kernel never forms the "
            "attention matrix); use attn_implementation='eager' to inspect attention weights"
        )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise NotImplementedError("modelopt_sparse: is_causal=False (bidirectional attention) is not supported")
    if dropout:
        raise NotImplementedError(
            f"modelopt_sparse: dropout={dropout} (attention dropout in training) is not supported; "
            "set config.attention_dropout=0.0"
        )
    unknown = sorted(
        name for name, val in kwargs.items()
        if val is not None and name not in _HARMLESS_KWARGS and name not in _PACKING_KWARGS
        and name not in _CHECKED_KWARGS
    )
    if unknown:
        warnings.warn(
            f"modelopt_sparse: ignoring attention kwargs {unknown} that it does not know", RuntimeWarning, stacklevel=3
        )


class _Layout:
    """Where the real tokens are: the packed metadata and the row selectors."""

    __slots__ = ("batch", "kv_len", "q_valid", "kv_valid")

    def __init__(self, batch: PackedBatch, kv_len: int, q_valid=None, kv_valid=None):
        self.batch, self.kv_len, self.q_valid, self.kv_valid = batch, kv_len, q_valid, kv_valid


def _metadata(q_lens: torch.Tensor, kv_lens: torch.Tensor, q_stride: int | None, kv_stride: int | None) -> PackedBatch:
    """int32 varlen metadata; a stride means fixed-size rows (no gather), else rows are packed."""
    q_lens, kv_lens = q_lens.to(torch.int32), kv_lens.to(torch.int32)

    def starts(lens, stride):
        if stride is not None:
            return torch.arange(lens.shape[0], dtype=torch.int32, device=lens.device) * stride
        return (torch.cumsum(lens, 0, dtype=torch.int32) - lens).to(torch.int32)

    max_q, max_kv = torch.stack([q_lens.max(), kv_lens.max()]).tolist()
    return PackedBatch(starts(q_lens, q_stride), q_lens, int(max_q), starts(kv_lens, kv_stride), kv_lens, int(max_kv))


def _layout(query, key, attention_mask, kwargs) -> _Layout:
    return _outside_inference_mode(_derived_layout, query, key, attention_mask, kwargs)


def _derived_layout(query, key, attention_mask, kwargs) -> _Layout:
    batch, q_len, kv_len, device = query.shape[0], query.shape[2], key.shape[2], query.device
    shape_key = (batch, q_len, kv_len, device)
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            raise ValueError(
                "modelopt_sparse: pass either cu_seq_lens_q/k (packed sequences) or a padding "
                "attention_mask, not both"
            )

        def packed():
            layout = _packed_layout(query, key, kwargs)
            if attention_mask is not None:
                _verify_dense_mask(attention_mask, layout, q_len, kv_len, "cu_seq_lens_q/k")
            return layout

        # The mask check is part of the memo: a verified mask stays verified while neither
        # it nor the sequence tensors change.
        anchors = (cu_q, cu_k) if attention_mask is None else (cu_q, cu_k, attention_mask)
        return _cached(anchors, (*shape_key, kwargs.get("max_length_q"), kwargs.get("max_length_k")), packed)
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
        return _cached((attention_mask,), shape_key, lambda: _padded_layout(attention_mask, *shape_key))
    if attention_mask.dim() == 4:
        position_ids = kwargs.get("position_ids")

        def block_causal():
            layout, source = _position_ids_layout(position_ids, batch, q_len, kv_len, device)
            _verify_dense_mask(attention_mask, layout, q_len, kv_len, source)
            return layout

        anchors = (attention_mask,) if position_ids is None else (attention_mask, position_ids)
        return _cached(anchors, shape_key, block_causal)
    raise ValueError(f"modelopt_sparse: attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")


# Every layer of one forward receives the same mask (or packing) tensors. Computing the
# layout once and reusing it saves the per-layer host syncs, and hands the kernel the very
# same metadata tensors, whose validation it caches.
_LAYOUT_ATTR = "_mts_layout"


def _cached(anchors, key, build) -> _Layout:
    """Layout memoized on ``anchors[0]``, valid while the anchors are the same tensor objects
    at the same version (in-place writes bump it). Inference tensors keep no version: no memo."""
    if any(a is None or a.is_inference() for a in anchors):
        return build()
    versions = tuple(a._version for a in anchors)
    hit = getattr(anchors[0], _LAYOUT_ATTR, None)
    if hit is not None:
        hit_key, hit_others, hit_versions, layout = hit
        if hit_key == key and hit_versions == versions and all(a is b for a, b in zip(hit_others, anchors[1:])):
            return layout
    layout = build()
    # The memo holds the other anchors themselves, so their ids cannot be reused while it lives.
    setattr(anchors[0], _LAYOUT_ATTR, (key, anchors[1:], versions, layout))
    return layout


@functools.lru_cache(maxsize=64)
def _dense_layout(batch, q_len, kv_len, device) -> _Layout:
    """Unpadded rows; cached by shape because its tensors are never written after creation."""
    full = torch.full((batch,), q_len, dtype=torch.int32, device=device)
    return _Layout(_metadata(full, torch.full_like(full, kv_len), q_len, kv_len), kv_len)


def _padded_layout(mask, batch, q_len, kv_len, device) -> _Layout:
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point:
            raise TypeError("modelopt_sparse: a 2-D attention_mask must be bool or integer 0/1, not floating point")
        mask = mask != 0
    end = mask.shape[-1]
    if mask.shape[0] != batch or not q_len <= end <= kv_len:
        raise ValueError(
            f"modelopt_sparse: 2-D attention_mask of shape {tuple(mask.shape)} does not fit batch {batch}, "
            f"{q_len} queries and {kv_len} keys"
        )
    kv_valid = mask.to(device)
    # The queries are the last q_len of the `end` key positions, so a query row is real
    # exactly when its own key position is.
    q_valid = kv_valid[:, end - q_len :]
    if bool(kv_valid.all()):
        return _dense_layout(batch, q_len, end, device)
    meta = _metadata(q_valid.sum(1), kv_valid.sum(1), None, None)
    return _Layout(meta, end, q_valid, kv_valid)


def _packed_layout(query, key, kwargs) -> _Layout:
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
        values = t.tolist()
        if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"modelopt_sparse: {name}={values} must rise from 0 to the {total} packed tokens"
            )
        cu.append(t)
    if cu[0].numel() != cu[1].numel():
        raise ValueError("modelopt_sparse: cu_seq_lens_q and cu_seq_lens_k describe different numbers of sequences")
    lens_q, lens_k = cu[0].diff(), cu[1].diff()
    if bool((lens_q > lens_k).any()):
        raise ValueError("modelopt_sparse: a packed sequence has more queries than keys")
    max_q, max_k = torch.stack([lens_q.max(), lens_k.max()]).tolist()
    for name, given, actual in (("max_length_q", kwargs.get("max_length_q"), max_q),
                                ("max_length_k", kwargs.get("max_length_k"), max_k)):
        if given is not None and int(given) < actual:
            raise ValueError(f"modelopt_sparse: {name}={int(given)} is below the longest sequence ({actual})")
    meta = PackedBatch(cu[0][:-1].contiguous(), lens_q, int(max_q), cu[1][:-1].contiguous(), lens_k, int(max_k))
    return _Layout(meta, kv_len)


def _position_ids_layout(position_ids, batch, q_len, kv_len, device):
    """Sequences per batch row: split where position_ids do not step by one (packing)."""
    if position_ids is None or q_len != kv_len:
        return _dense_layout(batch, q_len, kv_len, device), "a causal mask"
    pos = position_ids.to(device).expand(batch, -1)
    if pos.shape[-1] != q_len:
        raise ValueError(f"modelopt_sparse: position_ids of shape {tuple(position_ids.shape)} for {q_len} tokens")
    starts_here = torch.ones_like(pos, dtype=torch.bool)
    starts_here[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    # Flat start offsets of every sequence, in row-major order.
    flat_starts = starts_here.flatten().nonzero().flatten()
    bounds = torch.cat([flat_starts, torch.tensor([batch * q_len], device=device)])
    lens = bounds.diff().to(torch.int32)
    meta = PackedBatch(
        flat_starts.to(torch.int32), lens, int(lens.max()), flat_starts.to(torch.int32), lens, int(lens.max())
    )
    return _Layout(meta, kv_len), "packed sequences found in position_ids"


def _verify_dense_mask(mask, layout: _Layout, q_len, kv_len, source) -> None:
    """Refuse a 4-D mask unless it is exactly block-causal over the derived sequences."""
    batch = mask.shape[0]
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"modelopt_sparse: 4-D attention_mask of shape {tuple(mask.shape)} for {q_len}x{kv_len} scores")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise NotImplementedError("modelopt_sparse: additive attention biases in attention_mask are not supported")
    expected = _block_causal(layout, batch, q_len, kv_len, mask.device)
    if keep.shape[1] != 1:
        expected = expected.expand_as(keep)
    if not torch.equal(keep.expand_as(expected), expected):
        raise NotImplementedError(
            f"modelopt_sparse: transformers built an attention mask that is not the causal mask of "
            f"{source}: sliding windows, bidirectional or custom mask overlays are not supported"
        )


def _block_causal(layout: _Layout, batch, q_len, kv_len, device) -> torch.Tensor:
    """[B, 1, S, Skv] bool: query sees key iff same sequence and key position <= query position."""
    meta = layout.batch
    seq_q, pos_q = _sequence_positions(meta.b_start_loc, meta.b_seq_len, batch * q_len, device)
    seq_k, pos_k = _sequence_positions(meta.b_start_loc_k, meta.b_seq_len_k, batch * kv_len, device)
    seq = seq_q.clamp(min=0)
    lens_q, lens_k = meta.b_seq_len.to(device).long()[seq], meta.b_seq_len_k.to(device).long()[seq]
    pos_q = torch.where(seq_q >= 0, aligned_query_position(pos_q, lens_q, lens_k), pos_q)
    seq_k = torch.where(seq_k >= 0, seq_k, -2)  # rows outside every sequence see nothing
    seq_q, pos_q = seq_q.view(batch, q_len), pos_q.view(batch, q_len)
    seq_k, pos_k = seq_k.view(batch, kv_len), pos_k.view(batch, kv_len)
    same = seq_q[:, :, None] == seq_k[:, None, :]
    return (same & (pos_k[:, None, :] <= pos_q[:, :, None]))[:, None]


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
