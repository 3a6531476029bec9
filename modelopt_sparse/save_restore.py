"""Saving and restoring a sparsified model: JSON for the conversion, safetensors for weights.

No pickle is involved anywhere: the conversion state is plain JSON and the weights are
safetensors. Restoring validates everything (file integrity, architecture, configs,
methods) before it changes the model, so a bad checkpoint leaves the model untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import torch
from pydantic import ValidationError

from .config import SparseAttentionAttributeConfig
from .conversion import (
    HF_CONFIG_ATTR,
    ModuleSparseState,
    _check_module_supported,
    apply_states,
    build_state,
    find_attention_modules,
    original_class_name,
    sparse_modules,
)

__all__ = ["sparse_state", "restore_from_state", "save", "restore", "restore_from_pretrained"]

STATE_FORMAT = "modelopt_sparse.sparse_state"
STATE_FORMAT_VERSION = 1
STATE_FILE = "modelopt_sparse.json"
WEIGHTS_FILE = "model.safetensors"


def _version() -> str:
    from . import __version__

    return __version__


def _first(items: list, limit: int = 4) -> str:
    """``items`` cut to ``limit`` entries for a message, saying how many were left out."""
    more = len(items) - limit
    return f"{items[:limit]}" + (f" and {more} more" if more > 0 else "")


def sparse_state(model: torch.nn.Module) -> dict[str, Any]:
    """The conversion state of ``model`` as a JSON-able dict (no weights).

    Holds the config entries used, and per converted module its original class, the
    matched patterns, the full attribute config and the resolved kernel settings.
    """
    converted = sparse_modules(model)
    if not converted:
        raise ValueError(f"{type(model).__name__} is not sparsified: nothing to record")
    modules = {}
    for name, module in converted:
        state: ModuleSparseState = module._mts_state
        modules[name] = {
            "class": state.original_class,
            "method": state.config.method,
            "patterns": list(state.patterns),
            "config": state.config.model_dump(),
            "kernel_kwargs": dict(state.kernel_kwargs),
        }
    return {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "modelopt_sparse_version": _version(),
        "model_class": type(model).__name__,
        "config": getattr(model, "_mts_config_record", None),
        "modules": modules,
    }


def _plan(model: torch.nn.Module, state: Any) -> dict[str, ModuleSparseState]:
    """Validate ``state`` against ``model`` and build the per-module states; mutates nothing."""
    if not isinstance(state, dict):
        raise ValueError(f"sparse state must be a dict, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a modelopt_sparse state: format is {state.get('format')!r}, expected {STATE_FORMAT!r}")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"sparse state format_version {state.get('format_version')!r} is not supported by this "
            f"modelopt_sparse ({_version()}), which reads version {STATE_FORMAT_VERSION}"
        )
    entries = state.get("modules")
    if not isinstance(entries, dict) or not entries:
        raise ValueError("sparse state has no 'modules' entries")
    saved_version = state.get("modelopt_sparse_version")
    if saved_version != _version():
        warnings.warn(
            f"sparse state written by modelopt_sparse {saved_version}, restoring with {_version()}",
            UserWarning, stacklevel=3,
        )

    found = dict(find_attention_modules(model))
    missing, extra = sorted(set(entries) - set(found)), sorted(set(found) - set(entries))
    if missing or extra:
        raise ValueError(
            f"architecture mismatch: the sparse state has {len(entries)} attention modules and "
            f"{type(model).__name__} has {len(found)}"
            + (f"; not in the model: {_first(missing)}" if missing else "")
            + (f"; not in the state: {_first(extra)}" if extra else "")
        )
    plan = {}
    for name, entry in entries.items():
        module = found[name]
        if not isinstance(entry, dict):
            raise ValueError(f"sparse state entry for {name!r} must be a dict")
        if entry.get("class") != original_class_name(module):
            raise ValueError(
                f"architecture mismatch at {name!r}: the state records {entry.get('class')!r}, "
                f"the model has {original_class_name(module)!r}"
            )
        _check_module_supported(name, module)
        try:
            config = SparseAttentionAttributeConfig.model_validate(entry.get("config"))
        except ValidationError as err:
            raise ValueError(f"invalid sparse config recorded for {name!r}: {err}") from None
        patterns = entry.get("patterns", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"sparse state entry for {name!r}: 'patterns' must be a list of strings")
        module_state = build_state(name, module, config, tuple(patterns))
        recorded = entry.get("kernel_kwargs")
        if recorded is not None and recorded != module_state.kernel_kwargs:
            raise ValueError(
                f"method {config.method!r} now resolves {name!r} to {module_state.kernel_kwargs}, but the "
                f"state recorded {recorded}: the method's code changed since the checkpoint was saved"
            )
        plan[name] = module_state
    return plan


def restore_from_state(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """Re-apply a :func:`sparse_state` to a model of the same architecture (weights untouched)."""
    plan = _plan(model, state)
    apply_states(model, plan, state.get("config"))
    return model


def restore_from_pretrained(model: torch.nn.Module) -> torch.nn.Module:
    """Re-apply the conversion recorded in ``model.config`` by ``save_pretrained``.

    ``sparsify`` stores the sparse state in ``model.config.modelopt_sparse``, which
    ``save_pretrained`` writes to config.json and ``from_pretrained`` reads back; the
    weights are ordinary HF weights (conversion does not rename any).
    """
    hf_config = getattr(model, "config", None)
    state = getattr(hf_config, HF_CONFIG_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__}.config has no {HF_CONFIG_ATTR!r} entry: the checkpoint was not saved "
            "from a sparsified model"
        )
    return restore_from_state(model, state)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_atomically(write, final_path: str) -> None:
    tmp = final_path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_materialized(model: torch.nn.Module, action: str) -> None:
    """Refuse weights that live nowhere (``meta``) or only in shards (FSDP2 ``DTensor``).

    Copying into a ``meta`` parameter is a silent no-op in PyTorch, so without this check a
    restore into an accelerate-offloaded model would leave the offloaded layers unchanged.
    """
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise ValueError(
                f"cannot {action}: {name} is on the meta device (offloaded by accelerate or built "
                "with init_empty_weights). Load the weights first, or use save_pretrained + "
                "from_pretrained(device_map=...) + modelopt_sparse.restore_from_pretrained"
            )
        if type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor":
            raise ValueError(
                f"cannot {action}: {name} is sharded (FSDP2 DTensor). Gather the full state first, "
                "e.g. into an unsharded copy of the model with get_model_state_dict(..., "
                "full_state_dict=True), and call this on that copy"
            )


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``path/modelopt_sparse.json`` (conversion state) and ``path/model.safetensors``.

    Tied weights are stored once (``safetensors.torch.save_model``); the JSON records the
    weights file's SHA-256 so that :func:`restore` detects corruption before loading.
    """
    from safetensors.torch import save_model

    _check_materialized(model, "save")
    state = sparse_state(model)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    _replace_atomically(
        lambda tmp: save_model(model, tmp, metadata={"format": "pt", "modelopt_sparse_version": _version()}),
        weights_path,
    )
    record = {
        "sparse_state": state,
        "weights": {"file": WEIGHTS_FILE, "format": "safetensors", "sha256": _sha256(weights_path)},
    }

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)

    _replace_atomically(write_json, os.path.join(path, STATE_FILE))


