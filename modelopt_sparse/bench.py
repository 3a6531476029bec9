"""TFLOPS of modelopt_sparse N:M sparse flash attention against PyTorch's attention kernels.

One run measures, for every configuration (mode x causal x sequence length x head dim):

* ours: ``modelopt_sparse.kernels.attention`` on one varlen-packed sequence, dense and
  2:4, 4:8, 8:16 and 2:4 with ``tie_break="index"``;
* peers: PyTorch SDPA pinned to the flash and to the cuDNN backend, and FlexAttention
  compiled with ``torch.compile`` (causal through a ``create_block_mask`` BlockMask).

TFLOPS are *effective*: every implementation of a configuration is credited with the dense
FLOPs ``4*S^2*H*D`` (halved when causal, x3.5 for forward+backward), so a ratio of two
TFLOPS numbers is a ratio of speeds. A peer or variant that cannot run is reported as
"n/a" with its reason; it never stops the run.

Run ``modelopt-sparse bench --help`` (or ``python benchmarks/bench_attention.py --help`` from
a checkout); benchmarks/README.md explains the output. Other scripts can
``from modelopt_sparse.bench import run_benchmarks``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

# The checkout this module sits in, for recording the git commit of a run.
REPO_ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

# Our variants: keyword arguments of attention() on top of the shared pattern settings.
OUR_VARIANTS: dict[str, dict] = {
    "dense": {"sparsity_n": 0, "sparsity_m": 4, "tie_break": "threshold"},
    "2:4": {"sparsity_n": 2, "sparsity_m": 4, "tie_break": "threshold"},
    "4:8": {"sparsity_n": 4, "sparsity_m": 8, "tie_break": "threshold"},
    "8:16": {"sparsity_n": 8, "sparsity_m": 16, "tie_break": "threshold"},
    "2:4-index": {"sparsity_n": 2, "sparsity_m": 4, "tie_break": "index"},
}
PEERS = ("sdpa-flash", "sdpa-cudnn", "flex", "sdpa-math")
DEFAULT_PEERS = {"cuda": ("sdpa-flash", "sdpa-cudnn", "flex"), "cpu": ("sdpa-math", "flex")}
MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

FULL_SHAPES = {"seq_lens": (4096, 16384), "head_dims": (64, 128), "heads": 32}
QUICK_SHAPES = {"seq_lens": (256,), "head_dims": (64,), "heads": 2}
# The head dim the un-annotated target lines are judged at; the D=64 lines name theirs.
MAIN_HEAD_DIM = 128


@dataclass(frozen=True)
class Target:
    mode: str
    causal: bool
    head_dim: int | None  # None: MAIN_HEAD_DIM (or the largest measured, if it was not)
    numerator: str
    denominator: str
    target: float | None  # None: reported for information, no PASS/MISS

    def label(self, head_dim) -> str:
        kind = ("causal" if self.causal else "non-causal") + (" fwd" if self.mode == "fwd" else " fwd+bwd")
        names = {"flex": "FlexAttention", "sdpa-flash": "SDPA-flash", "sdpa-cudnn": "SDPA-cuDNN"}
        if self.denominator in OUR_VARIANTS:
            what = f"{self.numerator} / {self.denominator}"
        else:
            what = f"{self.numerator} vs {names.get(self.denominator, self.denominator)}"
        return f"{kind} D={head_dim}: {what}"


TARGETS: tuple[Target, ...] = (
    Target("fwd", True, None, "dense", "flex", 1.10),
    Target("fwd", True, None, "dense", "sdpa-flash", None),
    Target("fwd", False, None, "dense", "flex", 1.00),
    Target("fwd", True, None, "2:4", "dense", 0.80),
    Target("fwd", True, None, "4:8", "dense", 0.75),
    Target("fwd", True, None, "8:16", "dense", 0.68),
    Target("fwd", True, None, "2:4-index", "dense", 0.68),
    Target("fwdbwd", True, None, "dense", "sdpa-flash", 1.10),
    Target("fwdbwd", True, None, "2:4", "dense", 0.80),
    Target("fwd", True, 64, "dense", "flex", 1.05),
    Target("fwd", True, 64, "2:4", "dense", 0.70),
)


class Unsupported(Exception):
    """An implementation that does not apply to this device or configuration."""


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


@dataclass
class Prepared:
    fn: Callable[[], object]
    grads: list = field(default_factory=list)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str | None = None


def resolve_config(cfg: BenchConfig) -> BenchConfig:
    """Fill defaults that depend on the device and on ``quick``; validate the rest."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
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


