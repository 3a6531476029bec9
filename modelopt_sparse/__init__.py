"""modelopt_sparse: N:M structured sparse softmax attention for PyTorch and HuggingFace."""

__version__ = "0.1.0"

from .kernels import attention  # noqa: E402

__all__ = ["attention", "__version__"]