def _read_record(path: str) -> dict[str, Any]:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"no {STATE_FILE} in {path!r}: not a modelopt_sparse checkpoint")
    try:
        with open(state_path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{state_path} is corrupted (not valid JSON): {err}") from None
    weights = record.get("weights") if isinstance(record, dict) else None
    if not isinstance(weights, dict) or "sparse_state" not in record:
        raise ValueError(f"{state_path} is corrupted: missing 'sparse_state' or 'weights'")
    name, digest = weights.get("file"), weights.get("sha256")
    if not isinstance(name, str) or os.path.basename(name) != name or not isinstance(digest, str):
        raise ValueError(f"{state_path} is corrupted: bad 'weights' entry {weights!r}")
    return record


def _check_weights_fit(model: torch.nn.Module, weights_path: str) -> None:
    """Keys and shapes of the file against the model, allowing for tied (shared) tensors."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{weights_path} is corrupted: {err}") from None
    own = model.state_dict()
    unexpected = sorted(set(shapes) - set(own))
    wrong = sorted(k for k in shapes if k in own and tuple(own[k].shape) != shapes[k])
    groups: dict[tuple, set[str]] = {}
    for key, tensor in own.items():
        if tensor.device.type != "meta" and tensor.numel() > 0:
            groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), set()).add(key)
    shared_with_saved = {k for keys in groups.values() if keys & set(shapes) for k in keys}
    missing = sorted(k for k in own if k not in shapes and k not in shared_with_saved)
    if unexpected or wrong or missing:
        details = []
        if missing:
            details.append(f"missing from the file: {_first(missing)}")
        if unexpected:
            details.append(f"not in the model: {_first(unexpected)}")
        if wrong:
            shown = ", ".join(f"{k} {shapes[k]} vs {tuple(own[k].shape)}" for k in wrong[:4])
            details.append(f"shape mismatch: {shown}" + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""))
        raise ValueError(
            f"architecture mismatch between {weights_path} and {type(model).__name__}: " + "; ".join(details)
        )


def restore(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a :func:`save` checkpoint into a fresh model of the same architecture.

    Checks the JSON, the weights' SHA-256, the weight names and shapes, and the recorded
    conversion against ``model`` first; only then loads the weights and converts. On any
    error the model is left unchanged.
    """
    from safetensors.torch import load_model

    path = os.fspath(path)
    _check_materialized(model, "restore")
    record = _read_record(path)
    weights_path = os.path.join(path, record["weights"]["file"])
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"weights file {weights_path} is missing")
    if _sha256(weights_path) != record["weights"]["sha256"]:
        raise ValueError(f"{weights_path} is corrupted: its SHA-256 does not match {STATE_FILE}")
    _check_weights_fit(model, weights_path)
    plan = _plan(model, record["sparse_state"])
    load_model(model, weights_path, strict=True)
    apply_states(model, plan, record["sparse_state"].get("config"))
    return model
