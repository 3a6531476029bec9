"""The Hopper (sm_90) forward engine: ``attention(..., backend="hopper")``.

A warp-specialized CUDA C++ kernel (``kernels/hopper/nm_attention_fwd.cu``, inline PTX, no
CUTLASS) for the forward pass of the same rule as every other backend (docs/semantics.md):
dense and N:M (M in 2/4/8/16, both tie rules), varlen, GQA, causal or not, sinks, dense
window, decode rows, sliding window, D = 64 or 128, fp16 or bf16. It stores the same
log2-domain LSE as the Triton forward, so the Triton backward runs on its output.
docs/hopper_engine.md has the design and the status (**compile-checked; not yet run on a
GPU** at the time of writing).

How it runs, without a PyTorch C++ extension (so it works the same on any torch version):

* nvcc compiles the variant a call needs (head dim, N:M pattern, tie rule, dtype, schedule)
  into a cubin at first use; cubins are cached on disk under
  ``$MODELOPT_SPARSE_HOPPER_CACHE`` (default ``~/.cache/modelopt_sparse/hopper``), keyed by
  a hash of the CUDA sources, the variant and the nvcc version, so an edited source or
  another nvcc never reuses a stale binary;
* the CUDA driver API (``libcuda`` through ctypes) loads it (``cuModuleLoadData``) into
  PyTorch's context and launches it on PyTorch's current stream (``cuLaunchKernel``).

The toolchain is optional (``pip install modelopt-sparse[hopper]`` or any CUDA 12.4+
toolkit; ``$MODELOPT_SPARSE_NVCC`` names an nvcc explicitly). :func:`unsupported_reason`
says why a call cannot run here; ``backend="hopper"`` raises :class:`HopperUnavailable`
with it, ``backend="auto"`` (when it considers this engine) logs it once and uses Triton.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .switches import env_flag
from .reference import SparseParams

LOG = logging.getLogger("modelopt_sparse")
BACKEND = "hopper"
SOURCE_DIR = Path(__file__).resolve().parent / "hopper"
KERNEL = "nm_attn_fwd"
BLOCK_M = 128  # query rows per CTA with two consumer warpgroups (the three-warpgroup D = 64 variant: 192)
THREADS = 384
LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 128)
# Compile flags. No --use_fast_math: the selection's kept test (drop_below) relies on sub.f32
# not flushing subnormals.
NVCC_FLAGS = ("-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v")


class HopperUnavailable(RuntimeError):
    """``backend="hopper"`` was asked for a call this engine cannot run (the message says why)."""


# --------------------------------------------------------------------------------------
# Variants and the on-disk cubin cache
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: everything that is a template parameter of the CUDA source."""

    head_dim: int = 128
    sparsity_n: int = 0
    sparsity_m: int = 4
    tie_index: bool = False
    fp16: bool = False
    pingpong: bool = False
    overlap: bool = True
    probe: bool = False
    # Variants added after the first H200 run (compile-checked only, not yet run on a GPU):
    late_rescale: bool = False  # FA3's order: O rescaled under Q.K^T(i), before P.V(i-1) is issued
    tma: bool = False  # TMA producer (one thread) instead of cp.async (128 threads); dense and M <= 8
    lean: bool = False  # FA4's conditional O rescale (slack 2^8) and the two-instruction kept test
    consumers: int = 2  # 3: three consumer warpgroups, 192 query rows per CTA (D = 64 only)
    # Stage 3: 2:4 P.V through wgmma.sp (2:4 only). V in its own row order: by cp.async, or
    # with tma through a 5-D map (since session 11). With overlap since session 12.
    sparse_pv: bool = False
    # With tma, M = 16: the group permutation through a 4-D tensor map's dimensions {D, heads,
    # group, member} instead of element strides (<= 8), so M = 16 gets the TMA producer too.
    # The default for M = 16 since session 11 (measured_tma3d; MODELOPT_SPARSE_HOPPER_TMA3D=0 opts out).
    tma3d: bool = False

    def __post_init__(self):
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if self.sparsity_n and self.sparsity_m not in (2, 4, 8, 16):
            raise ValueError(f"sparsity_m must be 2, 4, 8 or 16, got {self.sparsity_m}")
        if not 0 <= self.sparsity_n < max(self.sparsity_m, 1):
            raise ValueError(f"need 0 <= sparsity_n < sparsity_m, got {self.sparsity_n}:{self.sparsity_m}")

    def canonical(self) -> "Variant":
        """Dense kernels ignore M and the tie rule: one cubin serves all of them. TMA's element
        stride is at most 8, so an N:M variant with M = 16 keeps the cp.async producer unless
        ``tma3d`` (grouped 4-D maps, M = 16 only, two consumer warpgroups) asks for TMA."""
        v = self
        if v.consumers not in (2, 3):
            raise ValueError(f"consumers must be 2 or 3, got {v.consumers}")
        # Three consumer warpgroups only at D = 64 and only with the TMA producer: the cp.async
        # producer needs 40 registers, which leaves the consumers 152, and ptxas then spills
        # and serializes the wgmma (C7512); so M = 16 (no TMA) keeps two warpgroups.
        if v.consumers == 3 and (v.head_dim != 64 or (v.sparsity_n and v.sparsity_m > 8)):
            v = dataclasses.replace(v, consumers=2)
        if v.consumers == 3:
            v = dataclasses.replace(v, tma=True)
        # Sparse P.V: 2:4 only (the hardware's format), two consumer warpgroups, not in probe
        # builds. With TMA, V goes through its own 5-D map (_Driver.encode_tma_sparse_pv).
        if v.sparse_pv and ((v.sparsity_n, v.sparsity_m) != (2, 4) or v.probe):
            v = dataclasses.replace(v, sparse_pv=False)
        if v.sparse_pv:
            v = dataclasses.replace(v, consumers=2)
        if v.sparsity_n == 0:
            v = dataclasses.replace(v, sparsity_m=4, tie_index=False)
        # Grouped 4-D maps: only where the element-strided map cannot go (M = 16), with TMA, two
        # consumer warpgroups, no sparse P.V; everywhere else the flag is dropped (one cubin).
        if v.tma3d and not (v.tma and v.sparsity_n and v.sparsity_m == 16 and v.consumers == 2 and not v.sparse_pv):
            v = dataclasses.replace(v, tma3d=False)
        if v.tma and v.sparsity_n and v.sparsity_m > 8 and not v.tma3d:
            v = dataclasses.replace(v, tma=False)
        return v

    @property
    def tag(self) -> str:
        pattern = f"{self.sparsity_n}of{self.sparsity_m}{'i' if self.tie_index else 't'}" if self.sparsity_n else "dense"
        flags = "".join(c for c, on in (("h", self.fp16), ("p", self.pingpong), ("o", self.overlap),
                                        ("r", self.late_rescale), ("m", self.tma), ("z", self.lean),
                                        ("3", self.consumers == 3), ("s", self.sparse_pv), ("g", self.tma3d),
                                        ("x", self.probe))
                        if on)
        return f"d{self.head_dim}_{pattern}_{flags or '-'}"

    def defines(self) -> list[str]:
        v = self.canonical()
        return [f"-DNMH_HEAD_DIM={v.head_dim}", f"-DNMH_SPARSITY_N={v.sparsity_n}",
                f"-DNMH_SPARSITY_M={v.sparsity_m}", f"-DNMH_TIE_INDEX={int(v.tie_index)}",
                f"-DNMH_FP16={int(v.fp16)}", f"-DNMH_PINGPONG={int(v.pingpong)}",
                f"-DNMH_OVERLAP={int(v.overlap)}", f"-DNMH_PROBE={int(v.probe)}"] + \
            [f for f, on in (("-DNMH_LATE_RESCALE=1", v.late_rescale), ("-DNMH_TMA=1", v.tma),
                             ("-DNMH_LEAN=1", v.lean), ("-DNMH_CONSUMERS=3", v.consumers == 3),
                             ("-DNMH_SPARSE_PV=1", v.sparse_pv), ("-DNMH_TMA3D=1", v.tma3d)) if on]


def measured_schedule(head_dim: int, sparsity_n: int, sparsity_m: int) -> dict:
    """The schedule a kernel runs unless the environment overrides a switch: the fastest one
    whose output matched on the H200 (docs/hopper_engine.md, session 10 table). Ping-pong
    consumers, FA3's late rescale, the TMA producer and FA4's conditional rescale everywhere;
    overlap of the next Q.K^T with this tile's softmax only up to M = 4: at M = 8 and 16 the
    selection's registers make the overlapped variant slower (4:8 454 vs 489 TFLOPS, 8:16 338
    vs 379), and at dense and 2:4 faster (660 vs 613, 558 vs 519)."""
    if measured_consumers(head_dim, sparsity_n, sparsity_m) == 3:
        # Dense D = 64 runs three consumer warpgroups, whose ring has no overlap and no late
        # rescale (440 TFLOPS against 388 for the two-warpgroup schedule below).
        return dict(pingpong=True, overlap=False, late_rescale=False, tma=True, lean=True)
    return dict(pingpong=True, overlap=not (sparsity_n and sparsity_m >= 8), late_rescale=True, tma=True, lean=True)


