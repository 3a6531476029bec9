"""The mask-interface function, and the token codes it returns.

What the mask function returns (and so what the attention function receives):

* ``None``: no padding, and the keys end at the last query (the common case).
* a 2-D int32 tensor ``[B, L]`` of *token codes*, one per key slot ``j < L``: ``0`` for no
  real token (padding, or an empty slot of a static cache), ``1`` for a real token that is
  not one of this call's queries, ``2 + r`` for the real token of query row ``r``. It stays
  a plain 2-D tensor because transformers feeds a precomputed mask back into the mask
  function (static-cache ``generate``); turned into bool there it means "real token",
  which is still right.
* a 3-D int32 tensor ``[B, 1, Skv]`` of *key codes* (``1`` for a real key, ``0`` for
  padding), for a bidirectional mask of fewer or more queries than keys that starts at no
  offset: what transformers builds for cross-attention (``encoder_hidden_states=``), where
  the queries are not among the keys. A cross-attention call reads it as the keys' padding
  (every query real); any other call reads it as the token codes it stands for (queries in
  the first slots, :func:`codes_from_key_codes`).
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
"""

from __future__ import annotations

from typing import Any

import torch

from .. import lazy_checks

# Token codes (see the module docstring).
_CODES_DTYPE = torch.int32
_FIRST_QUERY_CODE = 2


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
    # comes from the module's is_causal (see forward._resolve_is_causal), as SDPA takes it
    # when no mask is materialized: the token codes (which slots hold real tokens) serve
    # both. A sliding-window mask adds only the window, which the module passes as
    # sliding_window.
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
    if (mask_function is bidirectional_mask_function and q_length != kv_length and kv_offset == 0
            and not isinstance(q_offset, torch.Tensor) and int(q_offset) == 0):
        return _key_codes(batch_size, kv_length, attention_mask, device)
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


def _key_codes(batch_size, kv_length, attention_mask, device) -> torch.Tensor:
    """``[B, 1, kv_length]`` int32 key codes (module docstring): 1 where the padding mask says
    real (every slot without one), 0 for padding and for slots past the mask's end."""
    if attention_mask is None:
        return torch.ones(batch_size, 1, kv_length, dtype=_CODES_DTYPE, device=device)
    if is_key_codes(attention_mask):  # ours, fed back (as a precomputed mask is in static-cache generate)
        attention_mask = attention_mask[:, 0]
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
        raise ValueError(
            f"modelopt_sparse: expected a 2-D padding mask of {batch_size} rows, got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype.is_floating_point:
        raise TypeError("modelopt_sparse: a 2-D attention_mask must be bool or integer 0/1, not floating point")
    codes = torch.zeros(batch_size, 1, kv_length, dtype=_CODES_DTYPE, device=device)
    width = min(kv_length, attention_mask.shape[-1])
    codes[:, 0, :width] = attention_mask[:, :width].to(device=codes.device, dtype=torch.bool)
    return codes


def is_key_codes(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.dtype == _CODES_DTYPE


def codes_from_key_codes(key_codes: torch.Tensor, q_len: int) -> torch.Tensor:
    """The ``[B, Skv]`` token codes that key codes stand for in a call that is not
    cross-attention: ``q_len`` queries in the first slots (the mask starts at no offset),
    nothing real after the last query (an empty cache tail), as :func:`token_codes` makes them."""
    real = key_codes[:, 0] > 0
    slots = torch.arange(real.shape[-1], device=real.device, dtype=_CODES_DTYPE)
    return torch.where(real & (slots < q_len), slots + _FIRST_QUERY_CODE, 0).to(_CODES_DTYPE)


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
        # Index i <= n holds code i + 1 (1: before the queries; 2 + r at index r + 1: query row r),
        # index n + 1 code 0 (after the last query): the remainder wraps the last value to 0.
        # (Not `table[-1] = 0`: a Python scalar written into a CUDA tensor is a host-to-device
        # copy, which synchronizes.)
        top = n + _FIRST_QUERY_CODE
        return torch.arange(_FIRST_QUERY_CODE - 1, top + 1, device=device, dtype=_CODES_DTYPE).remainder_(top)

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


def _table_lookup(index, q_len, device) -> torch.Tensor:
    """The code table ``[1, 2, ..., q_len + 1, 0]`` at ``index`` (values in ``[0, q_len + 1]``):
    a gather from the cached table eagerly (one kernel); under torch.compile the same entries as
    ``where(index > q_len, 0, index + 1)``, which Inductor fuses. (A gather or a modulo there, with
    a sliding layer's symbolic slot offset ``Max(0, ...)`` in the index, fails in torch 2.13's CPU
    scheduler: "vr must not be None for symbol q1".)"""
    if torch.compiler.is_compiling():
        return torch.where(index > q_len, 0, index + 1).to(_CODES_DTYPE)
    return _code_constant("table", q_len, device)[index]


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
    codes = _table_lookup(index, q_len, device)
    if padding is not None:
        # Slots the mask does not reach (a static cache longer than the mask) lie after the
        # last query (checked by the callers): their code is 0 already.
        pad = padding[:, kv_offset : kv_offset + width]
        if pad.device != codes.device or pad.dtype != torch.bool:
            pad = pad.to(device=codes.device, dtype=torch.bool)
        codes[:, : pad.shape[-1]].mul_(pad)
    return codes
