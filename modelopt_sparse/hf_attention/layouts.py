"""Where the real tokens are: the varlen layout the kernel runs on, derived from what reached
the attention function (token codes or a 2-D padding mask, a 4-D mask with ``position_ids``,
or packed ``cu_seq_lens_q/k``) and memoized on those tensors, so that every layer of one
forward reuses it.

A 4-D mask is accepted only if it is exactly the block-causal mask (within the module's
sliding window, if it has one) of the sequences derived here, and refused otherwise (a
device check of the mask).
"""

from __future__ import annotations

import functools

import torch

from .. import lazy_checks
from ..kernels.semantics import aligned_query_position, allowed_keys
from ..methods import PackedBatch
from .masks import _CODES_DTYPE, _FIRST_QUERY_CODE, _outside_inference_mode, token_codes


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
# inference mode, see masks._outside_inference_mode, so the kernel API's memo can hold them).
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
    batch = codes.shape[0]
    # Query row r of batch row b is real iff some slot of row b holds code 2 + r.
    query_row = torch.where(codes >= _FIRST_QUERY_CODE, codes - _FIRST_QUERY_CODE, q_len).to(torch.int64)
    q_real = torch.zeros(batch, q_len + 1, dtype=torch.bool, device=codes.device).scatter_(1, query_row, True)
    return _compacted_layout(codes > 0, q_real[:, :q_len])


def _compacted_layout(real, q_real) -> _Layout:
    """The layout of ``real`` ``[B, Skv]`` key slots and ``q_real`` ``[B, S]`` query rows (bool),
    each batch row one sequence (see :func:`_codes_layout`)."""
    (batch, width), q_len = real.shape, q_real.shape[1]
    device = real.device
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


def _cross_layout(query, key, attention_mask, where) -> _Layout:
    """A cross-attention call's layout: every query row real, the keys' padding from the mask
    (the key codes of :func:`.masks.sparse_attention_mask`, its token codes when there are as
    many queries as keys, or a plain 2-D padding mask over the keys; ``None``: no padding)."""
    batch, q_len, kv_len, device = query.shape[0], query.shape[2], key.shape[2], query.device
    if attention_mask is None:
        return _dense_layout(batch, q_len, kv_len, device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 3):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise NotImplementedError(
            f"modelopt_sparse: {where}: a cross-attention mask must be the keys' 2-D padding mask, got {shape}"
        )
    keys = attention_mask[:, 0] if attention_mask.dim() == 3 else attention_mask
    if keys.shape != (batch, kv_len) or keys.dtype.is_floating_point:
        raise ValueError(
            f"modelopt_sparse: {where}: the cross-attention mask {tuple(attention_mask.shape)} "
            f"({attention_mask.dtype}) is not a bool or integer padding mask of {batch} rows of {kv_len} keys"
        )

    def build():
        q_real = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        return _compacted_layout(keys.to(device) > 0, q_real)

    return _cached((attention_mask,), ("cross", batch, q_len, kv_len, device), build)


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
        return _dense_layout(batch, q_len, kv_len, device), "one sequence per row (no position_ids)"
    pos = position_ids.to(device).expand(batch, -1)
    if pos.shape[-1] != q_len:
        raise ValueError(f"modelopt_sparse: position_ids of shape {tuple(position_ids.shape)} for {q_len} tokens")
    if _static_shapes_only(device):
        packed_rows = _continues_no_sequence(pos).any(dim=1)
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


def _continues_no_sequence(pos: torch.Tensor) -> torch.Tensor:
    """``[B, L - 1]`` bool: token ``j + 1`` of ``pos`` ``[B, L]`` starts a new sequence, its
    position not its predecessor's plus one (packing, as transformers finds it). The one
    statement of that rule: the static-shape path and the sequence starts both use it."""
    return pos[:, 1:] - pos[:, :-1] != 1


def _sequence_starts(pos: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) offsets, int64, of the tokens of ``pos`` ``[B, L]`` that start a
    sequence: the first of each row and every token :func:`_continues_no_sequence` marks."""
    starts_here = torch.ones_like(pos, dtype=torch.bool)
    starts_here[:, 1:] = _continues_no_sequence(pos)
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