def measured_tma3d(sparsity_n: int, sparsity_m: int) -> bool:
    """M = 16 loads K and V through the grouped 4-D maps unless MODELOPT_SPARSE_HOPPER_TMA3D=0:
    8:16 463 TFLOPS against 374 with the cp.async producer (session 11, H200; tests 22/23 and
    the whole GPU file pass with it). Other patterns ignore the flag (Variant.canonical)."""
    return bool(sparsity_n) and sparsity_m == 16


def measured_consumers(head_dim: int, sparsity_n: int, sparsity_m: int) -> int:
    """Consumer warpgroups unless MODELOPT_SPARSE_HOPPER_D64_WG3 says otherwise: three for dense
    D = 64 (192 query rows per CTA; measured 1.13x two), two everywhere else (N:M at D = 64
    was not timed with three, and 4:8 spills there)."""
    return 3 if head_dim == 64 and sparsity_n == 0 else 2


def variant_for(params: SparseParams, dtype: torch.dtype, head_dim: int, *, probe: bool = False) -> Variant:
    """The kernel a call runs: :func:`measured_schedule`, where the environment can override
    each switch so that the device script can time the alternatives:
    MODELOPT_SPARSE_HOPPER_PINGPONG, _OVERLAP, _LATE_RESCALE, _TMA (ignored for M = 16) and
    _LEAN (0 or 1; unset: the measured schedule), MODELOPT_SPARSE_HOPPER_D64_WG3 (three
    consumer warpgroups at D = 64; unset: :func:`measured_consumers`) and
    MODELOPT_SPARSE_HOPPER_SPARSE_PV (default 0: 2:4 P.V through wgmma.sp) and
    MODELOPT_SPARSE_HOPPER_TMA3D (with _TMA, M = 16 through the grouped 4-D maps; unset:
    :func:`measured_tma3d`, on for M = 16)."""
    return Variant(
        head_dim=head_dim,
        sparsity_n=params.sparsity_n,
        sparsity_m=params.sparsity_m,
        tie_index=params.tie_break == "index",
        fp16=dtype == torch.float16,
        **schedule_from_env(head_dim, params.sparsity_n, params.sparsity_m),
        consumers=3 if env_flag("MODELOPT_SPARSE_HOPPER_D64_WG3",
                                measured_consumers(head_dim, params.sparsity_n, params.sparsity_m) == 3) else 2,
        sparse_pv=env_flag("MODELOPT_SPARSE_HOPPER_SPARSE_PV", False),
        tma3d=env_flag("MODELOPT_SPARSE_HOPPER_TMA3D", measured_tma3d(params.sparsity_n, params.sparsity_m)),
        probe=probe,
    ).canonical()


def cache_dir() -> Path:
    return Path(os.environ.get("MODELOPT_SPARSE_HOPPER_CACHE") or Path.home() / ".cache" / "modelopt_sparse" / "hopper")


SYSTEM_NVCC = Path("/usr/local/cuda/bin/nvcc")  # the toolkit's default install location


def find_nvcc() -> str | None:
    """The nvcc to compile with: ``$MODELOPT_SPARSE_NVCC``, then ``$CUDA_HOME``/``$CUDA_PATH``,
    ``PATH``, ``/usr/local/cuda``, and the ``nvidia-cuda-nvcc`` wheel; None when none exists."""
    explicit = os.environ.get("MODELOPT_SPARSE_NVCC")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(SYSTEM_NVCC)
    try:  # the pip toolchain (nvidia-cuda-nvcc) installs under site-packages/nvidia/
        import nvidia  # noqa: PLC0415

        for root in getattr(nvidia, "__path__", []):
            candidates += sorted(Path(root).glob("cu*/bin/nvcc")) + sorted(Path(root).glob("cuda_nvcc/bin/nvcc"))
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


@functools.lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> str:
    """The last line of ``nvcc --version`` (e.g. ``Build cuda_13.0.r13.0/compiler.36424714_0``):
    part of the cache key, so that cubins of another nvcc are never reused."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise HopperUnavailable(f"{nvcc} --version failed: {out.stderr.strip()[-300:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else out.stdout


def source_digest() -> str:
    """Hash of every CUDA source of the engine (.cu and .cuh, by name and content)."""
    h = hashlib.sha256()
    files = sorted(list(SOURCE_DIR.glob("*.cu")) + list(SOURCE_DIR.glob("*.cuh")))
    if not files:
        raise HopperUnavailable(f"the engine's CUDA sources are missing ({SOURCE_DIR})")
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(variant: Variant, nvcc_id: str, digest: str | None = None) -> str:
    """What decides a cubin's bytes: sources, variant (its -D flags), compiler and flags."""
    h = hashlib.sha256()
    for part in (digest or source_digest(), " ".join(variant.canonical().defines()), nvcc_id, " ".join(NVCC_FLAGS)):
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def cubin_path(variant: Variant, nvcc: str | None = None) -> Path:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise HopperUnavailable(_NO_NVCC)
    v = variant.canonical()
    return cache_dir() / f"{KERNEL}_{v.tag}_{cache_key(v, nvcc_version(nvcc))}.cubin"


_NO_NVCC = ("no CUDA compiler found: install the optional toolchain (pip install 'modelopt-sparse[hopper]') "
            "or a CUDA 12.4+ toolkit, or set MODELOPT_SPARSE_NVCC to an nvcc")
_compile_locks: dict = {}
_compile_locks_guard = threading.Lock()


def compile_variant(variant: Variant, nvcc: str | None = None) -> Path:
    """The cached cubin of ``variant``, compiling it first if needed (atomic: concurrent
    processes never see a partial file). ptxas's report lands beside it (``.log``)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise HopperUnavailable(_NO_NVCC)
    path = cubin_path(variant, nvcc)
    if path.is_file():
        return path
    with _compile_locks_guard:  # one compile per cubin in this process; other cubins in parallel
        lock = _compile_locks.setdefault(path, threading.Lock())
    with lock:
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=path.parent)
        os.close(fd)
        cmd = [nvcc, *NVCC_FLAGS, *variant.canonical().defines(), "-o", tmp, str(SOURCE_DIR / "nm_attention_fwd.cu")]
        LOG.info("modelopt_sparse: compiling the Hopper kernel %s", variant.canonical().tag)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            os.unlink(tmp)
            raise HopperUnavailable(f"nvcc failed for {variant.canonical().tag}:\n{(res.stderr or res.stdout)[-2000:]}")
        path.with_suffix(".log").write_text(res.stderr + res.stdout)
        os.replace(tmp, path)
    return path


def ptxas_summary(log_text: str) -> dict:
    """Registers, spill bytes and stack of the kernel from ptxas -v output."""
    out = {}
    m = re.search(r"Used (\d+) registers", log_text)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log_text)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(x) for x in m.groups())
    out["serialized_wgmma"] = "C751" in log_text  # ptxas "wgmma ... serialized" performance warnings
    return out


# --------------------------------------------------------------------------------------
# CUDA driver API (ctypes)
# --------------------------------------------------------------------------------------
class _FwdParams(ctypes.Structure):
    """Mirror of ``struct FwdParams`` in nm_attention_fwd.cu (checked against the module's
    ``nmh_config[3]`` = sizeof at load time)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("lse", ctypes.c_void_p), ("q_start", ctypes.c_void_p), ("q_len", ctypes.c_void_p),
        ("k_start", ctypes.c_void_p), ("k_len", ctypes.c_void_p), ("probe_s", ctypes.c_void_p),
        ("probe_kept", ctypes.c_void_p),
        ("q_row", ctypes.c_int64), ("q_head", ctypes.c_int64), ("k_row", ctypes.c_int64),
        ("k_head", ctypes.c_int64), ("v_row", ctypes.c_int64), ("v_head", ctypes.c_int64),
        ("o_row", ctypes.c_int64), ("o_head", ctypes.c_int64), ("probe_head", ctypes.c_int64),
        ("probe_row", ctypes.c_int64),
        ("groups", ctypes.c_int), ("lse_row", ctypes.c_int), ("is_causal", ctypes.c_int),
        ("num_sink", ctypes.c_int), ("dense_window", ctypes.c_int), ("sliding_window", ctypes.c_int),
        ("reserved", ctypes.c_int), ("scale_log2", ctypes.c_float),
    ]


PARAMS_SIZE = 200  # static_assert(sizeof(FwdParams) == 200) in the CUDA source


class _TmaParams(ctypes.Structure):
    """Mirror of ``struct TmaParams`` (TMA variants' second argument): three CUtensorMaps."""

    _fields_ = [("q", ctypes.c_uint64 * 16), ("k", ctypes.c_uint64 * 16), ("v", ctypes.c_uint64 * 16)]


