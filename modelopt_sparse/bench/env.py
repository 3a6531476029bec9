"""Where a benchmark ran: versions, the device and the git commit of the code measured."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

# The checkout this package sits in (modelopt_sparse/bench/env.py -> the repository root),
# for recording the git commit of a run.
REPO_ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str | None:
    # safe.directory: a checkout copied to another machine is often owned by another user,
    # and git then refuses to read it.
    cmd = ["git", "-c", f"safe.directory={REPO_ROOT}", *args]
    try:
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """tools/code_fingerprint.sh in Python: one hash over the package, tools, tests and
    benchmarks (Python, shell and CUDA sources) as they are on disk (sha1sum lines of the sorted
    files, hashed again)."""
    paths = sorted(
        path.relative_to(root).as_posix()
        for folder in ("modelopt_sparse", "tools", "tests", "benchmarks")
        for path in (root / folder).rglob("*")
        if path.is_file() and path.suffix in (".py", ".sh", ".cu", ".cuh")
    )
    listing = "".join(f"{hashlib.sha1((root / p).read_bytes()).hexdigest()}  {p}\n" for p in paths)
    return hashlib.sha1(listing.encode()).hexdigest()[:12]


def stamped_commit(root: Path = REPO_ROOT) -> str | None:
    """The commit in ``.commit`` (tools/stamp_commit.sh), if its fingerprint is this tree's."""
    try:
        commit, fingerprint = (root / ".commit").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return commit if fingerprint == code_fingerprint(root) else None


def git_commit() -> str | None:
    # A copy shipped to the GPU machine carries the commit in .commit, written just before
    # shipping; a .git folder there is a stale snapshot. A .commit left over from an older
    # tree does not match the fingerprint and is ignored.
    commit = stamped_commit() or git("rev-parse", "HEAD")
    if commit:
        return commit
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


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def _installed_version(distribution: str) -> str | None:
    # From the package metadata: importing transformers only to read its version costs seconds.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_env(device: str) -> dict:
    dev = torch.device(device)
    commit = git_commit()
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "transformers": _installed_version("transformers"),
        "flash_attn_4": _installed_version("flash-attn-4"),  # the fa4 peer (None: not installed)
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
