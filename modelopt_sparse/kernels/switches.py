"""Environment switches of the kernel engines (``MODELOPT_SPARSE_*``)."""

from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """A 0/1 environment switch: unset or empty gives ``default``; anything other than 0 or
    1 is a mistake worth hearing about (ValueError)."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"
