"""The N:M sparse-softmax rule, stated once.

docs/semantics.md is the prose version of this module. Every backend implements exactly
this rule:

* the PyTorch reference calls :func:`kept_mask` below;
* the Triton kernels call ``_allowed_scores``, ``_dense_region`` and ``_selection_exponent`` in
  ``triton_attention/rule.py``, which the forward, the dK/dV and the dQ kernels share, and which
  the test-suite compares element for element with :func:`kept_mask` through a mask probe
  (``tests/test_kernel_triton.py``), for several tile shapes and both tile classifications.

Pattern validation (the N:M values, tie rules, token counts, window, cap and learned sinks)
also lives here, so that the kernel API and the plugin configs reject bad values with the
same words. Learned sinks (one extra softmax logit per query head) never touch the mask:
they enter the softmax only (``reference.sink_softmax``).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_M = (2, 4, 8, 16)
TIE_BREAKS = ("threshold", "index")


def check_pattern(
    sparsity_n: int,
    sparsity_m: int,
    num_sink_tokens: int = 0,
    dense_window_size: int = 0,
    tie_break: str = "threshold",
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the offending field of an N:M pattern."""
    for name, value in (
        ("sparsity_n", sparsity_n),
        ("sparsity_m", sparsity_m),
        ("num_sink_tokens", num_sink_tokens),
        ("dense_window_size", dense_window_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if sparsity_m not in SUPPORTED_M:
        raise ValueError(f"sparsity_m must be one of {SUPPORTED_M}, got {sparsity_m}")
    if not 0 <= sparsity_n < sparsity_m:
        raise ValueError(
            f"sparsity_n must satisfy 0 <= N < M (N=0 means dense); got N={sparsity_n}, "
            f"M={sparsity_m}"
        )
    if num_sink_tokens < 0:
        raise ValueError(f"num_sink_tokens must be >= 0, got {num_sink_tokens}")
    if dense_window_size < 0:
        raise ValueError(f"dense_window_size must be >= 0, got {dense_window_size}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")


def check_window_softcap(sliding_window, softcap, is_causal: bool = True) -> None:
    """Raise ``ValueError``/``TypeError`` for a bad ``sliding_window`` or ``softcap``.

    ``None`` turns either off. A sliding window needs causal attention: transformers'
    bidirectional sliding window (``abs(q - k) <= window``, inclusive) is a different
    rule, not implemented here.
    """
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(
                f"sliding_window must be an int or None, got {type(sliding_window).__name__} ({sliding_window!r})"
            )
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (None turns it off), got {sliding_window}")
        if not is_causal:
            raise ValueError(
                "sliding_window needs is_causal=True (a bidirectional sliding window is not supported)"
            )
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__} ({softcap!r})")
        if not 0 < softcap < math.inf:  # also false for NaN
            raise ValueError(f"softcap must be positive and finite (None turns it off), got {softcap}")


LEARNED_SINK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_learned_sinks(learned_sinks, heads: int, device, caller: str = "") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``learned_sinks`` is a floating ``[heads]``
    tensor (``heads``: the number of query heads) on ``device``. Metadata only: the values
    are never read (that would be a device synchronisation per call); a NaN or +inf logit
    gives NaN rows, as it would in the eager model."""
    if not isinstance(learned_sinks, torch.Tensor):
        raise TypeError(
            f"{caller}learned_sinks must be a tensor of shape [num_query_heads] or None, "
            f"got {type(learned_sinks).__name__}"
        )
    if learned_sinks.dtype not in LEARNED_SINK_DTYPES:
        raise TypeError(
            f"{caller}learned_sinks must be float16, bfloat16, float32 or float64, got {learned_sinks.dtype}"
        )
    if learned_sinks.dim() != 1 or learned_sinks.shape[0] != heads:
        raise ValueError(
            f"{caller}learned_sinks must have shape [{heads}] (one logit per query head), "
            f"got {tuple(learned_sinks.shape)}"
        )
    if learned_sinks.device != device:
        raise ValueError(f"{caller}learned_sinks is on {learned_sinks.device} but q is on {device}")


def capped_scores(scaled: torch.Tensor, softcap) -> torch.Tensor:
    """The scores the softmax sees: ``softcap * tanh(scaled / softcap)`` with a cap, else
    ``scaled`` (the scaled dot products). As Gemma 2's eager attention: scale first, then
    cap. -inf stays -inf (a disallowed score is never capped into the softmax)."""
    if not softcap:
        return scaled
    return torch.where(scaled == float("-inf"), scaled, softcap * torch.tanh(scaled / softcap))


def aligned_query_position(index, q_len, kv_len):
    """Key-space position of query ``index`` (0-based) of a sequence with ``q_len`` queries
    and ``kv_len`` keys: the queries are the last q_len keys. Elementwise on tensors.

    This bottom-right alignment makes one rule cover prefill (q_len == kv_len), chunked
    prefill after a cached prefix (q_len < kv_len) and single-token decode (q_len == 1).
    """
    return index + (kv_len - q_len)


def query_positions(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Absolute key-space position of each query row of one sequence."""
    return aligned_query_position(torch.arange(q_len, device=device), q_len, kv_len)


def selection_applies(sparsity_n: int, q_len: int) -> bool:
    """Whether N:M selection runs for a sequence at all: not for dense patterns, and not for
    a single query (decode), which always keeps every allowed key."""
    return sparsity_n > 0 and q_len > 1


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, is_causal: bool, sliding_window=None) -> torch.Tensor:
    """Which keys a query may attend before selection (broadcasting ``q_pos`` against
    ``k_pos``): with ``is_causal`` only keys at or before the query's position, and with a
    ``sliding_window`` W (None or 0: off) only keys with ``q_pos - k_pos < W``."""
    allowed = torch.ones(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device)
    if is_causal:
        allowed = k_pos <= q_pos
    if sliding_window:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    return allowed


