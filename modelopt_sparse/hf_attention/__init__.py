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

The package, in import order (each module imports only those above it):

* :mod:`.masks`: the mask-interface function, and the token codes it returns.
* :mod:`.layouts`: the varlen layouts the kernel runs on, derived from token codes, a 4-D
  mask with ``position_ids``, or packed ``cu_seq_lens_q/k``.
* :mod:`.forward`: the attention-interface function, and its checks of what transformers
  passes.
* this ``__init__``: the registration with transformers.
"""

from __future__ import annotations

from .forward import ATTN_IMPLEMENTATION, sparse_attention_forward
from .layouts import _block_causal, _Layout
from .masks import sliding_window_of, sparse_attention_mask, token_codes

__all__ = [
    "ATTN_IMPLEMENTATION",
    "register_with_transformers",
    "sparse_attention_forward",
    "sparse_attention_mask",
    "sliding_window_of",
    "token_codes",
    # Internals that tests import from here (patch a name in the module that looks it up,
    # not here: the package's copy is not the one its callers read).
    "_Layout",
    "_block_causal",
]


def register_with_transformers() -> None:
    """Register the attention and mask functions (idempotent; transformers is imported lazily)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparse_attention_mask)