class _TmaParams3D(_TmaParams):
    """``struct TmaParams`` of an NMH_TMA_BOUNDED build (NMH_TMA3D, or stage 3 with TMA): the
    three maps, then ``int64_t kv_rows``; the struct is 64-byte aligned (alignas(64) maps), so
    sizeof is 448 (the launch copies that many)."""

    _fields_ = [("kv_rows", ctypes.c_int64), ("_pad", ctypes.c_uint64 * 7)]


# cuTensorMapEncodeTiled's enums (cuda.h): raw 16-bit elements (no conversion, zero fill),
# no interleave, 128-byte swizzle (the layout the wgmma descriptors expect), L2 promotion 256 B.
_TMA_UINT16, _TMA_INTERLEAVE_NONE, _TMA_SWIZZLE_128B, _TMA_L2_256B, _TMA_OOB_ZERO = 1, 0, 3, 3, 0
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class _Driver:
    """The few driver calls the engine makes, with errors turned into exceptions."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise HopperUnavailable(f"cannot load the CUDA driver library libcuda.so.1 ({e})") from e
        self.check(self.lib.cuInit(0), "cuInit")

    def check(self, rc: int, what: str):
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(text))
            raise RuntimeError(f"modelopt_sparse hopper: {what} failed: {(name.value or b'?').decode()} "
                               f"({(text.value or b'').decode()})")

    def primary_context(self, device_index: int) -> int:
        """PyTorch's context of the device (the primary one), made current on this thread.
        Retained for the life of the process (loaded modules live in it)."""
        dev = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
        primary = ctypes.c_void_p()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev), "cuDevicePrimaryCtxRetain")
        self.make_current(primary.value)
        return primary.value

    def _encode_tiled(self, out, t: torch.Tensor, dims, strides, box, element_strides, what: str) -> None:
        """cuTensorMapEncodeTiled of ``t`` (16-bit elements, 128-byte swizzle, zero fill) into
        ``out`` (a 128-byte ctypes array): ``dims`` innermost first, ``strides`` in bytes of
        dims 1 and up. Host-only work (no device call)."""
        rank = len(dims)
        scratch = ctypes.create_string_buffer(128 + 64)
        aligned = (ctypes.addressof(scratch) + 63) & ~63  # the API wants a 64-byte aligned map
        self.check(self.lib.cuTensorMapEncodeTiled(
            ctypes.c_void_p(aligned), ctypes.c_int(_TMA_UINT16), ctypes.c_uint32(rank), ctypes.c_void_p(t.data_ptr()),
            (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
            (ctypes.c_uint32 * rank)(*element_strides), ctypes.c_int(_TMA_INTERLEAVE_NONE),
            ctypes.c_int(_TMA_SWIZZLE_128B), ctypes.c_int(_TMA_L2_256B), ctypes.c_int(_TMA_OOB_ZERO)), what)
        ctypes.memmove(out, aligned, 128)

    def encode_tma(self, out, t: torch.Tensor, row_step: int, rows: int = 128) -> None:
        """The map of the packed [rows, heads, head_dim] tensor ``t``: box {64, 1, rows}, element
        stride ``row_step`` along rows (an N:M variant's K and V: one box = every M-th row)."""
        self._encode_tiled(out, t, (t.shape[2], t.shape[1], t.shape[0]), (t.stride(1) * 2, t.stride(0) * 2),
                           (64, 1, rows), (1, 1, row_step), "cuTensorMapEncodeTiled")

    def encode_tma_grouped(self, out, t: torch.Tensor, m: int) -> int:
        """NMH_TMA3D's K / V map of the packed [rows, heads, head_dim] tensor ``t``: 4-D
        {head_dim, heads, g, mm} with g's stride M rows and mm's one row, box {64, 1, 128 / M, M}
        (smem row g + (128 / M) mm = key M g + mm: the group permutation, element strides 1).
        mm's extent is 2M - 1 (a tile starting at row M g0 + r is (g0, r)); g's extent stops at
        rows // M - 1 so that no in-bounds coordinate reads past the tensor's last row. Returns
        that extent (<= 0: no tile fits the map; the kernel then loads every tile with cp.async;
        the map itself is encoded with extent 1 and never used)."""
        groups = t.shape[0] // m - 1
        self._encode_tiled(out, t, (t.shape[2], t.shape[1], max(groups, 1), 2 * m - 1),
                           (t.stride(1) * 2, m * t.stride(0) * 2, t.stride(0) * 2), (64, 1, 128 // m, m),
                           (1, 1, 1, 1), "cuTensorMapEncodeTiled (grouped)")
        return groups

    def encode_tma_sparse_pv(self, out, t: torch.Tensor) -> int:
        """Stage 3's V map (with TMA) of the packed [rows, heads, head_dim] tensor ``t``: see
        :func:`sparse_pv_v_map`. Returns the d extent (the kernel's bound, kv_rows - 31)."""
        dims, strides, box = sparse_pv_v_map(t.shape[0], t.shape[1], t.shape[2], t.stride(0) * 2, t.stride(1) * 2)
        self._encode_tiled(out, t, dims, strides, box, (1, 1, 1, 1, 1), "cuTensorMapEncodeTiled (sparse P.V)")
        return dims[2]

    def make_current(self, context: int):
        current = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != context:
            self.check(self.lib.cuCtxSetCurrent(ctypes.c_void_p(context)), "cuCtxSetCurrent")


def sparse_pv_v_map(rows: int, heads: int, head_dim: int, row_bytes: int, head_bytes: int):
    """``(dims, strides in bytes of dims 1-4, box)`` of stage 3's V map (TMA producer): a 5-D
    view {head_dim, heads, d, c, b} of the packed V with d, c, b stepping 1, 8 and 4 rows, box
    {64, 1, 4, 4, 2}. TMA fills shared memory innermost dimension first, so a box started at
    row r0 writes row r0 + d + 8 c + 4 b to smem row d + 4 c + 16 b: 32 rows in v_row_key's
    order (nm_attention_fwd.cu), four boxes per atom column. d's extent, rows - 31 (at least 1),
    keeps every in-bounds coordinate below the last row; the kernel loads a tile whose boxes
    would cross it with cp.async."""
    dims = (head_dim, heads, max(rows - 31, 1), 4, 2)
    strides = (head_bytes, row_bytes, 8 * row_bytes, 4 * row_bytes)
    return dims, strides, (64, 1, 4, 4, 2)


class _Module:
    """One loaded cubin on one device: its function, smem size and timeout flag."""

    def __init__(self, driver: _Driver, image: bytes, context: int):
        self.driver = driver
        self.context = context
        self.handle = ctypes.c_void_p()
        self._image = ctypes.create_string_buffer(image, len(image))
        driver.check(driver.lib.cuModuleLoadData(ctypes.byref(self.handle), self._image), "cuModuleLoadData")
        self.function = ctypes.c_void_p()
        driver.check(driver.lib.cuModuleGetFunction(ctypes.byref(self.function), self.handle, KERNEL.encode()),
                     "cuModuleGetFunction")
        config = self._read_global("nmh_config", 16)
        self.smem, threads, block_m, params_size = (int.from_bytes(config[i:i + 4], "little", signed=True)
                                                    for i in range(0, 16, 4))
        self.threads, self.block_m = threads, block_m
        if block_m not in (128, 192) or threads != 128 * (1 + block_m // 64) or \
                params_size != ctypes.sizeof(_FwdParams):
            raise RuntimeError(f"modelopt_sparse hopper: the cubin's layout (threads {threads}, rows {block_m}, "
                               f"params {params_size} B) does not match the Python side")
        driver.check(driver.lib.cuFuncSetAttribute(self.function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                   self.smem), "cuFuncSetAttribute(max dynamic shared memory)")

    def _global(self, name: str):
        ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
        self.driver.check(self.driver.lib.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), self.handle,
                                                               name.encode()), f"cuModuleGetGlobal({name})")
        return ptr, size.value

    def _read_global(self, name: str, nbytes: int) -> bytes:
        ptr, size = self._global(name)
        buf = ctypes.create_string_buffer(nbytes)
        self.driver.check(self.driver.lib.cuMemcpyDtoH_v2(buf, ptr, ctypes.c_size_t(min(nbytes, size))),
                          f"cuMemcpyDtoH({name})")
        return buf.raw

    def take_timeout(self) -> int:
        """The kernel's deadlock flag (0 = none), cleared. Synchronizes the device."""
        flag = int.from_bytes(self._read_global("nmh_timeout", 4), "little", signed=True)
        if flag:
            ptr, _ = self._global("nmh_timeout")
            self.driver.check(self.driver.lib.cuMemsetD32_v2(ptr, ctypes.c_uint(0), ctypes.c_size_t(1)),
                              "cuMemsetD32(nmh_timeout)")
        return flag

    def launch(self, grid, params: _FwdParams, stream: int, tma: _TmaParams | None = None):
        self.driver.make_current(self.context)  # a launch from a thread torch never made current
        if tma is None:
            args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        else:  # TMA variants take the tensor maps as a second argument
            args = (ctypes.c_void_p * 2)(ctypes.addressof(params), ctypes.addressof(tma))
        self.driver.check(self.driver.lib.cuLaunchKernel(
            self.function, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(grid[2]),
            ctypes.c_uint(self.threads), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(self.smem),
            ctypes.c_void_p(stream), args, None), "cuLaunchKernel")


@functools.lru_cache(maxsize=1)
def _driver() -> _Driver:
    return _Driver()


_modules: dict = {}
_modules_lock = threading.Lock()


def _module(variant: Variant, device_index: int) -> _Module:
    key = (variant.canonical(), device_index)
    mod = _modules.get(key)
    if mod is None:
        with _modules_lock:
            mod = _modules.get(key)
            if mod is None:
                image = compile_variant(variant).read_bytes()
                driver = _driver()
                torch.cuda.init()
                mod = _modules[key] = _Module(driver, image, driver.primary_context(device_index))
    return mod


# --------------------------------------------------------------------------------------
# What can run here
# --------------------------------------------------------------------------------------
def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams,
                       *, stats=None, learned_sinks=None, check_toolchain: bool = True) -> str | None:
    """Why this engine cannot run the call (a sentence), or None when it can. Cheap checks
    first; the toolchain (nvcc present, sources present) last."""
    if not q.is_cuda:
        return f"it needs CUDA tensors, got {q.device}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) != (9, 0):
        return f"it needs an sm_90 GPU (H100/H200), this one is sm_{major}{minor}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it supports float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it supports head_dim 64 and 128, not {q.shape[-1]}"
    if stats is not None:
        return "return_stats=True runs on the Triton forward (the Hopper kernel keeps no statistics)"
    if learned_sinks is not None:
        return "learned_sinks are not implemented in the Hopper kernel"
    if params.softcap:
        return "softcap is not implemented in the Hopper kernel"
    if torch.compiler.is_compiling():
        return "it is not traceable by torch.compile (the Triton op is)"
    if q.shape[-2] > 65535:
        return f"at most 65535 query heads, got {q.shape[-2]}"
    if check_toolchain:
        if find_nvcc() is None:
            return _NO_NVCC
        if not (SOURCE_DIR / "nm_attention_fwd.cu").is_file():
            return f"the engine's CUDA sources are missing ({SOURCE_DIR})"
    return None


