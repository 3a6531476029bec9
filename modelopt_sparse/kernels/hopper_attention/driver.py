"""The CUDA driver API through ctypes: loading a cubin and launching it, no C++ extension.

The ctypes mirrors of the kernel's argument structs (:class:`_FwdParams`, :class:`_TmaParams`,
:class:`_TmaParams3D`), the tensor-map encoders (:class:`_Driver`: ``cuTensorMapEncodeTiled``
for the plain, grouped 4-D and stage 3's 5-D maps, whose geometry is :func:`sparse_pv_v_map`),
and :class:`_Module`: one cubin loaded with ``cuModuleLoadData`` into PyTorch's primary
context and launched with ``cuLaunchKernel`` on PyTorch's current stream. :func:`_module`
compiles (:mod:`.build`) and loads a variant once per device and keeps it.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from .build import KERNEL, HopperUnavailable, compile_variant
from .variants import Variant


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
        ("reserved", ctypes.c_int), ("scale_log2", ctypes.c_float), ("sinks", ctypes.c_void_p),
    ]


PARAMS_SIZE = 208  # static_assert(sizeof(FwdParams) == 208) in the CUDA source


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
        config = self._read_global("nmh_config", 20)
        self.smem, threads, block_m, params_size, block_n = (int.from_bytes(config[i:i + 4], "little", signed=True)
                                                             for i in range(0, 20, 4))
        self.threads, self.block_m, self.block_n = threads, block_m, block_n
        if block_m not in (128, 192) or threads != 128 * (1 + block_m // 64) or block_n not in (64, 128) or \
                params_size != ctypes.sizeof(_FwdParams):
            raise RuntimeError(f"modelopt_sparse hopper: the cubin's layout (threads {threads}, rows {block_m}, "
                               f"keys {block_n}, params {params_size} B) does not match the Python side")
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


def _module(variant: Variant, device_index: int, source_dir=None) -> _Module:
    """The loaded kernel of ``variant`` on a device (``source_dir``: from other CUDA sources, see
    build.compile_variant)."""
    key = (variant.canonical(), device_index, None if source_dir is None else str(source_dir))
    mod = _modules.get(key)
    if mod is None:
        with _modules_lock:
            mod = _modules.get(key)
            if mod is None:
                image = compile_variant(variant, source_dir=source_dir).read_bytes()
                driver = _driver()
                torch.cuda.init()
                mod = _modules[key] = _Module(driver, image, driver.primary_context(device_index))
    return mod
