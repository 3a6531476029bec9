"""What the kernel benchmark measures: implementations, shapes, settings and the cases.

A *case* is one configuration (mode x causal x sequence length x head dim); every
implementation (our variants, then the peers) is timed on it back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Our variants: keyword arguments of attention() on top of the shared pattern settings.
OUR_VARIANTS: dict[str, dict] = {
    "dense": {"sparsity_n": 0, "sparsity_m": 4, "tie_break": "threshold"},
    "2:4": {"sparsity_n": 2, "sparsity_m": 4, "tie_break": "threshold"},
    "4:8": {"sparsity_n": 4, "sparsity_m": 8, "tie_break": "threshold"},
    "8:16": {"sparsity_n": 8, "sparsity_m": 16, "tie_break": "threshold"},
    "2:4-index": {"sparsity_n": 2, "sparsity_m": 4, "tie_break": "index"},
}
PEERS = ("sdpa-flash", "sdpa-cudnn", "flex", "fa4", "sdpa-math")
# fa4 (FlashAttention-4) is a default on CUDA: timed when flash-attn-4 is installed, else a
# column of n/a that says so. It is CUDA-only, so the CPU defaults leave it out.
DEFAULT_PEERS = {"cuda": ("sdpa-flash", "sdpa-cudnn", "flex", "fa4"), "cpu": ("sdpa-math", "flex")}
MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

FULL_SHAPES = {"seq_lens": (4096, 16384), "head_dims": (64, 128), "heads": 32}
QUICK_SHAPES = {"seq_lens": (256,), "head_dims": (64,), "heads": 2}


@dataclass
class BenchConfig:
    """What to measure. ``None`` fields are filled by :func:`resolve_config`."""

    seq_lens: tuple[int, ...] | None = None
    head_dims: tuple[int, ...] | None = None
    heads: int | None = None
    gqa: int = 1
    modes: tuple[str, ...] = MODES
    causal: tuple[bool, ...] = (True, False)
    variants: tuple[str, ...] = tuple(OUR_VARIANTS)
    peers: tuple[str, ...] | None = None
    device: str = "auto"
    dtype: str = "bf16"
    backend: str | None = None  # ours; None: "triton" on CUDA, "torch" elsewhere
    dense_window_size: int = 64
    num_sink_tokens: int = 0
    # Sliding-window attention (0: off): ours, FlexAttention and FA4 get the window, SDPA has none.
    # FLOPs stay those of full causal attention, so TFLOPS against a run without the window
    # read as the speed-up the window brings.
    sliding_window: int = 0
    warmup_ms: float | None = None
    rep_ms: float | None = None
    cpu_warmup: int = 1
    cpu_reps: int = 5
    flex_compile_mode: str | None = None
    seed: int = 0
    quick: bool = False

    @property
    def kv_heads(self) -> int:
        return self.heads // self.gqa


@dataclass(frozen=True)
class Case:
    """One configuration: every implementation is timed on it back to back."""

    mode: str
    causal: bool
    seq_len: int
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def flops(self) -> float:
        flops = 4.0 * self.seq_len**2 * self.heads * self.head_dim
        if self.causal:
            flops /= 2
        if self.mode == "fwdbwd":
            # Backward recomputes the scores and does four matmuls to the forward's two.
            flops *= 3.5
        return flops

    @property
    def label(self) -> str:
        return (
            f"{self.mode:<6} {'causal' if self.causal else 'noncausal':<9} "
            f"S={self.seq_len:<6} D={self.head_dim}"
        )

    @classmethod
    def of_row(cls, row: dict) -> Case:
        return cls(row["mode"], row["causal"], row["seq_len"], row["head_dim"], row["heads"], row["kv_heads"])


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is there, else ``cpu``; a CUDA device without
    CUDA is an error (ValueError)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return device


def resolve_config(cfg: BenchConfig) -> BenchConfig:
    """Fill defaults that depend on the device and on ``quick``; validate the rest."""
    device = resolve_device(cfg.device)
    dev_type = torch.device(device).type
    shapes = QUICK_SHAPES if cfg.quick else FULL_SHAPES
    cfg = replace(
        cfg,
        device=device,
        seq_lens=tuple(cfg.seq_lens or shapes["seq_lens"]),
        head_dims=tuple(cfg.head_dims or shapes["head_dims"]),
        heads=cfg.heads or shapes["heads"],
        peers=tuple(DEFAULT_PEERS.get(dev_type, ("sdpa-math",)) if cfg.peers is None else cfg.peers),
        backend=cfg.backend or ("triton" if dev_type == "cuda" else "torch"),
        warmup_ms=cfg.warmup_ms if cfg.warmup_ms is not None else (25 if cfg.quick else 100),
        rep_ms=cfg.rep_ms if cfg.rep_ms is not None else (100 if cfg.quick else 500),
    )
    for name, values, allowed in (
        ("modes", cfg.modes, MODES),
        ("variants", cfg.variants, tuple(OUR_VARIANTS)),
        ("peers", cfg.peers, PEERS),
    ):
        unknown = [x for x in values if x not in allowed]
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {list(allowed)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.gqa < 1 or cfg.heads % cfg.gqa:
        raise ValueError(f"--gqa {cfg.gqa} must be >= 1 and divide --heads {cfg.heads}")
    if cfg.sliding_window < 0:
        raise ValueError(f"--sliding-window must be >= 0 (0: off), got {cfg.sliding_window}")
    if cfg.sliding_window and False in cfg.causal:
        raise ValueError("--sliding-window needs causal attention: add --causal causal")
    if any(s < 1 for s in cfg.seq_lens) or any(d < 1 for d in cfg.head_dims):
        raise ValueError("sequence lengths and head dims must be positive")
    return cfg


def cases(cfg: BenchConfig) -> list[Case]:
    return [
        Case(mode, causal, s, d, cfg.heads, cfg.kv_heads)
        for mode in cfg.modes
        for causal in cfg.causal
        for s in cfg.seq_lens
        for d in cfg.head_dims
    ]


def implementations(cfg: BenchConfig) -> list[str]:
    return list(cfg.variants) + list(cfg.peers)