_logged: set = set()


def log_fallback_once(reason: str) -> None:
    """One log line per distinct reason, for ``backend="auto"`` falling back to Triton."""
    if reason not in _logged:
        _logged.add(reason)
        LOG.warning("modelopt_sparse: the Hopper engine is not used (%s); using the Triton kernels", reason)


def auto_enabled() -> bool:
    """Whether ``backend="auto"`` considers this engine: on by default since the H200 run of
    session 10 (docs/hopper_engine.md: 1.40x the Triton forward dense, 1.14-1.36x at N:M);
    ``MODELOPT_SPARSE_HOPPER=0`` opts out."""
    return env_flag("MODELOPT_SPARSE_HOPPER", True)


# ``backend="auto"`` keeps small calls on Triton: below about this many query-key-head products
# (2k x 2k tokens x 32 heads) the kernel saves a few microseconds, less than this engine's
# extra host work (packing a batch, its parameter block) costs.
AUTO_MIN_WORK = 2048 * 2048 * 32


def choose(q, k, v, params, *, forced: bool, stats=None, learned_sinks=None) -> str:
    """``"hopper"`` or ``"triton"`` for one call. Forced (``backend="hopper"``): raises
    :class:`HopperUnavailable` when it cannot run, except for ``return_stats=True``, which is
    served by the Triton forward (documented fallback). Auto: calls smaller than
    :data:`AUTO_MIN_WORK` and calls traced by torch.compile stay on Triton silently; otherwise
    the engine, or Triton with one log line naming the reason."""
    if not forced and (_work(q, k) < AUTO_MIN_WORK or torch.compiler.is_compiling()):
        return "triton"  # under compile: the Triton op is traceable, this engine's launch is not
    reason = unsupported_reason(q, k, v, params, stats=stats, learned_sinks=learned_sinks)
    if reason is None:
        return BACKEND
    if forced and stats is None:
        raise HopperUnavailable(f"backend='hopper' cannot run this call: {reason}")
    log_fallback_once(reason)
    return "triton"


def _work(q, k) -> int:
    """Query rows x key rows x query heads, an upper bound of a call's score entries (packed
    ``[T, H, D]`` or batched ``[B, S, H, D]``)."""
    if q.dim() == 4:
        return q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
    return q.shape[0] * k.shape[0] * q.shape[1]


# --------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------
def _grid(max_q: int, hq: int, batch: int, block_m: int = BLOCK_M) -> tuple[int, int, int]:
    if batch > 65535:
        raise HopperUnavailable(f"at most 65535 sequences per call, got {batch}")
    return (max(1, math.ceil(max_q / block_m)), hq, batch)


def _checked() -> bool:
    """MODELOPT_SPARSE_HOPPER_CHECK=1: synchronize after every launch and raise if a barrier
    wait in the kernel timed out (a deadlock shows as an error, not a hang). For tests."""
    return env_flag("MODELOPT_SPARSE_HOPPER_CHECK", False)


def forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params: SparseParams, *, q_covered: bool,
            with_lse: bool, probe=None):
    """Launch the kernel: ``(out, lse or None)``; out is contiguous ``[T, Hq, D]`` in q's
    dtype (rows outside every sequence are 0 unless ``q_covered``), lse fp32 ``[T, Hq]``
    (log2 domain, as the Triton forward's). ``probe``: (scores, kept) buffers
    ``[Hq, T, keys]`` for a mask-probe build."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    variant = variant_for(params, q.dtype, d, probe=probe is not None)
    if variant.tma:  # a tensor map's strides must be non-zero multiples of 16 bytes (broadcast views are not)
        q, k, v = (t.contiguous() if 0 in (t.stride(0), t.stride(1)) else t for t in (q, k, v))
    device = q.get_device()
    mod = _module(variant, device)
    out = q.new_empty(q.shape) if q_covered else q.new_zeros(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=torch.float32) if with_lse else None
    p = _FwdParams()
    p.q, p.k, p.v, p.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    p.lse = lse.data_ptr() if lse is not None else None
    p.q_start, p.q_len, p.k_start, p.k_len = (t.data_ptr() for t in (q_start, q_len, k_start, k_len))
    p.q_row, p.q_head = q.stride(0), q.stride(1)
    p.k_row, p.k_head = k.stride(0), k.stride(1)
    p.v_row, p.v_head = v.stride(0), v.stride(1)
    p.o_row, p.o_head = out.stride(0), out.stride(1)
    if probe is not None:
        scores, kept = probe
        p.probe_s, p.probe_kept = scores.data_ptr(), kept.data_ptr()
        p.probe_head, p.probe_row = scores.stride(0), scores.stride(1)
    p.groups = hq // hkv
    p.lse_row = hq
    p.is_causal = int(params.is_causal)
    p.num_sink = params.num_sink_tokens
    p.dense_window = params.dense_window_size
    p.sliding_window = params.sliding_window or 0
    p.scale_log2 = params.softmax_scale * LOG2E
    grid = _grid(max_q, hq, q_len.shape[0], mod.block_m)
    if q.shape[0] == 0:
        return out, lse
    tma = None
    if variant.tma3d:
        tma = _TmaParams3D()
        mod.driver.encode_tma(tma.q, q, 1, mod.block_m)
        for field, t in (("k", k), ("v", v)):
            mod.driver.encode_tma_grouped(getattr(tma, field), t, variant.sparsity_m)
        tma.kv_rows = min(k.shape[0], v.shape[0])  # the kernel recomputes the maps' g extent from it
    elif variant.tma and variant.sparse_pv:
        tma = _TmaParams3D()
        mod.driver.encode_tma(tma.q, q, 1, mod.block_m)
        mod.driver.encode_tma(tma.k, k, variant.sparsity_m, 128)
        mod.driver.encode_tma_sparse_pv(tma.v, v)
        tma.kv_rows = v.shape[0]  # the kernel recomputes the V map's bound from it
    elif variant.tma:
        tma = _TmaParams()
        step = variant.sparsity_m if variant.sparsity_n else 1
        for field, t, row_step, rows in (("q", q, 1, mod.block_m), ("k", k, step, 128), ("v", v, step, 128)):
            mod.driver.encode_tma(getattr(tma, field), t, row_step, rows)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        mod.launch(grid, p, stream, tma)
        if _checked():
            torch.cuda.synchronize(device)
            flag = mod.take_timeout()
            if flag:
                flag -= 1
                raise RuntimeError(
                    f"modelopt_sparse hopper: a barrier wait timed out in {variant.tag} (barrier id {flag >> 16}, "
                    f"parity {(flag >> 15) & 1}, block {flag & 32767}): a synchronization bug in the kernel")
    return out, lse


def _backward_fields(params: SparseParams) -> tuple:
    return tuple(getattr(params, f.name) for f in dataclasses.fields(params))


class _HopperAttention(torch.autograd.Function):
    """Forward by the Hopper kernel, backward by the Triton kernels on its output and LSE."""

    @staticmethod
    def forward(ctx, q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, q_covered, k_covered, params):
        out, lse = forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, q_covered=q_covered,
                           with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, q_start, q_len, k_start, k_len)
        ctx.scalars = (max_q, max_k, q_covered, k_covered, *_backward_fields(params))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_attention import _launch_backward, _NoSecondDerivative

        q, k, v, out, lse, q_start, q_len, k_start, k_len = ctx.saved_tensors
        with torch.no_grad():
            # The first three results are dq, dk, dv (a version with learned sinks adds one).
            dq, dk, dv = _launch_backward(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len,
                                          *ctx.scalars)[:3]
        if torch.is_grad_enabled():  # create_graph=True: refuse a second derivative, as Triton does
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v, grad_out)
        return (dq, dk, dv) + (None,) * 9


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """cp.async moves 16-byte chunks: unit stride along head_dim and 16-byte aligned base,
    row and head strides; anything else is copied once."""
    if t.stride(-1) != 1 or t.stride(0) % 8 or t.stride(1) % 8 or t.data_ptr() % 16:
        return t.contiguous()
    return t


def hopper_attention(q, k, v, q_start, q_len, max_q, k_start, k_len, max_k, params, covered=(False, False)):
    """The engine's entry from :func:`modelopt_sparse.kernels.attention` (inputs validated
    there, packed 3-D tensors)."""
    max_q, max_k = max(int(max_q), 1), max(int(max_k), 1)
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _HopperAttention.apply(q, k, v, q_start, q_len, k_start, k_len, max_q, max_k, bool(covered[0]),
                                      bool(covered[1]), params)
    out, _ = forward(q, k, v, q_start, q_len, max_q, k_start, k_len, params, q_covered=bool(covered[0]),
                     with_lse=False)
    return out


def forward_with_lse(q, k, v, q_start, q_len, max_q, k_start, k_len, params, covered=False):
    """(out, lse) of the Hopper forward (for tests and comparisons with the Triton forward)."""
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    return forward(q, k, v, q_start, q_len, max(int(max_q), 1), k_start, k_len, params, q_covered=covered,
                   with_lse=True)


def kept_mask_probe(q, k, v, q_start, q_len, max_q, k_start, k_len, params, keys: int):
    """Run the mask-probe build: ``(scores, kept)`` of shape ``[Hq, T, keys]``: the raw
    scores q·k the kernel computed (NaN on tiles it never visited) and the entries its
    softmax kept (False where not visited). Compare ``kept`` with ``semantics.kept_mask`` of
    the same scores, sequence by sequence."""
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    hq, total = q.shape[1], q.shape[0]
    scores = torch.full((hq, total, keys), float("nan"), dtype=torch.float32, device=q.device)
    kept = torch.zeros((hq, total, keys), dtype=torch.uint8, device=q.device)
    forward(q, k, v, q_start, q_len, max(int(max_q), 1), k_start, k_len, params, q_covered=False, with_lse=True,
            probe=(scores, kept))
    return scores, kept.bool()


# --------------------------------------------------------------------------------------
# Precompiling (no GPU needed): python -m modelopt_sparse.kernels.hopper_attention
# --------------------------------------------------------------------------------------
SCHEDULE_FIELDS = ("pingpong", "overlap", "late_rescale", "tma", "lean")
_SCHEDULE_ENV = {"pingpong": "MODELOPT_SPARSE_HOPPER_PINGPONG",
                 "overlap": "MODELOPT_SPARSE_HOPPER_OVERLAP",
                 "late_rescale": "MODELOPT_SPARSE_HOPPER_LATE_RESCALE",
                 "tma": "MODELOPT_SPARSE_HOPPER_TMA",
                 "lean": "MODELOPT_SPARSE_HOPPER_LEAN"}


def schedule_from_env(head_dim: int = 128, sparsity_n: int = 0, sparsity_m: int = 4) -> dict:
    """The schedule fields for a kernel: :func:`measured_schedule`, each switch overridden by
    its environment variable when that is set (variant_for's switches)."""
    measured = measured_schedule(head_dim, sparsity_n, sparsity_m)
    return {f: env_flag(name, measured[f]) for f, name in _SCHEDULE_ENV.items()}


def schedule_env(schedule: dict) -> str:
    """``NAME=0/1 ...`` for a schedule (what the device script exports for the test run)."""
    return " ".join(f"{_SCHEDULE_ENV[f]}={int(bool(schedule[f]))}" for f in SCHEDULE_FIELDS)


def _test_set(probe: bool) -> list[Variant]:
    """Every kernel the GPU tests run (the measured schedule, as variant_for picks with no
    switch set), the probe builds optional."""
    return [dataclasses.replace(v, **measured_schedule(v.head_dim, v.sparsity_n, v.sparsity_m),
                                consumers=measured_consumers(v.head_dim, v.sparsity_n, v.sparsity_m),
                                tma3d=measured_tma3d(v.sparsity_n, v.sparsity_m)).canonical()
            for v in _test_set_base(probe)]


def _test_set_base(probe: bool) -> list[Variant]:
    out = []
    for d in HEAD_DIMS:
        for fp16 in (False, True):
            out.append(Variant(head_dim=d, fp16=fp16))
        for n, m in ((1, 2), (2, 4), (3, 4), (4, 8), (8, 16), (3, 16)):
            for tie in (False, True):
                out.append(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, tie_index=tie))
        out.append(Variant(head_dim=d, sparsity_n=2, sparsity_m=4, fp16=True))
        out.append(Variant(head_dim=d, sparsity_n=8, sparsity_m=16, fp16=True))
    if probe:
        for n, m in ((0, 4), (1, 2), (2, 4), (4, 8), (8, 16), (3, 16), (5, 16)):
            for tie in ((False, True) if n else (False,)):
                out.append(Variant(head_dim=128, sparsity_n=n, sparsity_m=m, tie_index=tie, probe=True))
    return out


# The schedules the timing table compares (pingpong, overlap, late_rescale, tma, lean); the
# first is the verified default. Rows past the first four are compile-checked only until a GPU run.
F, T = False, True
BENCH_SCHEDULES = [
    (F, T, F, F, F), (T, T, F, F, F), (T, F, F, F, F), (F, F, F, F, F),
    (F, T, T, F, F), (T, T, T, F, F), (T, F, T, F, F),
    (T, F, F, T, F), (T, F, T, T, F), (T, T, T, T, F), (F, T, T, T, F),
    (T, F, F, F, T), (T, F, T, F, T), (T, F, T, T, T), (T, T, T, T, T),
]
# The schedules timed for N:M, non-causal and D = 64 (fewer rows: the dense D = 128 causal rows
# decide the schedule).
BENCH_SCHEDULES_SHORT = [(F, T, F, F, F), (T, F, F, F, F), (T, F, F, F, T), (T, F, T, T, T), (T, T, T, T, T)]
BENCH_NM = ((2, 4), (4, 8), (8, 16))


def _sched(t) -> dict:
    return dict(zip(SCHEDULE_FIELDS, t))


# The schedules whose whole GPU test set is precompiled and carried (tools/device_hopper.sh runs
# the test file once, with the fastest of these in the environment): ping-pong without overlap
# (the fastest measured so far) and the new schedule most likely to beat it (TMA producer, late
# rescale, lean softmax). Two, because the probe builds take minutes to compile on 2 cores.
TEST_SCHEDULES = [(T, F, F, F, F), (T, F, T, T, T)]
# Three consumer warpgroups at D = 64 (192 query rows per CTA), timed with these schedules.
# TMA (the shape requires it) and no overlap (overlap keeps P(j-1) alive: spills at 160 registers).
BENCH_SCHEDULES_WG3 = [(T, F, F, T, F), (T, F, F, T, T), (T, F, T, T, T)]


# Stage 3 (2:4 P.V through wgmma.sp), timed and tested with these schedules: the cp.async
# producer (V in its second row order), the TMA producer (V through its 5-D map; session 11:
# 472 TFLOPS without overlap, against 554 for the masked 2:4 with overlap), and the TMA producer
# with overlap (the compressed P staged in registers while P.V(j-1) runs; session 12).
BENCH_SCHEDULES_SPARSE_PV = [(T, F, F, F, T), (T, F, T, T, T), (T, F, F, T, T), (T, T, T, T, T), (T, T, F, T, T)]
# 8:16 through the grouped 4-D TMA maps (tma3d), against the 8:16 rows of the same schedules
# (where TMA falls back to cp.async): 8:16's measured schedule and the same without late rescale.
BENCH_SCHEDULES_TMA3D = [(T, F, T, T, T), (T, F, F, T, T)]


