"""N:M sparse flash attention: the fused Triton kernels and the PyTorch reference.

Kernels know nothing about HuggingFace: they take packed ``[tokens, heads, head_dim]``
tensors and int32 varlen metadata.
"""

from .api import attention, interpreting
from .semantics import SUPPORTED_M, TIE_BREAKS, check_pattern, kept_mask

__all__ = ["attention", "interpreting", "kept_mask", "check_pattern", "SUPPORTED_M", "TIE_BREAKS"]
