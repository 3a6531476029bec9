"""What every evaluation command does before and after its own work.

Resolving ``--device``/``--backend``/``--dtype``, creating ``--out``, loading the model
with the checks that must come first (sequence length against the model's limit, a model
that ``sparsify`` would refuse), running offline, and the ``meta`` block of the outputs.
The order is the one ``modelopt-sparse eval`` established: everything the user can get
wrong fails before the slow steps (loading weights, tokenizing the text).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .data import check_text_file
from .errors import EvalError
from .models import ModelSource, load_config, load_model, max_positions, resolve_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise EvalError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_backend(backend: str, device: torch.device) -> str:
    """The kernel backend that will actually run (the name shown in the outputs)."""
    from ..kernels import interpreting

    triton_ok = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if backend == "triton" and not triton_ok:
        raise EvalError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, "
                        "very slow); use --backend torch or auto")
    if backend == "auto":
        # As the plugin resolves it: the Triton interpreter is far too slow for a real model.
        return "triton" if device.type == "cuda" else "torch"
    return backend


def check_sparsifiable(model: torch.nn.Module, label: str) -> None:
    """Refuse a model that sparsify would refuse, before the text is read and tokenized."""
    from ..conversion import check_convertible

    try:
        check_convertible(model)
    except (ValueError, NotImplementedError) as err:
        raise EvalError(f"--model {label}: {err}") from None


def check_length(length: int, limit: int | None, flag: str) -> None:
    """A sequence of ``length`` tokens must fit the model's position limit."""
    if limit is not None and length > limit:
        raise EvalError(f"{flag} {length} is longer than the model supports "
                        f"(max_position_embeddings = {limit}); use {flag} {limit} or less")


def prepare_out_dir(out: str) -> Path:
    """Create ``--out`` now, not after a long run: a path that cannot hold the outputs fails at once."""
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {out}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"--out {out}: cannot create it ({err})") from None
    return out_dir


@dataclass
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module
    tokenizer: Any
    max_positions: int | None

    @property
    def path(self) -> str:
        s = self.source
        return str(s.directory / s.gguf_file) if s.gguf_file else str(s.directory)


def open_model(model_arg: str | None, text_file: str | None, lengths: dict[str, int],
               device: torch.device, dtype: torch.dtype, say: Callable[[str], None]) -> LoadedModel:
    """Check ``--text-file`` exists, read the model config, check every ``{flag: length}``
    against the model's position limit, then load the model and refuse it if ``sparsify``
    would. The text itself is read later by the caller."""
    check_text_file(text_file)
    source = resolve_model(model_arg)
    say(f"model: {source.label}")
    config = load_config(source)
    limit = max_positions(config)
    for flag, length in lengths.items():
        check_length(length, limit, flag)
    model, tokenizer = load_model(source, config, device, dtype)
    check_sparsifiable(model, source.label)
    return LoadedModel(source, model, tokenizer, limit)


@contextlib.contextmanager
def offline_and_quiet():
    """Never reach the hub, whatever the caller's environment says, and silence transformers'
    warning about tokenizing the whole text past the model's length (the commands only feed
    slices of it). Both are restored afterwards: commands may run in-process (tests)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is first imported: read once, at import
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "triton", "accelerate", "modelopt-sparse"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_meta(command: str, argv: list[str] | None, loaded: LoadedModel, device: torch.device,
             dtype: torch.dtype, backend: str | None, started: float) -> dict:
    """The ``meta`` block shared by the outputs of every command."""
    return {
        "model": loaded.source.label,
        "model_path": loaded.path,
        "model_class": type(loaded.model).__name__,
        "max_position_embeddings": loaded.max_positions,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "versions": versions(),
        "command": "modelopt-sparse " + " ".join(argv or [command]),
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
    }


def say_written(say, out_dir, files, plot: str, skipped, extra: str = "") -> None:
    """One line naming the files written (the plot only if it was drawn), then why a plot
    was skipped, if it was."""
    written = list(files) + ([] if skipped else [plot])
    say(f"\nwrote {', '.join(str(out_dir / name) for name in written)}{extra}")
    if skipped:
        say(f"plot skipped: {skipped}")