def bench_variants() -> list[Variant]:
    """The kernels the timing table runs (bench)."""
    out = [Variant(**_sched(t)) for t in BENCH_SCHEDULES]
    out += [Variant(sparsity_n=2, sparsity_m=4, tie_index=tie, sparse_pv=True, **_sched(t))
            for t in BENCH_SCHEDULES_SPARSE_PV for tie in (False, True)]
    out.append(Variant(sparsity_n=2, sparsity_m=4, tie_index=True))
    out += [Variant(head_dim=64, consumers=3, **_sched(t)) for t in BENCH_SCHEDULES_WG3]
    for t in BENCH_SCHEDULES_SHORT:
        out.append(Variant(head_dim=64, **_sched(t)))
        for n, m in BENCH_NM:
            out.append(Variant(sparsity_n=n, sparsity_m=m, **_sched(t)))
    out.append(Variant(sparsity_n=8, sparsity_m=16, tie_index=True))
    out += [Variant(sparsity_n=8, sparsity_m=16, tma3d=True, **_sched(t)) for t in BENCH_SCHEDULES_TMA3D]
    return out


def standard_variants(probe: bool = True, schedule: dict | str | None = None) -> list[Variant]:
    """The variants the GPU tests and the timing table use (tools/device_hopper.sh carries
    them precompiled). With ``schedule``: the test set under that schedule only (what a test
    run with those switches in the environment loads); ``"env"``: each kernel's schedule as
    the environment gives it (:func:`schedule_from_env`)."""
    if schedule is not None:
        def sched(v):  # "env": each kernel's schedule as variant_for reads it from the environment
            return schedule_from_env(v.head_dim, v.sparsity_n, v.sparsity_m) if schedule == "env" else schedule

        out = [dataclasses.replace(v, **sched(v)) for v in _test_set_base(probe)]
        # test_gpu_11 sets ping-pong and overlap itself; the other switches come from the schedule.
        out += [dataclasses.replace(v, **dict(sched(v), pingpong=pp, overlap=ov))
                for v in (Variant(sparsity_n=0, sparsity_m=4), Variant(sparsity_n=4, sparsity_m=8))
                for pp, ov in ((True, True), (True, False), (False, False))]
    else:
        out = _test_set(False)
        # The alternative schedules the schedule tests run side by side.
        for d in HEAD_DIMS:
            for n, m in ((0, 4), (4, 8), (8, 16)):
                for pingpong, overlap in ((True, True), (True, False), (False, False)):
                    out.append(Variant(head_dim=d, sparsity_n=n, sparsity_m=m, pingpong=pingpong, overlap=overlap))
        out += NEW_VARIANT_TESTS + bench_variants()
        if probe:
            out += [v for v in _test_set(True) if v.probe]
            # The TMA producer's element-strided boxes (the group permutation), bit for bit.
            out += [Variant(sparsity_n=n, sparsity_m=m, tie_index=tie, probe=True, tma=True)
                    for n, m, tie in ((0, 4, False), (1, 2, False), (2, 4, True), (4, 8, False))]
            # The grouped 4-D maps (M = 16), bit for bit (test_gpu_22).
            out += [Variant(sparsity_n=n, sparsity_m=16, tie_index=tie, probe=True, tma=True, tma3d=True)
                    for n, tie in ((8, False), (3, True))]
    seen, unique = set(), []
    for v in out:
        if v.canonical() not in seen:
            seen.add(v.canonical())
            unique.append(v.canonical())
    return unique


# What test_gpu_22 runs with MODELOPT_SPARSE_HOPPER_TMA3D=1 (M = 16 through the grouped 4-D maps):
# the 8:16 measured schedule (no overlap), and TMA with overlap and ping-pong off.
TMA3D_TEST_SCHEDULES = [(T, F, T, T, T), (F, T, F, T, F)]

# What tests/test_kernel_hopper.py's new-variant tests run (test_gpu_14/15).
NEW_VARIANT_SCHEDULES = [(F, T, T, F, F), (T, F, T, F, F), (T, F, F, T, F), (T, T, T, T, F), (T, F, F, F, T),
                         (T, T, T, T, T)]
NEW_VARIANT_PATTERNS = ((0, 4), (2, 4), (4, 8), (8, 16))
NEW_VARIANT_TESTS = [Variant(head_dim=128, sparsity_n=n, sparsity_m=m, **_sched(t))
                     for t in NEW_VARIANT_SCHEDULES for n, m in NEW_VARIANT_PATTERNS] + \
                    [Variant(head_dim=64, fp16=h, **_sched(t)) for t in NEW_VARIANT_SCHEDULES
                     for h in (False, True)] + \
                    [Variant(head_dim=64, fp16=h, consumers=3, **_sched(t)) for t in BENCH_SCHEDULES_WG3
                     for h in (False, True)] + \
                    [Variant(head_dim=64, sparsity_n=n, sparsity_m=m, fp16=True, consumers=3, **_sched(t))
                     for t in BENCH_SCHEDULES_WG3 for n, m in ((0, 4), (2, 4), (4, 8), (8, 16))] + \
                    [Variant(sparsity_n=n, sparsity_m=4 if n == 0 else 8, lean=True) for n in (0, 4)] + \
                    [Variant(head_dim=d, sparsity_n=2, sparsity_m=4, tie_index=tie, fp16=h, sparse_pv=True, **_sched(t))
                     for t in BENCH_SCHEDULES_SPARSE_PV for d in HEAD_DIMS for tie in (False, True)
                     for h in (False, True)] + \
                    [Variant(head_dim=d, sparsity_n=n, sparsity_m=16, tie_index=tie, fp16=h, tma3d=True, **_sched(t))
                     for t in TMA3D_TEST_SCHEDULES for d in HEAD_DIMS for n, tie in ((8, False), (3, True))
                     for h in (False, True)]