# ----------------------------------------------------------------------------- inputs


def _randn(shape, device, dtype, requires_grad: bool) -> torch.Tensor:
    # Random, never zeros: zeros make tensor cores (and the N:M selection) unrealistically fast.
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def _with_backward(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], train: bool,
                   **kw) -> Prepared:
    if not train:
        return Prepared(fn=forward, **kw)
    # Every output here has the shape of q (leaves[0]).
    grad_out = torch.randn_like(leaves[0], requires_grad=False)

    def fwd_bwd():
        forward().backward(grad_out)

    return Prepared(fn=fwd_bwd, grads=list(leaves), **kw)


def _prepare_ours(variant: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    from modelopt_sparse.kernels import attention

    train = case.mode == "fwdbwd"
    s, d = case.seq_len, case.head_dim
    q = _randn((s, case.heads, d), device, dtype, train)
    k = _randn((s, case.kv_heads, d), device, dtype, train)
    v = _randn((s, case.kv_heads, d), device, dtype, train)
    start = torch.zeros(1, dtype=torch.int32, device=device)
    seq_len = torch.full((1,), s, dtype=torch.int32, device=device)
    kwargs = dict(
        OUR_VARIANTS[variant],
        num_sink_tokens=cfg.num_sink_tokens,
        dense_window_size=cfg.dense_window_size,
        backend=cfg.backend,
    )

    def forward():
        return attention(q, k, v, start, seq_len, s, is_causal=case.causal, **kwargs)

    return _with_backward(forward, (q, k, v), train)


def _peer_inputs(case: Case, device, dtype, train: bool):
    s, d = case.seq_len, case.head_dim
    return (
        _randn((1, case.heads, s, d), device, dtype, train),
        _randn((1, case.kv_heads, s, d), device, dtype, train),
        _randn((1, case.kv_heads, s, d), device, dtype, train),
    )


def _prepare_sdpa(name: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[name]
    if name != "sdpa-math" and device.type != "cuda":
        raise Unsupported(f"{name} needs CUDA (device is {device})")
    train = case.mode == "fwdbwd"
    q, k, v = _peer_inputs(case, device, dtype, train)
    gqa = case.kv_heads != case.heads
    note = None

    def context():
        return sdpa_kernel(backend)

    def run(k_, v_, **extra):
        return F.scaled_dot_product_attention(q, k_, v_, is_causal=case.causal, **extra)

    if gqa:
        try:
            with context(), torch.no_grad():
                run(k, v, enable_gqa=True)
        except Exception as exc:  # this backend has no native GQA: give it full-size K/V
            groups = case.heads // case.kv_heads
            k = k.detach().repeat_interleave(groups, dim=1).requires_grad_(train)
            v = v.detach().repeat_interleave(groups, dim=1).requires_grad_(train)
            note = f"K/V expanded to {case.heads} heads; native GQA failed: {_short(exc)}"
            gqa = False
    extra = {"enable_gqa": True} if gqa else {}
    leaves = (q, k, v)
    return _with_backward(lambda: run(leaves[1], leaves[2], **extra), leaves, train,
                          context=context, note=note)


def _prepare_flex(case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    if device.type != "cuda":
        raise Unsupported("FlexAttention is benchmarked on CUDA only")
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per configuration: otherwise the second shape turns on dynamic shapes
    # and later ones can hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True, mode=cfg.flex_compile_mode)
    train = case.mode == "fwdbwd"
    q, k, v = _peer_inputs(case, device, dtype, train)
    block_mask = None
    if case.causal:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(
            causal_mask, B=None, H=None, Q_LEN=case.seq_len, KV_LEN=case.seq_len, device=device
        )
    extra = {"enable_gqa": True} if case.kv_heads != case.heads else {}

    def forward():
        return compiled(q, k, v, block_mask=block_mask, **extra)

    return _with_backward(forward, (q, k, v), train)


def _prepare(impl: str, case: Case, cfg: BenchConfig, device, dtype) -> Prepared:
    if impl in OUR_VARIANTS:
        return _prepare_ours(impl, case, cfg, device, dtype)
    if impl == "flex":
        return _prepare_flex(case, cfg, device, dtype)
    return _prepare_sdpa(impl, case, cfg, device, dtype)


# ----------------------------------------------------------------------------- timing


def _time_ms(prep: Prepared, cfg: BenchConfig, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                prep.fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                grad_to_none=prep.grads or None, return_mode="median",
            )
        )
    times = []
    for i in range(cfg.cpu_warmup + cfg.cpu_reps):
        for t in prep.grads:
            t.grad = None
        t0 = time.perf_counter()
        prep.fn()
        if i >= cfg.cpu_warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# A row whose host side takes this share of its measured time or more is host-bound: the
# GPU waits for launches, and the kernel itself is faster than the number shows.
HOST_BOUND_SHARE = 0.9


def _host_enqueue_ms(prep: Prepared, reps: int = 20) -> float:
    """Host time to issue one call on CUDA, without waiting for the GPU (the queue holds far
    more than ``reps`` calls' launches, so nothing blocks)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        for t in prep.grads:
            t.grad = None
        prep.fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / reps * 1e3


def _host_bound(row: dict) -> bool:
    return row.get("host_ms") is not None and row["ms"] and row["host_ms"] >= HOST_BOUND_SHARE * row["ms"]


def _short(exc: BaseException, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    # Compiler errors put the source excerpt first and the actual complaint last.
    text = f"{type(exc).__name__}: {lines[0]}" + (f" ... {lines[-1]}" if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detail(exc: BaseException, limit: int = 4000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2:]


def _warning_texts(caught) -> list[str]:
    seen = []
    for w in caught:
        text = str(w.message).strip().splitlines()[0][:300] if str(w.message).strip() else ""
        if text and text not in seen:
            seen.append(text)
    return seen[:4]


def _release(device) -> str | None:
    """Free what the last measurement held; return why the CUDA context is unusable, if it is."""
    gc.collect()
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as exc:  # an illegal address or the like poisons the whole context
        return _short(exc)
    return None


def _new_row(case: Case, impl: str, cfg: BenchConfig) -> dict:
    return {
        "mode": case.mode,
        "causal": case.causal,
        "seq_len": case.seq_len,
        "head_dim": case.head_dim,
        "heads": case.heads,
        "kv_heads": case.kv_heads,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "impl": impl,
        "kind": "ours" if impl in OUR_VARIANTS else "peer",
        "backend": cfg.backend if impl in OUR_VARIANTS else None,
        "flops": case.flops,
        "status": "n/a",
        "ms": None,
        "host_ms": None,  # CUDA: host time to enqueue one call (see HOST_BOUND_SHARE)
        "tflops": None,
        "reason": None,
        "detail": None,
        "note": None,
        "warnings": [],
    }


def _measure(case: Case, impl: str, cfg: BenchConfig, device, dtype) -> tuple[dict, str | None]:
    row = _new_row(case, impl, cfg)
    prep = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(cfg.seed)
            prep = _prepare(impl, case, cfg, device, dtype)
            grad_mode = torch.no_grad() if case.mode == "fwd" else contextlib.nullcontext()
            with prep.context(), grad_mode:
                ms = _time_ms(prep, cfg, device)
                # A few reps suffice for long calls, which no host path comes near.
                host_ms = _host_enqueue_ms(prep, 20 if ms < 5 else 3) if device.type == "cuda" else None
            if not (math.isfinite(ms) and ms > 0):
                raise RuntimeError(f"the timer returned {ms} ms")
            row.update(status="ok", ms=ms, host_ms=host_ms, tflops=case.flops / (ms * 1e-3) / 1e12,
                       note=prep.note)
        except Exception as exc:
            row["reason"] = _short(exc)
            row["detail"] = _detail(exc)
        # SDPA explains why a backend refused only in warnings, so keep them with the row.
        row["warnings"] = _warning_texts(caught)
    del prep
    return row, _release(device)


def run_benchmarks(config: BenchConfig | None = None, *, on_row: Callable[[dict], None] | None = None,
                   **overrides) -> list[dict]:
    """Time every (configuration, implementation) pair; return one dict per pair.

    ``overrides`` are :class:`BenchConfig` fields, e.g.
    ``run_benchmarks(quick=True, device="cpu", modes=("fwd",))``. Each row holds the
    configuration, ``impl``, ``status`` ("ok" or "n/a"), ``ms`` and ``tflops`` (None when
    n/a) and ``reason``. ``on_row`` is called after each measurement (progress, partial saves).
    """
    cfg = resolve_config(replace(config or BenchConfig(), **overrides))
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    rows: list[dict] = []
    lost: str | None = None
    for case in cases(cfg):
        for impl in implementations(cfg):
            if lost is None:
                row, lost = _measure(case, impl, cfg, device, dtype)
            else:
                row = _new_row(case, impl, cfg)
                row["reason"] = f"not run: the CUDA context was lost earlier ({lost})"
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


# ----------------------------------------------------------------------------- reporting


def compute_ratios(rows: Iterable[dict], targets: Sequence[Target] = TARGETS) -> list[dict]:
    """Each target line: the speed ratio at every measured sequence length, and the worst one.

    The verdict uses the worst sequence length, so a win at one length cannot hide a
    regression at another.
    """
    rows = list(rows)
    tflops = {
        (r["mode"], r["causal"], r["seq_len"], r["head_dim"], r["impl"]): r["tflops"]
        for r in rows
        if r["status"] == "ok"
    }
    head_dims = sorted({r["head_dim"] for r in rows})
    main_d = MAIN_HEAD_DIM if MAIN_HEAD_DIM in head_dims else (head_dims[-1] if head_dims else None)
    seq_lens = sorted({r["seq_len"] for r in rows})
    out = []
    for t in targets:
        d = t.head_dim if t.head_dim is not None else main_d
        per_s, missing = [], []
        for s in seq_lens:
            num = tflops.get((t.mode, t.causal, s, d, t.numerator))
            den = tflops.get((t.mode, t.causal, s, d, t.denominator))
            if num is None or den is None:
                missing.append(s)
            else:
                per_s.append({"seq_len": s, "ratio": num / den})
        value = min(p["ratio"] for p in per_s) if per_s else None
        # A target stated for the main head dim is not a verdict at another one.
        target = t.target if (t.head_dim is not None or d == MAIN_HEAD_DIM) else None
        if value is None:
            status = "n/a"
        elif target is None:
            status = "info"
        else:
            status = "PASS" if value >= target else "MISS"
        out.append({
            "label": t.label(d), "mode": t.mode, "causal": t.causal, "head_dim": d,
            "numerator": t.numerator, "denominator": t.denominator, "target": target,
            "per_seq_len": per_s, "missing_seq_lens": missing, "value": value, "status": status,
        })
    return out


def _git(*args: str) -> str | None:
    # safe.directory: a checkout copied to another machine is often owned by another user,
    # and git then refuses to read it.
    cmd = ["git", "-c", f"safe.directory={REPO_ROOT}", *args]
    try:
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_commit() -> str | None:
    commit = _git("rev-parse", "HEAD")
    if commit:
        return commit
    # A copy shipped to a host without git (the GPU machine) carries the commit in a file
    # written just before shipping; a .git folder there may be stale.
    try:
        commit = (REPO_ROOT / ".commit").read_text().strip()
        if commit:
            return commit
    except OSError:
        pass
    # No git binary: read the ref by hand.
    git_dir = REPO_ROOT / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (git_dir / ref).is_file():
            return (git_dir / ref).read_text().strip() or None
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def collect_env(device: str) -> dict:
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = _git_commit()
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(dev),
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=torch.cuda.get_device_name(dev), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return env


def _format_table(header: list[str], body: list[list[str]], left: Sequence[int] = (0,)) -> str:
    """Plain-text table; columns in ``left`` are left-aligned, the others (numbers) right."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header] + body):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_tflops(x: float) -> str:
    # Significant digits below 10 so that CPU smoke numbers do not all print as 0.0.
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def format_report(rows: list[dict], ratios: list[dict], cfg: BenchConfig, env: dict) -> str:
    impls = implementations(cfg)
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        case = Case(r["mode"], r["causal"], r["seq_len"], r["head_dim"], r["heads"], r["kv_heads"])
        by_case.setdefault(case.label, {})[r["impl"]] = r
    def cell(r):
        if r is None or r["status"] != "ok":
            return "n/a"
        return _fmt_tflops(r["tflops"]) + ("*" if _host_bound(r) else "")

    body = [[label] + [cell(cells.get(i)) for i in impls] for label, cells in by_case.items()]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    out = [
        f"Effective TFLOPS ({cfg.dtype}, H={cfg.heads}, Hkv={cfg.kv_heads}, "
        f"window={cfg.dense_window_size}, sinks={cfg.num_sink_tokens}) on {where}; "
        f"ours = {', '.join(cfg.variants) or '-'} (backend={cfg.backend})",
        _format_table(["config"] + impls, body),
    ]
    if any(_host_bound(r) for r in rows if r["status"] == "ok"):
        out.append(
            f"* host-bound: issuing one call takes >= {HOST_BOUND_SHARE:.0%} of its measured time, so the "
            "GPU waits for launches and the kernels are faster than shown (host_ms in the JSON)"
        )
    out += ["", "Ratios (same run; worst sequence length decides)"]
    rbody = []
    for r in ratios:
        detail = ", ".join(f"S={p['seq_len']}: {p['ratio']:.2f}" for p in r["per_seq_len"])
        if r["missing_seq_lens"]:
            detail += (", " if detail else "") + "n/a at S=" + ",".join(map(str, r["missing_seq_lens"]))
        rbody.append([
            r["label"],
            f"{r['value']:.2f}x" if r["value"] is not None else "n/a",
            f">={r['target']:.2f}" if r["target"] is not None else "-",
            r["status"],
            detail,
        ])
    out.append(_format_table(["target line", "value", "target", "status", "per S"], rbody, left=(0, 4)))
    return "\n".join(out)


def _reasons(rows: list[dict]) -> list[str]:
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            seen.setdefault((r["impl"], r["reason"] or "?"), []).append(
                Case(r["mode"], r["causal"], r["seq_len"], r["head_dim"], r["heads"], r["kv_heads"]).label
            )
    return [f"  {impl}: n/a in {len(where)} config(s): {reason}" for (impl, reason), where in seen.items()]


def save_plot(rows: list[dict], cfg: BenchConfig, path: Path) -> str | None:
    """Grouped bar chart, one panel per mode. Returns why it was skipped, if it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipping the plot"
    impls = implementations(cfg)
    modes = [m for m in cfg.modes if any(r["mode"] == m for r in rows)]
    if not modes:
        return "nothing measured; skipping the plot"

    def group(r):
        return f"{'causal' if r['causal'] else 'noncausal'}\nS={r['seq_len']} D={r['head_dim']}"

    labels = {m: list(dict.fromkeys(group(r) for r in rows if r["mode"] == m)) for m in modes}
    tflops = {(r["mode"], group(r), r["impl"]): r["tflops"] for r in rows if r["status"] == "ok"}
    n_groups = max(len(v) for v in labels.values())
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(8.0, 0.3 * n_groups * len(impls)), 4.5 * len(modes)))
    width = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[:, 0], modes):
        for j, impl in enumerate(impls):
            offset = (j - (len(impls) - 1) / 2) * width
            xs = [i + offset for i in range(len(labels[mode]))]
            values = [tflops.get((mode, lab, impl)) for lab in labels[mode]]
            # n/a draws as a zero-height bar, so every implementation keeps its colour and
            # legend entry in every panel.
            ax.bar(xs, [v or 0.0 for v in values], width, color=f"C{j % 10}",
                   label=impl if any(v is not None for v in values) else f"{impl} (n/a)")
            for x, v in zip(xs, values):
                if v is None:
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color=f"C{j % 10}")
        ax.set_xticks(range(len(labels[mode])))
        ax.set_xticklabels(labels[mode], fontsize=8)
        ax.set_ylabel("effective TFLOPS")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'} ({cfg.dtype}, H={cfg.heads}, "
                     f"Hkv={cfg.kv_heads}, {cfg.device})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(len(impls), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- CLI


def _list_arg(convert):
    def parse(text: str):
        return [convert(x) for x in text.replace(",", " ").split() if x]

    return parse


def _flatten(values) -> list:
    return [x for chunk in values for x in chunk] if values else []


DESCRIPTION = (
            "Forward and forward+backward effective TFLOPS of modelopt_sparse N:M sparse "
            "attention (dense, 2:4, 4:8, 8:16, 2:4 index tie-break) against PyTorch SDPA "
            "(flash, cuDNN) and compiled FlexAttention, on one varlen-packed sequence. "
            "FLOPs = 4*S^2*H*D, /2 when causal, x3.5 for fwd+bwd, the same for every "
            "implementation, so TFLOPS ratios are speed ratios."
)
EPILOG = (
    "Lists take commas or spaces: --seq-lens 4096,16384. Examples:\n"
    "  modelopt-sparse bench --out bench_out                    # the full H200 sweep\n"
    "  modelopt-sparse bench --modes fwd --causal causal --head-dims 128\n"
    "  modelopt-sparse bench --quick --device cpu               # smoke test, no GPU"
)


def build_parser(prog: str = "modelopt-sparse bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _fill_parser(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Fill the ``modelopt-sparse bench`` subparser (see modelopt_sparse/cli.py)."""
    p.description, p.epilog = DESCRIPTION, EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _fill_parser(p)
    p.set_defaults(handler=lambda args: run_from_args(args, p))


def _fill_parser(p: argparse.ArgumentParser) -> None:
    shapes = p.add_argument_group("shapes")
    shapes.add_argument("--seq-lens", nargs="+", type=_list_arg(int), metavar="S",
                        help="sequence lengths (default 4096,16384; --quick: 256)")
    shapes.add_argument("--head-dims", nargs="+", type=_list_arg(int), metavar="D",
                        help="head dims (default 64,128; --quick: 64)")
    shapes.add_argument("--heads", type=int, help="query heads H (default 32; --quick: 2)")
    shapes.add_argument("--gqa", type=int, default=1, metavar="R",
                        help="query heads per K/V head: Hkv = H / R (default 1, i.e. MHA)")
    shapes.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="default bf16")

    what = p.add_argument_group("what to run")
    what.add_argument("--modes", nargs="+", type=_list_arg(str), metavar="MODE",
                      help="fwd, fwdbwd or both (default fwd,fwdbwd)")
    what.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both",
                      help="default both")
    what.add_argument("--variants", nargs="+", type=_list_arg(str), metavar="V",
                      help=f"our variants, a subset of {','.join(OUR_VARIANTS)} (default all); 'none' for none")
    what.add_argument("--peers", nargs="+", type=_list_arg(str), metavar="P",
                      help=f"peers, a subset of {','.join(PEERS)}; default sdpa-flash,sdpa-cudnn,flex on CUDA "
                           "and sdpa-math,flex (flex reported n/a) on CPU; 'none' for none")
    what.add_argument("--backend", choices=("triton", "torch", "auto"),
                      help="backend= for our attention() (default triton on CUDA, torch on CPU)")
    what.add_argument("--dense-window-size", type=int, default=64, help="default 64")
    what.add_argument("--num-sink-tokens", type=int, default=0, help="default 0")
    what.add_argument("--flex-compile-mode", default=None,
                      help="torch.compile mode for FlexAttention, e.g. max-autotune-no-cudagraphs "
                           "(default: torch.compile's default)")

    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    run.add_argument("--quick", action="store_true",
                     help="tiny shapes (S=256, H=2, D=64) and short timing: a smoke test, not a measurement")
    run.add_argument("--warmup-ms", type=float, help="do_bench warmup in ms (default 100; --quick: 25)")
    run.add_argument("--rep-ms", type=float, help="do_bench repetition time in ms (default 500; --quick: 100)")
    run.add_argument("--cpu-reps", type=int, default=5, help="timed repetitions per measurement on CPU (default 5)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="write DIR/results.json (updated after every measurement) and DIR/tflops.png")


def _subset(values, allowed, what, parser) -> tuple[str, ...] | None:
    if not values:
        return None
    if values == ["none"]:
        return ()
    bad = [v for v in values if v not in allowed]
    if bad:
        parser.error(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    variants = _subset(_flatten(args.variants), tuple(OUR_VARIANTS), "variants", parser)
    return BenchConfig(
        seq_lens=tuple(_flatten(args.seq_lens)) or None,
        head_dims=tuple(_flatten(args.head_dims)) or None,
        heads=args.heads,
        gqa=args.gqa,
        modes=_subset(_flatten(args.modes), MODES, "modes", parser) or MODES,
        causal={"both": (True, False), "causal": (True,), "noncausal": (False,)}[args.causal],
        variants=tuple(OUR_VARIANTS) if variants is None else variants,
        peers=_subset(_flatten(args.peers), PEERS, "peers", parser),
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        dense_window_size=args.dense_window_size,
        num_sink_tokens=args.num_sink_tokens,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cpu_reps=args.cpu_reps,
        flex_compile_mode=args.flex_compile_mode,
        seed=args.seed,
        quick=args.quick,
    )


def main(argv: Sequence[str] | None = None, prog: str = "modelopt-sparse bench") -> int:
    parser = build_parser(prog)
    return run_from_args(parser.parse_args(argv), parser)


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = resolve_config(config_from_args(args, parser))
    except ValueError as exc:
        parser.error(str(exc))
    on_cpu = torch.device(cfg.device).type != "cuda"
    if on_cpu and not cfg.quick:
        print("note: full-size shapes on CPU run the PyTorch reference and can take hours; "
              "use --quick for a smoke test", file=sys.stderr)
    env = collect_env(cfg.device)
    total = len(cases(cfg)) * len(implementations(cfg))
    results_path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results_path = args.out / "results.json"

    def dump(rows, ratios, complete):
        if results_path is None:
            return
        doc = {"complete": complete, "env": env, "settings": asdict(cfg), "rows": rows, "ratios": ratios}
        tmp = results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(results_path)  # a reader never sees half a file

    done: list[dict] = []

    def progress(row):
        done.append(row)
        what = (f"{_fmt_tflops(row['tflops']):>8} TFLOPS ({row['ms']:.3f} ms)" if row["status"] == "ok"
                else f"n/a: {row['reason']}")
        case = Case(row["mode"], row["causal"], row["seq_len"], row["head_dim"], row["heads"], row["kv_heads"])
        print(f"[{len(done)}/{total}] {case.label}  {row['impl']:<10} {what}", file=sys.stderr, flush=True)
        dump(done, None, False)  # a crash midway still leaves what was measured

    print(f"benchmarking on {env['gpu'] or 'CPU'}: torch {env['torch']}, triton {env['triton']}, "
          f"commit {(env['git_commit'] or 'unknown')[:12]}", file=sys.stderr, flush=True)
    rows = run_benchmarks(cfg, on_row=progress)
    ratios = compute_ratios(rows)
    dump(rows, ratios, True)

    notes = []
    if results_path is not None:
        notes.append(f"wrote {results_path}")
        skipped = save_plot(rows, cfg, args.out / "tflops.png")
        notes.append(skipped or f"wrote {args.out / 'tflops.png'}")
    reasons = _reasons(rows)
    if reasons:
        notes.append("n/a reasons:")
        notes.extend(reasons)
    if on_cpu:
        notes.append("NOTE: CPU run: these numbers only prove that the script works end to end; they say "
                     "nothing about GPU kernel speed.")
    print("\n".join(notes))
    print()
    print(format_report(rows, ratios, cfg, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