def kept_mask(
    qk: torch.Tensor,
    q_len: int,
    kv_len: int,
    *,
    is_causal: bool,
    sparsity_n: int,
    sparsity_m: int,
    num_sink_tokens: int,
    dense_window_size: int,
    tie_break: str,
    row_offset: int = 0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean mask of the scores that survive, for the rows ``qk[..., r, :]``.

    ``qk`` holds raw dot products q·k of shape ``[..., rows, kv_len]`` for query rows
    ``row_offset .. row_offset + rows - 1`` of a sequence of ``q_len`` queries and
    ``kv_len`` keys. Selection compares raw dot products: the softmax scale is positive, so
    they order keys exactly as the scaled scores do, without ties created by rounding the
    product with the scale. For the same reason a soft cap (strictly increasing) never
    enters the mask.

    ``sliding_window`` (None or 0: off) disallows keys with ``pos(i) - j >= sliding_window``,
    as transformers' ``sliding_window_overlay``; disallowed keys count as -inf in their
    group exactly as causally masked keys do. The window is defined for causal attention
    only; :func:`check_window_softcap` refuses it without ``is_causal``.
    """
    rows, keys = qk.shape[-2], qk.shape[-1]
    if keys != kv_len:
        raise ValueError(f"qk has {keys} key columns but kv_len is {kv_len}")
    device = qk.device
    q_pos = query_positions(q_len, kv_len, device)[row_offset : row_offset + rows]
    k_idx = torch.arange(kv_len, device=device)
    allowed = allowed_keys(q_pos[:, None], k_idx[None, :], is_causal, sliding_window)
    allowed = allowed.expand(rows, kv_len).expand(qk.shape)
    # Decode guard: a single query token never goes through selection.
    if not selection_applies(sparsity_n, q_len):
        return allowed

    m, n = sparsity_m, sparsity_n
    scores = qk.masked_fill(~allowed, float("-inf"))
    pad = (-kv_len) % m
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    groups = scores.unflatten(-1, (-1, m))  # group(j) = j // M, counted from key 0
    if tie_break == "threshold":
        # The N-th largest with multiplicity; everything tied with it passes.
        nth = groups.topk(n, dim=-1).values[..., n - 1 : n]
        selected = groups >= nth
    elif tie_break == "index":
        # Exactly N: a stable descending sort ranks equal scores by lower key index first.
        order = groups.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m, device=device).expand_as(order))
        selected = rank < n
    else:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    selected = selected.flatten(-2)[..., :kv_len]

    distance = q_pos[:, None] - k_idx[None, :]
    dense = (k_idx[None, :] < num_sink_tokens) | ((distance >= 0) & (distance < dense_window_size))
    return allowed & (selected | dense)