def _precompile(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    schedule = "env" if args.schedule_from_env else None
    variants = standard_variants(probe=not args.no_probe, schedule=schedule)
    if args.test_schedules:  # the carried test sets of every TEST_SCHEDULES entry as well
        for t in TEST_SCHEDULES:
            variants += [v for v in standard_variants(probe=not args.no_probe, schedule=_sched(t)) if v not in variants]
    print(f"cache: {cache_dir()}  nvcc: {find_nvcc()}  variants: {len(variants)}"
          f"{'  schedule: from the environment' if schedule else ''}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        paths = list(pool.map(compile_variant, variants))
    if args.no_report:
        print(f"{len(paths)} cubins ready")
        return 0
    print(f"{'variant':<22} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    for v, path in zip(variants, paths):
        s = ptxas_summary(path.with_suffix(".log").read_text())
        print(f"{v.tag:<22} {s.get('registers', '?'):>5} {s.get('stack', '?'):>6} {s.get('spill_stores', '?'):>9} "
              f"{s.get('spill_loads', '?'):>9}{'  SERIALIZED WGMMA' if s.get('serialized_wgmma') else ''}")
    return 0


def find_nvdisasm() -> str | None:
    """nvdisasm for the SASS counts: $MODELOPT_SPARSE_NVDISASM, PATH, beside nvcc, or the copy
    Triton ships (triton/backends/nvidia/bin)."""
    explicit = os.environ.get("MODELOPT_SPARSE_NVDISASM")
    if explicit:
        return explicit
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = find_nvcc()
    if nvcc and (Path(nvcc).parent / "nvdisasm").is_file():
        return str(Path(nvcc).parent / "nvdisasm")
    try:
        import triton  # noqa: PLC0415

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        return str(p) if p.is_file() else None
    except ImportError:
        return None


# Opcode classes of the SASS counts (the pipe they issue to, roughly: MUFU = the SFU's 16
# lanes/clk/SM; FMNMX/FSETP/FSEL/SEL/LOP3/ISETP = the half-rate ALU pipe; FFMA/FADD/FMUL = FMA).
SASS_CLASSES = ("HGMMA", "MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "SEL", "F2FP", "SHFL", "LOP3",
                "ISETP", "MOV", "BAR", "SYNCS")


def count_main_loop(sass: str) -> dict:
    """Static instruction counts of the consumers' tile loop in ``sass`` (nvdisasm -c output):
    the backward branch whose body holds the most HGMMA, less the nested barrier-retry loops.
    Compile with -DNMH_SASS_INTERIOR=1 so that the body is the interior-tile path."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(2))
    loops = []
    for k, text in enumerate(ins):
        m = re.search(r"BRA\b.*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), k + 1) <= k:
            loops.append((labels[m.group(1)], k))
    if not loops:
        return {}
    lo, hi = max(loops, key=lambda r: (sum("HGMMA" in t for t in ins[r[0]:r[1] + 1]), r[1] - r[0]))
    skip = set()
    for a, b in loops:
        if lo < a and b < hi and not any("HGMMA" in t for t in ins[a:b + 1]):
            skip.update(range(a, b + 1))
    body = [ins[i] for i in range(lo, hi + 1) if i not in skip]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body]
    out = {"total": len(ops)}
    for c in SASS_CLASSES:
        out[c] = sum(op.split(".")[0] == c for op in ops)
    return out


def _sass(args) -> int:
    """Inner-loop SASS counts per variant (no GPU): compile with NMH_SASS_INTERIOR, disassemble."""
    nvcc, nvdisasm = find_nvcc(), find_nvdisasm()
    if nvcc is None or nvdisasm is None:
        print("needs nvcc and nvdisasm")
        return 1
    if args.variants:
        variants = [_parse_tag(t) for t in args.variants]
    else:
        variants = [Variant(**_sched(t)) for t in BENCH_SCHEDULES]
        variants += [Variant(sparsity_n=n, sparsity_m=m, **_sched(t)) for n, m in BENCH_NM
                     for t in BENCH_SCHEDULES_SHORT]
        variants += [Variant(head_dim=64, **_sched(t)) for t in BENCH_SCHEDULES_SHORT]
        variants += [Variant(head_dim=64, consumers=3, **_sched(t)) for t in BENCH_SCHEDULES_WG3]
        variants += [Variant(sparsity_n=2, sparsity_m=4, sparse_pv=True, **_sched(t)) for t in BENCH_SCHEDULES_SPARSE_PV]
    print(f"{'variant':<24}" + "".join(f"{c:>7}" for c in ("total",) + SASS_CLASSES) + "   regs spill", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            v = v.canonical()
            cubin = Path(tmp) / f"{v.tag}.cubin"
            cmd = [nvcc, *NVCC_FLAGS, *v.defines(), "-DNMH_SASS_INTERIOR=1", "-o", str(cubin),
                   str(SOURCE_DIR / "nm_attention_fwd.cu")]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                print(f"{v.tag:<24} nvcc failed: {res.stderr[-300:]}")
                continue
            summary = ptxas_summary(res.stderr + res.stdout)
            dis = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, timeout=120).stdout
            counts = count_main_loop(dis)
            print(f"{v.tag:<24}" + "".join(f"{counts.get(c, 0):>7}" for c in ("total",) + SASS_CLASSES) +
                  f"   {summary.get('registers', '?')} {summary.get('spill_stores', '?')}/{summary.get('spill_loads', '?')}",
                  flush=True)
    return 0


def _parse_tag(tag: str) -> Variant:
    """``d128_4of8t_pr`` -> Variant (the inverse of Variant.tag, for the sass command)."""
    m = re.fullmatch(r"d(\d+)_(dense|(\d+)of(\d+)([ti]))_([a-z3-]+)", tag)
    if not m:
        raise ValueError(f"not a variant tag: {tag}")
    flags = m.group(6)
    return Variant(head_dim=int(m.group(1)), sparsity_n=int(m.group(3) or 0), sparsity_m=int(m.group(4) or 4),
                   tie_index=m.group(5) == "i", fp16="h" in flags, pingpong="p" in flags, overlap="o" in flags,
                   late_rescale="r" in flags, tma="m" in flags, lean="z" in flags,
                   consumers=3 if "3" in flags else 2, sparse_pv="s" in flags, tma3d="g" in flags,
                   probe="x" in flags)


def _smoke(args) -> int:
    """A few small calls with diagnostics that say *how* a result is wrong (first run on a GPU)."""
    import time

    os.environ["MODELOPT_SPARSE_HOPPER_CHECK"] = "1"
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)} sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}"
          f"  torch {torch.__version__}  nvcc {nvcc_version(find_nvcc()) if find_nvcc() else None}", flush=True)
    failures = 0
    cases = [
        ("dense noncausal 1x256 D128", dict(is_causal=False), [256], 128),
        ("dense causal 1x256 D128", dict(), [256], 128),
        ("dense causal varlen D64", dict(), [1, 130, 257], 64),
        ("2:4 causal varlen D128 sinks+window", dict(sparsity_n=2, num_sink_tokens=4, dense_window_size=16),
         [5, 300], 128),
        ("8:16 index causal D128", dict(sparsity_n=8, sparsity_m=16, tie_break="index"), [300], 128),
    ]
    g = torch.Generator().manual_seed(0)
    for name, kw, lens, d in cases:
        params = SparseParams(**{"is_causal": True, "softmax_scale": d ** -0.5, "sparsity_n": 0, "sparsity_m": 4,
                                 "num_sink_tokens": 0, "dense_window_size": 0, "tie_break": "threshold", **kw})
        total = sum(lens)
        q, k, v = (torch.randn(total, 4, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        k, v = k[:, :2], v[:, :2]  # GQA 4:2 (strided views, as a fused projection gives them)
        starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], dtype=torch.int32, device=dev)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        try:
            out, lse = forward_with_lse(q, k, v, starts, lens_t, max(lens), starts, lens_t, params, covered=True)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on with the next case
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            continue
        from .reference import Segment, reference_attention

        segs = [Segment(int(st), n, int(st), n) for st, n in zip(starts.tolist(), lens)]
        ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), segs, params, None)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse2 = ref_lse * LOG2E  # the reference's lse is natural-log; the kernels store log2
        finite = torch.isfinite(lse2)
        lse_err = (lse.double()[finite] - lse2[finite]).abs().max().item() if finite.any() else 0.0
        bad_rows = ((out.double() - ref).abs().amax(dim=(1, 2)) > 0.05).nonzero().flatten()
        ok = err < 2e-2 and lse_err < 1e-2 and torch.isfinite(out).all()
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: rel L2 {err:.2e}, max |lse - ref| {lse_err:.2e}, "
              f"non-finite {int((~torch.isfinite(out)).sum())}, rows off {bad_rows.numel()}/{total}"
              f"{' first ' + str(bad_rows[:8].tolist()) if bad_rows.numel() else ''}, "
              f"{1e3 * (time.perf_counter() - t0):.0f} ms (incl. load)", flush=True)
    return 1 if failures else 0


def _sched_label(sched: dict) -> str:
    names = (("pingpong", "pp"), ("late_rescale", "late"), ("tma", "tma"), ("lean", "lean"))
    parts = [short for f, short in names if sched[f]] + ([] if sched["overlap"] else ["no-ovl"]) + \
        (["3wg"] if sched.get("wg3") else []) + (["sparse-pv"] if sched.get("sparse_pv") else []) + \
        (["tma3d"] if sched.get("tma3d") else [])
    return " ".join(parts) or "base"  # the first verified schedule (overlap only), not the measured default


_TAIL_ROWS = 256


def _exact_tail(api_attention, q, k, v, params: SparseParams) -> torch.Tensor:
    """The float32 reference (backend="torch") of the last rows of a one-sequence call: those
    rows as a chunk against every key (causal alignment puts them at the sequence's end)."""
    rows, keys = min(_TAIL_ROWS, q.shape[0]), k.shape[0]
    dev = q.device
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    return api_attention(q[-rows:].float(), k.float(), v.float(), zero, torch.tensor([rows], dtype=torch.int32, device=dev),
                         rows, b_start_loc_k=zero, b_seq_len_k=torch.tensor([keys], dtype=torch.int32, device=dev),
                         max_input_len_k=keys, is_causal=params.is_causal, softmax_scale=params.softmax_scale, sparsity_n=params.sparsity_n,
                         sparsity_m=params.sparsity_m, dense_window_size=params.dense_window_size,
                         tie_break=params.tie_break, backend="torch")


def _bench(args) -> int:
    """Causal/non-causal forward TFLOPS at S x H (batch 1): the engine's schedules against the
    Triton forward and SDPA. Every engine and Triton row also reports the relative L2 distance
    of its last rows to the float32 reference ("vs fp32": bf16 rounding gives ~2e-3; a variant
    that computes something else shows here at once). Rows are skipped once the time budget is
    spent. The last line names the fastest dense D=128 causal schedule whose output agrees
    (BEST_SCHEDULE, read by tools/device_hopper.sh)."""
    import time

    from .api import attention as api_attention

    # device "cpu" only for the CPU test of the table's own code (a stubbed forward); every
    # number it prints there is meaningless.
    dev = torch.device(getattr(args, "device", "cuda"))
    s_len, heads = args.seq_len, args.heads
    start = time.perf_counter()
    rows = []

    def timed(fn, iters=args.iters):
        fn()
        if dev.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        return sorted(times)[len(times) // 2]

    # (d, causal, n, m, tie, impl, schedule)
    plan = []
    for t in BENCH_SCHEDULES:
        plan.append((128, True, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((128, True, 0, 4, "threshold", "sdpa", None))
    for n, m in BENCH_NM:
        for t in BENCH_SCHEDULES_SHORT:
            plan.append((128, True, n, m, "threshold", "hopper", _sched(t)))
    plan.append((128, True, 8, 16, "index", "hopper", _sched(BENCH_SCHEDULES[0])))
    # 8:16 through the grouped 4-D TMA maps (compare with the 8:16 rows of the same schedule above).
    for t in BENCH_SCHEDULES_TMA3D:
        plan.append((128, True, 8, 16, "threshold", "hopper", dict(_sched(t), tma3d=True)))
    # Stage 3: 2:4 with P.V through wgmma.sp (both tie rules), against the rows above (the
    # index rule's default row first: it is the reference of the index rows).
    plan.append((128, True, 2, 4, "index", "hopper", _sched(BENCH_SCHEDULES[0])))
    for t in BENCH_SCHEDULES_SPARSE_PV:
        for tie in ("threshold", "index"):
            plan.append((128, True, 2, 4, tie, "hopper", dict(_sched(t), sparse_pv=True)))
    for t in BENCH_SCHEDULES_SHORT:
        plan.append((64, True, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((64, True, 0, 4, "threshold", "sdpa", None))
    for t in BENCH_SCHEDULES_SHORT:
        plan.append((128, False, 0, 4, "threshold", "hopper", _sched(t)))
    plan.append((128, False, 0, 4, "threshold", "sdpa", None))
    plan += [(128, True, 0, 4, "threshold", "triton", None), (128, True, 2, 4, "threshold", "triton", None),
             (128, True, 4, 8, "threshold", "triton", None),
             (128, True, 8, 16, "threshold", "triton", None), (64, True, 0, 4, "threshold", "triton", None)]
    # Last: the three-warpgroup ring is the one new named-barrier protocol, and a named-barrier
    # deadlock cannot be caught by the in-kernel watchdog (the step's timeout ends it).
    for t in BENCH_SCHEDULES_WG3:
        plan.append((64, True, 0, 4, "threshold", "hopper", dict(_sched(t), wg3=True)))
    g = torch.Generator(device=dev).manual_seed(0)
    tensors, reference = {}, {}
    saved_env = {name: os.environ.get(name) for name in
                 list(_SCHEDULE_ENV.values()) + ["MODELOPT_SPARSE_HOPPER_D64_WG3", "MODELOPT_SPARSE_HOPPER_SPARSE_PV",
                                                 "MODELOPT_SPARSE_HOPPER_TMA3D", "MODELOPT_SPARSE_HOPPER_CHECK"]}
    best = fastest = None
    announced = False
    for d, causal, n, m, tie, impl, sched in plan:
        if not announced and not (d == 128 and causal and n == 0 and impl == "hopper") and best is not None:
            # As soon as the dense D=128 causal rows are done, so that a later hang cannot lose it.
            print(f"BEST_SCHEDULE {schedule_env(best[1])}  # {_sched_label(best[1])}, {best[0]:.3f} ms", flush=True)
            announced = True
        label = (f"D={d:<3} {'causal' if causal else 'noncausal':<9} {'dense' if n == 0 else f'{n}:{m}':<5}"
                 f"{' idx' if tie == 'index' else '    '} {impl:<6} {_sched_label(sched) if sched else ''}")
        if time.perf_counter() - start > args.budget:
            rows.append((label, None, "skipped (time budget)"))
            continue
        if d not in tensors:
            tensors[d] = [torch.randn(s_len, heads, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]
        q, k, v = tensors[d]
        lens = torch.tensor([s_len], dtype=torch.int32, device=dev)
        zero = torch.zeros(1, dtype=torch.int32, device=dev)
        params = SparseParams(causal, d ** -0.5, n, m, 0, 64 if n else 0, tie)
        flops = 4.0 * s_len * s_len * heads * d / (2 if causal else 1)
        check = ""
        try:
            if impl == "hopper":
                for f, name in _SCHEDULE_ENV.items():
                    os.environ[name] = str(int(sched[f]))
                os.environ["MODELOPT_SPARSE_HOPPER_D64_WG3"] = str(int(sched.get("wg3", False)))
                os.environ["MODELOPT_SPARSE_HOPPER_SPARSE_PV"] = str(int(sched.get("sparse_pv", False)))
                os.environ["MODELOPT_SPARSE_HOPPER_TMA3D"] = str(int(sched.get("tma3d", False)))

                def run():
                    return forward(q, k, v, zero, lens, s_len, zero, lens, params, q_covered=True, with_lse=False)[0]

                # First a checked call: a barrier wait that times out in the kernel raises here
                # (the row says ERROR) instead of hanging the table; then the timing, unchecked.
                os.environ["MODELOPT_SPARSE_HOPPER_CHECK"] = "1"
                try:
                    out = run()
                finally:
                    os.environ.pop("MODELOPT_SPARSE_HOPPER_CHECK", None)
                ms = timed(run)
                key = (d, causal, n, m, tie)
                if key not in reference:
                    reference[key] = _exact_tail(api_attention, q, k, v, params)
                ref = reference[key]
                err = ((out[-ref.shape[0]:].float() - ref).norm() / ref.norm()).item()
                # bf16 output rounding alone is ~2e-3 (every correct variant, and the Triton
                # forward); a wrong kernel is off by 0.1 or more.
                ok = err < 5e-3
                check = f"  vs fp32 {err:.1e}{'' if ok else '  WRONG'}"
                if ok:
                    if d == 128 and causal and n == 0:
                        if fastest is None or ms < fastest[0]:
                            fastest = (ms, sched)
                        if tuple(sched[f] for f in SCHEDULE_FIELDS) in TEST_SCHEDULES and (best is None or ms < best[0]):
                            best = (ms, sched)
                del out
            elif impl == "triton":
                def run():
                    return api_attention(q, k, v, zero, lens, s_len, is_causal=causal, sparsity_n=n, sparsity_m=m,
                                         dense_window_size=params.dense_window_size, tie_break=tie, backend="triton",
                                         check_metadata=False, rows_covered=True)

                ms = timed(run)
                key = (d, causal, n, m, tie)
                if key not in reference:
                    reference[key] = _exact_tail(api_attention, q, k, v, params)
                ref = reference[key]
                err = ((run()[-ref.shape[0]:].float() - ref).norm() / ref.norm()).item()
                check = f"  vs fp32 {err:.1e}{'' if err < 5e-3 else '  WRONG'}"
            else:
                qt, kt, vt = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
                ms = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            rows.append((label, ms, f"{flops / ms / 1e9:7.1f} TFLOPS{check}"))
        except Exception as e:  # noqa: BLE001 - a broken row must not hide the others
            rows.append((label, None, f"ERROR {type(e).__name__}: {str(e)[:120]}"))
        print(f"  {rows[-1][0]}  {rows[-1][2]}", flush=True)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    print(f"\nforward, S={s_len}, H={heads}, bf16, batch 1 (dense-equivalent FLOPs; N:M rows count the same FLOPs "
          f"as dense, so their TFLOPS compare directly; N:M rows: dense window 64; 'vs fp32': relative L2 "
          f"distance of the last {_TAIL_ROWS} rows to the float32 reference, WRONG above 5e-3)")
    for label, ms, text in rows:
        print(f"{label:<60} {'' if ms is None else f'{ms:8.3f} ms'}  {text}")
    if fastest is not None:
        print(f"FASTEST {_sched_label(fastest[1])}, {fastest[0]:.3f} ms (dense D=128 causal, output agrees)")
    if best is not None:  # the fastest whose test set is carried (TEST_SCHEDULES), again at the end
        print(f"BEST_SCHEDULE {schedule_env(best[1])}  # {_sched_label(best[1])}, {best[0]:.3f} ms")
    return 0


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelopt_sparse.kernels.hopper_attention",
                                     description="The Hopper engine's tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("precompile", help="compile the standard variants into the cubin cache (no GPU needed) "
                                            "and print ptxas's register / spill report")
    pre.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    pre.add_argument("--no-probe", action="store_true", help="skip the mask-probe builds")
    pre.add_argument("--schedule-from-env", action="store_true",
                     help="only the GPU tests' kernels, under the schedule the MODELOPT_SPARSE_HOPPER_* switches select")
    pre.add_argument("--no-report", action="store_true", help="skip ptxas's register / spill table")
    pre.add_argument("--test-schedules", action="store_true",
                     help="also the GPU tests' kernels under every schedule in TEST_SCHEDULES (what the device run carries)")
    sub.add_parser("smoke", help="a few small calls against the reference, with diagnostics (GPU)")
    sass = sub.add_parser("sass", help="static SASS counts of the consumers' tile loop (interior path) per variant "
                                       "(no GPU)")
    sass.add_argument("variants", nargs="*", help="variant tags (default: the timed schedules)")
    bench = sub.add_parser("bench", help="forward TFLOPS against Triton and SDPA (GPU)")
    bench.add_argument("--seq-len", type=int, default=16384)
    bench.add_argument("--heads", type=int, default=32)
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--budget", type=float, default=70.0, help="seconds; later rows are skipped")
    args = parser.parse_args(argv)
    return {"precompile": _precompile, "smoke": _smoke, "bench": _bench, "sass": _sass}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(_main())
