"""Sparse-attention methods: what a converted attention module computes.

A method is a class registered under a name with :func:`register_method`. The name goes in
the ``method`` field of a :class:`~modelopt_sparse.config.SparseAttentionAttributeConfig`.
At conversion time one method instance is created per attention module; it decides the
kernel settings of that module (:meth:`SparseAttentionMethod.kernel_kwargs`) and runs the
attention on packed varlen tensors (:meth:`SparseAttentionMethod.attention`).

The base class already implements a complete kernel-fused method, so a subclass overrides
only what differs (a per-layer N:M choice, another backend, ...); there are no
calibration or mask-application stubs to fill in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import kernels
from .kernels.semantics import check_pattern

if TYPE_CHECKING:
    from .config import SparseAttentionAttributeConfig

__all__ = [
    "PackedBatch",
    "SparseAttentionMethod",
    "TritonSparseSoftmax",
    "TorchSparseSoftmax",
    "register_method",
    "get_method",
    "registered_methods",
]

# The N:M fields a method hands to the kernel; kernel_kwargs() must return exactly these.
KERNEL_FIELDS = ("sparsity_n", "sparsity_m", "num_sink_tokens", "dense_window_size", "tie_break")

_REGISTRY: dict[str, type[SparseAttentionMethod]] = {}


@dataclass(frozen=True)
class PackedBatch:
    """Varlen metadata of one attention call, in the layout of :func:`modelopt_sparse.attention`.

    ``q`` holds ``[total_q, Hq, D]`` rows, ``k``/``v`` ``[total_kv, Hkv, D]`` rows, or, for
    one sequence per batch row, a padded batch ``[B, S, Hq, D]`` / ``[B, Skv, Hkv, D]`` with
    row-local starts (as :func:`modelopt_sparse.attention` takes them); the int32 tensors
    live on the device of ``q``. ``trusted`` marks metadata that is valid by
    construction (the HuggingFace adapter derives it on the device from the mask, and checks
    the mask itself): the kernel then skips reading it back, which would cost a device sync.
    ``rows_covered`` (trusted metadata only) says the sequences cover every packed row, so
    outputs need no zero fill.
    """

    b_start_loc: torch.Tensor
    b_seq_len: torch.Tensor
    max_input_len: int
    b_start_loc_k: torch.Tensor
    b_seq_len_k: torch.Tensor
    max_input_len_k: int
    trusted: bool = False
    rows_covered: bool = False


class SparseAttentionMethod:
    """Base class of sparse-attention methods; by itself a complete fused N:M method.

    Subclasses are registered with :func:`register_method` and may override:

    * ``backends``: the ``backend`` config values the method accepts;
    * :meth:`kernel_kwargs`: the N:M settings of one module (called once, at conversion);
    * :meth:`select_backend`: the kernel backend for a device;
    * :meth:`attention`: the computation itself, on packed varlen tensors.

    Args:
        config: the attribute config resolved for the module (patterns already merged).
    """

    name: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("auto", "triton", "torch")

    def __init__(self, config: SparseAttentionAttributeConfig):
        self.config = config

    def kernel_kwargs(self, module_name: str, module: torch.nn.Module) -> dict[str, Any]:
        """The N:M settings of ``module``: a dict with exactly the keys of ``KERNEL_FIELDS``.

        Called once when the module is converted (and again on restore, where the result
        must match the recorded one). The default copies the config fields.
        """
        return {field: getattr(self.config, field) for field in KERNEL_FIELDS}

    def select_backend(self, device: torch.device) -> str:
        """Kernel backend for tensors on ``device``. ``"auto"`` stays ``"auto"`` on CUDA, where
        :func:`modelopt_sparse.kernels.attention` picks per call (the Hopper engine for long
        prefills on sm_90, the Triton kernels otherwise), and is the reference (``"torch"``)
        elsewhere."""
        if self.config.backend == "auto":
            return "auto" if device.type == "cuda" else "torch"
        return self.config.backend

    def attention(
        self,
        module: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: PackedBatch,
        *,
        softmax_scale: float | None,
        kernel_kwargs: dict[str, Any],
        return_stats: bool,
        is_causal: bool = True,
        sliding_window: int | None = None,
        softcap: float | None = None,
        learned_sinks: torch.Tensor | None = None,
    ):
        """Attention of packed sequences; returns ``out`` or ``(out, stats)`` like the kernel.

        ``q``, ``k`` and ``v`` are packed ``[rows, H, D]`` or a padded batch ``[B, S, H, D]``
        (see :class:`PackedBatch`); the output has the shape of ``q``. They may hold rows
        outside every sequence; their output rows must be zero, as the kernel makes them.

        ``kernel_kwargs`` is what :meth:`kernel_kwargs` returned, with ``sparsity_n=0`` when
        the module is disabled.

        The other keywords are the module's own attention, which sparsity must not change:
        ``is_causal=False`` (encoders, vision towers), ``sliding_window`` (a query sees its
        own key and the ``W - 1`` before it), ``softcap`` (Gemma 2's logit soft-capping) and
        ``learned_sinks`` (``[Hq]``, one extra softmax logit per head, GPT-OSS). Each is
        passed only to modules that use it, so an override needs the keyword (or
        ``**kwargs``) only to support such modules; conversion checks that it has it.
        """
        # Keywords off are not passed: the kernel API gains them one at a time, and a
        # model without the feature must not depend on it.
        features = {}
        if sliding_window is not None:
            features["sliding_window"] = sliding_window
        if softcap is not None:
            features["softcap"] = softcap
        if learned_sinks is not None:
            features["learned_sinks"] = learned_sinks
        return kernels.attention(
            q, k, v,
            batch.b_start_loc, batch.b_seq_len, batch.max_input_len,
            is_causal, softmax_scale,
            batch.b_start_loc_k, batch.b_seq_len_k, batch.max_input_len_k,
            backend=self.select_backend(q.device),
            return_stats=return_stats,
            check_metadata=not batch.trusted,
            rows_covered=batch.trusted and batch.rows_covered,
            **kernel_kwargs,
            **features,
        )


def register_method(name: str, *, overwrite: bool = False):
    """Class decorator: register a :class:`SparseAttentionMethod` subclass under ``name``.

    Registering a different class under a taken name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, SparseAttentionMethod)):
            raise TypeError(f"@register_method({name!r}) needs a SparseAttentionMethod subclass, got {cls!r}")
        bad = [b for b in cls.backends if b not in ("auto", "triton", "torch")]
        if not cls.backends or bad:
            raise ValueError(f"{cls.__name__}.backends must be a non-empty subset of auto/triton/torch, got {cls.backends}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and not overwrite:
            raise ValueError(
                f"a sparse-attention method named {name!r} is already registered "
                f"({existing.__module__}.{existing.__qualname__}); pass overwrite=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type[SparseAttentionMethod]:
    """The method class registered under ``name``; ``ValueError`` listing the known names if none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown sparse-attention method {name!r}; registered methods: {sorted(_REGISTRY)}"
        ) from None


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def checked_kernel_kwargs(method: SparseAttentionMethod, module_name: str, module) -> dict[str, Any]:
    """``method.kernel_kwargs`` validated, so a custom method's mistake fails at conversion."""
    kw = method.kernel_kwargs(module_name, module)
    if not isinstance(kw, dict) or set(kw) != set(KERNEL_FIELDS):
        got = sorted(kw) if isinstance(kw, dict) else type(kw).__name__
        raise ValueError(
            f"{type(method).__name__}.kernel_kwargs() for {module_name!r} must return a dict with "
            f"keys {list(KERNEL_FIELDS)}, got {got}"
        )
    try:
        check_pattern(**kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{type(method).__name__}.kernel_kwargs() for {module_name!r}: {err}") from None
    return {field: kw[field] for field in KERNEL_FIELDS}


@register_method("triton_sparse_softmax")
class TritonSparseSoftmax(SparseAttentionMethod):
    """N:M sparse softmax through the fused Triton kernel (``backend="auto"`` falls back to
    the PyTorch reference for CPU tensors, where no Triton kernel can run)."""


@register_method("torch_sparse_softmax")
class TorchSparseSoftmax(SparseAttentionMethod):
    """The same N:M sparse softmax on the PyTorch reference backend: any device, float64 too."""

    backends = ("auto", "torch")

    def select_backend(self, device: torch.device) -> str:
        return "torch"
