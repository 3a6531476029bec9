"""Building the Hopper kernel: nvcc, the compile command and the on-disk cubin cache.

:func:`compile_variant` compiles one :class:`~.variants.Variant` of the CUDA source
(``kernels/hopper/nm_attention_fwd.cu``, :data:`SOURCE_DIR`) into a cubin at first use and
caches it under ``$MODELOPT_SPARSE_HOPPER_CACHE`` (default ``~/.cache/modelopt_sparse/hopper``),
keyed by :func:`cache_key`: a hash of the CUDA sources (:func:`source_digest`, the .cu and
.cuh files only, so moving Python code never invalidates a cubin), the variant's ``-D``
flags, the nvcc version and :data:`NVCC_FLAGS`. :func:`find_nvcc` locates the optional
toolchain. No GPU needed. :class:`HopperUnavailable` lives here because the toolchain is the
first place a call can turn out unrunnable; the package re-exports it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .variants import Variant

LOG = logging.getLogger("modelopt_sparse")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "hopper"  # kernels/hopper/ (package data)
KERNEL = "nm_attn_fwd"
# Compile flags. No --use_fast_math: the selection's kept test (drop_below) relies on sub.f32
# not flushing subnormals.
NVCC_FLAGS = ("-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v")


class HopperUnavailable(RuntimeError):
    """``backend="hopper"`` was asked for a call this engine cannot run (the message says why)."""


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


def _source_files(folder: Path) -> list[Path]:
    return sorted(list(folder.glob("*.cu")) + list(folder.glob("*.cuh")))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def source_digest() -> str:
    """Hash of every CUDA source of the engine (.cu and .cuh, by name and content)."""
    files = _source_files(SOURCE_DIR)
    if not files:
        raise HopperUnavailable(f"the engine's CUDA sources are missing ({SOURCE_DIR})")
    return _digest(files)


def cache_key(variant: Variant, nvcc_id: str, digest: str | None = None) -> str:
    """What decides a cubin's bytes: sources, variant (its -D flags), compiler and flags."""
    h = hashlib.sha256()
    for part in (digest or source_digest(), " ".join(variant.canonical().defines()), nvcc_id, " ".join(NVCC_FLAGS)):
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()[:20]


def cubin_path(variant: Variant, nvcc: str | None = None, digest: str | None = None) -> Path:
    """Where the cubin of ``variant`` for these sources (``digest``; default: as on disk now) lives."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise HopperUnavailable(_NO_NVCC)
    v = variant.canonical()
    return cache_dir() / f"{KERNEL}_{v.tag}_{cache_key(v, nvcc_version(nvcc), digest)}.cubin"


_NO_NVCC = ("no CUDA compiler found: install the optional toolchain (pip install 'modelopt-sparse[hopper]') "
            "or a CUDA 12.4+ toolkit, or set MODELOPT_SPARSE_NVCC to an nvcc")
_compile_locks: dict = {}
_compile_locks_guard = threading.Lock()


def compile_variant(variant: Variant, nvcc: str | None = None, source_dir: Path | str | None = None) -> Path:
    """The cached cubin of ``variant``, compiling it first if needed (atomic: concurrent
    processes never see a partial file). ptxas's report lands beside it (``.log``).
    ``source_dir``: another folder of the engine's CUDA sources (e.g. an older checkout's, for
    ``ab --against``); its cubins are keyed by its own sources' hash."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise HopperUnavailable(_NO_NVCC)
    source = Path(source_dir) if source_dir is not None else SOURCE_DIR
    if not (source / "nm_attention_fwd.cu").is_file():
        raise HopperUnavailable(f"no nm_attention_fwd.cu in {source}")
    path = cubin_path(variant, nvcc, None if source_dir is None else _digest(_source_files(source)))
    if path.is_file():
        return path
    with _compile_locks_guard:  # one compile per cubin in this process; other cubins in parallel
        lock = _compile_locks.setdefault(path, threading.Lock())
    with lock:
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # nvcc compiles a snapshot of the sources, and the cubin is keyed by the snapshot's hash:
        # a source edited while a compile runs can then never land under another source's key.
        with tempfile.TemporaryDirectory() as snapshot:
            for f in _source_files(source):
                shutil.copyfile(f, Path(snapshot) / f.name)
            v = variant.canonical()
            path = cubin_path(v, nvcc, _digest(_source_files(Path(snapshot))))
            if path.is_file():
                return path
            fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=path.parent)
            os.close(fd)
            cmd = [nvcc, *NVCC_FLAGS, *v.defines(), "-o", tmp, str(Path(snapshot) / "nm_attention_fwd.cu")]
            LOG.info("modelopt_sparse: compiling the Hopper kernel %s", v.tag)
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            os.unlink(tmp)
            raise HopperUnavailable(f"nvcc failed for {v.tag}:\n{(res.stderr or res.stdout)[-2000:]}")
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
