"""modelopt_sparse: N:M structured sparse softmax attention for PyTorch and HuggingFace."""

__version__ = "0.1.0"

from .kernels import attention  # noqa: E402
from .config import (  # noqa: E402
    SPARSE_SOFTMAX_2_4_SINKS,
    SPARSE_SOFTMAX_4_8,
    SPARSE_SOFTMAX_8_16,
    SPARSE_SOFTMAX_DEFAULT,
    SparseAttentionAttributeConfig,
    SparseAttentionConfig,
)
from .methods import (  # noqa: E402
    PackedBatch,
    SparseAttentionMethod,
    TorchSparseSoftmax,
    TritonSparseSoftmax,
    get_method,
    register_method,
    registered_methods,
)
from .conversion import disable, enable, is_sparsified, print_summary, sparsify  # noqa: E402
from .save_restore import (  # noqa: E402
    restore,
    restore_from_pretrained,
    restore_from_state,
    save,
    sparse_state,
)
from .stats import collect_stats  # noqa: E402

__all__ = [
    "attention",
    "__version__",
    "SparseAttentionAttributeConfig",
    "SparseAttentionConfig",
    "SPARSE_SOFTMAX_DEFAULT",
    "SPARSE_SOFTMAX_4_8",
    "SPARSE_SOFTMAX_8_16",
    "SPARSE_SOFTMAX_2_4_SINKS",
    "SparseAttentionMethod",
    "TritonSparseSoftmax",
    "TorchSparseSoftmax",
    "PackedBatch",
    "register_method",
    "get_method",
    "registered_methods",
    "sparsify",
    "enable",
    "disable",
    "is_sparsified",
    "print_summary",
    "sparse_state",
    "restore_from_state",
    "save",
    "restore",
    "restore_from_pretrained",
    "collect_stats",
]
